"""The benchmark harness: a grid of method x sparsity x seed on real data, every run with the same
epochs, optimizer, learning-rate schedule and data order; resumable, written as JSON lines.

A grid is a TOML file (see `benchmarks/configs/`):

    name = "quick"
    dataset = "fashion_mnist"
    model = "lenet5"
    seeds = [0, 1, 2]
    [train]                      # TrainConfig fields
    epochs = 10
    [schedule]                   # when pruning starts and when the target is reached
    warmup_epochs = 1
    ramp_end_epoch = 6
    [[runs]]
    methods = ["dense"]
    [[runs]]
    methods = ["pdp", "gmp"]
    structure = "unstructured"
    sparsities = [0.9, 0.95]

Optional: a `[pdp]` table of PruningConfig fields for every PDP entry (the grids recorded before LAMP
became the default allocation pin the paper's `allocation = "global"` there, so that they rerun as
recorded), `pretrained` (a weights file under the data directory), `train_limit` (first examples only),
`device` ("cuda"), and per `[[runs]]` entry `label` and `pdp` (extra PruningConfig fields, and a
`schedule` table of ScheduleConfig overrides) for PDP variants, `schedule` (its own `warmup_epochs`
and `ramp_end_epoch`, for every method of the entry: a baseline on PDP's schedule), `seeds` (more
seeds for the runs that a comparison hinges on than the grid's own), and, with a `label`, `options`
(a baseline's own settings, e.g. `options = { temperature = 3e-4 }` for `pquant_pdp`).

A baseline listed at a structure it cannot do (see `BASELINES`, e.g. PQuantML's PDP at "2:4") is not
run: the grid records it, and the summary table says "not supported" in its row.
"""

from __future__ import annotations

import json
import os
import textwrap
import statistics
import time
import tomllib
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pdprune._version import __version__
from pdprune.baselines import BASELINES, MethodSpec, build_baseline, structure_kind
from pdprune.config import PruningConfig, parse_structure
from pdprune.data import load_dataset, data_dir as resolve_data_dir
from pdprune.models import build_model, load_pretrained
from pdprune.pruner import PDPPruner
from pdprune.report import model_sparsity
from pdprune.schedule import ScheduleConfig
from pdprune.structure import compact, count_macs_and_parameters
from pdprune.train import PruningMethod, TrainConfig, evaluate_splits, recalibrate_batchnorm, train

__all__ = ["RunSpec", "Grid", "load_grid", "build_method", "run_one", "run_grid", "summarize", "METHODS"]

METHODS = ("dense", "pdp", *BASELINES)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. `key` names it in the results and checkpoints."""

    dataset: str
    model: str
    method: str
    structure: str
    sparsity: float
    seed: int
    train: TrainConfig
    warmup_epochs: float
    ramp_end_epoch: float
    pretrained: str | None = None
    pdp: dict[str, Any] = field(default_factory=dict)  # extra PruningConfig fields for PDP (temperature, ...)
    label: str | None = None  # a name for a variant, e.g. "pdp tau=0.1"
    train_limit: int | None = None  # use only the first examples of each split (smoke tests)
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # a baseline's own settings (MethodSpec.options)

    @property
    def name(self) -> str:
        return self.label or self.method

    @property
    def key(self) -> str:
        setting = "dense" if self.method == "dense" else f"{self.structure}-{self.sparsity:g}"
        return f"{self.dataset}-{self.model}-{self.name.replace(' ', '_')}-{setting}-seed{self.seed}"


@dataclass(frozen=True)
class Grid:
    """The runs of a grid file, and the (method name, structure, sparsity) cells it lists that the
    method cannot do, which the summary marks "not supported"."""

    name: str
    runs: tuple[RunSpec, ...]
    config: dict[str, Any]
    unsupported: tuple[tuple[str, str, float], ...] = ()


def _checked_schedule(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A grid's schedule table: every method's warm-up and ramp end, nothing else."""
    unknown = sorted(set(table) - {"warmup_epochs", "ramp_end_epoch"})
    if unknown:
        raise ValueError(f"{where} takes warmup_epochs and ramp_end_epoch, got {unknown}; "
                         "other ScheduleConfig fields go under pdp = { schedule = { ... } }")
    return table


