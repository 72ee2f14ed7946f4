from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pdprune.masks import pruned_count
from pdprune.schedule import Schedule, ScheduleConfig, global_budgets, uniform_budgets


def test_ramp_follows_the_paper_formula():
    config = ScheduleConfig(warmup_epochs=2, ramp_rate=0.25)
    assert [config.ramp_fraction(e) for e in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_ramp_end_epoch_reaches_the_target_exactly_then():
    config = ScheduleConfig(warmup_epochs=1, ramp_end_epoch=4)
    assert config.ramp_fraction(0.99) == 0
    assert config.ramp_fraction(3.99) < 1
    assert config.ramp_fraction(4) == pytest.approx(1.0)


def test_schedule_counts_steps_into_fractional_epochs():
    schedule = Schedule(ScheduleConfig(warmup_epochs=1, ramp_end_epoch=2, steps_per_epoch=4))
    fractions = []
    for _ in range(8):
        schedule.step()
        fractions.append(schedule.ramp_fraction)
    assert fractions[:3] == [0, 0, 0]
    assert fractions[3] == pytest.approx(0.5) and fractions[-1] == pytest.approx(1.0)
    assert fractions == sorted(fractions)
    restored = Schedule(schedule.config)
    restored.load_state_dict(schedule.state_dict())
    assert restored.epoch == schedule.epoch == 2


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6), sparsity=st.floats(0, 0.99), seed=st.integers(0, 999))
def test_global_budgets_sum_to_the_target_count(sizes, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"l{i}": torch.randn(size, generator=generator).square() * (i + 1) for i, size in enumerate(sizes)}
    budgets = global_budgets(tensors, sparsity)
    pruned = sum(pruned_count(budgets[name], t.numel()) for name, t in tensors.items())
    assert pruned == pruned_count(sparsity, sum(sizes))
    assert all(0 <= budget <= 1 for budget in budgets.values())


def test_global_budgets_give_small_weight_layers_more_sparsity_and_split_ties_deterministically():
    tensors = {"small": torch.full((10,), 0.01), "large": torch.full((10,), 1.0)}
    assert global_budgets(tensors, 0.5) == {"small": 1.0, "large": 0.0}
    ties = {"a": torch.ones(4), "b": torch.ones(4)}
    assert global_budgets(ties, 0.25) == {"a": 0.5, "b": 0.0}


def test_uniform_budgets():
    assert uniform_budgets({"a": 3, "b": 10}, 0.8) == {"a": 0.8, "b": 0.8}


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"warmup_epochs": -1}, ValueError, r"warmup_epochs must be a finite number >= 0, got -1"),
        ({"ramp_rate": 0.1, "ramp_end_epoch": 3}, ValueError, r"give ramp_rate or ramp_end_epoch, not both"),
        ({"ramp_rate": 0.0}, ValueError, r"ramp_rate must be in \(0, 1\], got 0.0"),
        ({"warmup_epochs": 3, "ramp_end_epoch": 2}, ValueError, r"ramp_end_epoch must be >= warmup_epochs \(3\), got 2"),
        ({"steps_per_epoch": 0}, ValueError, r"steps_per_epoch must be an int >= 1, got 0; pass len\(train_loader\)"),
        ({"anneal_soft_gradient": True}, ValueError, r"anneal_soft_gradient applies while annealing: set anneal_end_epoch too"),
        ({"ramp_end_epoch": float("inf")}, ValueError, r"ramp_end_epoch must be a finite number, got inf"),
        ({"warmup_epochs": float("nan")}, ValueError, r"warmup_epochs must be a finite number, got nan"),
        ({"warmup_epochs": "1"}, TypeError, r"warmup_epochs must be a number, got str '1'"),
        ({"anneal_end_epoch": 9, "anneal_factor": float("inf")}, ValueError, r"anneal_factor must be a finite number, got inf"),
        ({"reallocate": 1}, TypeError, r"reallocate must be True or False, got 1"),
        ({"steps_per_epoch": 2.5}, ValueError, r"steps_per_epoch must be an int >= 1, got 2.5"),
    ],
)
def test_schedule_config_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ScheduleConfig(**kwargs)


def test_annealing_shrinks_the_temperature_after_the_ramp_only():
    config = ScheduleConfig(warmup_epochs=1, ramp_end_epoch=4, anneal_end_epoch=8, anneal_factor=1e-2)
    assert config.ramp_end == pytest.approx(4)
    assert [config.temperature_factor(e) for e in (0, 2, 4)] == [1.0, 1.0, 1.0]
    assert config.temperature_factor(6) == pytest.approx(0.1)
    assert config.temperature_factor(8) == pytest.approx(1e-2) and config.temperature_factor(20) == pytest.approx(1e-2)
    assert ScheduleConfig().temperature_factor(100) == 1.0, "off by default"
    with pytest.raises(ValueError, match=r"anneal_end_epoch must come after the ramp ends \(epoch 4\), got 3"):
        ScheduleConfig(warmup_epochs=1, ramp_end_epoch=4, anneal_end_epoch=3)
    with pytest.raises(ValueError, match=r"anneal_factor must be in \(0, 1\], got 0"):
        ScheduleConfig(anneal_factor=0)


def test_the_pruner_anneals_every_mask_and_the_soft_mask_turns_hard():
    from torch import nn

    from pdprune import PDPPruner, PruningConfig

    layer = nn.Linear(32, 32)
    pruner = PDPPruner(nn.Sequential(layer), PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0, anneal_end_epoch=2, steps_per_epoch=2)))
    mask = layer.parametrizations.weight[0]
    assert mask.temperature == pytest.approx(0.05)
    for _ in range(4):
        pruner.step()
    assert mask.temperature == pytest.approx(0.05 * 1e-3)
    original = layer.parametrizations.weight.original.detach()
    soft = mask.soft_mask(original, 0.5)
    assert float(((soft > 0.01) & (soft < 0.99)).float().mean()) < 0.02, "almost every weight is fully in or out"


