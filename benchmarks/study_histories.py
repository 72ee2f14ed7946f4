"""What the per-epoch accuracies of a benchmark grid show: per method and setting, the lowest accuracy
after warm-up (where the ramp hurts) and the hard cut's cost (accuracy after `finalize()` minus the soft
model's at the last epoch). The README's study quotes these.

    python benchmarks/study_histories.py benchmarks/results/quick benchmarks/results/quick_study
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="grid result folders (each with results.jsonl)")
    parser.add_argument("--after-epoch", type=int, default=3, help="the lowest accuracy from this epoch on (default: %(default)s)")
    args = parser.parse_args()
    rows = defaultdict(list)
    for folder in args.results:
        for line in (folder / "results.jsonl").read_text().splitlines():
            run = json.loads(line)
            split, final = next(iter(run["accuracy"].items()))
            history = [epoch[f"{split}_accuracy"] for epoch in run["history"]]
            setting = run["structure"] if run["structure"] != "unstructured" else f"{100 * run['target_sparsity']:g}%"
            rows[(folder.name, run["method"], setting)].append((min(history[args.after_epoch :]), final - history[-1]))
    print(f"| grid | method | setting | seeds | lowest accuracy from epoch {args.after_epoch + 1} (%) | hard cut - soft model (points) |")
    print("|---|---|---|---|---|---|")
    for (grid, method, setting), runs in sorted(rows.items()):
        lowest = ", ".join(f"{100 * low:.1f}" for low, _ in runs)
        cuts = ", ".join(f"{100 * cut:+.2f}" for _, cut in runs)
        print(f"| {grid} | {method} | {setting} | {len(runs)} | {lowest} | {cuts} |")


if __name__ == "__main__":
    main()
