"""Is the N:M pattern still being chosen? PDP (paper's fixed tau, annealed) against SR-STE, per epoch.

After every epoch, for each pruned layer's raw weights (before the mask), the n largest magnitudes of
every group of m are the kept set; the script reports the share of kept weights that were not kept at
the end of the epoch before. A pattern that no longer changes was chosen for good. It reruns the 1:4
runs of `benchmarks/configs/digits_resnet20_hard_cut.toml` (ResNet-20 on the bundled digits, 15 epochs,
warm-up 2, target at epoch 8, anneal to a hard mask by epoch 13), the annealed run again with the
`straight_through` option, and SR-STE with the same budget, 3 seeds; minutes on one core.

    OMP_NUM_THREADS=1 python benchmarks/mask_churn.py   # one thread, as the grid ran: the same numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from pdprune.baselines.srste import nm_keep_mask
from pdprune.data import load_dataset
from pdprune.experiments import RunSpec, build_method, load_grid
from pdprune.models import build_model
from pdprune.train import PruningMethod, train

GRID = Path(__file__).parent / "configs" / "digits_resnet20_hard_cut.toml"
N, M = 1, 4
METHODS = ("pdp", "pdp anneal", "pdp anneal straight-through", "srste")


class ChurnProbe:
    """Steps `method` and, at the end of every epoch, records how much of the kept set is new."""

    def __init__(self, method: PruningMethod, model: nn.Module, steps_per_epoch: int) -> None:
        self.method, self.steps_per_epoch, self.steps = method, steps_per_epoch, 0
        self.layers = [module for module in model.modules() if parametrize.is_parametrized(module, "weight")]
        self.previous: torch.Tensor | None = None
        self.churn: list[float] = []

    def step(self) -> None:
        self.method.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            kept = torch.cat([nm_keep_mask(layer.parametrizations.weight.original, N, M).flatten() for layer in self.layers])
            if self.previous is not None:
                self.churn.append(float((kept & ~self.previous).sum() / kept.sum()))
            self.previous = kept

    def finalize(self) -> nn.Module:
        return self.method.finalize()

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)


def runs(seeds: list[int]) -> dict[str, list[RunSpec]]:
    """The hard-cut grid's 1:4 PDP runs, the annealed one with `straight_through`, and SR-STE with the
    same budget, by method."""
    pdp = [run for run in load_grid(GRID).runs if run.structure == f"{N}:{M}" and run.seed in seeds]
    through = [replace(run, label=f"{run.label} straight-through", pdp={**run.pdp, "straight_through": True})
               for run in pdp if run.name == "pdp anneal"]
    srste = [replace(run, method="srste", label=None, pdp={}) for run in pdp if run.name == "pdp"]
    return {name: [run for run in pdp + through + srste if run.name == name] for name in METHODS}


def churn_and_accuracy(spec: RunSpec) -> tuple[list[float], float]:
    digits = load_dataset(spec.dataset)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, digits.input_shape, digits.num_classes)
    steps_per_epoch = digits.steps_per_epoch(spec.train.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first convolution (1 input channel) stays dense in every method
        probe = ChurnProbe(build_method(spec, model, digits.train_inputs[:2], steps_per_epoch), model, steps_per_epoch)
        result = train(model, digits, spec.train, probe, progress=False)
    return probe.churn, result.accuracy["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_churn_digits"))
    args = parser.parse_args()
    specs = runs(args.seeds)
    results = {method: [churn_and_accuracy(spec) for spec in specs[method]] for method in METHODS}
    mean_churn = {method: [100 * statistics.mean(values) for values in zip(*(churn for churn, _ in rows))] for method, rows in results.items()}
    first = specs["pdp anneal"][0]
    epochs = range(2, first.train.epochs + 1)
    lines = [f"Share of kept weights new since the epoch before (%), ResNet-20, bundled digits, {N}:{M}, mean of seeds {args.seeds}",
             "", "| epoch | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for index, epoch in enumerate(epochs):
        lines.append(f"| {epoch} | " + " | ".join(f"{mean_churn[method][index]:.2f}" for method in METHODS) + " |")
    accuracies = [f"{100 * statistics.mean(accuracy for _, accuracy in results[method]):.2f}" for method in METHODS]
    lines.append("| test accuracy after finalize() | " + " | ".join(accuracies) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    runs_json = {method: [{"seed": spec.seed, "churn": churn, "test_accuracy": accuracy} for spec, (churn, accuracy) in zip(specs[method], rows)]
                 for method, rows in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(runs_json, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for method in METHODS:
        axes.plot(epochs, mean_churn[method], marker="o", label=method)
    marks = ((first.warmup_epochs, "warm-up ends"), (first.ramp_end_epoch, "target reached"), (first.pdp["schedule"]["anneal_end_epoch"], "anneal ends"))
    for epoch, text in marks:
        axes.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        axes.text(epoch, 0.98, text, transform=axes.get_xaxis_transform(), fontsize=7, rotation=90, va="top", ha="right")
    axes.set_yscale("symlog", linthresh=0.01)  # the tail, where the pattern settles, is what matters
    axes.set_ylim(bottom=0)
    axes.set(xlabel="epoch", ylabel="kept weights new since last epoch (%)", title=f"Is the {N}:{M} pattern still changing?")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
