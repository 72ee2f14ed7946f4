"""PDP under `torch.compile`: one graph, no host read, no recompilation over a whole schedule, and the
same thresholds and masks as the straightforward oracle at every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdprune import PDPPruner, PruningConfig, ScheduleConfig

SCHEDULE = {"warmup_epochs": 1, "ramp_end_epoch": 3, "anneal_end_epoch": 5, "steps_per_epoch": 2}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, 6, 6, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def _reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every masked tensor as the straightforward oracle computes it (sort-based t, autograd soft mask)."""
    expected = {}
    for name, module in model.named_modules():
        if not hasattr(module, "parametrizations"):
            continue
        for tensor_name, chain in module.parametrizations.items():
            value = chain.original.detach()
            for mask in chain:
                value = mask.soft(value, mask.group.sparsity if hasattr(mask, "group") else mask.sparsity)
            expected[f"{name}.{tensor_name}"] = value
    return expected


CONFIGS = {
    "unstructured": PruningConfig(sparsity=0.8, schedule=ScheduleConfig(**SCHEDULE)),
    "2:4 soft gradient, straight-through": PruningConfig(
        structure="2:4", layer_structures={"0": "unstructured"}, straight_through=True,
        schedule=ScheduleConfig(**SCHEDULE, anneal_soft_gradient=True)),
    "channel": PruningConfig(sparsity=0.5, structure="channel", schedule=ScheduleConfig(**SCHEDULE)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_compiled_model_has_no_graph_break_and_no_host_read(name):
    model = _model()
    pruner = PDPPruner(model, CONFIGS[name], example_inputs=_batch(0)[0])
    for _ in range(3):  # into the ramp: the masks are active
        pruner.step()
    explanation = torch._dynamo.explain(model)(_batch(0)[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_training_matches_the_oracle_at_every_step_and_compiles_once(name):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model()
    pruner = PDPPruner(model, CONFIGS[name], example_inputs=_batch(0)[0])
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masked = [(tensor, model.get_submodule(tensor.rpartition(".")[0]).parametrizations[tensor.rpartition(".")[2]]) for tensor in _reference(model)]

    @torch.compile(fullgraph=True)
    def compiled_masks() -> list[torch.Tensor]:  # what a compiled forward computes with: no refresh inside
        return [chain() for _, chain in masked]

    graphs = []
    for step in range(12):  # warm-up, ramp, anneal, and after
        for (tensor, value), compiled_value in zip(_reference(model).items(), compiled_masks()):
            torch.testing.assert_close(compiled_value, value, rtol=1e-5, atol=1e-6, msg=f"{tensor} at step {step}")
        x, y = _batch(step)
        nn.functional.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert pruner.schedule.temperature_factor < 1, "the anneal ran"
    assert graphs == graphs[:1] * len(graphs), f"compiled again during training: {graphs}"


def test_compiled_masks_follow_a_fused_optimizer_when_the_pruner_steps_once_per_epoch():
    """Only the optimizer hook can keep a compiled forward exact here: a fused optimizer bumps no version
    counter, and `step()` comes every fourth update."""
    model = _model()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    masked = [(tensor, model.get_submodule(tensor.rpartition(".")[0]).parametrizations[tensor.rpartition(".")[2]]) for tensor in _reference(model)]
    compiled_masks = torch.compile(lambda: [chain() for _, chain in masked], fullgraph=True)
    for step in range(8):
        for (tensor, value), compiled_value in zip(_reference(model).items(), compiled_masks()):
            torch.testing.assert_close(compiled_value, value, rtol=1e-5, atol=1e-6, msg=f"{tensor} at step {step}")
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 4 == 3:
            pruner.step()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_compiled_model_resumed_in_either_order_computes_with_the_loaded_weights(name):
    """Thresholds are not part of any state: loading the model's weights must recompute them, since a
    compiled forward pass cannot, whether the pruner's state was loaded before or after."""
    example = _batch(0)[0]
    trained = _model()
    pruner = PDPPruner(trained, CONFIGS[name], example_inputs=example)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for step in range(5):
        x, y = _batch(step)
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    for pruner_first in (True, False):
        resumed = _model()
        resumed_pruner = PDPPruner(resumed, CONFIGS[name], example_inputs=example)
        masked = [(tensor, resumed.get_submodule(tensor.rpartition(".")[0]).parametrizations[tensor.rpartition(".")[2]])
                  for tensor in _reference(resumed)]
        compiled_masks = torch.compile(lambda: [chain() for _, chain in masked], fullgraph=True)
        compiled_masks()
        if pruner_first:
            resumed_pruner.load_state_dict(pruner.state_dict())
        resumed.load_state_dict(trained.state_dict())
        if not pruner_first:
            resumed_pruner.load_state_dict(pruner.state_dict())
        for (tensor, value), compiled_value in zip(_reference(trained).items(), compiled_masks()):
            torch.testing.assert_close(compiled_value, value, rtol=1e-5, atol=1e-6, msg=f"{tensor}, pruner state loaded first: {pruner_first}")
