"""Which layer budgets the global magnitude sort and LAMP give on the weights a model starts from.

    python benchmarks/allocation_at_init.py

For the Hugging Face architectures of tests/test_generality.py (tiny configs, random weights) and
pdprune's model zoo, at initialization (no warm-up) and at 90%, 95% and 98%: the highest per-tensor
budget under `allocation="global"` (the paper's) and `"lamp"` (the default), and the tensors that the
global sort empties (a budget of 100%). The evidence for LAMP as the default (docs/study.md).

Writes benchmarks/results/allocation_at_init.json and .md.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_generality import ARCHITECTURES  # noqa: E402 - the same tiny configs the CI matrix tests

RESULTS = Path(__file__).parent / "results"
ZOO = {"lenet5": ((1, 28, 28), None), "mlp": ((64,), None), "resnet20": ((3, 32, 32), None),
       "mobilenet_v1": ((3, 32, 32), None), "vgg_small": ((3, 32, 32), None), "transformer": ((32,), 1000)}


def budgets(build, allocation: str, sparsity: float) -> dict[str, float]:
    """Per-tensor budgets when pruning starts at once from the model's initial weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(build(), PruningConfig(sparsity=sparsity, allocation=allocation,
                                                  schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)))
        pruner.step()
    return {layer.name: layer.target for layer in pruner.report().layers}


def main() -> None:
    models = {f"HF {name}": build for name, (build, _) in ARCHITECTURES.items()}
    models |= {name: (lambda name=name, shape=shape, vocabulary=vocabulary: build_model(name, shape, 10, vocabulary))
               for name, (shape, vocabulary) in ZOO.items()}
    rows = []
    for model, build in models.items():
        for sparsity in (0.9, 0.95, 0.98):
            found = {allocation: budgets(build, allocation, sparsity) for allocation in ("global", "lamp")}
            rows.append({"model": model, "sparsity": sparsity, "global_max": max(found["global"].values()),
                         "lamp_max": max(found["lamp"].values()),
                         "global_emptied": sorted(name for name, target in found["global"].items() if target >= 1.0)})
            print(rows[-1], flush=True)
    lines = ["| model | sparsity | highest budget, global | highest budget, LAMP | tensors the global sort empties |", "|---|---|---|---|---|"]
    for row in rows:
        emptied = ", ".join(row["global_emptied"]) if len(row["global_emptied"]) <= 3 else f"{len(row['global_emptied'])} tensors"
        lines.append(f"| {row['model']} | {row['sparsity']:.0%} | {row['global_max']:.2%} | {row['lamp_max']:.2%} | {emptied} |")
    RESULTS.joinpath("allocation_at_init.json").write_text(json.dumps(rows, indent=1) + "\n")
    RESULTS.joinpath("allocation_at_init.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
