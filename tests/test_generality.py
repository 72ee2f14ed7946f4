"""The models people use: Hugging Face architectures built from tiny configs (random weights, no
downloads) x unstructured 90%, 2:4 and channels/heads 50%, through the documented API: attach, train
with the model's own loss, finalize; exact counts, a state_dict that loads into a fresh model, and for
channels a compacted model that computes the same with every pruned channel and head gone. Then
PyTorch's own attention, and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification)

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, compact, is_nm_sparse
from pdprune.attention import FUSED_NAMES, KEY_NAMES, OUTPUT_NAMES, QUERY_NAMES, VALUE_NAMES, find_attention
from pdprune.layers import layer_type_of
from pdprune.masks import pruned_count
from pdprune.model_io import call_model, tensor_leaves
from pdprune.parametrizations import UnstructuredMask
from pdprune.report import state_dict_sparsity

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


def _causal(labels: bool = True) -> dict[str, torch.Tensor]:
    batch = _text(False)
    return batch | ({"labels": batch["input_ids"]} if labels else {})


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
    "modernbert": (lambda: AutoModelForSequenceClassification.from_config(AutoConfig.for_model(  # fused Wqkv and Wo, capitalized
        "modernbert", **TEXT, pad_token_id=0, max_position_embeddings=32, global_attn_every_n_layers=2, local_attention=8)), _text),
    "mixtral-moe": (lambda: AutoModelForSequenceClassification.from_config(AutoConfig.for_model(  # experts in 3-D (experts, out, in)
        "mixtral", **TEXT, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)), _text),
    "gpt-oss-moe": (lambda: AutoModelForCausalLM.from_config(AutoConfig.for_model(  # experts transposed, (experts, in, out)
        "gpt_oss", **TEXT, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)), _causal),
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
NO_CHANNELS = {"gpt-oss-moe": r"GptOssExperts holds \['gate_up_proj', 'down_proj'\].*self_attn heads: removing these heads changes"}
"""Architectures with no channel or head pdprune can remove, and what the refusal says (GPT-OSS: experts
are pruned unstructured or N:M only, and each head has an attention sink no projection holds)."""


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
    if structure == "channel" and architecture in NO_CHANNELS:
        with pytest.raises(ValueError, match=f"nothing left to prune: .*{NO_CHANNELS[architecture]}"):
            PDPPruner(model, config, example_inputs=batch(labels=False))
        return
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
            assert row.zeros < row.parameters, f"{row.name} emptied: the default allocation never kills a layer"
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


# --- mixtures of experts -------------------------------------------------------------------------


def _mixtral(experts_implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "mixtral", **TEXT, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
        experts_implementation=experts_implementation))


class _Interrupted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def test_experts_run_eagerly_compute_each_masked_tensor_once_per_forward_and_as_the_grouped_kernel_does(monkeypatch):
    """Run eagerly, Hugging Face's experts read their 3-D weights once per expert: each read must not compute the
    whole masked tensor again (E times the time and memory)."""
    models = {implementation: _mixtral(implementation) for implementation in ("grouped_mm", "eager")}
    pruners = {implementation: PDPPruner(model, PruningConfig(sparsity=0.9)) for implementation, model in models.items()}
    experts = [f"model.layers.{layer}.mlp.experts.{tensor}" for layer in (0, 1) for tensor in ("gate_up_proj", "down_proj")]
    assert all(name in pruners["eager"].tensor_names for name in experts), "experts are pruned by default"
    assert layer_type_of(models["eager"].model.layers[0].mlp.experts).name == "Experts"
    computed: dict[int, int] = {}
    forward = UnstructuredMask.forward

    def counted(mask, weight):
        computed[id(mask)] = computed.get(id(mask), 0) + 1
        return forward(mask, weight)

    monkeypatch.setattr(UnstructuredMask, "forward", counted)
    batch = _text(False)
    outputs = {implementation: _outputs(model, batch) for implementation, model in models.items()}
    masks = [id(models["eager"].get_submodule(name.rpartition(".")[0]).parametrizations[name.rpartition(".")[2]][0]) for name in experts]
    assert [computed[mask] for mask in masks] == [1] * len(experts)
    torch.testing.assert_close(outputs["eager"], outputs["grouped_mm"])
    copied = copy.deepcopy(models["eager"])
    computed.clear()
    _outputs(copied, batch)
    assert set(computed.values()) == {1}, "a deep copy caches too"

    monkeypatch.undo()
    model, experts_module = models["eager"], models["eager"].model.layers[0].mlp.experts
    activation = experts_module.act_fn

    experts_module.act_fn = _Interrupted()  # Ctrl-C inside the experts' forward must not leave the cache on
    with pytest.raises(KeyboardInterrupt):
        _outputs(model, batch)
    experts_module.act_fn = activation
    model.train()
    for _ in range(2):  # a cache left on would serve the first step's masked weights: "backward through the graph a second time"
        model(**_text()).loss.backward()
        pruners["eager"].step()
    pruners["eager"].finalize()
    assert type(experts_module).__name__ == "MixtralExperts", "finalize leaves the plain class"
    monkeypatch.setattr(UnstructuredMask, "forward", counted)
    computed.clear()
    _outputs(copied, batch)
    assert set(computed.values()) == {1}, "the copy taken during training keeps its masks and cache"
    monkeypatch.undo()
    counted_by_report = {row.name: row.sparsity for row in state_dict_sparsity(model.state_dict()).layers}  # `pdprune report`
    assert counted_by_report["model.layers.1.mlp.experts.down_proj"] > 0.5


def test_experts_sharded_on_their_own_keep_their_cached_forward():
    """fully_shard(experts) puts FSDP's class in front of the module's (what it does to the class, without
    a process group): the cached forward reaches the model's own through the MRO."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_init import _apply_to_module

    model = _mixtral("eager")
    PDPPruner(model, PruningConfig(sparsity=0.5))
    expected = _outputs(model, _text(False))
    _apply_to_module((model.model.layers[0].mlp.experts,), {}, FSDPModule, "FSDP", None)
    assert type(model.model.layers[0].mlp.experts).__bases__[0] is FSDPModule
    torch.testing.assert_close(_outputs(model, _text(False)), expected)


