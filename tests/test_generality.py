"""The models people use: Hugging Face architectures built from tiny configs (random weights, no
downloads) x unstructured 90%, 2:4 and channels/heads 50%, through the documented API: attach, train
with the model's own loss, finalize; exact counts, a state_dict that loads into a fresh model, and for
channels a compacted model that computes the same with every pruned channel and head gone."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, compact, is_nm_sparse
from pdprune.layers import layer_type_of
from pdprune.masks import pruned_count
from pdprune.model_io import call_model, tensor_leaves

transformers.logging.set_verbosity_error()
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def _text(labels: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 100, (4, 8), generator=generator), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    return batch | ({"labels": torch.randint(0, 2, (4,), generator=generator)} if labels else {})


def _image(labels: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator)}
    return batch | ({"labels": torch.randint(0, 3, (4,), generator=generator)} if labels else {})


def _seq2seq(labels: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = _text(False) | {"decoder_input_ids": torch.randint(1, 100, (4, 5), generator=generator)}
    return batch | ({"labels": torch.randint(1, 100, (4, 5), generator=generator)} if labels else {})


ARCHITECTURES = {
    "bert": (lambda: AutoModelForSequenceClassification.from_config(AutoConfig.for_model("bert", **TEXT)), _text),
    "gpt2": (lambda: AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16, pad_token_id=0)), _text),
    "vit": (lambda: AutoModelForImageClassification.from_config(
        AutoConfig.for_model("vit", **{k: v for k, v in TEXT.items() if k != "vocab_size"}, image_size=32, patch_size=8, num_labels=3)), _image),
    "llama-gqa": (lambda: AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("llama", **TEXT, num_key_value_heads=2, pad_token_id=0)), _text),
    "t5": (lambda: AutoModelForSeq2SeqLM.from_config(
        AutoConfig.for_model("t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)), _seq2seq),
    "resnet": (lambda: AutoModelForImageClassification.from_config(
        AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), _image),
    "convnext": (lambda: AutoModelForImageClassification.from_config(
        AutoConfig.for_model("convnext", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)), _image),
    "mobilenet_v2": (lambda: AutoModelForImageClassification.from_config(
        AutoConfig.for_model("mobilenet_v2", depth_multiplier=0.25, image_size=32, num_labels=3)), _image),
}
STRUCTURES = {"unstructured": 0.9, "2:4": 0.5, "channel": 0.5}


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return tensor_leaves(call_model(model, batch))


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_prune_train_finalize_reload_and_compact(architecture, structure):
    build, batch = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = build()
    config = PruningConfig(sparsity=STRUCTURES[structure], structure=structure,
                           schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=1, steps_per_epoch=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense are in the report, checked below
        pruner = PDPPruner(model, config, example_inputs=batch(labels=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        loss = model(**batch()).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.finalize()
    report = pruner.report()
    assert report.layers, "something was pruned"
    for row in report.layers:
        tensor = model.get_submodule(row.name.rpartition(".")[0]).get_parameter(row.name.rpartition(".")[2])
        if structure == "unstructured":
            assert row.zeros == pruned_count(row.target, row.parameters), row.name
        elif structure == "2:4":
            module = model.get_submodule(row.name.rpartition(".")[0])
            assert is_nm_sparse(tensor, 2, 4, layer_type_of(module).input_dim) and row.zeros == row.parameters // 2, row.name
    outputs = _outputs(model, batch(labels=False))
    assert all(bool(torch.isfinite(leaf).all()) for leaf in outputs if leaf.is_floating_point())

    torch.manual_seed(1)
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(outputs, _outputs(fresh, batch(labels=False))):
        torch.testing.assert_close(a, b)

    if structure == "channel":
        assert report.groups, "channel pruning found channel or head groups"
        small = compact(model, batch(labels=False))
        for a, b in zip(outputs, _outputs(small, batch(labels=False))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for group in report.groups:  # every pruned channel and head is gone from its layers
            assert group.pruned == round(group.target * group.channels), group.name
            removed: dict[tuple[str, str, int], int] = {}  # (module, tensor, dim) -> entries the group's pruned units hold
            for piece in pruner.units[group.name].slices("scoring"):
                key = (pruner._name_of(piece.module), piece.tensor_name, piece.dim)
                removed[key] = removed.get(key, 0) + group.pruned * piece.positions.shape[1]
            for (name, tensor_name, dim), entries in removed.items():
                before = getattr(model.get_submodule(name), tensor_name).shape[dim]
                after = getattr(small.get_submodule(name), tensor_name).shape[dim]
                assert before - after == entries, f"{group.name}: {name}"
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
