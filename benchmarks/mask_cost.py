"""What masking the weights costs per training step, apart from the rest of the step.

    python benchmarks/mask_cost.py                      # CPU, 2 threads, the workloads of step_overhead.py

For all prunable weights of a workload, each repeat times side by side: the workload's dense training
step; a fixed mask's forward (w * mask) and backward (grad * mask), the least that any mask applied to
the weights during training costs, whatever computes it; and PDP 90%'s threshold (the band selection
around the last one), forward w * m(w) and backward, each apart. Between repeats the weights move a
little, as an optimizer moves them (untimed), so that every threshold is found afresh. Reported: medians
over repeats, and each cost as a fraction of the dense step, i.e. what it adds to the step's ratio.

Writes benchmarks/results/mask_cost_<device>.json and .md (or `--out STEM`.json and .md).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from step_overhead import (
    AT_TARGET,
    PRUNABLE,
    RESULTS,
    WORKLOADS,
    _setup,
    _synchronize,
    machine_name,
    save,
)

from pdprune import PDPPruner, PruningConfig
from pdprune.masks import pruned_count

PARTS = ("fixed mask: forward", "fixed mask: backward", "PDP: threshold", "PDP: forward", "PDP: backward")


def _timed(device: torch.device, action: Callable[..., object], *args: object) -> tuple[float, object]:
    _synchronize(device)
    started = time.perf_counter()
    result = action(*args)
    _synchronize(device)
    return time.perf_counter() - started, result


def measure(workload: str, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    dense_step = _setup(workload, "dense", device)
    torch.manual_seed(0)
    model = WORKLOADS[workload][0]().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PDPPruner(model, PruningConfig(sparsity=0.9, allocation="uniform", schedule=AT_TARGET))
    masks = [(m.parametrizations.weight[0], m.parametrizations.weight.original) for m in model.modules() if isinstance(m, PRUNABLE)]
    gradients = [torch.randn_like(weight) for _, weight in masks]
    fixed = [(weight.detach().abs() > weight.detach().abs().flatten().kthvalue(pruned_count(0.9, weight.numel())).values).float() for _, weight in masks]
    times: dict[str, list[float]] = {"dense step": [], **{part: [] for part in PARTS}}
    for repeat in range(warmup + repeats):
        with torch.no_grad():
            for _, weight in masks:
                weight.mul_(1 + 1e-4)  # a small move: the last threshold's band still brackets the new one
        seconds = {"dense step": _timed(device, dense_step)[0]}
        for part in PARTS:
            seconds[part] = 0.0
        for (mask, weight), gradient, fixed_mask in zip(masks, gradients, fixed):
            pruned = pruned_count(mask.sparsity, weight.numel())
            seconds["PDP: threshold"] += _timed(device, mask.threshold, weight, pruned)[0]
            elapsed, output = _timed(device, mask, weight)  # the threshold is cached by now
            seconds["PDP: forward"] += elapsed
            seconds["PDP: backward"] += _timed(device, torch.autograd.backward, output, gradient)[0]
            elapsed, output = _timed(device, torch.mul, weight, fixed_mask)
            seconds["fixed mask: forward"] += elapsed
            seconds["fixed mask: backward"] += _timed(device, torch.autograd.backward, output, gradient)[0]
            weight.grad = None
        if repeat >= warmup:
            for name, value in seconds.items():
                times[name].append(value)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="result files without suffix (default: benchmarks/results/mask_cost_<device>)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="WORKLOAD")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for workload in args.workloads:
        times = measure(workload, device, args.repeats, args.warmup)
        dense = statistics.median(times["dense step"])
        results[workload] = {name: {"median_ms": 1e3 * statistics.median(values), "of_dense_step": statistics.median(values) / dense}
                             for name, values in times.items()}
        for name in ("fixed mask", "PDP"):
            total = statistics.median([sum(parts) for parts in zip(*(times[p] for p in PARTS if p.startswith(name)))])
            results[workload][f"{name}: all"] = {"median_ms": 1e3 * total, "of_dense_step": total / dense}
        for name, row in results[workload].items():
            print(f"{workload:44s} {name:22s} {row['median_ms']:8.1f} ms  {100 * row['of_dense_step']:6.1f}% of the dense step", flush=True)

    machine = machine_name(device, args.threads)
    lines = [f"Cost of masking all prunable weights per training step, median of {args.repeats} repeats; {machine}; torch {torch.__version__}", "",
             "| workload | part | ms per step | % of the dense step |", "|---|---|---|---|"]
    for workload, rows in results.items():
        for name, row in rows.items():
            lines.append(f"| {workload} | {name} | {row['median_ms']:.1f} | {100 * row['of_dense_step']:.1f}% |")
    save(args.out or RESULTS / f"mask_cost_{device.type}", args, machine, results, lines)


if __name__ == "__main__":
    main()