def test_finalized_state_dict_clears_the_pruned_heads_of_a_fused_projection():
    """GPT-2's c_attn is gated (its value rows) and cleared (its query and key rows): the state_dict for
    FSDP2 is what finalize() leaves, so that the heads compact away after loading it."""
    model = ARCHITECTURES["gpt2"][0]()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", include=("*.attn.*",),
                                            schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0)), example_inputs=_text(False))
    state = pruner.finalized_state_dict()
    pruner.finalize()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_experts_are_a_layer_type_of_their_own_that_module_types_can_leave_out():
    import pdprune

    with pytest.raises(ValueError, match="layer type name 'Experts' is taken by Hugging Face's mixture-of-experts modules"):
        pdprune.register_layer_type("Experts", torch.nn.Bilinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the router, of no layer type pdprune knows, is left dense without a warning
        pruner = PDPPruner(_mixtral("grouped_mm"), PruningConfig(sparsity=0.5))
    assert pruner.report().skipped["model.layers.0.mlp.gate"].startswith("the router of a mixture of experts")
    pruner.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(_mixtral("grouped_mm"), PruningConfig(sparsity=0.5, module_types=("Linear",)))
    assert "its layer type 'Experts' is not in module_types ['Linear']" in pruner.report().skipped["model.layers.0.mlp.experts"]


@pytest.mark.parametrize("architecture, router", [("phimoe", "mlp.router"), ("hunyuan_v1_moe", "mlp.gate.wg")])
def test_a_router_that_is_an_nn_linear_nested_or_not_stays_dense_unless_include_names_it(architecture, router):
    """PhiMoE's router is an nn.Linear beside the experts, Hunyuan's one inside its gate module: prunable
    layers, yet routers all the same."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        architecture, **TEXT, num_key_value_heads=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
        moe_topk=2, head_dim=8, pad_token_id=0))
    router = f"model.layers.0.{router}"
    assert isinstance(model.get_submodule(router), torch.nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5))
        assert pruner.report().skipped[router].startswith("the router of a mixture of experts")
        assert "model.layers.0.mlp.experts.down_proj" in pruner.tensor_names
        pruner.detach()
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, include=(router, "*experts")))
    assert f"{router}.weight" in pruner.tensor_names


def test_a_layer_shaped_like_a_router_is_pruned_and_a_broad_include_leaves_routers_dense():
    """A router is a gate or router with a row per expert: the shared expert's layers of the same shape
    (an intermediate size equal to the number of experts) are pruned; `include` that matches every layer
    does not name the router."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2_moe", **TEXT, num_key_value_heads=2, moe_intermediate_size=16, shared_expert_intermediate_size=8,
        num_experts=8, num_experts_per_tok=2, pad_token_id=0))
    assert model.model.layers[0].mlp.shared_expert.gate_proj.weight.shape == model.model.layers[0].mlp.gate.weight.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, include=("model.*",)))
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in pruner.tensor_names
    assert [name for name, why in pruner.report().skipped.items() if why.startswith("the router")] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