RUN_KEYS = ("methods", "structure", "sparsities", "label", "pdp", "schedule", "seeds", "options")
"""What a [[runs]] entry may set."""
SET_BY_THE_ENTRY = ("sparsity", "structure")
"""PruningConfig fields that a run's entry sets (and its key names): a `pdp` table may not change them."""


def _checked_seeds(seeds: Any, where: str) -> list[int]:
    """A non-empty list of integers >= 0 (the seeds of torch.manual_seed), else ValueError naming `where`."""
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers >= 0, got {seeds!r}; e.g. seeds = [0, 1, 2]")
    return seeds


def _checked_entry(entry: Any, index: int) -> None:
    """Refuse a [[runs]] entry that would expand into other runs than it says: unknown keys, a string or a
    number where a list belongs, empty lists. Raises ValueError naming the entry and the key."""
    where = f"runs[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a [[runs]] entry is a table, got {entry!r}")
    unknown = sorted(set(entry) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a [[runs]] entry takes {list(RUN_KEYS)}")
    methods = entry.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(method, str) for method in methods):
        example = f"[{methods!r}]" if isinstance(methods, str) else '["pdp"]'
        raise ValueError(f"{where}: methods must be a non-empty list of names, some of {list(METHODS)}, got {methods!r}; e.g. methods = {example}")
    if "sparsities" in entry:
        sparsities = entry["sparsities"]
        fractions = isinstance(sparsities, list) and all(
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1 for value in sparsities)
        if not sparsities or not fractions:
            example = f"[{sparsities!r}]" if isinstance(sparsities, int | float) and not isinstance(sparsities, bool) else "[0.9, 0.95]"
            raise ValueError(f"{where}: sparsities must be a non-empty list of fractions in [0, 1), got {sparsities!r}; e.g. sparsities = {example}")
    for key in ("pdp", "options", "schedule"):
        if key in entry and not isinstance(entry[key], dict):
            raise ValueError(f"{where}: {key} must be a table, e.g. {key} = {{ ... }}, got {entry[key]!r}")
    if "label" in entry and not isinstance(entry["label"], str):
        raise ValueError(f"{where}: label must be a string, got {entry['label']!r}")
    if "seeds" in entry:
        _checked_seeds(entry["seeds"], where)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read a grid TOML file and expand it into runs. Raises ValueError naming the bad entry."""
    try:
        config = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"grid {str(path)!r} is not valid TOML: {error}") from None
    for required in ("name", "dataset", "model", "seeds", "runs"):
        if required not in config:
            raise ValueError(f"grid {str(path)!r} lacks {required!r}")
    unknown = sorted(set(config.get("train", {})) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"grid {str(path)!r}: [train] has unknown fields {unknown}; TrainConfig takes {[f.name for f in fields(TrainConfig)]}")
    train_config = TrainConfig(**config.get("train", {}))
    schedule = _checked_schedule(config.get("schedule", {}), "[schedule]")
    _checked_seeds(config["seeds"], f"grid {str(path)!r}")
    if not isinstance(config["runs"], list) or not config["runs"]:
        raise ValueError(f"grid {str(path)!r}: runs must be a non-empty list of [[runs]] tables")
    runs, unsupported = [], []
    for index, entry in enumerate(config["runs"]):
        _checked_entry(entry, index)
        entry_schedule = {**schedule, **_checked_schedule(entry.get("schedule", {}), f"runs[{index}]: schedule")}
        warmup_epochs = float(entry_schedule.get("warmup_epochs", 1))
        ramp_end_epoch = float(entry_schedule.get("ramp_end_epoch", train_config.epochs // 2))
        epochs = train_config.epochs
        if not (0 <= warmup_epochs < epochs and warmup_epochs <= ramp_end_epoch <= epochs):
            raise ValueError(
                f"runs[{index}]: the schedule does not fit in {epochs} epochs: warmup_epochs {warmup_epochs:g} and ramp_end_epoch "
                f"{ramp_end_epoch:g} need 0 <= warmup_epochs < epochs and warmup_epochs <= ramp_end_epoch <= epochs (defaults: 1 and "
                "epochs // 2); set them under [schedule] or in the entry's schedule"
            )
        for method in entry["methods"]:
            if method not in METHODS:
                raise ValueError(f"runs[{index}]: unknown method {method!r}; choose from {list(METHODS)}")
            structure = entry.get("structure", "unstructured")
            try:
                parsed = parse_structure(structure)
            except ValueError as error:
                raise ValueError(f"runs[{index}]: {error}") from None
            sparsities = [0.0] if method == "dense" else entry.get("sparsities", [1 - parsed[0] / parsed[1]] if isinstance(parsed, tuple) else None)
            if sparsities is None:
                raise ValueError(f"runs[{index}]: give sparsities for structure {structure!r}")
            if method in BASELINES and structure_kind(structure) not in BASELINES[method][0]:
                unsupported += [(entry.get("label") or method, structure, float(sparsity)) for sparsity in sparsities]
                continue
            options = dict(entry.get("options", {}))
            if options and method not in BASELINES:
                raise ValueError(f"runs[{index}]: options are a baseline's own settings; {method!r} takes none (PDP's go under pdp = {{ ... }})")
            if options and "label" not in entry:
                raise ValueError(f"runs[{index}]: options make a variant: give it a label, e.g. label = \"{method} {next(iter(options))}\"")
            allowed = getattr(BASELINES[method][1], "OPTIONS", ()) if options else ()
            if set(options) - set(allowed):
                raise ValueError(f"runs[{index}]: {method!r} has no option {sorted(set(options) - set(allowed))}; its options: {list(allowed)}")
            seeds = entry.get("seeds", config["seeds"])
            for sparsity in sparsities:
                for seed in seeds:
                    runs.append(RunSpec(
                        config["dataset"], config["model"], method, structure, float(sparsity), int(seed),
                        TrainConfig(**{**asdict(train_config), "seed": int(seed)}),
                        warmup_epochs, ramp_end_epoch,
                        config.get("pretrained"), _pdp_settings(config, entry) if method == "pdp" else {}, entry.get("label"),
                        config.get("train_limit"), config.get("device", "cpu"), dict(options),
                    ))
                    if method == "pdp":  # a bad setting fails here, not hours into the grid
                        try:
                            pdp_config(runs[-1], steps_per_epoch=1)
                        except (TypeError, ValueError) as error:
                            raise ValueError(f"runs[{index}]: pdp at sparsity {float(sparsity):g}: {error}") from None
    keys = [run.key for run in runs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"grid {str(path)!r} has the same run twice: {duplicates[:3]}; give PDP variants a distinct label")
    return Grid(config["name"], tuple(runs), config, tuple(unsupported))


def _pdp_settings(config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """PDP's PruningConfig fields for an entry: the grid's [pdp] table, then the entry's own `pdp`."""
    grid, own = dict(config.get("pdp", {})), dict(entry.get("pdp", {}))
    schedule = {**grid.pop("schedule", {}), **own.pop("schedule", {})}
    return {**grid, **own, **({"schedule": schedule} if schedule else {})}


