"""Export and deploy a pruned model: the compressed sparse file, ONNX (checked with onnxruntime) and
`torch.export`, for LeNet-5 pruned to 90% on the bundled digits (upsampled to 28x28).

    python examples/export_deploy.py            # 15 epochs, then every export; files in --out
    python examples/export_deploy.py --smoke    # seconds: 1 epoch on 128 images

Guide: docs/guides/export.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import pdprune
from pdprune.data import batches, load_dataset
from pdprune.export import export_onnx, load_sparse, save_sparse
from pdprune.models import build_model
from pdprune.train import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("exported"), help="folder for model.pt, model.sparse.pt, model.onnx")
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 epoch on 128 images")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("digits")
    if args.smoke:
        data = data.subset(128, 64)
    upsample = nn.Upsample(size=(28, 28), mode="bilinear")    # LeNet-5 reads 28x28 images
    model = nn.Sequential(upsample, build_model("lenet5", (1, 28, 28), 10))
    epochs = 1 if args.smoke else args.epochs
    schedule = pdprune.ScheduleConfig(warmup_epochs=0.2 * epochs, ramp_end_epoch=0.6 * epochs, steps_per_epoch=data.steps_per_epoch(32))
    pruner = pdprune.PDPPruner(model, pdprune.PruningConfig(sparsity=args.sparsity, schedule=schedule))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for x, y in batches(data.train_inputs, data.train_labels, 32, generator):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()
    model = pruner.finalize().eval()                            # a plain nn.Module: export it as any other
    accuracy = evaluate(model, *data.evaluations["test"])

    args.out.mkdir(parents=True, exist_ok=True)
    dense_file, sparse_file, onnx_file = args.out / "model.pt", args.out / "model.sparse.pt", args.out / "model.onnx"
    torch.save(model.state_dict(), dense_file)
    save_sparse(sparse_file, model)                             # packed bitmask + non-zero values
    restored = nn.Sequential(nn.Upsample(size=(28, 28), mode="bilinear"), build_model("lenet5", (1, 28, 28), 10)).eval()
    restored.load_state_dict(load_sparse(sparse_file))
    assert all(torch.equal(value, restored.state_dict()[name]) for name, value in model.state_dict().items()), "bit-exact"

    example = data.train_inputs[:2]                             # two rows: a batch of 1 would be specialized
    export_onnx(model, example, onnx_file)                      # dynamic batch dimension
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file))
    batch = data.evaluations["test"][0][:16]
    (logits,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    onnx_difference = float((torch.from_numpy(logits) - model(batch).detach()).abs().max())

    batch_dim = torch.export.Dim("batch")
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim},))  # for AOTInductor, ExecuTorch, ...
    export_difference = float((exported.module()(batch) - model(batch)).abs().max().detach())

    sizes = {path.name: path.stat().st_size for path in (dense_file, sparse_file, onnx_file)}
    result = {"sparsity": pruner.report().sparsity, "target": pruner.report().target, "accuracy": accuracy, "bytes": sizes,
              "onnx_max_difference": onnx_difference, "torch_export_max_difference": export_difference}
    print(f"sparse file: {sizes['model.sparse.pt']:,} bytes, {sizes['model.sparse.pt'] / sizes['model.pt']:.0%} of the dense file")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