# --- bad input: a specific error naming the module and the fix, nothing modified ---------------------


def _untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    from torch.nn.utils import parametrize

    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "no parametrization left behind"
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_keyword_model_given_a_positional_tensor_is_told_to_pass_a_dict():
    model = ARCHITECTURES["t5"][0]()  # needs decoder_input_ids as well
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"T5ForConditionalGeneration rejected example_inputs tensor\(4, 8\) int64 when called as model\(example_inputs\).*needs a dict"):
        PDPPruner(model, PruningConfig(structure="channel"), example_inputs=_text(False)["input_ids"])
    _untouched(model, before)


def test_a_model_given_other_keyword_inputs_than_it_reads_names_them():
    """Whisper given text inputs: its forward reads input_features.shape of None (an AttributeError)."""
    class ReadsFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, input_features=None, input_ids=None):
            return self.down(torch.relu(self.up(input_features.reshape(input_features.shape[0], -1))))

    model = ReadsFeatures()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"ReadsFeatures rejected example_inputs \{'input_ids': tensor\(4, 8\) int64.*AttributeError"):
        PDPPruner(model, PruningConfig(structure="channel"), example_inputs={"input_ids": _text(False)["input_ids"]})
    _untouched(model, before)


def test_example_inputs_of_the_wrong_shape_name_the_model_and_the_shapes():
    model = ARCHITECTURES["vit"][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"ViTForImageClassification rejected example_inputs \{'pixel_values': tensor\(4, 3, 20, 32\) float32\}"):
        PDPPruner(model, PruningConfig(structure="channel"), example_inputs={"pixel_values": torch.randn(4, 3, 20, 32)})
    _untouched(model, before)


