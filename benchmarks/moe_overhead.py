"""Training-step time of PDP on a Hugging Face mixture of experts, relative to dense training, side by side.

    python benchmarks/moe_overhead.py            # CPU, 2 threads

The model: a Mixtral built from a config (random weights; hidden 256, 2 layers, 8 experts of 512, top-2),
batch 8 x 128 tokens, causal-LM loss, AdamW. transformers keeps each layer's experts in two 3-D tensors,
which pdprune prunes as the layer type "Experts" (90% unstructured, uniform budgets, at its target). Two
of transformers' expert kernels: "grouped_mm" (its default: one grouped matrix product over all experts)
and "eager" (a loop that reads `gate_up_proj[expert]` once per expert), the latter also with pdprune's
per-forward cache of the masked tensors taken off ("eager, no cache": every read computes the whole
masked tensor). Each timed repeat runs `--steps` steps of every variant in turn, after warm-up steps, so
that drift of a shared machine hits all alike; reported: median step time over repeats, min-max, and the
ratio of medians to dense with the same kernel.

Writes benchmarks/results/moe_overhead_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import pdprune.attach
from pdprune import PDPPruner, PruningConfig, ScheduleConfig

RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name -> (experts kernel, PDP attached, per-forward cache kept)
    "dense, grouped_mm": ("grouped_mm", False, True),
    "PDP, grouped_mm": ("grouped_mm", True, True),
    "dense, eager": ("eager", False, True),
    "PDP, eager": ("eager", True, True),
    "PDP, eager, no cache": ("eager", True, False),
}


def build(kernel: str, pdp: bool, cache: bool, device: torch.device):
    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  intermediate_size=512, vocab_size=1000, num_local_experts=8, num_experts_per_tok=2,
                                  experts_implementation=kernel)
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    pruner = None
    if pdp:
        with mock.patch.object(pdprune.attach, "cache_per_forward", pdprune.attach.cache_per_forward if cache else lambda modules: None):
            pruner = PDPPruner(model, PruningConfig(sparsity=0.9, allocation="uniform", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)))
        assert any(".experts." in name for name in pruner.tensor_names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    steps = {name: build(*variant, device) for name, variant in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = [f"Mixtral-style MoE (2 layers, 8 experts, top-2), batch 8 x 128, {machine}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}; median of {args.repeats} repeats of {args.steps} steps",
             "", "| variant | step (ms) | min-max (ms) | vs dense, same kernel |", "|---|---|---|---|"]
    for name, values in times.items():
        dense = medians["dense, " + VARIANTS[name][0]]
        lines.append(f"| {name} | {1000 * medians[name]:.0f} | {1000 * min(values):.0f}-{1000 * max(values):.0f} | {medians[name] / dense:.2f}x |")
    print("\n".join(lines))
    stem = RESULTS / f"moe_overhead_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args), "seconds": times}, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
