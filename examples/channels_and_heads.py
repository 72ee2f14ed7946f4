"""Channels and heads to a smaller, faster model: a BERT built from a config is pruned by attention heads
and FFN neurons while it trains on SST-2, compacted, and timed against the dense model on the CPU.

    python examples/channels_and_heads.py                    # BERT (4 layers, width 256), 50% of heads and neurons
    python examples/channels_and_heads.py --model resnet20   # a CNN on the bundled digits: 50% of the channels
    python examples/channels_and_heads.py --smoke            # seconds: a tiny BERT, a few steps

The anneal turns the soft mask hard before training ends (without it, the hard cut costs channels
14-25 points: docs/study.md). Guide: docs/guides/channels-and-heads.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import pdprune
from pdprune.data import batches, data_dir, load_dataset
from pdprune.models import build_model


def latency_ms(model: nn.Module, example, repeats: int) -> float:
    """Median forward time in milliseconds, after a warm-up call."""
    model.eval()
    call = (lambda: model(**example)) if isinstance(example, dict) else (lambda: model(example))
    with torch.no_grad():
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def bert_and_data(smoke: bool, directory: Path | None):
    from transformers import BertConfig, BertForSequenceClassification

    if directory is None:
        raise SystemExit("SST-2 is read from a data directory: set PDPRUNE_DATA or pass --data-dir")
    data = load_dataset("sst2", directory) if not smoke else None
    if smoke:  # the first sentences only, tokenized by pdprune's tokenizer: seconds instead of a full load
        import csv

        from pdprune.data.dataset import Dataset
        from pdprune.data.sst2 import WordTokenizer

        with open(directory / "sst2" / "train.tsv", newline="", encoding="utf-8") as file:
            rows = [row for _, row in zip(range(96), csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))]
        tokenizer = WordTokenizer.fit(row["sentence"] for row in rows)
        ids, labels = tokenizer.encode([row["sentence"] for row in rows]), torch.tensor([int(row["label"]) for row in rows])
        data = Dataset("sst2", ids[:64], labels[:64], {"dev": (ids[64:], labels[64:])}, num_classes=2, vocabulary=tuple(tokenizer.vocabulary))
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if smoke else \
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(data.vocabulary), max_position_embeddings=64, **size))

    def inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(**inputs(x), labels=y).loss

    return model, data, inputs, loss, ("classifier",)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", choices=("bert", "resnet20"))
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of the channels (heads) of every group to remove")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="the folder holding sst2/ (default: $PDPRUNE_DATA)")
    parser.add_argument("--out", type=Path, default=Path("compacted.pt"), help="where to save the compacted model")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny model, a few steps")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "bert":
        model, data, inputs, loss, exclude = bert_and_data(args.smoke, data_dir(args.data_dir))
        batch_size, learning_rate = 32, 5e-4
    else:
        data = load_dataset("digits")
        data = data.subset(128, 64) if args.smoke else data
        model = build_model("resnet20", data.input_shape, data.num_classes)
        inputs = lambda x: x  # noqa: E731
        loss = lambda x, y: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        batch_size, learning_rate, exclude = 64, 0.05, ()
    epochs = 1 if args.smoke else args.epochs
    example = inputs(data.train_inputs[:2])                    # a batch as the model takes it: traces coupling
    schedule = pdprune.ScheduleConfig(warmup_epochs=0.1 * epochs, ramp_end_epoch=0.5 * epochs, anneal_end_epoch=0.9 * epochs,
                                      steps_per_epoch=data.steps_per_epoch(batch_size))
    config = pdprune.PruningConfig(sparsity=args.sparsity, structure="channel", exclude=exclude, schedule=schedule)
    pruner = pdprune.PDPPruner(model, config, example_inputs=example)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate) if args.model == "bert" else \
        torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)

    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(data.train_inputs, data.train_labels, batch_size, generator):
            loss(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()
        print(f"epoch {epoch + 1}: the masks prune {pruner.report().groups[0].current:.0%} of each group")
    pruner.finalize()
    report = pruner.report()
    print(report.table())

    small = pdprune.compact(model, example)                    # the pruned channels and heads physically removed
    one = inputs(data.train_inputs[:1])
    dense_macs, dense_parameters = pdprune.count_macs_and_parameters(model, one)
    small_macs, small_parameters = pdprune.count_macs_and_parameters(small, one)
    repeats = 3 if args.smoke else 30
    dense_ms, small_ms = latency_ms(model, one, repeats), latency_ms(small, one, repeats)
    print(f"parameters {dense_parameters:,} -> {small_parameters:,}; MACs {dense_macs:,} -> {small_macs:,}; "
          f"CPU latency, batch 1: {dense_ms:.2f} ms -> {small_ms:.2f} ms")
    pdprune.save_compacted(args.out, small, example)          # pdprune.load_compacted rebuilds it from a fresh model
    result = {"sparsity": report.sparsity, "target": report.target, "parameters": [dense_parameters, small_parameters],
              "macs": [dense_macs, small_macs], "latency_ms": [dense_ms, small_ms],
              "groups": {group.name: [group.pruned, group.channels] for group in report.groups}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
