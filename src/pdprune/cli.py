"""The `pdprune` command line: `pdprune train` prunes a model on a dataset and writes the results.

Every argument is checked before anything is trained or written; a mistake is one line on stderr in
the command line's own words (`--exclude`, not `exclude=`) and exit code 2. `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from pdprune._version import __version__
from pdprune.checkpoint import atomic_file, load_checkpoint, save_checkpoint
from pdprune.config import DEFAULT_TEMPERATURE, TEMPERATURE_MODES, PruningConfig, parse_structure
from pdprune.data import DATASETS, data_dir, load_dataset
from pdprune.data import EMBEDDED as EMBEDDED_DATASETS
from pdprune.experiments import load_grid, run_grid, summarize
from pdprune.export import export_onnx, read_state_dict, save_sparse
from pdprune.model_io import evaluating
from pdprune.models import MODELS, build_model, load_pretrained
from pdprune.pruner import HARD_CUT_WARNING, PDPPruner
from pdprune.report import plot_sparsity, state_dict_sparsity
from pdprune.schedule import ALLOCATIONS, RAMP_SHAPES, RAMP_UPDATES, ScheduleConfig
from pdprune.structure import compact, count_macs_and_parameters, load_compacted, save_compacted
from pdprune.train import LR_SCHEDULES, OPTIMIZERS, TrainConfig, TrainResult, evaluate_splits, has_batchnorm, recalibrate_batchnorm, train

EXIT_ERROR = 2
"""A mistake in the command or in its input files: one line on stderr."""
EXIT_INTERNAL = 1
"""A bug in pdprune: one line on stderr that asks for `--debug` and a report."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as shells report SIGINT (128 + 2)."""

WARMUP_FRACTION = 0.1
RAMP_END_FRACTION = 0.5
ANNEAL_END_FRACTION = 0.9
"""Default schedule as fractions of the epochs: dense for the first 10%, at the target from 50% on, and
for N:M and channels a hard mask from 90% on (the paper's soft mask lost 6 points at 1:4 and 25 at
channels when `finalize()` made it hard on ResNet-20; annealed, nothing: README, the full tier)."""
PRETRAINED_RAMP_END_FRACTION = 1 / 6
"""With --pretrained: no warm-up, at the target from 1/6 of the epochs on (the pretrained ResNet-56 gained
1.5-1.9 points at 90%, 1:4 and channels over the target at 2/3: README, the full tier)."""
DEFAULT_SPARSITY = 0.9

TEXT_DATASETS = frozenset({"sst2"})
"""Datasets of token ids; only TEXT_MODELS read them, and TEXT_MODELS read nothing else."""
TEXT_MODELS = frozenset({"transformer"})

CHECKPOINTS = "checkpoints"
"""Subdirectory of `--out` holding an unfinished run: its settings and the last epoch of each training."""
SETTINGS = "settings.json"
NOT_SETTINGS = frozenset({"out", "quiet", "debug", "overwrite", "data_dir", "download", "handler", "command", "argv", "on_interrupt"})
"""`pdprune train` arguments that do not change the result: a run resumes whatever they are."""

MAIN_EPILOG = """\
exit codes: 0 done; 2 a mistake in the command or its input files (one line on stderr; add --debug for
the traceback); 1 an internal error, a bug (rerun with --debug and report the traceback); 130 interrupted.
"""
TRAIN_EPILOG = """\
output and resume: the run goes to --out (default runs/<dataset>-<model>-<time>), which must be new or
empty, and is checkpointed there after every epoch (--out/checkpoints/, removed when the run ends).
Interrupted (Ctrl-C, a crash), the same command resumes it from its last finished epoch, to the same
result. An --out holding a finished run, or an unfinished run with other settings, is refused:
--overwrite deletes that earlier run first: what pdprune train wrote (model.pt, model_compacted.pt,
report.md, run.json, checkpoints/), not the files you or pdprune export and report added. A non-empty
directory that pdprune train did not write is never touched, with or without --overwrite.
"""

