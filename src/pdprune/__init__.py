"""pdprune: Parameter-free Differentiable Pruning (Cho, Adya, Naik, NeurIPS 2023) for PyTorch.

    pruner = pdprune.PDPPruner(model, pdprune.PruningConfig(sparsity=0.9))
    ...; optimizer.step(); pruner.step()
    pruner.finalize()
"""

from pdprune._version import __version__
from pdprune.checkpoint import load_checkpoint, save_checkpoint
from pdprune.masks import is_nm_sparse
from pdprune.config import DEFAULT_TEMPERATURE, PruningConfig
from pdprune.layers import LayerType, register_layer_type
from pdprune.pruner import PDPPruner
from pdprune.report import GroupSparsity, LayerSparsity, SparsityReport, model_sparsity
from pdprune.schedule import ScheduleConfig
from pdprune.structure import compact, count_macs_and_parameters, load_compacted, save_compacted

__all__ = [
    "__version__",
    "PDPPruner",
    "PruningConfig",
    "ScheduleConfig",
    "DEFAULT_TEMPERATURE",
    "LayerType",
    "register_layer_type",
    "SparsityReport",
    "LayerSparsity",
    "GroupSparsity",
    "model_sparsity",
    "is_nm_sparse",
    "save_checkpoint",
    "load_checkpoint",
    "compact",
    "save_compacted",
    "load_compacted",
    "count_macs_and_parameters",
]