@pytest.mark.parametrize("structure", ["unstructured", "1:4", "channel"])
def test_soft_gradient_keeps_the_starting_slope_while_annealing_and_changes_no_value(structure):
    from torch import nn

    from pdprune import PDPPruner, PruningConfig

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    schedule = {"warmup_epochs": 0, "ramp_end_epoch": 0, "anneal_end_epoch": 2, "steps_per_epoch": 2}
    outputs, units = {}, {}
    for soft in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        config = PruningConfig(sparsity=0.5, structure=structure, schedule=ScheduleConfig(**schedule, anneal_soft_gradient=soft))
        pruner = PDPPruner(model, config, example_inputs=x)
        units[soft] = next(iter(pruner.units.values()))
        assert units[soft].gradient_temperature is None, "the ramp's end: not annealing yet"
        pruner.step()
        outputs[soft] = model(x)
    torch.testing.assert_close(outputs[True], outputs[False])
    assert units[False].gradient_temperature is None
    assert units[True].gradient_temperature == pytest.approx(0.05) and units[True].temperature < 0.05


def test_lamp_budgets_meet_the_target_never_empty_a_tensor_and_ignore_scale():
    from pdprune.schedule import lamp_budgets

    generator = torch.Generator().manual_seed(0)
    small, large = torch.randn(1000, generator=generator) * 0.01, torch.randn(200, generator=generator) * 10
    budgets = lamp_budgets({"small": small.square(), "large": large.square()}, 0.9)
    assert pruned_count(budgets["small"], 1000) + pruned_count(budgets["large"], 200) == 1080
    assert budgets["small"] < 1.0, "global magnitude would empty the small-scale tensor"
    assert global_budgets({"small": small.square(), "large": large.square()}, 0.9)["small"] == 1.0
    rescaled = lamp_budgets({"small": (small * 1000).square(), "large": large.square()}, 0.9)
    assert rescaled == budgets, "a tensor's scale does not change its budget"
    assert all(b < 1 for b in lamp_budgets({"a": torch.rand(10), "b": torch.rand(10)}, 0.9).values())


def test_lamp_scores_an_all_zero_tensor_as_tied_and_never_empties_it():
    """A zero-initialized head: every weight ties with the largest, scored as LAMP scores a constant tensor."""
    import warnings

    from pdprune import PDPPruner, PruningConfig
    from pdprune.schedule import lamp_budgets

    generator = torch.Generator().manual_seed(0)
    weights = {"body": torch.randn(1000, generator=generator).square(), "head": torch.zeros(40)}
    for sparsity in (0.5, 0.9, 0.99):
        assert lamp_budgets(weights, sparsity)["head"] < 1.0
    assert lamp_budgets({"zeros": torch.zeros(4), "constant": torch.full((4,), 3.0)}, 0.5) == {"zeros": 0.5, "constant": 0.5}
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    nn.init.zeros_(model[2].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer emptied, nothing to warn about
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0)))
    assert pruner.budgets["2.weight"] < 1.0


def test_cubic_ramp_prunes_early_and_reaches_the_target_at_the_same_epoch():
    linear = ScheduleConfig(warmup_epochs=1, ramp_end_epoch=6)
    cubic = ScheduleConfig(warmup_epochs=1, ramp_end_epoch=6, ramp_shape="cubic")
    assert cubic.ramp_fraction(0.5) == 0 and cubic.ramp_fraction(6) == pytest.approx(1.0)
    for epoch in (1, 2, 3, 4, 5):
        assert cubic.ramp_fraction(epoch) > linear.ramp_fraction(epoch)
    assert cubic.ramp_fraction(3) == pytest.approx(1 - (1 - 3 / 6) ** 3)
    with pytest.raises(ValueError, match=r"ramp_shape must be one of \('linear', 'cubic'\), got 'exponential'"):
        ScheduleConfig(ramp_shape="exponential")


def test_a_per_epoch_ramp_rises_once_per_epoch_in_steps_of_eps_from_the_end_of_warm_up():
    per_step = ScheduleConfig(warmup_epochs=1.5, ramp_end_epoch=4.5)
    per_epoch = ScheduleConfig(warmup_epochs=1.5, ramp_end_epoch=4.5, ramp_updates="epoch")
    epochs = [1.4, 1.5, 2.0, 2.49, 2.5, 3.9, 4.5, 9.0]
    assert [per_epoch.ramp_fraction(e) for e in epochs] == pytest.approx([0, 0.25, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0])
    for whole in (1.5, 2.5, 3.5, 4.5):  # the two agree at every epoch boundary counted from the warm-up's end
        assert per_epoch.ramp_fraction(whole) == pytest.approx(per_step.ramp_fraction(whole))
    schedule = Schedule(ScheduleConfig(warmup_epochs=1, ramp_end_epoch=3, steps_per_epoch=4, ramp_updates="epoch"))
    fractions = []
    for _ in range(16):
        schedule.step()
        fractions.append(schedule.ramp_fraction)
    assert fractions == pytest.approx([0, 0, 0] + [1 / 3] * 4 + [2 / 3] * 4 + [1.0] * 5)
    with pytest.raises(ValueError, match=r"ramp_updates must be one of \('step', 'epoch'\), got 'batch'"):
        ScheduleConfig(ramp_updates="batch")
