"""Hugging Face architectures x structures: what pdprune prunes, and what compaction gains.

    python benchmarks/hf_structured.py                 # the tiny configs of tests/test_generality.py
    python benchmarks/hf_structured.py --latency       # also BERT-base and a 2-layer Llama-2-7B-sized GQA model, timed

For every architecture (random weights from a config, no downloads) and structure (unstructured 90%,
2:4, channels and heads 50%): the tensors pruned, the sparsity reached over them, the channel and head
groups found and those left dense, and for channels the parameters and MACs before and after
`compact()`. With --latency, two full-size configs are pruned by channels and heads and their CPU
forward latency is timed before and after compaction (batch 1, 128 tokens; median of repeats,
alternating dense and compacted), the outputs compared.

Writes benchmarks/results/hf_structured.json and .md (or `--out STEM`.json and .md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, compact, count_macs_and_parameters
from pdprune.model_io import call_model, same_outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_generality import ARCHITECTURES  # noqa: E402 - the same tiny configs the CI matrix tests

RESULTS = Path(__file__).parent / "results"
STRUCTURES = {"unstructured 90%": ("unstructured", 0.9), "2:4": ("2:4", 0.5), "channels and heads 50%": ("channel", 0.5)}
AT_TARGET = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)


def _prune(model: torch.nn.Module, structure: str, sparsity: float, example: dict) -> PDPPruner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=sparsity, structure=structure, schedule=AT_TARGET), example_inputs=example)
        pruner.finalize()
    return pruner


def tiny_matrix() -> list[dict]:
    rows = []
    for architecture, (build, batch) in tqdm(list(ARCHITECTURES.items()), desc="architectures"):
        for label, (structure, sparsity) in STRUCTURES.items():
            torch.manual_seed(0)
            model = build().eval()
            example = batch(labels=False)
            parameters = sum(p.numel() for p in model.parameters())
            pruner = _prune(model, structure, sparsity, example)
            report = pruner.report()
            row = {"architecture": architecture, "structure": label, "tensors": len(report.layers), "sparsity": report.sparsity,
                   "parameters": parameters,
                   "groups": {kind: sum(1 for g in report.groups if g.kind == kind) for kind in ("channel", "head")},
                   "left_dense": sorted(name for name in report.skipped if "group" in name or name.endswith(" heads"))}
            if structure == "channel":
                small = compact(model, example)
                row["macs"], _ = count_macs_and_parameters(model, example)
                row["compacted_macs"], row["compacted_parameters"] = count_macs_and_parameters(small, example)
            rows.append(row)
    return rows


LARGE = {
    "BERT-base (12 layers)": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)),
    "Llama-2-7B-sized, 2 layers, 8 KV heads": ("llama", dict(hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                                                             intermediate_size=11008, vocab_size=1000, pad_token_id=0)),
}


def _latency(model: torch.nn.Module, example: dict, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            call_model(model, example)
            times.append(time.perf_counter() - started)
    return times


def latency_rows(repeats: int) -> list[dict]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rows = []
    for label, (model_type, config) in LARGE.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **config)).eval()
        example = {"input_ids": torch.randint(1, 1000, (1, 128)), "attention_mask": torch.ones(1, 128, dtype=torch.long)}
        dense = {"parameters": sum(p.numel() for p in model.parameters())}
        dense["macs"], _ = count_macs_and_parameters(model, example)
        started = time.perf_counter()
        pruner = _prune(model, "channel", 0.5, example)
        seconds = time.perf_counter() - started
        small = compact(model, example)
        macs, parameters = count_macs_and_parameters(small, example)
        with torch.no_grad():
            assert same_outputs(call_model(model, example), call_model(small, example))
        _latency(model, example, 2), _latency(small, example, 2)  # warm-up
        times = {"dense": [], "compacted": []}
        for _ in range(repeats):  # alternate, so that drift of the machine hits both alike
            times["dense"] += _latency(model, example, 1)
            times["compacted"] += _latency(small, example, 1)
        groups = pruner.report().groups
        rows.append({"model": label, **dense, "compacted_parameters": parameters, "compacted_macs": macs,
                     "heads_pruned": sum(g.pruned for g in groups if g.kind == "head"), "heads": sum(g.channels for g in groups if g.kind == "head"),
                     "neurons_pruned": sum(g.pruned for g in groups if g.kind == "channel"), "neurons": sum(g.channels for g in groups if g.kind == "channel"),
                     "prune_seconds": seconds, "dense_ms": 1e3 * statistics.median(times["dense"]),
                     "compacted_ms": 1e3 * statistics.median(times["compacted"]), "times": times})
    return rows


def markdown(tiny: list[dict], large: list[dict], machine: str) -> list[str]:
    lines = ["Tiny configs (random weights), pruned at the target at once and finalized; channel rows compacted.", "",
             "| architecture | structure | tensors pruned | sparsity over them | groups pruned (channel / head) | groups left dense | parameters | after compaction | MACs | after compaction |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in tiny:
        groups = f"{row['groups']['channel']} / {row['groups']['head']}" if row["structure"].startswith("channels") else ""
        heads = sum(name.endswith(" heads") for name in row["left_dense"])
        dense = ", ".join(f"{count} {kind}" for count, kind in ((len(row["left_dense"]) - heads, "channel"), (heads, "head")) if count)
        compacted = (f"{row['compacted_parameters']:,} ({row['compacted_parameters'] / row['parameters']:.2f})", f"{row['macs']:,}",
                     f"{row['compacted_macs']:,} ({row['compacted_macs'] / row['macs']:.2f})") if "macs" in row else ("", "", "")
        lines.append(f"| {row['architecture']} | {row['structure']} | {row['tensors']} | {100 * row['sparsity']:.2f}% | {groups} | {dense} | "
                     f"{row['parameters']:,} | {compacted[0]} | {compacted[1]} | {compacted[2]} |")
    if large:
        lines += ["", f"Channels and heads 50%, compacted; CPU forward latency, batch 1, 128 tokens; {machine}; torch {torch.__version__}", "",
                  "| model | heads pruned | FFN neurons pruned | parameters | after | MACs | after | latency (ms) | after (ms) | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in large:
            lines.append(f"| {row['model']} | {row['heads_pruned']} of {row['heads']} | {row['neurons_pruned']:,} of {row['neurons']:,} | "
                         f"{row['parameters'] / 1e6:.1f} M | {row['compacted_parameters'] / 1e6:.1f} M | {row['macs'] / 1e9:.2f} G | "
                         f"{row['compacted_macs'] / 1e9:.2f} G | {row['dense_ms']:.1f} | {row['compacted_ms']:.1f} | "
                         f"{row['dense_ms'] / row['compacted_ms']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", action="store_true", help="also prune and time the full-size configs")
    parser.add_argument("--repeats", type=int, default=9, help="timed forward passes per model (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hf_structured", help="result files without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    tiny = tiny_matrix()
    large = latency_rows(args.repeats) if args.latency else []
    lines = markdown(tiny, large, machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
                                                         "date": time.strftime("%Y-%m-%d"), "tiny": tiny, "large": large}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
