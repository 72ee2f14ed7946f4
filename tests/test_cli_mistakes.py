"""Every everyday mistake on the command line: one line on stderr in the CLI's words, exit code 2, and
nothing written. A bug is one line too (exit 1), with the traceback only under --debug."""

from __future__ import annotations

import os
import re

import pytest
import torch

from pdprune.cli import cli_words, main


def _refused(arguments: list[str], capsys, code: int = 2) -> str:
    """Run `pdprune ARGUMENTS`, expect exit `code` and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def _files(directory) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


TRAIN_MISTAKES = [
    (["--sparsity", "1.5"], r"argument --sparsity: must be in \[0, 1\), got 1.5; pass a fraction"),
    (["--sparsity", "nan"], r"argument --sparsity: expected a finite number, got 'nan'"),
    (["--sparsity", "-0.1"], r"argument --sparsity: must be in \[0, 1\), got -0.1"),
    (["--sparsity", "ninety"], r"argument --sparsity: expected a number, got 'ninety'"),
    (["--batch-size", "0"], r"argument --batch-size: must be >= 1, got 0"),
    (["--epochs", "-3"], r"argument --epochs: must be >= 1, got -3"),
    (["--epochs", "2.5"], r"argument --epochs: expected a whole number, got '2.5'"),
    (["--lr", "-0.1"], r"argument --lr: must be > 0, got -0.1"),
    (["--lr", "inf"], r"argument --lr: expected a finite number, got 'inf'"),
    (["--weight-decay", "-1"], r"argument --weight-decay: must be >= 0, got -1"),
    (["--temperature", "0"], r"argument --temperature: must be > 0, got 0"),
    (["--warmup-epochs", "nan"], r"argument --warmup-epochs: expected a finite number, got 'nan'"),
    (["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*63\), got -1"),
    (["--structure", "4:2"], r"argument --structure: structure '4:2' needs 0 < N < M"),
    (["--structure", "blocks"], r"argument --structure: structure must be 'unstructured', 'channel' or 'N:M'"),
    (["--layer-structure", "fc"], r"argument --layer-structure: expected PATTERN=STRUCTURE such as 'fc\*=2:4', got 'fc'"),
    (["--layer-structure", "fc=3:3"], r"argument --layer-structure: structure '3:3' needs 0 < N < M"),
    (["--model", "resnet1000"], r"argument --model: invalid choice: 'resnet1000'"),
    (["--sparsty", "0.5"], r"unrecognized arguments: --sparsty 0.5; did you mean --sparsity\?"),
    (["--warmup-epochs", "5", "--epochs", "1"], r"--warmup-epochs 5 leaves no epoch to prune in: --epochs is 1"),
    (["--ramp-end-epoch", "40"], r"--ramp-end-epoch 40 comes after the last epoch \(--epochs 30\)"),
    (["--anneal-end-epoch", "31"], r"--anneal-end-epoch 31 comes after the last epoch \(--epochs 30\)"),
    (["--epochs", "10", "--warmup-epochs", "2", "--ramp-end-epoch", "1"],
     r"--ramp-end-epoch 1 comes before the warm-up ends \(--warmup-epochs 2\); give a later --ramp-end-epoch"),
    (["--epochs", "10", "--ramp-end-epoch", "0.5"], r"--ramp-end-epoch 0.5 comes before the warm-up ends \(--warmup-epochs 1, the default: 10% of --epochs\)"),
    (["--epochs", "10", "--ramp-end-epoch", "6", "--anneal-end-epoch", "5"], r"--anneal-end-epoch 5 must come after the ramp ends \(--ramp-end-epoch 6\)"),
    (["--no-anneal", "--anneal-end-epoch", "8"], r"give --anneal-end-epoch or --no-anneal, not both"),
    (["--anneal-soft-gradient"], r"--anneal-soft-gradient works while tau anneals, and nothing anneals here"),
    (["--structure", "2:4", "--sparsity", "0.3"], r"--sparsity 0.3 has no effect with --structure 2:4: an N:M pattern sets the sparsity itself \(2:4 keeps 2 of every 4 weights: 50% zeros\)"),
    (["--structure", "channel", "--straight-through"], r"--straight-through applies to unstructured and N:M masks, not to 'channel'"),
    (["--include", "layer9*"], r"--include 'layer9\*' matches no module of types .*module names look like \['layers.1'"),
    (["--exclude", "layers.9"], r"--exclude 'layers.9' matches no module"),
    (["--layer-structure", "conv*=2:4"], r"--layer-structure 'conv\*' matches no module"),
    (["--model", "resnet20", "--structure", "2:4", "--on-incompatible", "error"],
     r"2:4 needs the input dimension of 'conv1.weight' \(dimension 1 of shape \(16, 1, 3, 3\)\) to be a multiple of 4; exclude it, e.g. --exclude 'conv1', or pass --on-incompatible skip"),
    (["--dataset", "sst2", "--model", "mlp"], r"--model mlp cannot read --dataset sst2, which gives token ids \(text\); choose --model from \['transformer'\]"),
    (["--model", "transformer"], r"--model transformer cannot read --dataset digits, which gives images; choose --model from \['lenet5'"),
    (["--model", "lenet5"], r"--model lenet5 cannot take --dataset digits's inputs of shape \(1, 8, 8\) \(.*\); choose another --model"),
    (["--dataset", "sst2", "--model", "transformer", "--channels-last"], r"--channels-last is a layout for image inputs; --dataset sst2 gives token ids"),
    (["--device", "tpu9"], r"--device 'tpu9' is not a torch device"),
    (["--recalibrate-bn"], r"--recalibrate-bn: model 'mlp' has no BatchNorm layer; drop the option"),
    (["--pretrained", "no-such-weights.pt"], r"--pretrained no-such-weights.pt: no such file"),
    (["--data-dir", "no-such-directory"], r"--data-dir no-such-directory is not a directory"),
]


@pytest.mark.parametrize("arguments,message", TRAIN_MISTAKES, ids=[" ".join(a) for a, _ in TRAIN_MISTAKES])
def test_train_refuses_a_mistake_before_anything_is_written(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/...) and relative paths land here
    line = _refused(["train", "--quiet", "--out", str(tmp_path / "out"), *arguments], capsys)
    assert line.startswith("pdprune train: error: ")
    assert re.search(message, line), line
    assert not re.search(r"\w=True|\w=\.\.\.|exclude=|include=", line), f"API words in a CLI message: {line}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda_is_refused(tmp_path, capsys):
    line = _refused(["train", "--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert "--device cuda: this machine has no CUDA device" in line and "use --device cpu" in line
    assert not (tmp_path / "out").exists()


def test_missing_data_is_explained_with_the_cli_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PDPRUNE_DATA", raising=False)
    line = _refused(["train", "--dataset", "mnist", "--out", str(tmp_path / "out")], capsys)
    assert "--dataset mnist needs its files: pass --data-dir (or set PDPRUNE_DATA) and --download" in line
    (tmp_path / "empty").mkdir()
    line = _refused(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")], capsys)
    assert "is missing; set PDPRUNE_DATA (or --data-dir)" in line and "pass --download to fetch it" in line and "download=True" not in line
    assert not (tmp_path / "out").exists()


def test_pretrained_weights_that_are_not_weights_or_do_not_fit_are_named(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    line = _refused(["train", "--pretrained", str(tmp_path / "list.pt"), "--out", str(tmp_path / "out")], capsys)
    assert "list.pt' holds a list, not a state_dict of tensors" in line
    (tmp_path / "text.pt").write_text("hello")
    assert "cannot read weights from" in _refused(["train", "--pretrained", str(tmp_path / "text.pt"), "--out", str(tmp_path / "out")], capsys)
    torch.save({"weight": torch.ones(3)}, tmp_path / "other.pt")
    assert "does not fit MLP" in _refused(["train", "--pretrained", str(tmp_path / "other.pt"), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    line = _refused(["train", "--out", str(tmp_path / "notes.txt")], capsys)
    assert "--out" in line and "notes.txt is a file; pass a directory" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_holding_files_pdprune_did_not_write_is_never_touched(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    for extra in ([], ["--overwrite"]):
        line = _refused(["train", "--out", str(tmp_path / "out"), *extra], capsys)
        assert "is not empty and holds no pdprune run (thesis.tex); choose a new or empty directory" in line
    assert _files(tmp_path / "out") == {"thesis.tex": b"mine"}


def test_a_bug_is_one_line_that_asks_for_debug_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr("pdprune.cli.load_dataset", broken)
    line = _refused(["train", "--out", str(tmp_path / "out")], capsys, code=1)
    assert line.startswith("pdprune train: internal error (RuntimeError: something inside broke); this is a bug")
    assert "rerun with --debug" in line
    for arguments in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "something inside broke" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--debug", "--warmup-epochs", "5", "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err, "--debug shows the traceback of a mistake too"
    assert not (tmp_path / "out").exists()


def test_api_words_become_flags():
    assert cli_words("pass download=True (--download) to fetch it") == "pass --download to fetch it"
    assert cli_words("exclude it, e.g. exclude=('conv1',), or pass on_incompatible='skip'") == "exclude it, e.g. --exclude 'conv1', or pass --on-incompatible skip"
    assert cli_words("warmup_epochs must be a finite number >= 0") == "--warmup-epochs must be a finite number >= 0"
    assert cli_words("sparsity must be in [0, 1), got 2") == "--sparsity must be in [0, 1), got 2"
    assert cli_words("Train with ScheduleConfig(anneal_end_epoch=...) so that") == "Train with --anneal-end-epoch so that"
    assert cli_words("torch.optim.swa_utils.update_bn and the sparsity of x") == "torch.optim.swa_utils.update_bn and the sparsity of x"


# --- report, export, bench ---------------------------------------------------------------------------


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.fixture
def model_file(tmp_path):
    """A small model file as `pdprune train` writes it."""
    from pdprune import save_checkpoint
    from pdprune.models import build_model

    model = build_model("mlp", (1, 8, 8), 10)
    with torch.no_grad():
        model.layers[1].weight[:, ::2] = 0
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_name": "mlp", "dataset": "digits", "input_shape": [1, 8, 8],
                           "num_classes": 10, "vocabulary_size": None})
    return path


def test_report_refuses_files_that_hold_no_model_by_name(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty.pt' is empty (0 bytes)" in _refused(["report", str(tmp_path / "empty.pt")], capsys)
    torch.save([1, 2], tmp_path / "list.pt")
    assert "list.pt' holds a list, not model weights" in _refused(["report", str(tmp_path / "list.pt")], capsys)
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "other.pt")
    assert "other.pt' holds no model weights pdprune recognizes" in _refused(["report", str(tmp_path / "other.pt")], capsys)
    assert "is a directory; pass a model file" in _refused(["report", str(tmp_path)], capsys)
    assert "missing.pt: no such file" in _refused(["report", str(tmp_path / "missing.pt")], capsys)
    torch.save({"model": {"w": torch.ones(2, 2)}, "x": _Payload(str(tmp_path / "ran"))}, tmp_path / "evil.pt")
    assert "pickled objects are refused" in _refused(["report", str(tmp_path / "evil.pt")], capsys)
    assert not (tmp_path / "ran").exists()
    assert not list(tmp_path.glob("*.png"))


def test_report_never_writes_its_plot_over_the_model(model_file, capsys):
    before = model_file.read_bytes()
    line = _refused(["report", str(model_file), "--plot", str(model_file)], capsys)
    assert "--plot" in line and "is the input file" in line
    assert model_file.read_bytes() == before
    assert "is a directory; give a file name" in _refused(["report", str(model_file), "--plot", str(model_file.parent)], capsys)


def test_export_refuses_to_destroy_its_input_or_write_into_a_directory(model_file, tmp_path, capsys):
    before = _files(tmp_path)
    assert "is the input file; writing it would destroy the input" in _refused(["export", str(model_file), str(model_file)], capsys)
    assert "is a directory; give a file name" in _refused(["export", str(model_file), str(tmp_path)], capsys)
    assert "does not exist; create it first" in _refused(["export", str(model_file), str(tmp_path / "no" / "m.pt")], capsys)
    assert _files(tmp_path) == before
    assert main(["export", str(model_file), str(tmp_path / "m.sparse.pt")]) == 0
    written = (tmp_path / "m.sparse.pt").read_bytes()
    assert "m.sparse.pt exists; pass --overwrite to replace it" in _refused(["export", str(model_file), str(tmp_path / "m.sparse.pt")], capsys)
    assert (tmp_path / "m.sparse.pt").read_bytes() == written
    assert main(["export", str(model_file), str(tmp_path / "m.sparse.pt"), "--overwrite"]) == 0


def test_export_refuses_a_model_that_is_still_being_pruned(tmp_path, capsys):
    from pdprune import PDPPruner, PruningConfig, save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    PDPPruner(model, PruningConfig(sparsity=0.5))
    save_checkpoint(tmp_path / "training.pt", {"model": model.state_dict()})
    line = _refused(["export", str(tmp_path / "training.pt"), str(tmp_path / "out.pt")], capsys)
    assert "holds a model still being pruned" in line and "finalize()" in line
    assert not (tmp_path / "out.pt").exists()


def test_onnx_export_of_weights_that_do_not_fit_their_architecture_is_named(model_file, tmp_path, capsys):
    from pdprune import load_checkpoint, save_checkpoint

    state = load_checkpoint(model_file)
    state["model"]["layers.1.weight"] = torch.ones(3, 3)
    save_checkpoint(tmp_path / "bent.pt", state)
    pytest.importorskip("onnxscript")
    line = _refused(["export", str(tmp_path / "bent.pt"), str(tmp_path / "m.onnx"), "--format", "onnx"], capsys)
    assert "bent.pt's weights do not fit model 'mlp'" in line
    assert not (tmp_path / "m.onnx").exists()


GRID = """
name = "tiny"
dataset = "digits"
model = "mlp"
seeds = [0, 1]
train_limit = 64
[train]
epochs = 1
[schedule]
warmup_epochs = 0.5
ramp_end_epoch = 1
[[runs]]
methods = ["dense", "pdp"]
sparsities = [0.5]
"""


@pytest.mark.parametrize("arguments,message", [
    (["--only", "nomatch"], r"--only 'nomatch' matches no run of grid 'tiny'; .* the keys are: digits-mlp-dense-dense-seed0, .*digits-mlp-pdp-unstructured-0.5-seed1"),
    (["--seeds", "7"], r"--seeds 7: grid 'tiny' has seeds \[0, 1\]"),
    (["--device", "tpu9"], r"--device 'tpu9' is not a torch device"),
], ids=["only", "seeds", "device"])
def test_bench_refuses_a_selection_that_runs_nothing(arguments, message, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(GRID)
    line = _refused(["bench", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "out"), *arguments], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_bench_names_a_missing_or_broken_grid_file(tmp_path, capsys):
    assert "grid file" in _refused(["bench", str(tmp_path / "none.toml")], capsys)
    (tmp_path / "broken.toml").write_text("name = [")
    assert "broken.toml' is not valid TOML" in _refused(["bench", str(tmp_path / "broken.toml")], capsys)
    (tmp_path / "typo.toml").write_text(GRID.replace("epochs = 1", "epoch = 1"))
    assert "[train] has unknown fields ['epoch']" in _refused(["bench", str(tmp_path / "typo.toml")], capsys)


@pytest.mark.parametrize("change,message", [
    (("ramp_end_epoch = 1", "ramp_end_epoch = 2"), r"runs\[0\]: the schedule does not fit in 1 epochs: warmup_epochs 0.5 and ramp_end_epoch 2"),
    (("warmup_epochs = 0.5", "warmup_epochs = 1"), r"runs\[0\]: the schedule does not fit in 1 epochs"),
    (("sparsities = [0.5]", "sparsities = [0.5]\npdp = { temperature = -1 }"), r"runs\[0\]: pdp at sparsity 0.5: temperature must be a finite number > 0"),
    (("sparsities = [0.5]", "sparsities = [0.5]\npdp = { warmth = 1 }"), r"runs\[0\]: pdp at sparsity 0.5: unknown PruningConfig fields \['warmth'\]"),
    (("sparsities = [0.5]", "sparsities = 0.5"), r"runs\[0\]: sparsities must be a non-empty list of fractions in \[0, 1\), got 0.5; e.g. sparsities = \[0.5\]$"),
], ids=["ramp-after-end", "warmup-fills-all", "temperature", "unknown-field", "scalar-sparsities"])
def test_bench_refuses_a_grid_that_would_fail_midway_before_running_anything(change, message, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(GRID.replace(*change))
    line = _refused(["bench", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "out")], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments,message", [
    (["--exclude", "layers.*"], r"no prunable layer selected: .* left after --include/--exclude; change --include/--exclude$"),
    (["--device", "meta"], r"--device meta holds shapes but no values"),
    (["--structure", "2:4", "--sparsity", "0.75"], r"drop --sparsity, or use --structure 1:4 for 75%$"),
    (["--structure", "1:4", "--layer-structure", "layers.5=2:4", "--sparsity", "0.75"], r"with --structure 1:4 and every --layer-structure: .*; drop --sparsity$"),
], ids=["exclude-all", "meta", "suggest-nm", "mixed-nm"])
def test_more_train_mistakes_in_cli_words(arguments, message, tmp_path, capsys):
    line = _refused(["train", "--out", str(tmp_path / "out"), *arguments], capsys)
    assert re.search(message, line), line
    assert "module_types=" not in line and not (tmp_path / "out").exists()


def test_an_n_m_structure_with_its_own_sparsity_is_accepted():
    from pdprune.cli import build_parser, check_train_arguments

    check_train_arguments(build_parser().parse_args(["train", "--structure", "2:4", "--sparsity", "0.5"]))
    check_train_arguments(build_parser().parse_args(["train", "--structure", "2:4", "--layer-structure", "layers.5=unstructured", "--sparsity", "0.3"]))
