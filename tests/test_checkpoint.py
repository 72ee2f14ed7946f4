from __future__ import annotations

import os

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


class _RunsCodeWhenUnpickled:
    """A pickled object whose loading would create a directory: what a malicious checkpoint could do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_file_holding_pickled_objects_is_refused_without_running_them(tmp_path):
    target = tmp_path / "created-by-unpickling"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCodeWhenUnpickled(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*evil\.pt.*GLOBAL posix.mkdir.*not a weights-only torch checkpoint "
                                         r"\(pickled objects are refused: loading them could run code\)") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(refused.value) and "set to `False`" not in str(refused.value), "no advice to load it unsafely"
    assert not target.exists(), "loading ran code from the file"


@pytest.mark.parametrize("content,message", [(b"", r"is empty \(0 bytes\)"), (b"not a torch file", r"cannot read checkpoint")])
def test_empty_or_foreign_files_name_the_file(tmp_path, content, message):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "c.pt")


def test_files_are_written_with_the_usual_permissions(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o666 & ~umask
