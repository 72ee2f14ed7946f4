"""Sweep PDP's temperature (relative and absolute) on real data; the README's defaults come from here.

    python benchmarks/temperature_sweep.py --dataset digits --model mlp --seeds 0 1 2

Writes benchmarks/results/temperature_sweep_<dataset>.json and .md (mean and std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
SETTINGS = [("relative", t) for t in (0.003, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0)] + [("absolute", t) for t in (1e-3, 1e-4, 1e-5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.97])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    dataset = load_dataset(args.dataset, args.data_dir)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    schedule = ScheduleConfig(warmup_epochs=round(0.1 * args.epochs, 2), ramp_end_epoch=round(0.5 * args.epochs, 2),
                              steps_per_epoch=dataset.steps_per_epoch(args.batch_size))
    primary = dataset.primary_evaluation
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense_model = build_model(args.model, dataset.input_shape, dataset.num_classes)
        dense = train(dense_model, dataset, TrainConfig(**{**train_config.__dict__, "seed": seed}), progress=False)
        rows.append({"method": "dense", "sparsity": 0.0, "seed": seed, "accuracy": dense.accuracy[primary]})
        for sparsity in args.sparsities:
            for mode, temperature in SETTINGS:
                torch.manual_seed(seed)
                model = build_model(args.model, dataset.input_shape, dataset.num_classes)
                pruner = PDPPruner(model, PruningConfig(sparsity=sparsity, temperature=temperature, temperature_mode=mode, schedule=schedule))
                result = train(model, dataset, TrainConfig(**{**train_config.__dict__, "seed": seed}), pruner, progress=False)
                rows.append({"method": f"{mode} {temperature:g}", "sparsity": sparsity, "seed": seed, "accuracy": result.accuracy[primary]})
                print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"temperature_sweep_{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    lines = [f"PDP temperature sweep: {args.dataset} / {args.model}, {args.epochs} epochs, seeds {args.seeds}, {primary} accuracy (mean ± std)", "",
             "| temperature | " + " | ".join(f"{100 * s:g}% sparse" for s in args.sparsities) + " |",
             "|---|" + "---|" * len(args.sparsities)]
    dense_scores = [100 * r["accuracy"] for r in rows if r["method"] == "dense"]
    lines.append("| dense | " + " | ".join(f"{statistics.mean(dense_scores):.2f} ± {statistics.pstdev(dense_scores):.2f}" for _ in args.sparsities) + " |")
    for mode, temperature in SETTINGS:
        cells = []
        for sparsity in args.sparsities:
            scores = [100 * r["accuracy"] for r in rows if r["method"] == f"{mode} {temperature:g}" and r["sparsity"] == sparsity]
            cells.append(f"{statistics.mean(scores):.2f} ± {statistics.pstdev(scores):.2f}")
        lines.append(f"| {mode} {temperature:g} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
