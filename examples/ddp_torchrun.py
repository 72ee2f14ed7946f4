"""PDP under DistributedDataParallel, launched by torchrun: every rank trains on its share of each batch.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py           # 2 processes on a CPU (gloo)
    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --smoke   # seconds
    torchrun --standalone --nproc_per_node 8 examples/ddp_torchrun.py           # one per GPU (NCCL)

Attach the pruner first, then wrap the model in DDP. The masks are the same on every rank at every step
(the global budgets are computed on rank 0 and broadcast); rank 0 saves the checkpoint, which resumes at
any world size. Guide: docs/guides/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pdprune
from pdprune.data import batches, load_dataset
from pdprune.train import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="ddp_checkpoint.pt", help="rank 0 writes the final checkpoint here")
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 epochs on 256 images")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")      # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)

    data = load_dataset("digits")                              # every rank holds it; each trains on its share
    if args.smoke:
        data = data.subset(256, 100)
    epochs, batch_size = (2 if args.smoke else args.epochs), 64   # the global batch
    torch.manual_seed(0)                                       # the same initial weights on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    schedule = pdprune.ScheduleConfig(warmup_epochs=0.1 * epochs, ramp_end_epoch=0.5 * epochs,
                                      steps_per_epoch=data.steps_per_epoch(batch_size))
    pruner = pdprune.PDPPruner(model, pdprune.PruningConfig(sparsity=args.sparsity, schedule=schedule))  # attach first ...
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)                 # ... then wrap
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    generator = torch.Generator().manual_seed(0)               # the same order on every rank
    for epoch in range(epochs):
        for x, y in batches(data.train_inputs, data.train_labels, batch_size, generator):
            share = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)  # this rank's rows
            loss = nn.functional.cross_entropy(ddp(x[share].to(device)), y[share].to(device))
            loss.backward()                                    # DDP averages the gradients across ranks
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()
    if rank == 0:
        pdprune.save_checkpoint(args.out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                           "pruner": pruner.state_dict(), "epoch": epochs})
    model = pruner.finalize()
    report = pruner.report()
    result = {"rank": rank, "world_size": world_size, "sparsity": report.sparsity, "target": report.target,
              "accuracy": evaluate(model, *data.evaluations["test"])}
    del ddp                                                    # DDP's reducer holds the process group: release it first
    dist.barrier()
    dist.destroy_process_group()
    table = report.table() + "\n" if rank == 0 else ""
    sys.stdout.write(f"{table}{json.dumps(result)}\n")  # one write: ranks share stdout, and print() under
    sys.stdout.flush()                                   # PYTHONUNBUFFERED writes a line and its newline apart
    return result


if __name__ == "__main__":
    main()
