"""Training-step time and peak memory of PDP and its peers relative to dense training, side by side.

    python benchmarks/step_overhead.py                  # CPU, 2 threads
    python benchmarks/step_overhead.py --compile        # also every PDP variant and dense under torch.compile
    python benchmarks/step_overhead.py --device cuda

Workloads: (a) ResNet-20 at CIFAR shapes, batch 128; (b) four 768-3072-768 MLP blocks, batch 256;
(c) two BERT-base encoder layers (hidden 768, 12 heads, seq 128), batch 8; (d) LeNet-5 at MNIST
shapes, batch 64, and (e) the digits MLP of `make demo` (64-256-256-10), batch 64: small models where
a fixed cost per pruned tensor shows. Each timed repeat runs
`--steps` training steps (forward, backward, optimizer step, mask update) of every method in turn,
after warm-up steps (which also compile PDP's kernels), so that drift of a shared machine hits all
methods alike. Reported: median step time over repeats, min-max, ratio of medians to dense, and peak
memory above dense (CUDA: allocator peak; CPU: peak of the profiler's tensor-memory timeline). Then,
independent of the device's speed, the ATen operations PDP adds to a training step (counted by a
dispatch mode; views apart), per pruned tensor, in the forward pass, the backward pass and the
optimizer and pruner steps, and the host reads (`.item()` and the like) in each.
PDP budgets are uniform here: global allocation at initialization can give a layer 100% sparsity,
whose mask then costs nothing, which would flatter the measurement.

The third-party peers (pip install 'pdprune[peers]') run through their pdprune adapters, as in the
benchmark grids: PQuantML's PDP at its target (its full top-k and two-way softmax in every forward
cost the same at any budget, so its global budgets are kept), and coremltools' MagnitudePruner with
its mask recomputed at every step (as at each update of its ramp) and at its target (mask fixed).

Writes benchmarks/results/step_overhead_<device>.json and .md (or `--out STEM`.json and .md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils._python_dispatch import TorchDispatchMode

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.baselines import MethodSpec, build_baseline
from pdprune.models import build_model
from pdprune.models.transformer import EncoderLayer
from pdprune.masks import midpoint_threshold, pruned_count, temperature_for

RESULTS = Path(__file__).parent / "results"
AT_TARGET = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)
PRUNABLE = (nn.Conv2d, nn.Linear)


class MLPBlock(nn.Module):
    def __init__(self, width: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class EncoderStack(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(768, 12, 3072, dropout=0.0) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.device], tuple[torch.Tensor, torch.Tensor | None]]]] = {
    "(a) ResNet-20, batch 128": (
        lambda: build_model("resnet20", (3, 32, 32), 10),
        lambda device: (torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)),
    ),
    "(b) 4 MLP blocks 768-3072-768, batch 256": (
        lambda: nn.Sequential(*[MLPBlock() for _ in range(4)]),
        lambda device: (torch.randn(256, 768, device=device), None),
    ),
    "(c) 2 BERT-base layers, seq 128, batch 8": (
        EncoderStack,
        lambda device: (torch.randn(8, 128, 768, device=device), None),
    ),
    "(d) LeNet-5, MNIST shapes, batch 64": (
        lambda: build_model("lenet5", (1, 28, 28), 10),
        lambda device: (torch.randn(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)),
    ),
    "(e) digits MLP 64-256-256-10, batch 64": (
        lambda: build_model("mlp", (64,), 10),
        lambda device: (torch.randn(64, 64, device=device), torch.randint(0, 10, (64,), device=device)),
    ),
}
COMPILED = ("dense", "PDP 90%", "PDP 2:4", "PDP channel 50%")
"""The methods that `--compile` also measures under torch.compile (the peers' masks are eager code)."""


class StraightforwardPDP(nn.Module):
    """PDP as first written (and kept as the tests' oracle): a full sort for t at every forward, the soft
    mask by autograd, tau relative to t^2."""

    def __init__(self, sparsity: float, temperature: float = 0.05) -> None:
        super().__init__()
        self.sparsity, self.temperature = sparsity, temperature

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        squared = weight.detach().square().reshape(-1)
        threshold = midpoint_threshold(squared, pruned_count(self.sparsity, squared.numel()))
        tau = temperature_for(threshold, self.temperature, relative=True)
        return weight * torch.sigmoid((weight.square() - threshold.square()) / tau)


class StraightforwardPruner:
    def __init__(self, model: nn.Module, sparsity: float) -> None:
        for module in model.modules():
            if isinstance(module, PRUNABLE):
                parametrize.register_parametrization(module, "weight", StraightforwardPDP(sparsity))

    def step(self) -> None:
        pass


class TorchPrune:
    """torch.nn.utils.prune's L1 mask, recomputed every step (remove, then prune again) or, with
    `recompute=False`, fixed: then a step pays only for w·mask forward and grad·mask backward, the floor
    of any mask applied to the weights during training, whatever computes it."""

    def __init__(self, model: nn.Module, sparsity: float, recompute: bool = True) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
        self.sparsity = sparsity
        self.recompute = recompute
        for module in self.layers:
            prune.l1_unstructured(module, "weight", amount=sparsity)

    def step(self) -> None:
        if not self.recompute:
            return
        for module in self.layers:
            prune.remove(module, "weight")
            prune.l1_unstructured(module, "weight", amount=self.sparsity)


class TorchAOPerStep:
    """torch.ao.pruning.WeightNormSparsifier with its mask updated every step (Linear layers only)."""

    def __init__(self, model: nn.Module, sparsity: float) -> None:
        from torch.ao.pruning import WeightNormSparsifier

        self.sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
        config = [{"tensor_fqn": f"{name}.weight"} for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.sparsifier.prepare(model, config)
        self.sparsifier.step()

    def step(self) -> None:
        self.sparsifier.step()


def _pdp(structure: str, sparsity: float, compile_kernels: bool = True) -> Callable[[nn.Module, torch.Tensor], object]:
    def attach(model: nn.Module, example: torch.Tensor) -> object:
        config = PruningConfig(sparsity=sparsity, structure=structure, allocation="uniform", schedule=AT_TARGET, compile_kernels=compile_kernels)
        return PDPPruner(model, config, example_inputs=example[:1])

    return attach


def _peer(name: str, structure: str, sparsity: float, ramp_steps: int) -> Callable[[nn.Module, torch.Tensor], object]:
    """A peer's pdprune adapter, pruning from the first step. With `ramp_steps`, one step per epoch and a
    ramp that long: coremltools updates its mask at every step. Without, an epoch of 10^9 steps, so that
    PQuantML's once-per-epoch hooks never run while timing (per real epoch, they cost one forward)."""

    def attach(model: nn.Module, example: torch.Tensor) -> object:
        steps_per_epoch = 1 if ramp_steps else 10**9
        return build_baseline(name, model, MethodSpec(sparsity, structure, 0, ramp_steps, steps_per_epoch), example[:1])

    return attach


METHODS: dict[str, Callable[[nn.Module, torch.Tensor], object | None]] = {
    "dense": lambda model, example: None,
    "PDP 90%, straightforward": lambda model, example: StraightforwardPruner(model, 0.9),
    "PDP 90%": _pdp("unstructured", 0.9),
    "PDP 90%, eager kernels": _pdp("unstructured", 0.9, compile_kernels=False),
    "PDP 2:4": _pdp("2:4", 0.5),
    "PDP channel 50%": _pdp("channel", 0.5),
    "PQuantML PDP 90%": _peer("pquant_pdp", "unstructured", 0.9, ramp_steps=0),
    "PQuantML PDP channel 50%": _peer("pquant_pdp", "channel", 0.5, ramp_steps=0),
    "coremltools Magnitude 90%, per step": _peer("coreml_magnitude", "unstructured", 0.9, ramp_steps=1000),
    "coremltools Magnitude 2:4, per step": _peer("coreml_magnitude", "2:4", 0.5, ramp_steps=1000),
    "coremltools Magnitude 90%, at target (mask fixed)": _peer("coreml_magnitude", "unstructured", 0.9, ramp_steps=0),
    "torch.ao WeightNorm 90%, per step (Linear only)": lambda model, example: TorchAOPerStep(model, 0.9),
    "torch.nn.utils.prune L1 90%, per step": lambda model, example: TorchPrune(model, 0.9),
    "fixed mask, never updated (floor of any mask)": lambda model, example: TorchPrune(model, 0.9, recompute=False),
}


def _setup(workload: str, method: str, device: torch.device, parts: bool = False):
    """One training step of `method` (a name of METHODS, or of COMPILED with ", compiled") as a function;
    with `parts`, as three functions: forward (returning the loss), backward, optimizer and mask steps."""
    build, batch = WORKLOADS[workload]
    x, y = batch(device)
    torch.manual_seed(0)
    model = build().to(device)
    base = method.removesuffix(", compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepper = METHODS[base](model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    run = torch.compile(model) if method.endswith(", compiled") else model

    def forward() -> torch.Tensor:
        out = run(x)
        return nn.functional.cross_entropy(out, y) if y is not None else out.square().mean()

    def steps() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stepper is not None:
            stepper.step()

    if parts:
        return forward, lambda loss: loss.backward(), steps, stepper

    def step() -> None:
        out = run(x)
        loss = nn.functional.cross_entropy(out, y) if y is not None else out.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stepper is not None:
            stepper.step()

    return step


class _OperationCounter(TorchDispatchMode):
    """Counts the ATen operations that run (views apart: they launch no kernel) and the host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += not func.is_view
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


PHASES = ("forward", "backward", "optimizer and mask steps")


def count_operations(workload: str, method: str, device: torch.device) -> dict[str, object]:
    """ATen operations and host reads of one training step after two warm-up steps, per phase, and
    the number of tensors the method masks."""
    forward, backward, update, stepper = _setup(workload, method, device, parts=True)
    for _ in range(2):
        backward(forward())
        update()
    counters = {phase: _OperationCounter() for phase in PHASES}
    with counters["forward"]:
        loss = forward()
    with counters["backward"]:
        backward(loss)
    with counters["optimizer and mask steps"]:
        update()
    masked = len(stepper.tensor_names) if isinstance(stepper, PDPPruner) else None
    return {"masked_tensors": masked, **{phase: {"operations": c.operations, "host_reads": c.host_reads} for phase, c in counters.items()}}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_times(workload: str, methods: list[str], device: torch.device, steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    steppers = {method: _setup(workload, method, device) for method in methods}
    for step in steppers.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(repeats):
        for method, step in steppers.items():
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            _synchronize(device)
            times[method].append((time.perf_counter() - started) / steps)
    return times


def peak_memory_mb(workload: str, method: str, device: torch.device, steps: int = 3) -> float:
    """Peak tensor memory of a few steps: on CUDA the allocator's peak; on a CPU the peak of the
    profiler's memory timeline (every tensor allocated and freed on the CPU) over steps after warm-up,
    which unlike resident memory leaves out the interpreter, compiled code and heap fragmentation."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = _setup(workload, method, device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**20
    step = _setup(workload, method, device)
    for _ in range(2):
        step()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")  # the timeline's export is deprecated for CUDA, the only replacement
        with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as profiler:
            for _ in range(steps):
                step()
        timeline = Path(folder) / "memory.json"
        try:
            profiler.export_memory_timeline(str(timeline), device="cpu")
        except AssertionError:  # the profiler cannot trace some in-place rewrites (torch.nn.utils.prune's)
            return math.nan
        _, sizes = json.loads(timeline.read_text())
    return max(sum(categories) for categories in sizes) / 2**20


def machine_name(device: torch.device, threads: int) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {threads} threads"


def save(stem: Path, args: argparse.Namespace, machine: str, results: dict, lines: list[str]) -> None:
    """Write `results` with the run's arguments to `stem`.json and the Markdown `lines` to `stem`.md; print them."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": {**vars(args), "out": str(stem)}, "machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _megabytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="result files without suffix (default: benchmarks/results/step_overhead_<device>)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="WORKLOAD")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--compile", action="store_true", help=f"also time {', '.join(COMPILED)} under torch.compile".replace("%", "%%"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = ["dense", *[m for m in args.methods if m != "dense"]]
    if args.compile:
        methods += [f"{m}, compiled" for m in COMPILED if m in methods]
    results = {}
    for workload in args.workloads:
        times = measure_times(workload, methods, device, args.steps, args.repeats, args.warmup)
        dense_time = statistics.median(times["dense"])
        dense_memory = peak_memory_mb(workload, "dense", device)
        prunable = sum(m.weight.numel() * 4 for m in WORKLOADS[workload][0]().modules() if isinstance(m, PRUNABLE)) / 2**20
        results[workload] = {"prunable_weights_mb": prunable, "methods": {}}
        for method in methods:
            extra = peak_memory_mb(workload, method, device) - dense_memory
            row = {
                "median_ms": 1e3 * statistics.median(times[method]), "min_ms": 1e3 * min(times[method]), "max_ms": 1e3 * max(times[method]),
                "ratio_to_dense": statistics.median(times[method]) / dense_time, "extra_peak_memory_mb": None if math.isnan(extra) else extra,
            }
            results[workload]["methods"][method] = row
            print(f"{workload:44s} {method:48s} {row['median_ms']:9.1f} ms  x{row['ratio_to_dense']:.3f}  {extra:+7.1f} MB", flush=True)

    operations = {workload: {m: count_operations(workload, m, device) for m in methods if not m.endswith(", compiled")} for workload in args.workloads}
    machine = machine_name(device, args.threads)
    lines = [f"Training-step time, median of {args.repeats} repeats of {args.steps} steps; {machine}; torch {torch.__version__}", "",
             "| workload | method | step (ms) | min-max (ms) | / dense | peak memory above dense (MB) |", "|---|---|---|---|---|---|"]
    for workload, entry in results.items():
        for method, row in entry["methods"].items():
            lines.append(f"| {workload} | {method} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                         f"{row['ratio_to_dense']:.3f} | {_megabytes(row['extra_peak_memory_mb'])} |")
        lines.append(f"| {workload} | (one copy of the prunable weights) | | | | {entry['prunable_weights_mb']:.0f} |")
    lines += ["", "ATen operations (views apart) and host reads in one training step, and what PDP adds per masked tensor:", "",
              "| workload | method | masked tensors | forward ops | backward ops | step ops | added ops per masked tensor | host reads: forward, backward, steps |",
              "|---|---|---|---|---|---|---|---|"]
    for workload, rows in operations.items():
        dense = sum(rows["dense"][phase]["operations"] for phase in PHASES)
        for method, row in rows.items():
            total = sum(row[phase]["operations"] for phase in PHASES)
            added = f"{(total - dense) / row['masked_tensors']:.1f}" if row["masked_tensors"] else ""
            reads = ", ".join(str(row[phase]["host_reads"]) for phase in PHASES)
            lines.append(f"| {workload} | {method} | {row['masked_tensors'] or ''} | {row['forward']['operations']} | {row['backward']['operations']} | "
                         f"{row['optimizer and mask steps']['operations']} | {added} | {reads} |")
        results[workload]["operations"] = rows
    save(args.out or RESULTS / f"step_overhead_{device.type}", args, machine, results, lines)


if __name__ == "__main__":
    main()
