"""DDP on CPU with gloo (2 processes): same masks on every rank at every step, the same result as one
process on the same global batch, checkpoints from rank 0 that resume at another world size.

Every worker ends with `_end_worker()`: DDP's reducer and FSDP2's device mesh keep the gloo process group
alive after `destroy_process_group()` (with its threads: gloo_tcp_loop, pt_gloo_runloop), and tearing
the interpreter down under those running threads aborted a worker about one run in ten ("terminate
called without an active exception"). `os._exit` after a barrier skips that teardown.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, load_checkpoint, save_checkpoint
from pdprune.masks import midpoint_threshold
from pdprune.parametrizations import SoftMask

STEPS = 6
CONFIG = PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=2, steps_per_epoch=2))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _masked(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]


def _train(model: nn.Module, pruner: PDPPruner, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1, after_step=None) -> None:
    """Each rank trains on its slice of the same global batch; `after_step(step)` runs after each step."""
    for step in steps:
        x, y = _global_batch(step)
        rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        if after_step is not None:
            after_step(step)


def _end_worker() -> None:
    """Leave once every rank is done, without the interpreter's teardown (see the module docstring)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model()
    pruner = PDPPruner(model, CONFIG)
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)

    def check_and_save(step: int) -> None:
        for tensor in _masked(model):
            gathered = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(gathered, tensor)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"masks differ across ranks at step {step}"
        if step == 2 and rank == 0:
            save_checkpoint(os.path.join(out, "step3.pt"), {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()})

    _train(wrapped, pruner, optimizer, range(STEPS), rank, world, check_and_save)
    if rank == 0:
        torch.save({"masked": _masked(model), "budgets": pruner.budgets}, os.path.join(out, "ddp.pt"))
    _end_worker()


