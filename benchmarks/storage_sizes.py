"""File sizes of finalized models: dense `torch.save` vs pdprune's sparse format (bitmask + values).

    python benchmarks/storage_sizes.py

Each model is pruned at once to the target (the file size depends on the zeros, not on training) and
saved both ways; the sparse file is loaded back and compared bit for bit. Writes
benchmarks/results/storage_sizes.json and .md.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.export import load_sparse, save_sparse
from pdprune.models import build_model

RESULTS = Path(__file__).parent / "results"
CASES = [
    ("resnet20", (3, 32, 32), "unstructured", 0.9),
    ("resnet56", (3, 32, 32), "unstructured", 0.9),
    ("mobilenet_v1", (3, 32, 32), "unstructured", 0.9),
    ("vgg_small", (3, 32, 32), "unstructured", 0.95),
    ("lenet5", (1, 28, 28), "unstructured", 0.98),
    ("resnet20", (3, 32, 32), "2:4", 0.5),
]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, shape, structure, sparsity in CASES:
            torch.manual_seed(0)
            model = build_model(name, shape, 10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner = PDPPruner(model, PruningConfig(sparsity=sparsity, structure=structure, schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)))
                pruner.finalize()
            dense, sparse = Path(folder) / "dense.pt", Path(folder) / "sparse.pt"
            torch.save(model.state_dict(), dense)
            save_sparse(sparse, model)
            restored = load_sparse(sparse)
            exact = all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
            rows.append({"model": name, "structure": structure, "sparsity": pruner.report().sparsity, "dense_bytes": dense.stat().st_size,
                         "sparse_bytes": sparse.stat().st_size, "ratio": sparse.stat().st_size / dense.stat().st_size, "bit_exact": exact})
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage_sizes.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    lines = ["| model | structure | sparsity of the pruned weights | dense file | sparse file | sparse / dense | loads back bit-exact |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['structure']} | {100 * row['sparsity']:.1f}% | {row['dense_bytes']:,} B | {row['sparse_bytes']:,} B | "
                     f"{100 * row['ratio']:.1f}% | {'yes' if row['bit_exact'] else 'NO'} |")
    (RESULTS / "storage_sizes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