def pdp_config(spec: RunSpec, steps_per_epoch: int) -> PruningConfig:
    """The PruningConfig of a PDP run: its sparsity, structure and schedule, with the entry's `pdp` overrides."""
    overrides = dict(spec.pdp)
    clash = [name for name in SET_BY_THE_ENTRY if name in overrides]
    if clash:
        raise ValueError(
            f"pdp settings may not set {clash}: the entry's sparsities and structure do, and name the run; "
            "write them in the [[runs]] entry instead, e.g. sparsities = [0.5] and structure = \"2:4\""
        )
    schedule = {"warmup_epochs": spec.warmup_epochs, "ramp_end_epoch": spec.ramp_end_epoch, **overrides.pop("schedule", {})}
    return PruningConfig.from_dict({
        "sparsity": spec.sparsity, "structure": spec.structure,
        "schedule": ScheduleConfig(steps_per_epoch=steps_per_epoch, **schedule), **overrides,
    })


def build_method(spec: RunSpec, model: nn.Module, example: Tensor, steps_per_epoch: int) -> PruningMethod | None:
    """Attach the run's pruning method to `model` (None for dense): PDP with the run's overrides, or a baseline."""
    if spec.method == "dense":
        return None
    if spec.method == "pdp":
        return PDPPruner(model, pdp_config(spec, steps_per_epoch), example_inputs=example)
    return build_baseline(spec.method, model, MethodSpec(spec.sparsity, spec.structure, spec.warmup_epochs, spec.ramp_end_epoch, steps_per_epoch, dict(spec.options)), example)