_CLI_PHRASES = (
    (r"\(download=True / --download\)", "(--download)"),
    (r"download=True \(--download\)", "--download"),
    (r"download=True", "--download"),
    (r"--data-dir / directory=\.\.\.", "--data-dir"),
    (r"directory=\.\.\.", "--data-dir"),
    (r"\b(include|exclude)=\(('[^']*'),?\)", r"--\1 \2"),
    (r"\bon_incompatible='(\w+)'", r"--on-incompatible \1"),
    (r"set channels_last=False", "drop --channels-last"),
    (r"ScheduleConfig\((\w+)=\.\.\.\)", r"\1"),
    (r"\blayer_structures\[('[^']*')\]", r"--layer-structure \1"),
    (r"pass module_types=\.\.\. or change include/exclude", "change --include/--exclude"),
    (r"\binclude/exclude\b", "--include/--exclude"),
)
_API_FLAGS = {
    "warmup_epochs": "--warmup-epochs", "ramp_end_epoch": "--ramp-end-epoch", "ramp_shape": "--ramp-shape",
    "ramp_updates": "--ramp-updates",
    "anneal_end_epoch": "--anneal-end-epoch", "anneal_soft_gradient": "--anneal-soft-gradient",
    "straight_through": "--straight-through", "temperature_mode": "--temperature-mode", "on_incompatible": "--on-incompatible",
    "layer_structures": "--layer-structure", "batch_size": "--batch-size", "learning_rate": "--lr",
    "weight_decay": "--weight-decay", "lr_schedule": "--lr-schedule", "channels_last": "--channels-last",
}
_LEADING_FLAGS = ("sparsity", "structure", "temperature", "allocation", "epochs", "optimizer", "include", "exclude")


def cli_words(message: str) -> str:
    """An API error or warning in the command line's words: `exclude=('fc',)` -> `--exclude 'fc'`."""
    for pattern, replacement in _CLI_PHRASES:
        message = re.sub(pattern, replacement, message)
    message = re.sub(r"(?<![\w.\-'])(" + "|".join(_API_FLAGS) + r")\b(?!\()", lambda m: _API_FLAGS[m.group(1)], message)
    return re.sub(r"^(" + "|".join(_LEADING_FLAGS) + r") (must|applies)\b", r"--\1 \2", message)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- argument types: a bad value is an argparse error (one line, exit 2) -----------------------------


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}; pass a fraction, e.g. 0.9 for 90% zeros")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _count(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def _structure(text: str) -> str:
    try:
        parse_structure(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _layer_structure(text: str) -> tuple[str, str]:
    pattern, separator, structure = text.rpartition("=")
    if not separator or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=STRUCTURE such as 'fc*=2:4', got {text!r}")
    return pattern, _structure(structure)


# --- pdprune train -----------------------------------------------------------------------------------


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="digits", choices=sorted(DATASETS), help="default: %(default)s (bundled, no download)")
    data.add_argument("--model", default="mlp", choices=sorted(MODELS),
                      help=f"default: %(default)s ({', '.join(sorted(TEXT_MODELS))} reads the text of {', '.join(sorted(TEXT_DATASETS))}; the others read images)")
    data.add_argument("--data-dir", default=None, help="directory of the datasets (default: $PDPRUNE_DATA)")
    data.add_argument("--download", action="store_true", help="fetch missing dataset files from their official sources")
    data.add_argument("--pretrained", default=None, metavar="PATH", help="start from these weights (a state_dict or checkpoint)")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--sparsity", type=_fraction, default=None,
                         help=f"fraction of weights to prune (default: {DEFAULT_SPARSITY}; an N:M structure sets its own: 2:4 is 0.5)")
    pruning.add_argument("--structure", type=_structure, default="unstructured", help="'unstructured', 'channel' or N:M such as 2:4 (default: %(default)s)")
    pruning.add_argument("--layer-structure", type=_layer_structure, action="append", default=[], metavar="PATTERN=STRUCTURE",
                         help="override the structure for modules matching PATTERN, e.g. 'fc*=2:4' (repeatable)")
    pruning.add_argument("--on-incompatible", default="skip", choices=("skip", "error"),
                         help="layers that cannot hold their N:M pattern: skip with a warning, or fail (default: %(default)s)")
    pruning.add_argument("--allocation", default="lamp", choices=ALLOCATIONS,
                         help="how the budget is split between layers: 'lamp' never empties a layer, 'global' is the paper's "
                              "(default: %(default)s)")
    pruning.add_argument("--temperature", type=_positive, default=DEFAULT_TEMPERATURE, help="tau of the soft mask (default: %(default)s)")
    pruning.add_argument("--temperature-mode", default="relative", choices=TEMPERATURE_MODES, help="default: %(default)s")
    pruning.add_argument("--warmup-epochs", type=_non_negative, default=None,
                         help=f"dense epochs first, fewer than --epochs (default: {100 * WARMUP_FRACTION:.0f}%% of --epochs; 0 with --pretrained)")
    pruning.add_argument("--ramp-end-epoch", type=_non_negative, default=None,
                         help=f"epoch at which the target is reached, at most --epochs (default: {100 * RAMP_END_FRACTION:.0f}%% of --epochs; "
                              f"{100 * PRETRAINED_RAMP_END_FRACTION:.0f}%% with --pretrained)")
    pruning.add_argument("--ramp-shape", default="linear", choices=RAMP_SHAPES,
                         help="'linear' (the paper) or 'cubic' (better at 95%%+ on short budgets; README, the study) (default: %(default)s)")
    pruning.add_argument("--ramp-updates", default="step", choices=RAMP_UPDATES,
                         help="'step' (the budget grows at every step) or 'epoch' (once per epoch, as the paper's formula and "
                              "PQuantML: better on LeNet-5 at 90-98%%; the study) (default: %(default)s)")
    pruning.add_argument("--anneal-end-epoch", type=_non_negative, default=None,
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
    training.add_argument("--epochs", type=_count, default=30, help="default: %(default)s")
    training.add_argument("--batch-size", type=_count, default=64, help="default: %(default)s")
    training.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="default: %(default)s")
    training.add_argument("--lr", type=_positive, default=0.05, help="peak learning rate (default: %(default)s)")
    training.add_argument("--weight-decay", type=_non_negative, default=5e-4, help="default: %(default)s")
    training.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES, help="default: %(default)s")
    training.add_argument("--seed", type=_seed, default=0, help="default: %(default)s")
    training.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default: %(default)s)")
    training.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                          help="after pruning, re-estimate BatchNorm statistics on 100 training batches; model.pt keeps them "
                               "(gives back a costly hard cut: README, 'After a costly hard cut'; default: when the model has "
                               f"BatchNorm and the hard cut removed over {100 * HARD_CUT_WARNING:g}%% of a tensor's weight energy)")
    training.add_argument("--channels-last", action="store_true", help="NHWC layout for image models (faster convolutions on CPU)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<dataset>-<model>-<time>); see 'output and resume' below")
    output.add_argument("--overwrite", action="store_true", help="delete the run that --out holds (finished, or unfinished with other settings) first: the files pdprune train wrote, no others")
    output.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    output.add_argument("--quiet", action="store_true", help="no progress bars")


