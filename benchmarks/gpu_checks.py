"""Checks and measurements that need an NVIDIA GPU; they are not part of `make test` (CI has no GPU).

    python benchmarks/gpu_checks.py          # exits non-zero if a check fails

1. PDP's CUDA paths (selection-based thresholds, compiled Triton kernels, N:M, channels) against the
   straightforward oracle, over training steps: same thresholds and masked weights.
2. A training run resumed from its epoch checkpoint on CUDA ends where the uninterrupted run ends.
3. A finalized 2:4 model converted with `pdprune.semi_structured.to_semi_structured`: same outputs as
   the dense model with zeros, and the speed of a 2:4 semi-structured Linear against the dense one.
Writes benchmarks/results/gpu_checks.json and .md.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, is_nm_sparse
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.semi_structured import to_semi_structured
from pdprune.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"


def check_against_oracle(structure: str, shape: tuple[int, ...]) -> float:
    """Largest difference between the fast masked weight and the oracle's over 10 training steps."""
    torch.manual_seed(0)
    layer = (nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], 3)).cuda()
    model = nn.Sequential(layer)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.9, structure=structure, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=2, steps_per_epoch=4)))
    mask = layer.parametrizations.weight[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.randn(16, shape[1], device="cuda") if len(shape) == 2 else torch.randn(16, shape[1], 8, 8, device="cuda")
    worst = 0.0
    for _ in range(10):
        original = layer.parametrizations.weight.original
        reference = original * mask.soft_mask(original, mask.sparsity)
        worst = max(worst, float((layer.weight - reference).abs().max() / original.abs().max()))
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    return worst


def check_channels() -> float:
    model = build_model("resnet20", (3, 32, 32), 10).cuda()
    example = torch.randn(2, 3, 32, 32, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)), example_inputs=example)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        nn.functional.cross_entropy(model(example), torch.tensor([1, 2], device="cuda")).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    pruner.finalize()
    return sum(group.pruned for group in pruner.report().groups) / sum(group.channels for group in pruner.report().groups)


def check_resume() -> float:
    """Largest weight difference between a 2-epoch run and one resumed from the first's epoch-1 checkpoint.

    The checkpoint is loaded onto the GPU, data order included (once broken: the generator's state).
    """
    digits = load_dataset("digits").subset(256, 100)
    schedule = ScheduleConfig(warmup_epochs=0, ramp_end_epoch=2, steps_per_epoch=digits.steps_per_epoch(32))
    models = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(2):  # the first run leaves its epoch-1 checkpoint behind; the second resumes from it
            torch.manual_seed(0)
            model = build_model("mlp", digits.input_shape, digits.num_classes).cuda()
            pruner = PDPPruner(model, PruningConfig(sparsity=0.8, schedule=schedule))
            train(model, digits, TrainConfig(epochs=2, batch_size=32), pruner, checkpoint_path=Path(folder) / "run.ckpt", progress=False)
            models.append(model)
    return max(float((a - b).abs().max()) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def semi_structured(features: int = 4096, batch: int = 4096, repeats: int = 50) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, features)).cuda()
    PDPPruner(model, PruningConfig(structure="2:4", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0))).finalize()
    assert all(is_nm_sparse(m.weight, 2, 4) for m in model if isinstance(m, nn.Linear))
    model = model.half().eval()
    x = torch.randn(batch, features, device="cuda", dtype=torch.float16)
    results: dict[str, float] = {"features": features, "batch": batch}
    with torch.inference_mode():
        dense_out = model(x)
        results["dense_ms"] = statistics.median(_time(lambda: model(x), repeats))
        for backend in ("cutlass", "cusparselt"):
            if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
                continue
            try:
                sparse = to_semi_structured(copy.deepcopy(model), backend=backend)
                difference = float((sparse(x) - dense_out).abs().max() / dense_out.abs().max())
                milliseconds = statistics.median(_time(lambda: sparse(x), repeats))
            except RuntimeError as error:
                results[f"{backend}_unavailable"] = str(error).splitlines()[0][:200]
                continue
            results[f"{backend}_ms"], results[f"{backend}_relative_max_difference"] = milliseconds, difference
            results[f"{backend}_speedup"] = results["dense_ms"] / milliseconds
    return results


def _time(function, repeats: int) -> list[float]:
    for _ in range(5):
        function()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - started))
    return times


def main() -> None:
    assert torch.cuda.is_available(), "these checks need a CUDA GPU"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    results["oracle_max_relative_difference"] = {
        f"{structure} {shape}": check_against_oracle(structure, shape)
        for structure, shape in [("unstructured", (3072, 768)), ("unstructured", (64, 40)), ("2:4", (1024, 768)), ("1:4", (32, 64, 3, 3))]
    }
    results["channel_fraction_pruned"] = check_channels()
    results["resume_max_difference"] = check_resume()
    results["semi_structured_2_4"] = semi_structured()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_checks.json").write_text(json.dumps(results, indent=1) + "\n")
    s = results["semi_structured_2_4"]
    lines = [f"GPU checks on {results['device']} (torch {results['torch']}), `python benchmarks/gpu_checks.py`", "",
             "| check | result |", "|---|---|"]
    lines += [f"| fast vs oracle masked weight, {name} (max relative difference over 10 steps) | {value:.1e} |" for name, value in results["oracle_max_relative_difference"].items()]
    lines.append(f"| ResNet-20 channel groups pruned after finalize (target 50%) | {100 * results['channel_fraction_pruned']:.1f}% |")
    lines.append(f"| run resumed from its epoch checkpoint vs uninterrupted run (max weight difference) | {results['resume_max_difference']:.1e} |")
    for backend in ("cutlass", "cusparselt"):
        if f"{backend}_ms" in s:
            lines.append(f"| 2:4 semi-structured ({backend}) vs dense fp16, two {s['features']}x{s['features']} Linear, batch {s['batch']}: "
                         f"output difference; time dense / sparse (median of 50) | {s[f'{backend}_relative_max_difference']:.1e}; "
                         f"{s['dense_ms']:.3f} ms / {s[f'{backend}_ms']:.3f} ms = {s[f'{backend}_speedup']:.2f}x |")
        elif f"{backend}_unavailable" in s:
            lines.append(f"| 2:4 semi-structured ({backend}) | not available: {s[f'{backend}_unavailable']} |")
    (RESULTS / "gpu_checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failures = [name for name, value in results["oracle_max_relative_difference"].items() if value > 1e-4]
    differences = [value for key, value in s.items() if key.endswith("relative_max_difference")]
    if failures or abs(results["channel_fraction_pruned"] - 0.5) > 0.01 or results["resume_max_difference"] > 1e-5:
        raise SystemExit(f"GPU checks failed: {failures or 'channels or resume'}")
    if not differences or max(differences) > 1e-2:
        raise SystemExit("GPU checks failed: semi-structured")


if __name__ == "__main__":
    main()