def run_one(spec: RunSpec, data_dir: str | os.PathLike | None, checkpoint: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one run of the grid and measure it: accuracy per split, achieved sparsity, time, size."""
    dataset = load_dataset(spec.dataset, data_dir)
    if spec.train_limit is not None:
        dataset = dataset.subset(spec.train_limit, spec.train_limit)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, dataset.input_shape, dataset.num_classes,
                        vocabulary_size=None if dataset.vocabulary is None else len(dataset.vocabulary))
    if spec.pretrained is not None:
        load_pretrained(model, (resolve_data_dir(data_dir) or Path(".")) / spec.pretrained)
    model = model.to(spec.device)
    example = dataset.train_inputs[:2].to(spec.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense are reported in the results instead
        method = build_method(spec, model, example, dataset.steps_per_epoch(spec.train.batch_size))
        result = train(model, dataset, spec.train, method, checkpoint_path=checkpoint, progress=progress, description=spec.key)
    report = model_sparsity(model)
    hard_cut = getattr(method, "hard_cut", {})
    row: dict[str, Any] = {
        "hard_cut_max": max(hard_cut.values(), default=0.0),
        "key": spec.key, "dataset": spec.dataset, "model": spec.model, "method": spec.name, "structure": spec.structure,
        "target_sparsity": spec.sparsity, "seed": spec.seed, "accuracy": result.accuracy,
        "achieved_sparsity": report.sparsity, "train_seconds": result.seconds, "epochs": spec.train.epochs,
        "history": result.history, "spec": {**asdict(spec), "train": asdict(spec.train)},
        "pdprune_version": __version__, "torch_version": torch.__version__,
    }
    if spec.structure == "channel" or spec.method == "dense":
        small = compact(model, example[:1]) if spec.structure == "channel" else model
        row["macs"], row["parameters"] = count_macs_and_parameters(small, example[:1])
    row["device"] = spec.device
    if recalibrate_batchnorm(model, dataset, spec.train.batch_size, seed=spec.seed):  # a diagnostic: how much of the
        # final accuracy fresh BatchNorm statistics would add; `accuracy` stays what the method gave
        row["accuracy_bn_recalibrated"] = evaluate_splits(model, dataset)
    return row


def _completed(results: Path) -> dict[str, dict[str, Any]]:
    """Finished runs by key; a torn last line (a crash mid-write) is ignored and redone."""
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def run_grid(grid: Grid, out: Path, data_dir: str | os.PathLike | None, progress: bool = True, only: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run every run of `grid` not yet in `out/results.jsonl`, appending each result as it finishes.

    An interrupted run resumes from its last epoch checkpoint in `out/checkpoints/`. `only` keeps the
    runs whose key contains one of its strings, so that several workers can share a grid (each result
    file line is re-read before a run starts, so no run is done twice by workers with disjoint `only`).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(grid.config, indent=1) + "\n")
    results = out / "results.jsonl"
    done = _completed(results)
    pending = [run for run in grid.runs if run.key not in done and (not only or any(text in run.key for text in only))]
    for run in tqdm(pending, desc=f"grid {grid.name}", disable=not progress):
        done |= _completed(results)
        if run.key in done:
            continue
        checkpoint = out / "checkpoints" / f"{run.key}.pt"
        started = time.perf_counter()
        row = run_one(run, data_dir, checkpoint, progress=progress)  # the batches of the run in progress, under the grid's bar
        row["wall_seconds"] = time.perf_counter() - started
        with open(results, "a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())
        checkpoint.unlink(missing_ok=True)
        done[run.key] = row
    return [done[run.key] for run in grid.runs if run.key in done]


def _setting(method: str, structure: str, sparsity: float) -> str:
    """A table row's setting: "dense", "90%", "2:4" or "channel 50%"."""
    if method == "dense":
        return "dense"
    return {"unstructured": f"{100 * sparsity:g}%", "channel": f"channel {100 * sparsity:g}%"}.get(structure, structure)


def summarize(rows: list[dict[str, Any]], out: Path, title: str, unsupported: Sequence[tuple[str, str, float]] = ()) -> str:
    """Markdown table (mean ± std over seeds) and a plot of accuracy vs sparsity, one line per method;
    a "not supported" row for each (method, structure, sparsity) of `unsupported` (`Grid.unsupported`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(_setting(row["method"], row["structure"], row["target_sparsity"]), row["method"])].append(row)
    for method, structure, sparsity in unsupported:  # a placeholder with no results
        groups[(_setting(method, structure, sparsity), method)] = [{"method": method, "structure": structure, "target_sparsity": sparsity}]
    splits = list(rows[0]["accuracy"]) if rows else []

    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    def order(item: tuple[tuple, list[dict]]) -> tuple:
        (_, method), members = item
        structure = members[0]["structure"]
        rank = 0 if method == "dense" else 1 if structure == "unstructured" else 2 if structure != "channel" else 3
        return rank, members[0]["target_sparsity"], structure, not method.startswith("pdp"), method != "pdp", method

    groups = dict(sorted(groups.items(), key=order))
    header = ["setting", "method", "seeds", *[f"{split} accuracy (%)" for split in splits], "achieved sparsity", "train time (s)"]
    if any("parameters" in row for row in rows):
        header.append("parameters")
    recalibrated = splits and any("accuracy_bn_recalibrated" in row for row in rows)
    if recalibrated:
        header += [f"{split}, BatchNorm re-estimated (%)" for split in splits]
    lines = [f"{title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (setting, method), members in groups.items():
        if "accuracy" not in members[0]:
            lines.append("| " + " | ".join([setting, method, "-", "not supported", *[""] * (len(header) - 4)]) + " |")
            continue
        cells = [setting, method, str(len(members))]
        cells += [mean_std([100 * m["accuracy"][split] for m in members]) for split in splits]
        cells += [f"{100 * statistics.mean(m['achieved_sparsity'] for m in members):.2f}%", f"{statistics.mean(m['train_seconds'] for m in members):.0f}"]
        if "parameters" in header:
            cells.append(f"{members[0]['parameters']:,}" if "parameters" in members[0] else "")
        if recalibrated:
            for split in splits:
                scores = [100 * m["accuracy_bn_recalibrated"][split] for m in members if "accuracy_bn_recalibrated" in m]
                cells.append(mean_std(scores) if len(scores) == len(members) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    _plot(groups, splits[0] if splits else None, out / "accuracy_vs_sparsity.png", title)
    return table


CHART_DEPTH = 10.0
"""A method with a point more than this many points below dense is left off the plot (and named on it)."""


def _plot(groups: dict[tuple, list[dict]], split: str | None, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if split is None:
        return
    by_method: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    dense = None
    for (setting, method), members in groups.items():
        if "accuracy" not in members[0]:
            continue  # not supported
        scores = [100 * m["accuracy"][split] for m in members]
        if method == "dense":
            dense = statistics.mean(scores)
        elif members[0]["structure"] == "unstructured":  # at the sparsity reached, not the one asked for
            reached = 100 * statistics.mean(m["achieved_sparsity"] for m in members)
            by_method[method].append((reached, statistics.mean(scores), statistics.pstdev(scores)))
    below = sorted(m for m, points in by_method.items() if dense is not None and any(p[1] < dense - CHART_DEPTH for p in points))
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for method, points in sorted(by_method.items()):
        if method not in below:  # a diverged run would squash every other curve into a line
            points.sort()
            axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=method)
    if dense is not None:
        axis.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    if below:
        axis.text(0.01, 0.01, f"left out, more than {CHART_DEPTH:g} points below dense: {', '.join(below)} (in the table)",
                  transform=axis.transAxes, fontsize=7)
    axis.set_xlabel("sparsity reached, unstructured (%)")
    axis.set_ylabel(f"{split} accuracy (%)")
    axis.set_title(textwrap.fill(title, 70), fontsize=8)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
