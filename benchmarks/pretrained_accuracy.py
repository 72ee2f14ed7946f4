"""Accuracy of the pretrained CIFAR-10 ResNets (akamaster checkpoints) before any pruning: the reference
for the pretrained grid. They trained on all 50,000 training images, so only the test column is held out.

    PDPRUNE_DATA=../shared/data python benchmarks/pretrained_accuracy.py

Writes benchmarks/results/pretrained_accuracy.md.
"""

from __future__ import annotations

from pathlib import Path

from pdprune.data import data_dir, load_dataset
from pdprune.models import build_model, load_pretrained
from pdprune.train import evaluate_splits

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    cifar = load_dataset("cifar10")
    lines = ["| model | " + " | ".join(f"{split} accuracy (%)" for split in cifar.evaluations) + " |", "|---|" + "---|" * len(cifar.evaluations)]
    print("\n".join(lines))
    for path in sorted((data_dir() / "resnet_cifar10_akamaster").glob("resnet*.th")):
        name = path.name.split("-")[0]
        model = load_pretrained(build_model(name, cifar.input_shape, cifar.num_classes), path)
        lines.append(f"| {name} | " + " | ".join(f"{100 * accuracy:.2f}" for accuracy in evaluate_splits(model, cifar).values()) + " |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretrained_accuracy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
