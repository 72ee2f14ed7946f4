"""PDP in your own training loop: an MLP pruned while it trains on the bundled handwritten digits.

    python examples/train_loop.py                      # 90% unstructured, 30 epochs (a minute on a CPU)
    python examples/train_loop.py --structure 2:4      # N:M, annealed to a hard mask before the end
    python examples/train_loop.py --smoke              # a few seconds: 2 epochs on 256 images

Guide: docs/guides/training-loop.md.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import pdprune
from pdprune.data import batches, load_dataset
from pdprune.train import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--structure", default="unstructured", help="'unstructured', an N:M pattern such as '2:4', or 'channel'")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="a run of seconds: 2 epochs on 256 images")
    args = parser.parse_args(argv)
    epochs = 2 if args.smoke else args.epochs

    torch.manual_seed(0)
    data = load_dataset("digits")
    if args.smoke:
        data = data.subset(256, 100)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batch_size = 64
    structured = args.structure != "unstructured"
    schedule = pdprune.ScheduleConfig(
        warmup_epochs=0.1 * epochs, ramp_end_epoch=0.5 * epochs,             # dense first, at the target from half-way
        anneal_end_epoch=0.9 * epochs if structured else None,               # N:M and channels: hard before the end
        anneal_soft_gradient=structured and args.structure != "channel",
        steps_per_epoch=data.steps_per_epoch(batch_size),
    )
    config = pdprune.PruningConfig(sparsity=args.sparsity, structure=args.structure, schedule=schedule,
                                   straight_through=schedule.anneal_soft_gradient)
    pruner = pdprune.PDPPruner(model, config, example_inputs=data.train_inputs[:2])

    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for x, y in batches(data.train_inputs, data.train_labels, batch_size, generator):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()                                   # after every optimizer step
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, sparsity now {pruner.report().sparsity:.1%}")

    model = pruner.finalize()                               # a plain nn.Module at the exact target
    report = pruner.report()
    print(report.table())
    result = {"sparsity": report.sparsity, "target": report.target, "accuracy": evaluate(model, *data.evaluations["test"])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