def _structures(args: argparse.Namespace) -> tuple[str, ...]:
    return (args.structure, *(structure for _, structure in args.layer_structure))


def check_train_arguments(args: argparse.Namespace) -> None:
    """The checks that need no file and no data: each refuses a combination that would be ignored or wasted.

    Raises:
        ValueError: naming the flags, the values and the fix.
    """
    structures = _structures(args)
    patterns = {parse_structure(s) for s in structures}
    if args.sparsity is not None and all(isinstance(p, tuple) for p in patterns):
        implied = {round(1 - n / m, 12) for n, m in patterns}
        if implied != {round(args.sparsity, 12)}:
            n, m = parse_structure(args.structure)
            others = " and every --layer-structure" if args.layer_structure else ""
            matching = next((f"{k}:{size}" for size in (4, 8, 16) for k in range(1, size) if abs(1 - k / size - args.sparsity) < 1e-9), None)
            raise ValueError(
                f"--sparsity {args.sparsity:g} has no effect with --structure {args.structure}{others}: an N:M pattern sets the sparsity "
                f"itself ({args.structure} keeps {n} of every {m} weights: {1 - n / m:.0%} zeros); drop --sparsity"
                + (f", or use --structure {matching} for {args.sparsity:.0%}" if matching and matching != args.structure else "")
            )
    if args.warmup_epochs is not None and args.warmup_epochs >= args.epochs:
        raise ValueError(
            f"--warmup-epochs {args.warmup_epochs:g} leaves no epoch to prune in: --epochs is {args.epochs}; "
            f"give fewer warm-up epochs (the default is {100 * WARMUP_FRACTION:.0f}% of --epochs) or more --epochs"
        )
    for flag, value in (("--ramp-end-epoch", args.ramp_end_epoch), ("--anneal-end-epoch", args.anneal_end_epoch)):
        if value is not None and value > args.epochs:
            raise ValueError(f"{flag} {value:g} comes after the last epoch (--epochs {args.epochs}); give at most {args.epochs}, or more --epochs")
    if args.no_anneal and args.anneal_end_epoch is not None:
        raise ValueError(f"give --anneal-end-epoch or --no-anneal, not both (got --anneal-end-epoch {args.anneal_end_epoch:g})")
    if args.no_anneal and args.anneal_soft_gradient:
        raise ValueError("--anneal-soft-gradient works while tau anneals, and --no-anneal turns annealing off; drop one of them")
    if args.straight_through and "channel" in structures:
        raise ValueError("--straight-through applies to unstructured and N:M masks, not to 'channel': a pruned channel's "
                         "zeroed norm scale blocks the gradient to its filters; drop --straight-through")
    text_data, text_model = args.dataset in TEXT_DATASETS, args.model in TEXT_MODELS
    if text_data != text_model:
        readers = sorted(TEXT_MODELS) if text_data else sorted(set(MODELS) - TEXT_MODELS)
        what = "token ids (text)" if text_data else "images"
        raise ValueError(f"--model {args.model} cannot read --dataset {args.dataset}, which gives {what}; choose --model from {readers}")
    if args.channels_last and text_data:
        raise ValueError(f"--channels-last is a layout for image inputs; --dataset {args.dataset} gives token ids: drop --channels-last")
    check_device(args.device)
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        problem = "is a directory" if Path(args.pretrained).is_dir() else ": no such file"
        raise ValueError(f"--pretrained {args.pretrained}{' ' if problem[0] != ':' else ''}{problem}; pass the weights file to start from (a state_dict or checkpoint)")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is not a directory; pass the folder that holds the datasets")
    if args.data_dir is None and args.dataset not in EMBEDDED_DATASETS and data_dir() is None:
        raise ValueError(f"--dataset {args.dataset} needs its files: pass --data-dir (or set PDPRUNE_DATA) and --download to fetch them")


