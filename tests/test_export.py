"""Compressed sparse files, ONNX and torch.export of finalized models, and the report/export CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, save_checkpoint
from pdprune.cli import main
from pdprune.export import export_onnx, load_sparse, read_state_dict, save_sparse
from pdprune.models import build_model

AT_TARGET = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)


def _finalized(name="resnet20", shape=(3, 32, 32), sparsity=0.9):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PDPPruner(model, PruningConfig(sparsity=sparsity, schedule=AT_TARGET)).finalize()
    return model.eval()


def test_sparse_file_is_small_and_loads_back_bit_exact(tmp_path):
    model = _finalized()
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    save_sparse(tmp_path / "sparse.pt", model, model_name="resnet20")
    assert (tmp_path / "sparse.pt").stat().st_size <= 0.15 * (tmp_path / "dense.pt").stat().st_size
    restored = load_sparse(tmp_path / "sparse.pt")
    assert list(restored) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    fresh = build_model("resnet20", (3, 32, 32), 10).eval()
    fresh.load_state_dict(restored)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))
    weights, metadata = read_state_dict(tmp_path / "sparse.pt")
    assert metadata == {"model_name": "resnet20"} and torch.equal(weights["linear.weight"], model.linear.weight)


def test_damaged_or_foreign_sparse_files_are_refused(tmp_path):
    save_sparse(tmp_path / "s.pt", _finalized("mlp", (1, 8, 8)))
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    state["values"]["float32"] = state["values"]["float32"][:-5]
    save_checkpoint(tmp_path / "damaged.pt", state)
    with pytest.raises(ValueError, match=r"is damaged: tensor 'layers.\d.bias' of shape \(\d+,\) has \d+ values"):
        load_sparse(tmp_path / "damaged.pt")  # the last tensor is dense: a bias
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    last_weight = [name for name in state["entries"] if name.endswith("weight")][-1]
    end = state["entries"][last_weight]["values"][1]
    state["values"]["float32"] = torch.cat([state["values"]["float32"][: end - 5], state["values"]["float32"][end:]])
    for entry in list(state["entries"].values())[list(state["entries"]).index(last_weight) + 1:]:
        entry["values"] = (entry["values"][0] - 5, entry["values"][1] - 5)
    state["entries"][last_weight]["values"] = (state["entries"][last_weight]["values"][0], end - 5)
    save_checkpoint(tmp_path / "damaged.pt", state)
    with pytest.raises(ValueError, match=r"is damaged: tensor 'layers.\d.weight' has \d+ mask bits but \d+ values"):
        load_sparse(tmp_path / "damaged.pt")
    save_checkpoint(tmp_path / "future.pt", {**state, "format": "pdprune.sparse/9"})
    with pytest.raises(ValueError, match=r"has format 'pdprune.sparse/9' .* upgrade pdprune"):
        load_sparse(tmp_path / "future.pt")
    torch.save({"x": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not a pdprune sparse model file"):
        load_sparse(tmp_path / "plain.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "s.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"truncated, corrupt"):
        load_sparse(tmp_path / "cut.pt")


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path):
    import onnxruntime
    model = _finalized()
    export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(5, 3, 32, 32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_finalized_models_export_with_torch_export():
    model = _finalized()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), model(x))


def test_cli_report_and_export(tmp_path, capsys):
    assert main(["train", "--epochs", "3", "--no-dense", "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "model.pt"), "--plot", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "| layers.1.weight" in printed and "| total" in printed and "90.00%" in printed
    assert (tmp_path / "plot.png").stat().st_size > 5000
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "model.sparse.pt")]) == 0
    assert "% of" in capsys.readouterr().out
    restored, metadata = read_state_dict(tmp_path / "model.sparse.pt")
    original, _ = read_state_dict(tmp_path / "model.pt")
    assert all(torch.equal(restored[k], original[k]) for k in original) and metadata["model_name"] == "mlp"
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "model.onnx"), "--format", "onnx"]) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 1000
    again = tmp_path / "from-sparse"  # the sparse file is a model file like the others: it starts a run
    assert main(["train", "--epochs", "1", "--no-dense", "--quiet", "--pretrained", str(tmp_path / "model.sparse.pt"), "--out", str(again)]) == 0


def test_report_on_a_tensor_without_entries(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(0, 3, 3, 3), "fc.weight": torch.zeros(4, 4)}, tmp_path / "empty.pt")
    assert main(["report", str(tmp_path / "empty.pt"), "--plot", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "| conv.weight | -         | 0          |" in printed and "| fc.weight   | -         | 16         | -      | -       | 100.00% |" in printed


def test_report_on_a_file_without_weights_says_so(tmp_path):
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "other.pt")])
