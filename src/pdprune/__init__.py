"""pdprune: Parameter-free Differentiable Pruning (Cho, Adya, Naik, NeurIPS 2023) for PyTorch.

    pruner = pdprune.PDPPruner(model, pdprune.PruningConfig(sparsity=0.9))
    ...; optimizer.step(); pruner.step()
    pruner.finalize()
"""

from pdprune._version import __version__
from pdprune.checkpoint import load_checkpoint, save_checkpoint
from pdprune.masks import is_nm_sparse
from pdprune.pruner import DEFAULT_TEMPERATURE, PDPPruner, PruningConfig
from pdprune.report import LayerSparsity, SparsityReport, model_sparsity
from pdprune.schedule import ScheduleConfig

__all__ = [
    "__version__",
    "PDPPruner",
    "PruningConfig",
    "ScheduleConfig",
    "DEFAULT_TEMPERATURE",
    "SparsityReport",
    "LayerSparsity",
    "model_sparsity",
    "is_nm_sparse",
    "save_checkpoint",
    "load_checkpoint",
]
