"""What a "pruned" channel still carries when only its filter is zeroed, as PQuantML's and coremltools'
channel pruning do, against removing it, as pdprune and Torch-Pruning do.

    PDPRUNE_DATA=../shared/data python benchmarks/channel_passthrough.py

On the pretrained CIFAR-10 ResNet-56, without training: in every residual block, the half of the first
convolution's filters with the smallest L2 norms (the channels the channel grids prune) are

- zeroed, with the BatchNorm after them kept (its running mean set to 0, as training with a zero filter
  makes it): each such channel still passes the constant ReLU(beta) on to the next convolution, and
  nothing can be removed; or
- removed: filter and BatchNorm zeroed, so the channel gives 0 and compacts away exactly.

The gap between the two is what the peers' models keep and cannot shed. Writes
benchmarks/results/channel_passthrough.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pdprune.data import data_dir, load_dataset
from pdprune.models import build_model, load_pretrained
from pdprune.models.resnet_cifar import BasicBlock
from pdprune.train import evaluate_splits

RESULTS = Path(__file__).parent / "results"
CHECKPOINT = "resnet_cifar10_akamaster/resnet56-4bfd9763.th"


def prune_first_convolutions(model: nn.Module, fraction: float, remove: bool) -> int:
    """Zero the `fraction` of smallest-norm filters of each block's first convolution; with `remove`, their
    BatchNorm too. Returns how many channels were pruned."""
    pruned = 0
    with torch.no_grad():
        for block in (module for module in model.modules() if isinstance(module, BasicBlock)):
            norms = block.conv1.weight.flatten(1).norm(dim=1)
            channels = norms.argsort()[: int(fraction * norms.numel())]
            block.conv1.weight[channels] = 0
            block.bn1.running_mean[channels] = 0
            if remove:
                block.bn1.weight[channels] = 0
                block.bn1.bias[channels] = 0
            pruned += channels.numel()
    return pruned


def main() -> None:
    cifar = load_dataset("cifar10")
    rows = {}
    for label, remove in (("filter zeroed, BatchNorm kept (PQuantML, coremltools)", False), ("channel removed (pdprune, Torch-Pruning)", True)):
        model = load_pretrained(build_model("resnet56", cifar.input_shape, cifar.num_classes), data_dir() / CHECKPOINT).eval()
        pruned = prune_first_convolutions(model, 0.5, remove)
        rows[label] = evaluate_splits(model, cifar)
        print(label, pruned, rows[label], flush=True)
    dense = evaluate_splits(load_pretrained(build_model("resnet56", cifar.input_shape, cifar.num_classes), data_dir() / CHECKPOINT).eval(), cifar)
    splits = list(dense)
    lines = [f"Pretrained ResNet-56, half of every block's first-convolution channels ({pruned} of {2 * pruned}), no training:", "",
             "| channels | " + " | ".join(f"{split} accuracy (%)" for split in splits) + " |", "|---|" + "---|" * len(splits),
             "| dense | " + " | ".join(f"{100 * dense[split]:.2f}" for split in splits) + " |"]
    lines += [f"| {label} | " + " | ".join(f"{100 * accuracy[split]:.2f}" for split in splits) + " |" for label, accuracy in rows.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "channel_passthrough.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