def _single_process(resume_from: str | None = None, steps_per_epoch: int = 2) -> tuple[list[torch.Tensor], PDPPruner]:
    model = _model()
    config = PruningConfig.from_dict({**CONFIG.to_dict(), "schedule": {**CONFIG.to_dict()["schedule"], "steps_per_epoch": steps_per_epoch}})
    pruner = PDPPruner(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        pruner.load_state_dict(state["pruner"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = 3
    _train(model, pruner, optimizer, range(first, STEPS))
    return _masked(model), pruner


def test_ddp_ranks_agree_match_one_process_and_resume_at_another_world_size(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single, pruner = _single_process()
    assert ddp["budgets"] == pruner.budgets
    for a, b in zip(ddp["masked"], single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed, _ = _single_process(resume_from=str(tmp_path / "step3.pt"))
    for a, b in zip(resumed, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _twins(power: float) -> nn.Module:
    """Two layers of one shape and init, the first's magnitudes raised to a power: a heavier tail changes
    how the default (LAMP) allocation splits the budget between them, as a scale would for the global one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight.sign() * model[0].weight.abs().pow(power))
    return model


def _budgets_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Ranks whose weights differ (no DDP to sync them): the budgets must still be rank 0's, so that no
    rank prunes by budgets that add up to another sparsity than the others'."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _twins(power=1.0 + 2.0 * rank)  # rank 1's first layer is heavier-tailed: on its own, it would prune it otherwise
    pruner = PDPPruner(model, CONFIG)
    for _ in range(2):  # the warm-up ends: the budgets are allocated
        pruner.step()
    targets = {layer.name: layer.target for layer in pruner.report().layers}
    gathered = [None] * world
    dist.all_gather_object(gathered, targets)
    if rank == 0:
        torch.save({"targets": gathered}, os.path.join(out, "budgets.pt"))
    _end_worker()


def test_ranks_that_start_different_still_prune_with_rank_0_s_budgets(tmp_path):
    mp.spawn(_budgets_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    targets = torch.load(tmp_path / "budgets.pt", weights_only=True)["targets"]
    alone = {}
    for power in (1.0, 3.0):
        pruner = PDPPruner(_twins(power), CONFIG)
        for _ in range(2):
            pruner.step()
        alone[power] = {layer.name: layer.target for layer in pruner.report().layers}
    assert alone[1.0] != alone[3.0], "the two ranks' weights alone give different budgets"
    assert targets[0] == alone[1.0], "rank 0 allocates as one process would"
    assert targets[1] == targets[0], "rank 1 uses rank 0's budgets, not its own weights' ones"


def test_resuming_with_more_steps_per_epoch_keeps_the_position_in_epochs(tmp_path):
    model = _model()
    pruner = PDPPruner(model, CONFIG)
    for _ in range(3):
        pruner.step()
    state = pruner.state_dict()
    config = PruningConfig.from_dict({**CONFIG.to_dict(), "schedule": {**CONFIG.to_dict()["schedule"], "steps_per_epoch": 4}})
    other = PDPPruner(_model(), config)
    other.load_state_dict(state)
    assert other.schedule.steps_done == 6 and other.schedule.epoch == pruner.schedule.epoch
    assert other.current_sparsity("0.weight") == pruner.current_sparsity("0.weight")


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model()
    pruner = PDPPruner(model, CONFIG)
    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(module.weight.detach().clone()))
    stale: list[int] = []  # steps whose forward pass used thresholds other than those of the gathered weight

    def check_thresholds(module: nn.Module, args, output) -> None:
        gathered = module.parametrizations.weight.original.detach()
        if any(not torch.equal(mask.threshold_squared, mask.threshold_squares(gathered)) for mask in module.parametrizations.weight):
            stale.append(len(seen))

    for layer in (model[0], model[2]):
        layer.register_forward_hook(check_thresholds)
        fully_shard(layer)
    fully_shard(model)
    shard = model[0].parametrizations.weight.original
    assert shard.to_local().shape[0] == 32 // world, "the dense weight is sharded"
    _train(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1), range(STEPS), rank, world)
    try:
        pruner.finalize()
    except RuntimeError as error:
        assert "finalized_state_dict()" in str(error)
    else:
        raise AssertionError("finalize() under FSDP2 must refuse")
    state = pruner.finalized_state_dict()
    final = [state["0.weight"], state["2.weight"]]
    # FSDP2 refills the gathered weight without a version bump, often at its last address: staleness
    # must come from the optimizer's step. Ten more steps make a missed refresh certain to show.
    _train(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1), range(STEPS, STEPS + 10), rank, world)
    torch.save({"seen": seen[:STEPS], "budgets": pruner.budgets, "final": final, "stale": stale}, os.path.join(out, f"fsdp{rank}.pt"))
    _end_worker()


def test_fsdp2_thresholds_select_over_the_whole_tensor_not_the_shard(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    fsdp, other_rank = (torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=True) for rank in (0, 1))
    assert fsdp["stale"] == other_rank["stale"] == [], "every forward pass refreshed the thresholds of the gathered weight"
    model = _model()
    pruner = PDPPruner(model, CONFIG)
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(module.weight.detach().clone()))
    _train(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1), range(STEPS))
    assert fsdp["budgets"] == pruner.budgets
    assert len(fsdp["seen"]) == len(seen) == STEPS
    for step, (sharded, single) in enumerate(zip(fsdp["seen"], seen)):
        assert sharded.shape == (32, 12), "the mask saw the gathered weight"
        torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    pruner.finalize()
    for sharded, single in zip(fsdp["final"], (model[0].weight, model[2].weight)):
        assert torch.equal(sharded == 0, single == 0), "the same weights pruned, exactly"
        torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)


def _whole_threshold(pruner: PDPPruner, name: str) -> torch.Tensor:
    """t^2 of unit `name` at its sparsity, selected over the gathered weights (a collective)."""
    unit = pruner.units[name]
    with torch.no_grad():
        if isinstance(unit, SoftMask):
            return unit.threshold_squares(pruner._original(name))
        scores = sum(piece.unit_norms(piece.tensor().full_tensor()) for piece in unit.slices("scoring"))
        pruned = unit.pruned(unit.sparsity)
        if pruned == 0:  # warm-up
            return torch.full((), -math.inf)
        return midpoint_threshold(scores.reshape(1, -1), pruned).square().reshape(())


def _fsdp_structure_worker(rank: int, world: int, init_file: str, out: str, structure: str, compiled: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model()
    config = PruningConfig(sparsity=0.5, structure=structure, allocation="uniform", schedule=CONFIG.schedule)
    pruner = PDPPruner(model, config, example_inputs=torch.randn(2, 12))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stale = []  # steps after which the thresholds were not those of the whole weights
    for step in range(8):
        _train(forward, pruner, optimizer, range(step, step + 1), rank, world)
        if compiled and not all(torch.equal(unit.threshold_squared, _whole_threshold(pruner, name)) for name, unit in pruner.units.items()):
            stale.append(step)  # the next compiled forward pass would read thresholds of older weights
    state = pruner.finalized_state_dict()
    torch.save({"stale": stale, "zeros": int((state["0.weight"] == 0).sum())}, os.path.join(out, f"rank{rank}.pt"))
    _end_worker()


@pytest.mark.parametrize("structure, compiled", [("unstructured", True), ("channel", False), ("channel", True)])
def test_fsdp2_prunes_exactly_under_torch_compile_and_in_channels(tmp_path, structure, compiled):
    """A compiled forward pass cannot recompute thresholds, so under FSDP2 the optimizer's step gathers
    the weights and does; channel scores too (and the final hard cut) come from the gathered weights."""
    mp.spawn(_fsdp_structure_worker, args=(2, str(tmp_path / "init"), str(tmp_path), structure, compiled), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0] == ranks[1], "every rank holds the same thresholds and the same result"
    assert ranks[0]["stale"] == [], "every compiled forward pass read the thresholds of the current weights"
    assert ranks[0]["zeros"] == (16 * 12 if structure == "channel" else 32 * 12 // 2), "the exact count pruned"
