"""Is the N:M pattern still being chosen? PDP (paper's fixed tau, annealed) against SR-STE, per epoch.

After every epoch, for each pruned layer's raw weights (before the mask), the n largest magnitudes of
every group of m are the kept set; the script reports the share of kept weights that were not kept at
the end of the epoch before. A pattern that no longer changes was chosen for good. ResNet-20 on the
bundled digits at 1:4, the settings of `benchmarks/configs/digits_resnet20_hard_cut.toml` (15 epochs,
warm-up 2, target at epoch 8, anneal to a hard mask by epoch 13), 3 seeds; a few minutes on one core.

    python benchmarks/mask_churn.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from pdprune import PDPPruner, PruningConfig
from pdprune.baselines import MethodSpec, build_baseline
from pdprune.baselines.srste import nm_keep_mask
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.schedule import ScheduleConfig
from pdprune.train import PruningMethod, TrainConfig, train

N, M = 1, 4
EPOCHS, WARMUP, RAMP_END, ANNEAL_END = 15, 2, 8, 13
METHODS = ("pdp", "pdp anneal", "srste")


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


def run(method: str, seed: int) -> tuple[list[float], float]:
    digits = load_dataset("digits")
    config = TrainConfig(epochs=EPOCHS, batch_size=64, learning_rate=0.05, weight_decay=5e-4, seed=seed)
    steps_per_epoch = digits.steps_per_epoch(config.batch_size)
    torch.manual_seed(seed)
    model = build_model("resnet20", digits.input_shape, digits.num_classes)
    example = digits.train_inputs[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first convolution (1 input channel) stays dense in every method
        if method == "srste":
            pruner = build_baseline("srste", model, MethodSpec(1 - N / M, f"{N}:{M}", WARMUP, RAMP_END, steps_per_epoch), example)
        else:
            schedule = ScheduleConfig(warmup_epochs=WARMUP, ramp_end_epoch=RAMP_END, steps_per_epoch=steps_per_epoch,
                                      anneal_end_epoch=ANNEAL_END if method == "pdp anneal" else None)
            pruner = PDPPruner(model, PruningConfig(sparsity=1 - N / M, structure=f"{N}:{M}", schedule=schedule), example_inputs=example)
        probe = ChurnProbe(pruner, model, steps_per_epoch)
        result = train(model, digits, config, probe, progress=False)
    return probe.churn, result.accuracy["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_churn_digits"))
    args = parser.parse_args()
    results = {method: [run(method, seed) for seed in args.seeds] for method in METHODS}
    lines = [f"Share of kept weights new since the epoch before (%), ResNet-20, bundled digits, {N}:{M}, mean of seeds {args.seeds}",
             "", "| epoch | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for index in range(EPOCHS - 1):
        cells = [f"{100 * statistics.mean(churn[index] for churn, _ in results[method]):.2f}" for method in METHODS]
        lines.append(f"| {index + 2} | " + " | ".join(cells) + " |")
    accuracies = [f"{100 * statistics.mean(accuracy for _, accuracy in results[method]):.2f}" for method in METHODS]
    lines.append("| test accuracy after finalize() | " + " | ".join(accuracies) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({method: [{"seed": seed, "churn": churn, "test_accuracy": accuracy}
                                                                   for seed, (churn, accuracy) in zip(args.seeds, rows)]
                                                          for method, rows in results.items()}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    epochs = range(2, EPOCHS + 1)
    for method in METHODS:
        axes.plot(epochs, [100 * statistics.mean(churn[i] for churn, _ in results[method]) for i in range(EPOCHS - 1)], marker="o", label=method)
    for epoch, text in ((WARMUP, "warm-up ends"), (RAMP_END, "target reached"), (ANNEAL_END, "anneal ends")):
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