def check_device(name: str) -> torch.device:
    """The torch device `name`, if this machine has it.

    Raises:
        ValueError: not a device name, or the device is not available here.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device ({_one_line(error)[:120]}); e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "meta":
        raise ValueError("--device meta holds shapes but no values, so nothing can train on it; use --device cpu or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(1, device=device)
        except Exception as error:  # noqa: BLE001 - any backend's way of saying "not here"
            raise ValueError(f"--device {name} is not usable here ({_one_line(error)[:120]}); use --device cpu") from None
    return device


def _configs(args: argparse.Namespace, steps_per_epoch: int) -> tuple[TrainConfig, PruningConfig]:
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, learning_rate=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed, channels_last=args.channels_last,
    )
    warmup_fraction, ramp_end_fraction = (0.0, PRETRAINED_RAMP_END_FRACTION) if args.pretrained else (WARMUP_FRACTION, RAMP_END_FRACTION)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else round(warmup_fraction * args.epochs, 2)
    if args.ramp_end_epoch is not None and args.ramp_end_epoch < warmup:
        source = "" if args.warmup_epochs is not None else f", the default: {100 * warmup_fraction:.0f}% of --epochs"
        raise ValueError(f"--ramp-end-epoch {args.ramp_end_epoch:g} comes before the warm-up ends (--warmup-epochs {warmup:g}{source}); "
                         "give a later --ramp-end-epoch or fewer --warmup-epochs")
    ramp_end = args.ramp_end_epoch if args.ramp_end_epoch is not None else max(warmup, round(ramp_end_fraction * args.epochs, 2))
    layer_structures = dict(args.layer_structure)
    if args.no_anneal and args.anneal_end_epoch is not None:
        raise ValueError(f"give --anneal-end-epoch or --no-anneal, not both (got --anneal-end-epoch {args.anneal_end_epoch:g})")
    if args.anneal_end_epoch is not None and args.anneal_end_epoch <= ramp_end:
        raise ValueError(f"--anneal-end-epoch {args.anneal_end_epoch:g} must come after the ramp ends (--ramp-end-epoch {ramp_end:g}); "
                         "give a later --anneal-end-epoch, or --no-anneal")
    anneal_end = args.anneal_end_epoch
    structures = (args.structure, *layer_structures.values())
    if anneal_end is None and any(s != "unstructured" for s in structures) and not args.no_anneal and ramp_end < args.epochs:
        anneal_end = round(max(ANNEAL_END_FRACTION * args.epochs, (ramp_end + args.epochs) / 2), 2)
    soft_gradient = args.anneal_soft_gradient
    if soft_gradient and anneal_end is None:
        raise ValueError("--anneal-soft-gradient works while tau anneals, and nothing anneals here (unstructured masks do not by default, "
                         "nor a ramp that ends with the last epoch): add --anneal-end-epoch, or drop --anneal-soft-gradient")
    if soft_gradient is None:
        soft_gradient = anneal_end is not None and any(isinstance(parse_structure(s), tuple) for s in structures)
    straight_through = args.straight_through
    if straight_through is None:
        straight_through = soft_gradient and "channel" not in structures
    pruning_config = PruningConfig(
        sparsity=DEFAULT_SPARSITY if args.sparsity is None else args.sparsity, structure=args.structure, allocation=args.allocation,
        temperature=args.temperature, temperature_mode=args.temperature_mode,
        layer_structures=layer_structures, on_incompatible=args.on_incompatible, straight_through=straight_through,
        include=tuple(args.include), exclude=tuple(args.exclude),
        schedule=ScheduleConfig(warmup_epochs=warmup, ramp_end_epoch=ramp_end, steps_per_epoch=steps_per_epoch,
                                ramp_shape=args.ramp_shape, ramp_updates=args.ramp_updates, anneal_end_epoch=anneal_end,
                                anneal_soft_gradient=soft_gradient),
    )
    return train_config, pruning_config


def _seeded_model(args: argparse.Namespace, dataset) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    vocabulary_size = None if dataset.vocabulary is None else len(dataset.vocabulary)
    model = build_model(args.model, dataset.input_shape, dataset.num_classes, vocabulary_size=vocabulary_size)
    if args.pretrained is not None:  # any model file pdprune writes (model.pt, a sparse file) or a torch state_dict
        try:
            weights = read_state_dict(args.pretrained)[0]
        except ValueError:
            weights = None  # not weights pdprune reads: load_pretrained says what the file holds
        load_pretrained(model, args.pretrained, weights)
    return model.to(args.device)


def _check_model_reads(model: torch.nn.Module, example_inputs: torch.Tensor, args: argparse.Namespace) -> None:
    """One forward pass on two examples, in eval mode (no BatchNorm statistics change)."""
    try:
        with evaluating(model), torch.no_grad():
            model(example_inputs)
    except Exception as error:  # noqa: BLE001 - whatever the model says, the pairing is the user's choice
        raise ValueError(
            f"--model {args.model} cannot take --dataset {args.dataset}'s inputs of shape {tuple(example_inputs.shape[1:])} "
            f"({_one_line(error)[:160]}); choose another --model"
        ) from None


def _attach(model: torch.nn.Module, config: PruningConfig, example_inputs: torch.Tensor, args: argparse.Namespace) -> PDPPruner:
    """The pruner, whose own checks name the pattern or layer at fault; the flag that gave it is named too."""
    try:
        return PDPPruner(model, config, example_inputs=example_inputs)
    except ValueError as error:
        flags = {**{p: "--include" for p in args.include}, **{p: "--exclude" for p in args.exclude},
                 **{p: "--layer-structure" for p, _ in args.layer_structure}}
        message = re.sub(r"\bpattern '([^']*)'", lambda m: f"{flags.get(m.group(1), 'pattern')} '{m.group(1)}'", str(error))
        raise ValueError(message) from error


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides a run's result: a run in --out resumes only under the same settings."""
    values = {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS}
    return json.loads(json.dumps({"pdprune_version": __version__, **values}, default=str))


