"""What PDP's elementwise passes cost on a CPU, per tensor: the evidence for the form of w * m(w).

    python benchmarks/mask_kernels.py

Forward: w * sigmoid((w^2 - t^2) / tau), as PyTorch writes the sigmoid (an exponential), against
pdprune's w / (1 + 2^((t^2 - w^2) log2(e) / tau)). Backward: the gradient by autograd's rule of the
expression (which computes the exponential again) against pdprune's, which recovers m = out / w from
the output the layer keeps anyway. Each compiled, as inside a compiled model, for 90% pruning at a
relative temperature of 0.05 (so the exponentials span the range training gives them); the forms are
timed in turn within each repeat (medians), 2 threads, and every result checked close to the reference.

Writes benchmarks/results/mask_kernels_cpu.json and .md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from pdprune.masks import _fused_masked_weight_forward, _masked_weight_backward, inverse_temperature, order_statistics

RESULTS = Path(__file__).parent / "results"
SIZES = (262_144, 2_359_296)
REPEATS = 60


def _sigmoid_forward(weight: torch.Tensor, threshold_squared: torch.Tensor, inverse_tau: torch.Tensor) -> torch.Tensor:
    return weight * torch.sigmoid((weight * weight - threshold_squared) * inverse_tau)


def _autograd_backward(grad: torch.Tensor, weight: torch.Tensor, threshold_squared: torch.Tensor, inverse_tau: torch.Tensor) -> torch.Tensor:
    """d(w m)/dw = m + 2 w^2 m (1 - m) / tau with m computed again, as autograd's rule of the expression does."""
    mask = torch.sigmoid((weight * weight - threshold_squared) * inverse_tau)
    return grad * (mask + 2 * weight * weight * mask * (1 - mask) * inverse_tau)


def interleaved_medians(functions: dict[str, object]) -> dict[str, float]:
    """Median ms of each function, the functions called in turn within every repeat."""
    for function in functions.values():
        for _ in range(3):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(REPEATS):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    kernels = {name: torch.compile(function, dynamic=True) for name, function in (
        ("sigmoid", _sigmoid_forward), ("exp2", _fused_masked_weight_forward),
        ("autograd", _autograd_backward), ("recovered", lambda *args: _masked_weight_backward(*args, False)))}
    results = {}
    for size in SIZES:
        weight = torch.randn(size, generator=generator) * 0.02
        grad = torch.randn(size, generator=generator)
        largest_pruned, smallest_kept = order_statistics(weight.square().reshape(1, -1), round(0.9 * size))
        threshold_squared = ((largest_pruned.sqrt() + smallest_kept.sqrt()) / 2).square().reshape(())
        inverse_tau = inverse_temperature(threshold_squared, 0.05, relative=True)
        output = kernels["exp2"](weight, threshold_squared, inverse_tau)
        torch.testing.assert_close(output, kernels["sigmoid"](weight, threshold_squared, inverse_tau))
        # m = out / w carries the output's rounding, which the slope term 2 w^2 m (1 - m) / tau scales up
        torch.testing.assert_close(kernels["recovered"](grad, weight, output, threshold_squared, inverse_tau),
                                   kernels["autograd"](grad, weight, threshold_squared, inverse_tau), rtol=1e-4, atol=1e-5)
        results[size] = interleaved_medians({
            "forward, sigmoid": lambda: kernels["sigmoid"](weight, threshold_squared, inverse_tau),
            "forward, exp2 (pdprune)": lambda: kernels["exp2"](weight, threshold_squared, inverse_tau),
            "backward, autograd's rule": lambda: kernels["autograd"](grad, weight, threshold_squared, inverse_tau),
            "backward, m = out / w (pdprune)": lambda: kernels["recovered"](grad, weight, output, threshold_squared, inverse_tau),
        })
        print(size, {name: round(value, 3) for name, value in results[size].items()}, flush=True)

    names = list(results[SIZES[0]])
    lines = [f"Elementwise passes of w * m(w) per tensor, compiled, CPU, 2 threads, torch {torch.__version__}; median ms over {REPEATS} repeats", "",
             "| weights | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {size:,} | " + " | ".join(f"{row[name]:.3f}" for name in names) + " |" for size, row in results.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mask_kernels_cpu.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "mask_kernels_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
