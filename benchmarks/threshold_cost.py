"""What finding PDP's thresholds costs on a CPU, per tensor: the evidence for the fast paths' size limits.

    python benchmarks/threshold_cost.py

Unstructured: the two order statistics of the squared weights by two `kthvalue` selections, by the
band around the last threshold in plain passes, and by the band's fused pass, for tensors from 2,400
to 2.4 million weights (the band set ±0.4% around the true values, as after a training step).
N:M: the 2:4 group thresholds of a 3072x768 weight by the compiled sorting network on magnitudes with
`where` (pdprune's) and by the same network with minimum/maximum on squares (the form before it).
Medians over repeats, 2 threads, one process; every fast result checked equal to the reference.

Writes benchmarks/results/threshold_cost_cpu.json and .md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from pdprune.masks import band_order_statistics, group_threshold_squares, order_statistics

RESULTS = Path(__file__).parent / "results"
SIZES = (2_400, 10_080, 16_384, 28_672, 48_000, 65_536, 131_072, 262_144, 2_359_296)


def median_ms(function, repeats: int = 50) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _min_max_network(groups: torch.Tensor, pruned: int, dim: int) -> torch.Tensor:
    """The group thresholds as computed before: minimum/maximum on squares, then square roots."""
    columns = [column * column for column in groups.unbind(dim)]
    for round_ in range(len(columns)):
        for i in range(round_ % 2, len(columns) - 1, 2):
            columns[i], columns[i + 1] = torch.minimum(columns[i], columns[i + 1]), torch.maximum(columns[i], columns[i + 1])
    return ((columns[pruned - 1].sqrt() + columns[pruned].sqrt()) / 2).square().unsqueeze(dim)


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    unstructured = {}
    for size in SIZES:
        weight = torch.randn(size, generator=generator) * 0.02
        pruned = round(0.9 * size)
        largest_pruned, smallest_kept = order_statistics(weight.square().reshape(1, -1), pruned)
        low, high = float(largest_pruned) * (1 - 4e-3), float(smallest_kept) * (1 + 4e-3)
        row = {"two selections": median_ms(lambda: order_statistics(weight.square().reshape(1, -1), pruned), 10 if size > 1e6 else 50)}
        for name, fused in (("band, plain passes", False), ("band, fused pass", True)):
            found = band_order_statistics(weight, pruned, low, high, fused=fused)
            assert found is not None and float(found[0]) == float(largest_pruned) and float(found[1]) == float(smallest_kept)
            row[name] = median_ms(lambda: band_order_statistics(weight, pruned, low, high, fused=fused))
        unstructured[size] = row
        print(size, {name: round(value, 3) for name, value in row.items()}, flush=True)

    groups = torch.randn(3072 * 768 // 4, 4, 1, generator=generator)
    before = torch.compile(_min_max_network, dynamic=True)
    assert torch.equal(before(groups, 2, 1), group_threshold_squares(groups, 2, dim=1, compiled=True))
    grouped = {"where on magnitudes (pdprune)": median_ms(lambda: group_threshold_squares(groups, 2, dim=1, compiled=True)),
               "minimum/maximum on squares (before)": median_ms(lambda: before(groups, 2, 1))}
    print(grouped)

    lines = [f"Threshold cost per tensor, CPU, 2 threads, torch {torch.__version__}, median ms; 90% of the weights pruned", "",
             "| weights | two selections | band, plain passes | band, fused pass |", "|---|---|---|---|"]
    lines += [f"| {size:,} | {row['two selections']:.3f} | {row['band, plain passes']:.3f} | {row['band, fused pass']:.3f} |"
              for size, row in unstructured.items()]
    lines += ["", "2:4 group thresholds of a 3072x768 weight (589,824 groups), compiled, median ms:", "",
              "| network | ms |", "|---|---|"] + [f"| {name} | {value:.3f} |" for name, value in grouped.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threshold_cost_cpu.json").write_text(json.dumps({"unstructured": unstructured, "groups_2_4": grouped}, indent=1))
    (RESULTS / "threshold_cost_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
