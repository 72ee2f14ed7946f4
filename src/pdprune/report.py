"""Sparsity reports: per-tensor and overall counts, as data and as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from pdprune.layers import DEFAULT_MODULE_TYPES, EXPERT_TENSORS, layer_type_of, layer_types

__all__ = ["LayerSparsity", "GroupSparsity", "SparsityReport", "model_sparsity", "state_dict_sparsity", "plot_sparsity"]


@dataclass(frozen=True)
class LayerSparsity:
    """One prunable tensor: its size, exact zeros, and (under a pruner) its target and current sparsity."""

    name: str
    structure: str
    parameters: int
    zeros: int
    target: float | None = None
    current: float | None = None

    @property
    def sparsity(self) -> float:
        """The fraction of this tensor's entries that are exactly zero."""
        return self.zeros / max(self.parameters, 1)  # a tensor with no entries has none zero


@dataclass(frozen=True)
class GroupSparsity:
    """One group of coupled channels (or attention heads): how many it has, how many are gone (zero in
    every coupled tensor)."""

    name: str
    channels: int
    pruned: int
    members: tuple[str, ...]
    target: float | None = None
    current: float | None = None
    kind: str = "channel"


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor sparsity of a model, totals over the listed tensors, and channel groups if any.

    `skipped` names what was left dense and why (layers and channel or head groups that cannot be pruned
    as asked, layers of a known type outside `module_types`, ...).
    """

    layers: tuple[LayerSparsity, ...]
    groups: tuple[GroupSparsity, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        """Entries of all listed tensors."""
        return sum(layer.parameters for layer in self.layers)

    @property
    def zeros(self) -> int:
        """Exact zeros in all listed tensors."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """The fraction of the listed tensors' entries that are exactly zero."""
        return self.zeros / max(self.parameters, 1)

    @property
    def target(self) -> float | None:
        """The budgets' overall sparsity (weighted by tensor size), or None outside a pruner's report."""
        if any(layer.target is None for layer in self.layers):
            return None
        return sum(layer.target * layer.parameters for layer in self.layers) / max(self.parameters, 1)

    def to_dict(self) -> dict:
        """The report as plain values (per tensor, totals, groups, skipped layers), for JSON."""
        return {
            "layers": [asdict(layer) | {"sparsity": layer.sparsity} for layer in self.layers],
            "parameters": self.parameters,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "target": self.target,
            "groups": [asdict(group) for group in self.groups],
            "skipped": dict(self.skipped),
        }

    def table(self) -> str:
        """A Markdown table, one row per tensor and a total row."""

        def percent(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.2f}%"

        rows = [("tensor", "structure", "parameters", "target", "current", "zeros")]
        for layer in self.layers:
            rows.append(
                (layer.name, layer.structure, f"{layer.parameters:,}", percent(layer.target),
                 percent(layer.current), percent(layer.sparsity))
            )
        rows.append(("total", "", f"{self.parameters:,}", percent(self.target), "", percent(self.sparsity)))
        lines = _markdown(rows)
        if self.groups:
            group_rows = [("channel or head group", "units", "target", "current", "pruned", "tensors")]
            for group in self.groups:
                group_rows.append((group.name, f"{group.channels} {group.kind}s", percent(group.target), percent(group.current),
                                   f"{group.pruned} ({percent(group.pruned / group.channels)})", str(len(group.members))))
            lines += [""] + _markdown(group_rows)
        if self.skipped:
            lines += [""] + [f"left dense: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _markdown(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return lines


def model_sparsity(model: nn.Module, module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES) -> SparsityReport:
    """Exact zeros of every weight of the given layer types (`pdprune.layers`), for any model (pruned by us or not)."""
    known = layer_types()
    layers = []
    for module_name, module in model.named_modules():
        layer_type = layer_type_of(module, known)
        if layer_type is not None and layer_type.name in module_types:
            for attribute in layer_type.tensors_of(module):
                weight = getattr(module, attribute)
                name = f"{module_name}.{attribute}" if module_name else attribute
                layers.append(LayerSparsity(name, "-", weight.numel(), int((weight == 0).sum())))
    return SparsityReport(tuple(layers))


def state_dict_sparsity(state_dict: dict) -> SparsityReport:
    """Exact zeros of every weight matrix or filter bank of a state_dict: `*.weight` with 2+ dimensions,
    and the 3-D matrices of Hugging Face's experts (`*.gate_up_proj`, `*.up_proj`, `*.down_proj`)."""
    def counted(name: str, tensor) -> bool:
        dims = getattr(tensor, "dim", lambda: 0)()
        return (name.endswith("weight") and dims >= 2) or (name.rpartition(".")[2] in EXPERT_TENSORS and dims == 3)

    layers = [LayerSparsity(name, "-", tensor.numel(), int((tensor == 0).sum())) for name, tensor in state_dict.items() if counted(name, tensor)]
    return SparsityReport(tuple(layers))


def plot_sparsity(report: SparsityReport, weights: dict, path, title: str = "") -> None:
    """Two panels: sparsity per tensor, and the histogram of the kept weights' magnitudes (log scale)
    with the smallest kept magnitude of the model marked (where the hard threshold fell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    figure, (bars, histogram) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.22 * len(report.layers))), gridspec_kw={"width_ratios": [1.2, 1]})
    names = [layer.name for layer in report.layers]
    bars.barh(range(len(names)), [100 * layer.sparsity for layer in report.layers], color="tab:blue")
    bars.set_yticks(range(len(names)), names, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 100)
    bars.set_xlabel("zeros (%)")
    bars.set_title(f"sparsity per tensor (total {100 * report.sparsity:.2f}%)", fontsize=9)
    kept = torch.cat([weights[name].detach().abs().flatten().float() for name in names])
    kept = kept[kept > 0]
    if kept.numel():
        histogram.hist(kept.log10().numpy(), bins=100, color="tab:gray")
        histogram.axvline(float(kept.min().log10()), color="tab:red", linestyle="--", label=f"smallest kept |w| = {float(kept.min()):.2e}")
        histogram.legend(fontsize=8)
    histogram.set_xlabel("log10 |w| of the kept weights")
    histogram.set_ylabel("count")
    histogram.set_title("weight magnitudes", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
