"""PDP with PyTorch Lightning: `PDPCallback` prunes a LightningModule while it trains on the bundled digits.

    python examples/lightning_digits.py            # 90% unstructured, 20 epochs
    python examples/lightning_digits.py --smoke    # seconds: 2 short epochs

Guide: docs/guides/lightning.md.
"""

from __future__ import annotations

import argparse
import json
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import pdprune
from pdprune.data import load_dataset
from pdprune.integrations.lightning import PDPCallback
from pdprune.train import evaluate


class DigitClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 epochs of 4 batches")
    args = parser.parse_args(argv)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(0, verbose=False)

    data = load_dataset("digits")
    if args.smoke:
        data = data.subset(128, 100)
    epochs = 2 if args.smoke else args.epochs
    loader = DataLoader(TensorDataset(data.train_inputs, data.train_labels), batch_size=32, shuffle=True)
    config = pdprune.PruningConfig(sparsity=args.sparsity,
                                   schedule=pdprune.ScheduleConfig(warmup_epochs=0.1 * epochs, ramp_end_epoch=0.5 * epochs))
    module, callback = DigitClassifier(), PDPCallback(config)   # the callback sets steps_per_epoch from the trainer
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=not args.smoke, enable_model_summary=False)
    trainer.fit(module, loader)                                 # finalizes when training ends

    report = callback.pruner.report()
    print(report.table())
    result = {"sparsity": report.sparsity, "target": report.target, "accuracy": evaluate(module, *data.evaluations["test"])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
