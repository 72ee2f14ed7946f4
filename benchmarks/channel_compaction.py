"""Parameters, MACs and CPU inference latency of a channel-pruned model, dense vs compacted.

    python benchmarks/channel_compaction.py --model resnet20 --sparsity 0.5

The pruned channels are chosen by PDP's channel scores on the model's initial weights (the architecture,
not the accuracy, is what is measured here). Latency: median over repeats, dense and compacted timed in
turn in one process. Writes benchmarks/results/channel_compaction_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, compact, count_macs_and_parameters
from pdprune.models import build_model

RESULTS = Path(__file__).parent / "results"


def latency_ms(models: dict[str, torch.nn.Module], batch: torch.Tensor, repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(batch)
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(batch)
                times[name].append(1e3 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    example = torch.randn(1, 3, 32, 32)
    dense = build_model(args.model, (3, 32, 32), 10).eval()
    pruned = build_model(args.model, (3, 32, 32), 10)
    pruned.load_state_dict(dense.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = PDPPruner(pruned, PruningConfig(sparsity=args.sparsity, structure="channel",
                                                 schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)), example_inputs=example)
    pruner.finalize()
    report = pruner.report()
    small = compact(pruned, example).eval()

    rows = {}
    for name, model in (("dense", dense), ("compacted", small)):
        macs, parameters = count_macs_and_parameters(model, example)
        rows[name] = {"parameters": parameters, "macs": macs}
    for batch_size in (1, 64):
        batch = torch.randn(batch_size, 3, 32, 32)
        times = latency_ms({"dense": dense, "compacted": small}, batch, args.repeats)
        for name, values in times.items():
            rows[name][f"latency_ms_batch{batch_size}"] = statistics.median(values)
            rows[name][f"latency_spread_ms_batch{batch_size}"] = [min(values), max(values)]
    groups = len(report.groups)
    pruned_channels = sum(g.pruned for g in report.groups)
    channels = sum(g.channels for g in report.groups)
    result = {
        "args": vars(args), "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows,
        "groups": groups, "pruned_channels": pruned_channels, "channels_in_groups": channels,
        "left_dense": dict(report.skipped), "warnings": [str(w.message) for w in caught],
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"channel_compaction_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    d, c = rows["dense"], rows["compacted"]
    lines = [
        f"{args.model}, {100 * args.sparsity:g}% of the channels of {groups} prunable groups removed "
        f"({pruned_channels} of {channels}); CPU ({result['machine']}), torch {torch.__version__}, median of {args.repeats}",
        "",
        "| | parameters | MACs | latency batch 1 (ms) | latency batch 64 (ms) |",
        "|---|---|---|---|---|",
        f"| dense | {d['parameters']:,} | {d['macs'] / 1e6:.1f} M | {d['latency_ms_batch1']:.2f} | {d['latency_ms_batch64']:.1f} |",
        f"| compacted | {c['parameters']:,} | {c['macs'] / 1e6:.1f} M | {c['latency_ms_batch1']:.2f} | {c['latency_ms_batch64']:.1f} |",
        f"| ratio | {c['parameters'] / d['parameters']:.2f} | {c['macs'] / d['macs']:.2f} | "
        f"{d['latency_ms_batch1'] / c['latency_ms_batch1']:.2f}x faster | {d['latency_ms_batch64'] / c['latency_ms_batch64']:.2f}x faster |",
    ]
    if report.skipped:
        lines += ["", "Left dense: " + "; ".join(f"{k} ({v})" for k, v in report.skipped.items())]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
