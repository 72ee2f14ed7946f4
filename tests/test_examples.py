"""Every script in examples/ runs in its --smoke mode (seconds each) and reaches its target sparsity.

The scripts run in this process through their `main(argv)` (the imports are shared, so the suite stays
fast), in a temporary directory, on one thread; the torchrun one runs as torchrun launches it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *argv: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, above all on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # smoke runs are too short for a good schedule: the warnings say so
            return module.main(["--smoke", *argv])
    finally:
        torch.set_num_threads(threads)


def test_every_example_is_tested():
    tested = {"train_loop", "huggingface_trainer", "lightning_digits", "ddp_torchrun", "channels_and_heads", "export_deploy"}
    assert {path.stem for path in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("structure, target", [("unstructured", 0.9), ("2:4", 0.5)])
def test_train_loop(structure, target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_example("train_loop", "--structure", structure)
    assert result["sparsity"] == pytest.approx(target, abs=1e-4)


@pytest.mark.parametrize("structure, target", [("unstructured", 0.9), ("channel", 0.5)])
def test_huggingface_trainer_on_sst2(structure, target, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_example("huggingface_trainer", "--data-dir", str(data_dir), "--structure", structure)
    assert result["sparsity"] == pytest.approx(target, abs=1e-4)
    if structure == "channel":
        dense, compacted = result["parameters"]
        assert compacted < dense


def test_lightning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_example("lightning_digits")["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_channels_and_heads_compacts_a_bert(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_example("channels_and_heads", "--data-dir", str(data_dir))
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["parameters"][1] < result["parameters"][0] and result["macs"][1] < result["macs"][0]
    heads = [units for name, units in result["groups"].items() if name.endswith(" heads")]
    assert heads and all(pruned == total // 2 for pruned, total in heads), "half the heads of every layer are gone"
    assert (tmp_path / "compacted.pt").is_file()


def test_export_and_deploy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_example("export_deploy")
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert result["bytes"]["model.sparse.pt"] < 0.3 * result["bytes"]["model.pt"]
    assert result["onnx_max_difference"] < 1e-4 and result["torch_export_max_difference"] < 1e-5


def test_ddp_with_torchrun_on_two_processes(tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ddp_torchrun.py"), "--smoke", "--out", str(checkpoint)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith('{"rank"')]
    assert sorted(result["rank"] for result in results) == [0, 1]
    assert all(result["sparsity"] == pytest.approx(0.9, abs=1e-4) for result in results)
    assert results[0]["accuracy"] == results[1]["accuracy"], "every rank holds the same pruned model"
    import pdprune

    assert pdprune.load_checkpoint(checkpoint)["pruner"]["budgets"] is not None