def test_a_layer_type_with_an_impossible_layout_is_refused():
    import pdprune

    with pytest.raises(ValueError, match=r"layer type 'Twisted': input_dim and output_dim are both 1"):
        pdprune.register_layer_type("Twisted", torch.nn.Bilinear, input_dim=1, output_dim=1)
    with pytest.raises(ValueError, match=r"tensors of layer type 'Named' must be a non-empty tuple of Parameter names, e.g. \('weight',\), got 'weight'"):
        pdprune.register_layer_type("Named", torch.nn.Bilinear, tensors="weight")
    pdprune.register_layer_type("Bilinear", torch.nn.Bilinear, input_dim=3, output_dim=0)  # its weight has 3 dimensions
    model = torch.nn.Sequential(torch.nn.Bilinear(4, 4, 8), torch.nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0' is a Bilinear whose weight has shape \(8, 4, 4\), but the layer type 'Bilinear' declares input_dim=3"):
        PDPPruner(model, PruningConfig(module_types=("Bilinear", "Linear")))
    _untouched(model, before)


def _torch_transformer() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


class _CrossAttention(torch.nn.Module):
    """nn.MultiheadAttention with keys and values of other widths: three projections, no packed one."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)

    def forward(self, queries: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.attention(queries, *memory)[0]


@pytest.mark.parametrize("structure,sparsity", [("unstructured", 0.9), ("2:4", 0.5), ("channel", 0.5)])
def test_pytorch_s_own_attention_prunes_its_projection_matrices(structure, sparsity):
    """nn.MultiheadAttention (nn.TransformerEncoder, torchvision's ViT) keeps its query, key and value
    projections as its own Parameters, not in Linear children: they are pruned like any weight, and the
    masked model computes what the finalized one does, in the eager path and in PyTorch's fused one."""
    torch.manual_seed(0)
    model, x = _torch_transformer(), torch.randn(4, 6, 32)
    config = PruningConfig(sparsity=sparsity, structure=structure, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=1, steps_per_epoch=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, config, example_inputs=x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    with torch.no_grad():  # a validation pass while masked: PyTorch's fused path reads the masked projections
        model.eval()
        torch.testing.assert_close(model(x), _without_fused_attention(model, x), rtol=1e-4, atol=1e-5)
        model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.finalize()
    projections = [f"layers.{i}.self_attn.in_proj_weight" for i in range(2)]
    report = pruner.report()
    if structure == "channel":
        assert all("layer_structures=" in report.skipped[name] for name in projections), report.skipped
        assert {"layers.0.linear1", "layers.1.linear1"} <= {group.name for group in report.groups}
    else:
        rows = {row.name: row for row in report.layers}
        for name in projections:
            weight = model.get_parameter(name)
            assert rows[name].zeros == int((weight == 0).sum()) == pruned_count(rows[name].target, weight.numel())
            assert structure != "2:4" or is_nm_sparse(weight, 2, 4)
        assert sum(row.zeros for row in report.layers) == pruned_count(sparsity, sum(row.parameters for row in report.layers))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fresh = _torch_transformer().eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x), expected)
        torch.testing.assert_close(_without_fused_attention(fresh, x), expected, rtol=1e-4, atol=1e-5)


def _without_fused_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_attention_with_separate_key_and_value_widths_prunes_its_three_projections():
    torch.manual_seed(0)
    model = _CrossAttention()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)))
    assert pruner.tensor_names == [f"attention.{name}" for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")]
    model(torch.randn(2, 3, 16), (torch.randn(2, 5, 8), torch.randn(2, 5, 12))).sum().backward()
    assert model.attention.parametrizations.k_proj_weight.original.grad is not None
    pruner.finalize()
    assert [row.zeros for row in pruner.report().layers] == [pruned_count(row.target, row.parameters) for row in pruner.report().layers]


class _ProjectedAttention(torch.nn.Module):
    """Linear layers straight into nn.MultiheadAttention (no LayerNorm between): Torch-Pruning couples
    the last one's channels with the attention's width."""

    def __init__(self, **attention: object) -> None:
        super().__init__()
        self.hidden, self.project = torch.nn.Linear(12, 24), torch.nn.Linear(24, 32)
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True, **attention)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.relu(self.hidden(x)))
        return self.head(self.attention(h, h, h)[0])


def test_channels_feeding_pytorch_s_attention_stay_dense_and_the_rest_compacts():
    torch.manual_seed(0)
    model, x = _ProjectedAttention(), torch.randn(2, 5, 12)
    with pytest.warns(UserWarning, match=r"'project': \"the coupled layer 'attention' \(MultiheadAttention\) is not one whose channels pdprune removes"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)),
                           example_inputs=x)
    assert sorted(pruner.units) == ["hidden"] and "layer_structures=" in pruner.report().skipped["attention.in_proj_weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.finalize()
    model.eval()
    small = compact(model, x).eval()
    assert small.hidden.out_features == 12 and small.project.in_features == 12
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"Torch-Pruning could not follow this model's channels \(TypeError: .*unstructured or N:M"):
        PDPPruner(_ProjectedAttention(add_zero_attn=True), PruningConfig(structure="channel"), example_inputs=x)