def _write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all."""
    with atomic_file(path) as file:
        file.write(text)


def _plan_out(out: Path, settings: dict[str, Any], overwrite: bool) -> str:
    """'new', 'resume' or 'replace' for the run directory `out`, reading only.

    Raises:
        ValueError: `out` is a file, holds another run (without --overwrite) or files pdprune did not write.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory (it is created if missing)")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    marker = out / CHECKPOINTS / SETTINGS
    if marker.is_file():
        if overwrite:
            return "replace"
        try:
            saved = json.loads(marker.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved == settings:
            return "resume"
        differences = [f"{'pdprune' if key == 'pdprune_version' else '--' + key.replace('_', '-')} {saved.get(key)!r} there, {settings.get(key)!r} here"
                       for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
        raise ValueError(f"--out {out} holds an unfinished run with other settings ({'; '.join(differences[:4])}); "
                         "rerun its command to resume it, pass --overwrite to delete it, or choose another --out")
    if (out / "run.json").is_file():
        if overwrite:
            return "replace"
        raise ValueError(f"--out {out} already holds a finished run (run.json); pass --overwrite to replace it, or choose another --out")
    entries = sorted(path.name for path in out.iterdir())
    raise ValueError(f"--out {out} is not empty and holds no pdprune run ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); "
                     "choose a new or empty directory (--overwrite replaces only what pdprune train wrote)")


TRAIN_OUTPUTS = ("model.pt", "model_compacted.pt", "report.md", "run.json")  # with CHECKPOINTS: what --overwrite replaces


def _prepare_out(out: Path, plan: str, settings: dict[str, Any]) -> None:
    """Make `out` ready; "replace" deletes what `pdprune train` wrote there, and nothing else (the files
    `pdprune export` and `report` add, a user's notes)."""
    if plan == "replace":
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        for name in TRAIN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    if plan in ("new", "replace"):
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        _write_text(out / CHECKPOINTS / SETTINGS, json.dumps(settings, indent=1) + "\n")


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    argv = [a for a in args.argv if a != "--overwrite"]  # rerun as is, it would delete what it should resume
    if args.out is None:
        argv += ["--out", str(out)]
    return shlex.join(["pdprune", *argv])


def command_train(args: argparse.Namespace) -> int:
    check_train_arguments(args)
    out = args.out or Path("runs") / f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = _settings(args)
    plan = _plan_out(out, settings, args.overwrite)
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    train_config, pruning_config = _configs(args, dataset.steps_per_epoch(args.batch_size))
    model = _seeded_model(args, dataset)
    example_inputs = dataset.train_inputs[:2].to(args.device)
    _check_model_reads(model, example_inputs, args)
    if args.recalibrate_bn and not has_batchnorm(model):
        raise ValueError(f"--recalibrate-bn: model {args.model!r} has no BatchNorm layer; drop the option")
    pruner = _attach(model, pruning_config, example_inputs, args)

    # Everything is checked: from here on, files are written and an interruption can be resumed.
    _prepare_out(out, plan, settings)
    checkpoints = out / CHECKPOINTS
    args.on_interrupt = f"resume from the last finished epoch with: {_resume_command(args, out)}"
    if plan == "resume":
        print(f"resuming the unfinished run in {out} (same settings)")
    dense = None
    if not args.no_dense:
        if (checkpoints / "dense.json").is_file():
            dense = TrainResult(**json.loads((checkpoints / "dense.json").read_text()))
        else:
            dense_model = _seeded_model(args, dataset)
            torch.manual_seed(args.seed)  # training's own random numbers (dropout) start alike in every run
            dense = train(dense_model, dataset, train_config, checkpoint_path=checkpoints / "dense.pt", progress=not args.quiet, description="dense")
            _write_text(checkpoints / "dense.json", json.dumps(asdict(dense)) + "\n")
            (checkpoints / "dense.pt").unlink(missing_ok=True)
            del dense_model
    torch.manual_seed(args.seed)
    pruned = train(model, dataset, train_config, pruner, checkpoint_path=checkpoints / "pdp.pt", progress=not args.quiet, description="PDP")
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
    _write_text(out / "report.md", report.table() + "\n")
    run = {
        "pdprune_version": __version__, "torch_version": torch.__version__,
        "command": shlex.join(["pdprune", *args.argv]),
        "dataset": args.dataset, "model": args.model,
        "train_config": asdict(train_config), "pruning_config": pruning_config.to_dict(),
        "dense": None if dense is None else asdict(dense), "pdp": asdict(pruned),
        "pdp_accuracy_bn_recalibrated": recalibrated, "report": report.to_dict(),
        "compaction": compaction,
    }
    _write_text(out / "run.json", json.dumps(run, indent=2) + "\n")  # last: its presence marks a finished run
    shutil.rmtree(checkpoints)
    args.on_interrupt = f"the run had finished: {out / 'run.json'}"

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


# --- pdprune bench, report, export -------------------------------------------------------------------


def command_bench(args: argparse.Namespace) -> int:
    if not args.config.is_file():
        raise ValueError(f"grid file {str(args.config)!r} not found; e.g. benchmarks/configs/quick.toml")
    grid = load_grid(args.config)
    if args.device is not None:
        check_device(args.device)
        grid = replace(grid, runs=tuple(replace(run, device=args.device) for run in grid.runs))
    if args.seeds:
        seeds = sorted({run.seed for run in grid.runs})
        unknown = sorted(set(args.seeds) - set(seeds))
        if unknown:
            raise ValueError(f"--seeds {' '.join(map(str, unknown))}: grid {grid.name!r} has seeds {seeds}")
        grid = replace(grid, runs=tuple(run for run in grid.runs if run.seed in args.seeds))
    if args.only and not any(text in run.key for run in grid.runs for text in args.only):
        keys = [run.key for run in grid.runs]
        shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} runs in all)" if len(keys) > 20 else "")
        raise ValueError(f"--only {' '.join(map(repr, args.only))} matches no run of grid {grid.name!r}; "
                         f"--only keeps the runs whose key contains the text, and the keys are: {shown}")
    if grid.config["dataset"] not in EMBEDDED_DATASETS and data_dir(args.data_dir) is None:
        raise ValueError(f"grid {grid.name!r} trains on {grid.config['dataset']!r}: pass --data-dir or set PDPRUNE_DATA")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is not a directory; pass the folder that holds the datasets")
    out = args.out or Path("benchmarks/results") / grid.name
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory (it is created if missing)")
    args.on_interrupt = (f"finished runs are kept in {out / 'results.jsonl'}; rerun the same command to resume "
                         "(the run in progress resumes from its last finished epoch)")
    rows = run_grid(grid, out, args.data_dir, progress=not args.quiet, only=args.only)
    if rows:
        print(summarize(rows, out, f"{grid.name}: {grid.config['dataset']} / {grid.config['model']}, {grid.config['train'].get('epochs')} epochs",
                        grid.unsupported))
    print(f"{len(rows)} of {len(grid.runs)} runs done; results in {out / 'results.jsonl'}")
    return 0


