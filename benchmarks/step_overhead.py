"""Training-step time of PDP relative to dense training, measured side by side in one process.

    python benchmarks/step_overhead.py                 # CPU, 2 threads
    python benchmarks/step_overhead.py --device cuda

Each repeat times `--steps` training steps (forward + backward + optimizer step) of every method in
turn, after warm-up steps, so that drift of a shared machine hits all methods alike. Reports the median
step time over repeats, its spread (min-max), and the ratio of medians to dense. Writes
benchmarks/results/step_overhead_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.models import build_model

RESULTS = Path(__file__).parent / "results"
AT_TARGET = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)


def mlp_stack(blocks: int = 4, width: int = 768, hidden: int = 3072) -> nn.Module:
    """`blocks` residual feed-forward blocks 768 -> 3072 -> 768, as in a BERT-base layer."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, hidden)
            self.down = nn.Linear(hidden, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    return nn.Sequential(*[Block() for _ in range(blocks)])


def workloads() -> dict[str, tuple[Callable[[], nn.Module], Callable[[torch.device], tuple[torch.Tensor, ...]]]]:
    """name -> (model builder, batch maker)."""
    return {
        "resnet20 (CIFAR, batch 128)": (
            lambda: build_model("resnet20", (3, 32, 32), 10),
            lambda device: (torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)),
        ),
        "4 MLP blocks 768-3072-768 (batch 256)": (
            mlp_stack,
            lambda device: (torch.randn(256, 768, device=device), None),
        ),
    }


METHODS: dict[str, Callable[[nn.Module], object | None]] = {
    "dense": lambda model: None,
    "PDP unstructured 90%": lambda model: PDPPruner(model, PruningConfig(sparsity=0.9, allocation="uniform", schedule=AT_TARGET)),
}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    out = model(x)
    return nn.functional.cross_entropy(out, y) if y is not None else out.square().mean()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(workload: str, device: torch.device, steps: int, repeats: int, warmup: int) -> dict[str, dict]:
    build, batch = workloads()[workload]
    x, y = batch(device)
    runs = {}
    for method, attach in METHODS.items():
        torch.manual_seed(0)
        model = build().to(device)
        pruner = attach(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs[method] = (model, pruner, optimizer, [])

    def one_step(model, pruner, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()

    for model, pruner, optimizer, _ in runs.values():
        for _ in range(warmup):
            one_step(model, pruner, optimizer)
    for _ in range(repeats):
        for model, pruner, optimizer, times in runs.values():
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                one_step(model, pruner, optimizer)
            _synchronize(device)
            times.append((time.perf_counter() - started) / steps)
    dense = statistics.median(runs["dense"][3])
    return {
        method: {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times),
            "ratio_to_dense": statistics.median(times) / dense,
        }
        for method, (_, _, _, times) in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = {}
    for workload in workloads():
        results[workload] = measure(workload, device, args.steps, args.repeats, args.warmup)
        for method, row in results[workload].items():
            print(f"{workload:40s} {method:28s} {row['median_ms']:9.2f} ms  x{row['ratio_to_dense']:.3f}", flush=True)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"step_overhead_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results},
        indent=1) + "\n")
    lines = [f"Training-step time, median of {args.repeats} repeats of {args.steps} steps ({machine}, torch {torch.__version__})", "",
             "| workload | method | step (ms) | min-max (ms) | / dense |", "|---|---|---|---|---|"]
    for workload, rows in results.items():
        for method, row in rows.items():
            lines.append(f"| {workload} | {method} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | {row['ratio_to_dense']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