def test_a_registered_layer_with_other_tensors_stays_dense_under_channels_and_its_neighbours_prune(monkeypatch):
    import pdprune
    from pdprune import layers

    monkeypatch.setattr(layers, "_REGISTERED", dict(layers._REGISTERED))  # the registration ends with the test
    pdprune.register_layer_type("GRU", torch.nn.GRU, tensors=("weight_ih_l0", "weight_hh_l0"))
    with pytest.raises(ValueError, match=r"GRU is the layer type 'GRU' already \(one class has one layout\)"):
        pdprune.register_layer_type("Recurrent", torch.nn.GRU)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.hidden, self.project = torch.nn.Embedding(30, 16), torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)
            self.rnn, self.head = torch.nn.GRU(16, 16, batch_first=True), torch.nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.project(torch.relu(self.hidden(self.embed(ids)))))[0][:, -1])

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(Classifier(), PruningConfig(sparsity=0.5, structure="channel", module_types=("Linear", "GRU")),
                           example_inputs=torch.randint(0, 30, (2, 7)))
    assert sorted(pruner.units) == ["hidden"] and "a GRU holds ['weight_ih_l0', 'weight_hh_l0']" in pruner.report().skipped["rnn.weight_ih_l0"]


def test_projection_names_are_matched_without_case():
    """ModernBERT's fused `Wqkv` and output `Wo`: its heads and their output projection, found in the module."""
    build, batch = ARCHITECTURES["modernbert"]
    specs = find_attention(build(), batch(labels=False))
    assert [(spec.query, spec.output, spec.output_inside) for spec in specs] == [
        (f"model.layers.{i}.attn.Wqkv", f"model.layers.{i}.attn.Wo", True) for i in range(2)]
    assert all(name == name.lower() for names in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES, FUSED_NAMES, OUTPUT_NAMES) for name in names)

    odd = _OddAttention()  # a child named "O" that is no layer does not hide "o"
    odd.q, odd.k, odd.v, odd.o, odd.O = *(torch.nn.Linear(16, 16) for _ in range(4)), torch.nn.Identity()
    assert [(spec.output, spec.output_inside) for spec in find_attention(odd)] == [("o", True)]


class _OddAttention(torch.nn.Module):
    """Heads behind names pdprune does not know (`mix` for the fused projections, `out`)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.mix, self.out = 2, torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.mix(x).chunk(3, dim=-1))
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_heads_with_a_norm_each_are_refused_though_their_norms_start_alike():
    """StableLM's qk_layernorm keeps one LayerNorm per head. Freshly built, they are all alike, so removing
    a head looks exact; once trained, the heads after it would meet their neighbours' norms."""
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "stablelm", **TEXT, num_key_value_heads=2, pad_token_id=0, qk_layernorm=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=_text(False))
    assert "removing these heads changes the model's outputs" in pruner.report().skipped["model.layers.0.self_attn heads"]
    assert "model.layers.0.mlp.gate_proj" in pruner.units, "the MLP neurons still prune"


@pytest.mark.parametrize("attention, include, message", [
    (lambda: torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "0.self_attn.*", r"0\.self_attn heads: nn.MultiheadAttention keeps its heads in in_proj_weight"),
    (_OddAttention, "0.*", r"0 heads: _OddAttention looks like attention but pdprune cannot tell where its heads lie"),
])
def test_heads_asked_of_attention_pdprune_cannot_read_are_refused_with_the_reason(attention, include, message):
    model = torch.nn.Sequential(attention())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing left to prune: .*" + message):
        PDPPruner(model, PruningConfig(structure="channel", include=(include,)), example_inputs=torch.randn(2, 5, 16))
    _untouched(model, before)