def _input_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass {what}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass {what}")


def _output_file(path: Path, source: Path, flag: str, overwrite: bool | None = None) -> None:
    """`path` may be written: not a directory, not the input, not an existing file unless `overwrite`."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name, e.g. {path / ('model' + (path.suffix or '.pt'))}")
    if path.exists() and (path.resolve() == source.resolve() or os.path.samefile(path, source)):
        raise ValueError(f"{flag} {path} is the input file; writing it would destroy the input: choose another name")
    if overwrite is False and path.exists():
        raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {path.parent} does not exist; create it first")


def command_report(args: argparse.Namespace) -> int:
    _input_file(args.model, "a model file, e.g. runs/demo/model.pt")
    plot = args.plot or args.model.with_suffix(".sparsity.png")
    _output_file(plot, args.model, "--plot" if args.plot else "the plot")
    weights, _ = read_state_dict(args.model)
    report = state_dict_sparsity(weights)
    if not report.layers:
        raise ValueError(f"{args.model} holds no weight matrix or filter bank to report on")
    print(report.table())
    try:
        plot_sparsity(report, weights, plot, title=str(args.model.name))
        print(f"plot: {plot}")
    except ImportError:
        print("(no plot: pip install matplotlib)")
    return 0


def _architecture(path: Path, metadata: dict[str, Any]) -> torch.nn.Module:
    if "model_name" not in metadata:
        raise ValueError(f"ONNX export needs the architecture: {path} was not written by `pdprune train` (no model_name)")
    return build_model(metadata["model_name"], tuple(metadata["input_shape"]), metadata["num_classes"], vocabulary_size=metadata.get("vocabulary_size"))


def command_export(args: argparse.Namespace) -> int:
    _input_file(args.model, "a model file, e.g. runs/demo/model.pt")
    _output_file(args.out, args.model, "OUT", overwrite=args.overwrite)
    weights, metadata = read_state_dict(args.model)
    if (args.format or ("onnx" if args.out.suffix == ".onnx" else "sparse")) == "sparse":
        save_sparse(args.out, weights, **metadata)
    else:
        model = _architecture(args.model, metadata)
        if str(metadata.get("format", "")).startswith("pdprune.compacted/"):
            if str(load_checkpoint(args.model).get("format", "")).startswith("pdprune.sparse/"):
                raise ValueError(f"{args.model} is a sparse copy of a compacted model; ONNX export rebuilds the compacted "
                                 "architecture from the model_compacted.pt that pdprune train wrote: export that file")
            model = load_compacted(args.model, model)
        else:
            try:
                model.load_state_dict(weights)
            except RuntimeError as error:
                raise ValueError(f"{args.model}'s weights do not fit model {metadata['model_name']!r}: {_one_line(error)[:200]}") from None
        example = torch.zeros(1, *metadata["input_shape"], dtype=torch.long if metadata["model_name"] in TEXT_MODELS else torch.float32)
        with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".pdprune-export-") as scratch:
            export_onnx(model, example, Path(scratch) / "model.onnx")  # complete or nothing at args.out
            os.replace(Path(scratch) / "model.onnx", args.out)
    before, after = args.model.stat().st_size, args.out.stat().st_size
    print(f"wrote {args.out}: {after:,} bytes ({100 * after / before:.1f}% of {args.model}'s {before:,})")
    return 0


# --- the parser and the one place that turns exceptions into exit codes ----------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the full traceback")
    parser = _Parser(prog="pdprune", description="Parameter-free Differentiable Pruning for PyTorch models.", epilog=MAIN_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pdprune {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="on an error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,report,export}")
    train_parser = commands.add_parser("train", parents=[debug], help="prune a model on a dataset to a target sparsity",
                                       epilog=TRAIN_EPILOG + "\n" + MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=command_train)
    bench_parser = commands.add_parser("bench", parents=[debug], help="run (or resume) a benchmark grid from a TOML config")
    bench_parser.add_argument("config", type=Path, help="grid file, e.g. benchmarks/configs/quick.toml")
    bench_parser.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results/<grid name>)")
    bench_parser.add_argument("--data-dir", default=None, help="directory of the datasets (default: $PDPRUNE_DATA)")
    bench_parser.add_argument("--only", action="append", default=[], metavar="TEXT", help="run only the runs whose key contains TEXT (repeatable)")
    bench_parser.add_argument("--seeds", type=_seed, nargs="+", default=None, help="run only these of the grid's seeds")
    bench_parser.add_argument("--device", default=None, help="run every run on this torch device (default: the grid's, else cpu)")
    bench_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    bench_parser.set_defaults(handler=command_bench)
    report_parser = commands.add_parser("report", parents=[debug], help="per-layer sparsity table and plot of any saved model")
    report_parser.add_argument("model", type=Path, help="a model file: pdprune's model.pt or sparse file, or a torch state_dict")
    report_parser.add_argument("--plot", type=Path, default=None, help="where to write the plot (default: next to MODEL, .sparsity.png)")
    report_parser.set_defaults(handler=command_report)
    export_parser = commands.add_parser("export", parents=[debug], help="write a model compressed (sparse bitmask + values) or as ONNX")
    export_parser.add_argument("model", type=Path, help="a model file, e.g. the model.pt or model_compacted.pt that `pdprune train` wrote")
    export_parser.add_argument("out", type=Path, help="the file to write (not the input; an existing file only with --overwrite)")
    export_parser.add_argument("--format", default=None, choices=("sparse", "onnx"), help="default: onnx if OUT ends in .onnx, else sparse")
    export_parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export_parser.set_defaults(handler=command_export)
    parser.commands = {"train": train_parser, "bench": bench_parser, "report": report_parser, "export": export_parser}
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Returns 0; a mistake, a bug or Ctrl-C exits (SystemExit) with 2, 1 or 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command]
        options = [option for action in command._actions for option in action.option_strings]
        guesses = [match for word in unknown if word.startswith("-") for match in difflib.get_close_matches(word.split("=")[0], options, n=1)]
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {', '.join(guesses)}?" if guesses else ""))
    args.argv = argv
    prog = f"pdprune {args.command}"
    words = cli_words if args.command == "train" else str  # bench's grid files use the API's names
    default_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"{prog}: warning: {words(str(message))}\n"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: interrupted; {getattr(args, 'on_interrupt', 'nothing was written')}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (ValueError, OSError, ImportError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {words(_one_line(error))}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    except Exception as error:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: internal error ({type(error).__name__}: {_one_line(error)[:300]}); this is a bug in pdprune {__version__}: "
              "rerun with --debug and report the traceback", file=sys.stderr)
        raise SystemExit(EXIT_INTERNAL) from None
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
