"""Finalized 2:4 Linear layers as PyTorch semi-structured sparse weights: real speed on NVIDIA GPUs.

`torch.sparse.to_sparse_semi_structured` runs 2:4-sparse matrix products on sparse tensor cores
(compute capability 8.0+, float16/bfloat16). On a CPU there is no such kernel: the finalized model
then runs as an ordinary dense model with zeros.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pdprune.masks import is_nm_sparse

__all__ = ["to_semi_structured"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the weight of every 2:4-sparse Linear layer by a semi-structured sparse tensor, in place.

    Args:
        backend: "cusparselt", "cutlass", or "auto" (cuSPARSELt where PyTorch has it, else CUTLASS).

    Raises:
        ValueError: no Linear layer is 2:4 sparse, or the model is not on CUDA in float16/bfloat16.
        RuntimeError: no CUDA GPU with sparse tensor cores is available.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_nm_sparse(m.weight, 2, 4)}
    if not candidates:
        raise ValueError("no Linear layer of the model is 2:4 sparse; finalize() a PDPPruner with structure='2:4' first")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "semi-structured sparse kernels need a CUDA GPU (compute capability 8.0 or newer); none is available "
            "here. On a CPU the finalized 2:4 model runs as a dense model with zeros"
        )
    if torch.cuda.get_device_capability() < (8, 0):
        raise RuntimeError(f"semi-structured sparse kernels need compute capability 8.0+, this GPU has {torch.cuda.get_device_capability()}")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    if backend not in ("auto", "cusparselt", "cutlass"):
        raise ValueError(f"backend must be 'auto', 'cusparselt' or 'cutlass', got {backend!r}")
    capability = torch.cuda.get_device_capability()
    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise RuntimeError("this PyTorch build has no cuSPARSELt; pass backend='cutlass' (compute capability 8.x only)")
    if backend == "cutlass" and capability[0] != 8:
        raise RuntimeError(f"CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU has {capability}; use backend='cusparselt'")
    sparse_type = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    for name, module in candidates.items():  # all checked before any is converted: a refused model stays as it was
        weight = module.weight
        if weight.device.type != "cuda" or weight.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}.weight is {weight.dtype} on {weight.device}; move the model first: model.half().cuda() "
                "(or .to(torch.bfloat16).cuda())"
            )
    for name, module in candidates.items():
        weight = module.weight
        rows, columns = weight.shape
        if rows % 64 or columns % 64:
            warnings.warn(f"{name}.weight {tuple(weight.shape)} left dense: sparse kernels need both sides multiples of 64", stacklevel=2)
            continue
        module.weight = nn.Parameter(sparse_type.from_dense(weight.detach()), requires_grad=False)
    return model
