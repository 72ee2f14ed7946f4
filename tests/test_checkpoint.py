from __future__ import annotations

import pytest
import torch

from pdprune.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_adds_the_version(tmp_path):
    save_checkpoint(tmp_path / "a" / "c.pt", {"x": torch.arange(3), "step": 4})
    state = load_checkpoint(tmp_path / "a" / "c.pt")
    assert torch.equal(state["x"], torch.arange(3)) and state["step"] == 4 and "pdprune_version" in state


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*c\.pt.*truncated, corrupt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
