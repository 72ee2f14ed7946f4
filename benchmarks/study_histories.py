"""What the per-epoch accuracies of a benchmark grid show: per method and setting, the lowest accuracy
after warm-up (where the ramp hurts), the soft model's accuracy at the last epoch, the hard cut's cost
(accuracy after `finalize()` minus that), the accuracy after `finalize()`, the largest share of a tensor's weight energy the hard cut
removed (`PDPPruner.hard_cut`; n/a for runs recorded before it), the accuracy once BatchNorm was
re-estimated (n/a: not recorded), and the training loss of the last three epochs (rising at the end:
the schedule is hurting); one value per seed, in the seeds' order. The README's study quotes these.

    python benchmarks/study_histories.py benchmarks/results/quick benchmarks/results/quick_study
    python benchmarks/study_histories.py benchmarks/results/cifar10_resnet56_pretrained --after-epoch 0
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
            energy, later = run.get("hard_cut_max"), history[args.after_epoch :]
            recalibrated = run.get("accuracy_bn_recalibrated")
            rows[(folder.name, run["method"], setting)].append((
                str(run["seed"]), f"{100 * min(later):.1f}" if later else "n/a", f"{100 * history[-1]:.2f}", f"{100 * (final - history[-1]):+.2f}", f"{100 * final:.2f}",
                "n/a" if energy is None else f"{100 * energy:.2f}",
                "n/a" if recalibrated is None else f"{100 * recalibrated[split]:.2f}",
                " → ".join(f"{epoch['loss']:.3f}" for epoch in run["history"][-3:]),
            ))
    print(f"| grid | method | setting | seed | lowest accuracy from epoch {args.after_epoch + 1} (%) | soft model, last epoch (%) "
          "| hard cut - soft model (points) | after finalize() (%) | weight energy the hard cut removed (max, %) | BatchNorm re-estimated (%) "
          "| training loss, last 3 epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (grid, method, setting), runs in sorted(rows.items()):
        columns = [", ".join(values) for values in zip(*sorted(runs, key=lambda run: int(run[0])))]
        print(f"| {grid} | {method} | {setting} | " + " | ".join(columns) + " |")


if __name__ == "__main__":
    main()