def test_a_compacted_hugging_face_model_loads_in_a_new_process(tmp_path):
    import subprocess
    import sys

    from pdprune import save_compacted

    build, batch = ARCHITECTURES["llama-gqa"]
    torch.manual_seed(0)
    model = build()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)),
                       example_inputs=batch(labels=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.finalize()
    small = compact(model, batch(labels=False))
    save_compacted(tmp_path / "small.pt", small, batch(labels=False))
    torch.save(_outputs(small, batch(labels=False)), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from test_generality import ARCHITECTURES, _outputs
from pdprune import load_compacted
build, batch = ARCHITECTURES["llama-gqa"]
model = load_compacted({str(tmp_path / 'small.pt')!r}, build())
expected = torch.load({str(tmp_path / 'expected.pt')!r})
for a, b in zip(expected, _outputs(model, batch(labels=False))):
    torch.testing.assert_close(a, b)
attention = model.model.layers[0].self_attn
assert attention.q_proj.out_features == 2 * attention.head_dim and attention.k_proj.out_features == attention.head_dim
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# --- attention pdprune cannot read, fused projections ----------------------------------------------

IMMEDIATE = ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0)
DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
UNREAD_ATTENTION = {  # fused query_key_value (GPT-NeoX, Falcon's grouped heads), fused qkv_proj with grouped-query attention (Phi-3)
    "gpt_neox": dict(DECODER, intermediate_size=128),
    "phi3": dict(DECODER, num_key_value_heads=2, intermediate_size=128, pad_token_id=0),
    "falcon": dict(DECODER, num_kv_heads=2, new_decoder_architecture=True),
}


def _decoder(architecture: str, **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(architecture, **(UNREAD_ATTENTION[architecture] | overrides)))


def _compact_and_reload(model: torch.nn.Module, fresh: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """compact(), then save_compacted() and load_compacted() into `fresh`: all three compute the same."""
    from pdprune import load_compacted, save_compacted

    batch = _text(False)
    small = compact(model, batch)
    save_compacted(tmp_path / "small.pt", small, batch)
    loaded = load_compacted(tmp_path / "small.pt", fresh)
    for a, b, c in zip(_outputs(model, batch), _outputs(small, batch), _outputs(loaded, batch)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, b)
    return small


@pytest.mark.parametrize("architecture", list(UNREAD_ATTENTION))
def test_models_with_attention_pdprune_cannot_read_compact_their_mlp_and_reload(architecture, tmp_path):
    """Compaction and reloading skip exactly the projections attaching skipped (all of them, selected or
    not): before, they rooted channel groups at fused attention projections and crashed."""
    model = _decoder(architecture)
    plain = compact(model, _text(False))  # nothing pruned: nothing removed
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", include=("*mlp*",), schedule=IMMEDIATE),
                           example_inputs=_text(False))
        pruner.finalize()
    assert pruner.report().groups and all(group.pruned == group.channels // 2 for group in pruner.report().groups)
    small = _compact_and_reload(model, _decoder(architecture), tmp_path)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("how", [dict(exclude=("*self_attention*",)), dict(layer_structures={"*self_attention*": "unstructured"})])
def test_falcon_s_grouped_heads_follow_the_advice_to_leave_the_attention_out(how):
    """Falcon's new decoder architecture: an unselected fused projection became a Torch-Pruning root, whose
    index mapping divides by zero; no attention projection is a root, selected or not."""
    model = _decoder("falcon")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE, **how), example_inputs=_text(False))
    assert sorted(group.name for group in pruner.report().groups) == [f"transformer.h.{i}.mlp.dense_h_to_4h" for i in range(2)]


def test_a_fused_gate_up_projection_prunes_whole_neurons(tmp_path):
    """Phi-3's gate_up_proj holds [gate | up]: rows i and i + 128 feed neuron i, so they are one unit (before,
    each row was its own, and 77% of the neurons died at 50%; reloading the compacted model failed)."""
    model = _decoder("phi3", num_key_value_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", include=("*mlp*",), schedule=IMMEDIATE),
                           example_inputs=_text(False))
        pruner.finalize()
    assert [(group.name, group.channels, group.pruned) for group in pruner.report().groups] == [
        (f"model.layers.{i}.mlp.gate_up_proj", 128, 64) for i in range(2)]
    weight = model.model.layers[0].mlp.gate_up_proj.weight  # (2 * 128, 64): [gate | up]
    gate_dead, up_dead = (weight[:128] == 0).all(1), (weight[128:] == 0).all(1)
    assert torch.equal(gate_dead, up_dead) and int(gate_dead.sum()) == 64
    small = _compact_and_reload(model, _decoder("phi3", num_key_value_heads=4), tmp_path)
    assert tuple(small.model.layers[0].mlp.gate_up_proj.weight.shape) == (128, 64)
    assert tuple(small.model.layers[0].mlp.down_proj.weight.shape) == (64, 64)
