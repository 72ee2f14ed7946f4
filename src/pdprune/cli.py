"""The `pdprune` command line: `pdprune train` prunes a model on a dataset and writes the results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pdprune._version import __version__
from pdprune.checkpoint import save_checkpoint
from pdprune.data import DATASETS, load_dataset
from pdprune.experiments import load_grid, run_grid, summarize
from pdprune.export import export_onnx, read_state_dict, save_sparse
from pdprune.models import MODELS, build_model, load_pretrained
from pdprune.config import DEFAULT_TEMPERATURE, TEMPERATURE_MODES, PruningConfig, parse_structure
from pdprune.pruner import HARD_CUT_WARNING, PDPPruner
from pdprune.report import plot_sparsity, state_dict_sparsity
from pdprune.schedule import ALLOCATIONS, RAMP_SHAPES, ScheduleConfig
from pdprune.structure import compact, count_macs_and_parameters, save_compacted
from pdprune.train import LR_SCHEDULES, OPTIMIZERS, TrainConfig, evaluate_splits, has_batchnorm, recalibrate_batchnorm, train

WARMUP_FRACTION = 0.1
RAMP_END_FRACTION = 0.5
ANNEAL_END_FRACTION = 0.9
"""Default schedule as fractions of the epochs: dense for the first 10%, at the target from 50% on, and
for N:M and channels a hard mask from 90% on (the paper's soft mask lost 6 points at 1:4 and 25 at
channels when `finalize()` made it hard on ResNet-20; annealed, nothing: README, the full tier)."""
PRETRAINED_RAMP_END_FRACTION = 1 / 6
"""With --pretrained: no warm-up, at the target from 1/6 of the epochs on (the pretrained ResNet-56 gained
1.5-1.9 points at 90%, 1:4 and channels over the target at 2/3: README, the full tier)."""


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="digits", choices=sorted(DATASETS), help="default: %(default)s (bundled, no download)")
    data.add_argument("--model", default="mlp", choices=sorted(MODELS), help="default: %(default)s")
    data.add_argument("--data-dir", default=None, help="directory of the datasets (default: $PDPRUNE_DATA)")
    data.add_argument("--download", action="store_true", help="fetch missing dataset files from their official sources")
    data.add_argument("--pretrained", default=None, metavar="PATH", help="start from these weights (a state_dict or checkpoint)")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights to prune (default: %(default)s)")
    pruning.add_argument("--structure", default="unstructured", help="'unstructured', 'channel' or N:M such as 2:4 (default: %(default)s)")
    pruning.add_argument("--layer-structure", action="append", default=[], metavar="PATTERN=STRUCTURE",
                         help="override the structure for modules matching PATTERN, e.g. 'fc*=2:4' (repeatable)")
    pruning.add_argument("--on-incompatible", default="skip", choices=("skip", "error"),
                         help="layers that cannot hold their N:M pattern: skip with a warning, or fail (default: %(default)s)")
    pruning.add_argument("--allocation", default="global", choices=ALLOCATIONS, help="default: %(default)s")
    pruning.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="tau of the soft mask (default: %(default)s)")
    pruning.add_argument("--temperature-mode", default="relative", choices=TEMPERATURE_MODES, help="default: %(default)s")
    pruning.add_argument("--warmup-epochs", type=float, default=None, help=f"dense epochs first (default: {100 * WARMUP_FRACTION:.0f}%% of --epochs; 0 with --pretrained)")
    pruning.add_argument("--ramp-end-epoch", type=float, default=None, help=f"epoch at which the target is reached (default: {100 * RAMP_END_FRACTION:.0f}%% of --epochs; "
                              f"{100 * PRETRAINED_RAMP_END_FRACTION:.0f}%% with --pretrained)")
    pruning.add_argument("--ramp-shape", default="linear", choices=RAMP_SHAPES,
                         help="'linear' (the paper) or 'cubic' (better at 95%%+ on short budgets; README, the study) (default: %(default)s)")
    pruning.add_argument("--anneal-end-epoch", type=float, default=None,
                         help="shrink tau after the ramp until this epoch, so the soft mask is hard before the end "
                              f"(default: {100 * ANNEAL_END_FRACTION:.0f}%% of --epochs for N:M and channel structures, none for unstructured)")
    pruning.add_argument("--no-anneal", action="store_true", help="keep tau fixed to the end, as in the paper, whatever the structure")
    pruning.add_argument("--anneal-soft-gradient", action=argparse.BooleanOptionalAction, default=None,
                         help="while annealing, keep the starting mask's slope in the backward pass (a surrogate gradient; not in the paper; "
                              "default: on when N:M masks anneal: README, the full tier)")
    pruning.add_argument("--straight-through", action=argparse.BooleanOptionalAction, default=None,
                         help="pruned weights also learn as if kept (SR-STE's estimator); not in the paper (default: on with the "
                              "soft gradient unless a layer is pruned by channel: with it, PDP is level with SR-STE at 1:4; README)")
    pruning.add_argument("--include", action="append", default=[], metavar="PATTERN", help="prune only modules matching (repeatable)")
    pruning.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="never prune modules matching (repeatable)")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=30, help="default: %(default)s")
    training.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    training.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="default: %(default)s")
    training.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default: %(default)s)")
    training.add_argument("--weight-decay", type=float, default=5e-4, help="default: %(default)s")
    training.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES, help="default: %(default)s")
    training.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    training.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    training.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                          help="after pruning, re-estimate BatchNorm statistics on 100 training batches; model.pt keeps them "
                               "(gives back a costly hard cut: README, 'After a costly hard cut'; default: when the model has "
                               f"BatchNorm and the hard cut removed over {100 * HARD_CUT_WARNING:g}%% of a tensor's weight energy)")
    training.add_argument("--channels-last", action="store_true", help="NHWC layout for image models (faster convolutions on CPU)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<dataset>-<model>-<time>)")
    output.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    output.add_argument("--quiet", action="store_true", help="no progress bars")


def _configs(args: argparse.Namespace, steps_per_epoch: int) -> tuple[TrainConfig, PruningConfig]:
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, learning_rate=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed, channels_last=args.channels_last,
    )
    warmup_fraction, ramp_end_fraction = (0.0, PRETRAINED_RAMP_END_FRACTION) if args.pretrained else (WARMUP_FRACTION, RAMP_END_FRACTION)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else round(warmup_fraction * args.epochs, 2)
    ramp_end = args.ramp_end_epoch if args.ramp_end_epoch is not None else max(warmup, round(ramp_end_fraction * args.epochs, 2))
    layer_structures = _layer_structures(args.layer_structure)
    if args.no_anneal and args.anneal_end_epoch is not None:
        raise ValueError(f"give --anneal-end-epoch or --no-anneal, not both (got --anneal-end-epoch {args.anneal_end_epoch:g})")
    anneal_end = args.anneal_end_epoch
    structures = (args.structure, *layer_structures.values())
    if anneal_end is None and any(s != "unstructured" for s in structures) and not args.no_anneal and ramp_end < args.epochs:
        anneal_end = round(max(ANNEAL_END_FRACTION * args.epochs, (ramp_end + args.epochs) / 2), 2)
    soft_gradient = args.anneal_soft_gradient
    if soft_gradient is None:
        soft_gradient = anneal_end is not None and any(isinstance(parse_structure(s), tuple) for s in structures)
    straight_through = args.straight_through
    if straight_through is None:
        straight_through = soft_gradient and "channel" not in structures
    pruning_config = PruningConfig(
        sparsity=args.sparsity, structure=args.structure, allocation=args.allocation,
        temperature=args.temperature, temperature_mode=args.temperature_mode,
        layer_structures=layer_structures, on_incompatible=args.on_incompatible, straight_through=straight_through,
        include=tuple(args.include), exclude=tuple(args.exclude),
        schedule=ScheduleConfig(warmup_epochs=warmup, ramp_end_epoch=ramp_end, steps_per_epoch=steps_per_epoch,
                                ramp_shape=args.ramp_shape, anneal_end_epoch=anneal_end,
                                anneal_soft_gradient=soft_gradient),
    )
    return train_config, pruning_config


def _layer_structures(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        pattern, separator, structure = value.rpartition("=")
        if not separator or not pattern:
            raise ValueError(f"--layer-structure expects PATTERN=STRUCTURE such as 'fc*=2:4', got {value!r}")
        pairs[pattern] = structure
    return pairs


def _seeded_model(args: argparse.Namespace, dataset) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    vocabulary_size = None if dataset.vocabulary is None else len(dataset.vocabulary)
    model = build_model(args.model, dataset.input_shape, dataset.num_classes, vocabulary_size=vocabulary_size)
    if args.pretrained is not None:
        load_pretrained(model, args.pretrained)
    return model.to(args.device)


def command_train(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    train_config, pruning_config = _configs(args, dataset.steps_per_epoch(args.batch_size))
    out = args.out or Path("runs") / f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    model = _seeded_model(args, dataset)
    if args.recalibrate_bn and not has_batchnorm(model):
        raise ValueError(f"--recalibrate-bn: model {args.model!r} has no BatchNorm layer; drop the option")
    dense = None
    if not args.no_dense:
        dense = train(_seeded_model(args, dataset), dataset, train_config, progress=not args.quiet, description="dense")
    example_inputs = dataset.train_inputs[:2].to(args.device)
    pruner = PDPPruner(model, pruning_config, example_inputs=example_inputs)
    pruned = train(model, dataset, train_config, pruner, progress=not args.quiet, description="PDP")
    report = pruner.report()
    recalibrated = None
    worst_cut = max(pruner.hard_cut.values(), default=0.0)
    if args.recalibrate_bn or (args.recalibrate_bn is None and has_batchnorm(model) and worst_cut > HARD_CUT_WARNING):
        if args.recalibrate_bn is None:
            print(f"the hard cut removed {100 * worst_cut:.1f}% of a tensor's weight energy: re-estimating BatchNorm "
                  "(--no-recalibrate-bn to skip)")
        recalibrate_batchnorm(model, dataset, args.batch_size, seed=args.seed)
        recalibrated = evaluate_splits(model, dataset)

    about = {"model_name": args.model, "dataset": args.dataset, "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
             "vocabulary_size": None if dataset.vocabulary is None else len(dataset.vocabulary)}
    save_checkpoint(out / "model.pt", {"model": model.state_dict(), **about})
    compaction = None
    if report.groups:
        small = compact(model, example_inputs)
        save_compacted(out / "model_compacted.pt", small, example_inputs, **about)
        (macs, parameters), (small_macs, small_parameters) = (count_macs_and_parameters(m, example_inputs[:1]) for m in (model, small))
        compaction = {"parameters": parameters, "macs": macs, "compacted_parameters": small_parameters, "compacted_macs": small_macs}
    (out / "report.md").write_text(report.table() + "\n")
    run = {
        "pdprune_version": __version__, "torch_version": torch.__version__,
        "command": " ".join(["pdprune", *sys.argv[1:]]),
        "dataset": args.dataset, "model": args.model,
        "train_config": asdict(train_config), "pruning_config": pruning_config.to_dict(),
        "dense": None if dense is None else asdict(dense), "pdp": asdict(pruned),
        "pdp_accuracy_bn_recalibrated": recalibrated, "report": report.to_dict(),
        "compaction": compaction,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    print(f"\n{report.table()}\n")
    primary = dataset.primary_evaluation
    if dense is not None:
        print(f"dense accuracy ({primary}):  {100 * dense.accuracy[primary]:.2f}%  ({dense.seconds:.1f} s training)")
    print(f"PDP accuracy ({primary}):    {100 * pruned.accuracy[primary]:.2f}%  at {100 * report.sparsity:.2f}% sparsity  ({pruned.seconds:.1f} s training)")
    if recalibrated is not None:
        print(f"  BatchNorm re-estimated:  {100 * recalibrated[primary]:.2f}%  (model.pt holds these statistics)")
    if compaction is not None:
        print(f"compacted: {compaction['parameters']:,} -> {compaction['compacted_parameters']:,} parameters, "
              f"{compaction['macs'] / 1e6:.2f} M -> {compaction['compacted_macs'] / 1e6:.2f} M MACs per example "
              f"(load with pdprune.load_compacted: {out / 'model_compacted.pt'})")
    print(f"wrote {out / 'model.pt'}, {out / 'report.md'}, {out / 'run.json'}")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    grid = load_grid(args.config)
    if args.device is not None:
        grid = replace(grid, runs=tuple(replace(run, device=args.device) for run in grid.runs))
    if args.seeds:
        grid = replace(grid, runs=tuple(run for run in grid.runs if run.seed in args.seeds))
    out = args.out or Path("benchmarks/results") / grid.name
    rows = run_grid(grid, out, args.data_dir, progress=not args.quiet, only=args.only)
    if rows:
        print(summarize(rows, out, f"{grid.name}: {grid.config['dataset']} / {grid.config['model']}, {grid.config['train'].get('epochs')} epochs",
                        grid.unsupported))
    print(f"{len(rows)} of {len(grid.runs)} runs done; results in {out / 'results.jsonl'}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    weights, _ = read_state_dict(args.model)
    report = state_dict_sparsity(weights)
    if not report.layers:
        raise ValueError(f"{args.model} holds no weight matrix or filter bank to report on")
    print(report.table())
    plot = args.plot or Path(args.model).with_suffix(".sparsity.png")
    try:
        plot_sparsity(report, weights, plot, title=str(Path(args.model).name))
        print(f"plot: {plot}")
    except ImportError:
        print("(no plot: pip install matplotlib)")
    return 0


def command_export(args: argparse.Namespace) -> int:
    weights, metadata = read_state_dict(args.model)
    if args.format == "sparse":
        save_sparse(args.out, weights, **metadata)
    else:
        if "model_name" not in metadata:
            raise ValueError(f"ONNX export needs the architecture: {args.model} was not written by `pdprune train` (no model_name)")
        model = build_model(metadata["model_name"], tuple(metadata["input_shape"]), metadata["num_classes"], vocabulary_size=metadata.get("vocabulary_size"))
        model.load_state_dict(weights)
        example = torch.zeros(1, *metadata["input_shape"], dtype=torch.long if metadata["model_name"] == "transformer" else torch.float32)
        export_onnx(model, example, args.out)
    before, after = Path(args.model).stat().st_size, Path(args.out).stat().st_size
    print(f"wrote {args.out}: {after:,} bytes ({100 * after / before:.1f}% of {args.model}'s {before:,})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdprune", description="Parameter-free Differentiable Pruning for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"pdprune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="prune a model on a dataset to a target sparsity")
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=command_train)
    bench_parser = commands.add_parser("bench", help="run (or resume) a benchmark grid from a TOML config")
    bench_parser.add_argument("config", type=Path, help="grid file, e.g. benchmarks/configs/quick.toml")
    bench_parser.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results/<grid name>)")
    bench_parser.add_argument("--data-dir", default=None, help="directory of the datasets (default: $PDPRUNE_DATA)")
    bench_parser.add_argument("--only", action="append", default=[], metavar="TEXT", help="run only the runs whose key contains TEXT (repeatable)")
    bench_parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these of the grid's seeds")
    bench_parser.add_argument("--device", default=None, help="run every run on this torch device (default: the grid's, else cpu)")
    bench_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    bench_parser.set_defaults(handler=command_bench)
    report_parser = commands.add_parser("report", help="per-layer sparsity table and plot of any saved model")
    report_parser.add_argument("model", type=Path, help="a model file: pdprune's model.pt or sparse file, or a torch state_dict")
    report_parser.add_argument("--plot", type=Path, default=None, help="where to write the plot (default: next to MODEL, .sparsity.png)")
    report_parser.set_defaults(handler=command_report)
    export_parser = commands.add_parser("export", help="write a model compressed (sparse bitmask + values) or as ONNX")
    export_parser.add_argument("model", type=Path, help="a model file, e.g. the model.pt that `pdprune train` wrote")
    export_parser.add_argument("out", type=Path, help="the file to write")
    export_parser.add_argument("--format", default="sparse", choices=("sparse", "onnx"), help="default: %(default)s")
    export_parser.set_defaults(handler=command_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        parser.exit(2, f"pdprune {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
