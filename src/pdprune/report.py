"""Sparsity reports: per-tensor and overall counts, as data and as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

__all__ = ["LayerSparsity", "SparsityReport", "model_sparsity", "PRUNABLE_MODULE_TYPES"]

PRUNABLE_MODULE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}


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
        return self.zeros / self.parameters


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor sparsity of a model and its totals over the listed tensors."""

    layers: tuple[LayerSparsity, ...]

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.parameters, 1)

    @property
    def target(self) -> float | None:
        if any(layer.target is None for layer in self.layers):
            return None
        return sum(layer.target * layer.parameters for layer in self.layers) / max(self.parameters, 1)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) | {"sparsity": layer.sparsity} for layer in self.layers],
            "parameters": self.parameters,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "target": self.target,
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
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def model_sparsity(model: nn.Module, module_types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")) -> SparsityReport:
    """Exact zeros of every weight of the given module types, for any model (pruned by us or not)."""
    kinds = tuple(PRUNABLE_MODULE_TYPES[name] for name in module_types)
    layers = []
    for module_name, module in model.named_modules():
        if isinstance(module, kinds):
            weight = module.weight
            name = f"{module_name}.weight" if module_name else "weight"
            layers.append(LayerSparsity(name, "-", weight.numel(), int((weight == 0).sum())))
    return SparsityReport(tuple(layers))
