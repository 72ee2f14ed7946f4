"""PDP with the Hugging Face Trainer: a BERT built from a config, fine-tuned on SST-2 while it is pruned.

    python examples/huggingface_trainer.py                        # 90% of the Linear weights, 2 epochs (an hour or so on a CPU)
    python examples/huggingface_trainer.py --structure 2:4
    python examples/huggingface_trainer.py --structure channel    # attention heads and FFN neurons
    python examples/huggingface_trainer.py --smoke                # seconds: 2 steps on 64 sentences

SST-2 is read from PDPRUNE_DATA (or --data-dir): `sst2/train.tsv` and `sst2/dev.tsv` of GLUE, tokenized
with pdprune's word tokenizer (`pdprune.data.sst2`). No download: the BERT is built from a config with
random weights (pass --pretrained NAME_OR_PATH to start from a checkpoint you have).
Guide: docs/guides/huggingface-trainer.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import pdprune
from pdprune.data import data_dir, load_dataset
from pdprune.data.sst2 import WordTokenizer
from pdprune.integrations.transformers import PDPTrainerCallback


def sst2(directory: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(train ids, train labels, dev ids, dev labels, vocabulary size); the first `limit` sentences of each
    split if given (the whole dataset goes through pdprune's checksummed loader)."""
    if limit is None:
        data = load_dataset("sst2", directory)
        dev_ids, dev_labels = data.evaluations["dev"]
        return data.train_inputs, data.train_labels, dev_ids, dev_labels, len(data.vocabulary)
    splits = {}
    for name in ("train", "dev"):
        with open(directory / "sst2" / f"{name}.tsv", newline="", encoding="utf-8") as file:
            rows = [row for _, row in zip(range(limit), csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))]
        splits[name] = ([row["sentence"] for row in rows], torch.tensor([int(row["label"]) for row in rows]))
    tokenizer = WordTokenizer.fit(splits["train"][0])
    return (tokenizer.encode(splits["train"][0]), splits["train"][1], tokenizer.encode(splits["dev"][0]), splits["dev"][1],
            len(tokenizer.vocabulary))


class Sentences(torch.utils.data.Dataset):
    """Token ids (0 pads) and labels as the keyword dicts a Hugging Face model takes."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": self.labels[index]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="unstructured", help="'unstructured', '2:4' or 'channel' (heads and FFN neurons)")
    parser.add_argument("--sparsity", type=float, default=None, help="default: 0.9 (unstructured), 0.5 (channel); N:M sets its own")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--data-dir", type=Path, default=None, help="the folder holding sst2/ (default: $PDPRUNE_DATA)")
    parser.add_argument("--out", type=Path, default=None, help="the Trainer's output_dir (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny BERT, 2 steps on 64 sentences")
    args = parser.parse_args(argv)
    directory = data_dir(args.data_dir)
    if directory is None:
        parser.error("SST-2 is read from a data directory: set PDPRUNE_DATA or pass --data-dir")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    train_ids, train_labels, dev_ids, dev_labels, vocabulary = sst2(directory, 64 if args.smoke else None)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if args.smoke else \
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    model = BertForSequenceClassification(BertConfig(vocab_size=vocabulary, max_position_embeddings=train_ids.shape[1], **size))

    channel = args.structure == "channel"
    sparsity = args.sparsity if args.sparsity is not None else (0.5 if channel else 0.9)
    epochs = 1 if args.smoke else args.epochs
    schedule = pdprune.ScheduleConfig(warmup_epochs=0.1 * epochs, ramp_end_epoch=0.5 * epochs,
                                      anneal_end_epoch=None if args.structure == "unstructured" else 0.9 * epochs)
    config = pdprune.PruningConfig(sparsity=sparsity, structure=args.structure, exclude=("classifier",), schedule=schedule)
    example = {"input_ids": train_ids[:2], "attention_mask": (train_ids[:2] != 0).long()}  # traces heads and neurons
    callback = PDPTrainerCallback(model, config, example_inputs=example if channel else None)

    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(
            output_dir=str(args.out or scratch), num_train_epochs=epochs, max_steps=2 if args.smoke else -1,
            per_device_train_batch_size=32, learning_rate=5e-4, weight_decay=0.01,
            save_strategy="no" if args.smoke else "epoch", logging_steps=50, report_to=[], seed=0,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=args.smoke,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=Sentences(train_ids, train_labels),
                          eval_dataset=Sentences(dev_ids, dev_labels), callbacks=[callback])
        trainer.train()                                      # the callback finalizes at the end
    report = callback.pruner.report()
    print(report.table())
    model.eval()
    with torch.no_grad():
        predictions = model(input_ids=dev_ids, attention_mask=(dev_ids != 0).long()).logits.argmax(dim=1)
    result = {"sparsity": report.sparsity, "target": report.target, "dev_accuracy": float((predictions == dev_labels).float().mean())}
    if channel:
        small = pdprune.compact(model, example)
        result["parameters"] = [sum(p.numel() for p in m.parameters()) for m in (model, small)]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
