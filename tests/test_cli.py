from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdprune.checkpoint import load_checkpoint
from pdprune.cli import _configs, build_parser, main
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.train import evaluate, recalibrate_batchnorm


def test_train_on_bundled_digits_at_90_percent_stays_within_two_points_of_dense(tmp_path, capsys):
    assert main(["train", "--sparsity", "0.9", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "dense accuracy (test)" in printed and "PDP accuracy (test)" in printed and "| total" in printed
    run = json.loads((tmp_path / "run.json").read_text())
    dense, pdp = run["dense"]["accuracy"]["test"], run["pdp"]["accuracy"]["test"]
    assert run["report"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert dense > 0.95
    assert pdp >= dense - 0.02, f"PDP {pdp:.4f} vs dense {dense:.4f}"
    assert run["pruning_config"]["sparsity"] == 0.9 and run["train_config"]["epochs"] == 30
    assert (tmp_path / "report.md").read_text().startswith("| tensor")

    saved = load_checkpoint(tmp_path / "model.pt")
    digits = load_dataset("digits")
    model = build_model(saved["model_name"], tuple(saved["input_shape"]), saved["num_classes"])
    model.load_state_dict(saved["model"])
    assert evaluate(model, *digits.evaluations["test"]) == pytest.approx(pdp)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--sparsity", "1.5", "--out", str(tmp_path), "--quiet", "--no-dense"])
    assert exit_info.value.code == 2
    assert "argument --sparsity: must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_recalibrate_bn_keeps_the_fresh_statistics_in_the_saved_model(tmp_path, capsys):
    arguments = ["train", "--model", "resnet20", "--structure", "2:4", "--epochs", "1", "--no-dense", "--quiet", "--out", str(tmp_path)]
    assert main([*arguments, "--recalibrate-bn"]) == 0
    assert "BatchNorm re-estimated:" in capsys.readouterr().out
    run = json.loads((tmp_path / "run.json").read_text())
    recalibrated = run["pdp_accuracy_bn_recalibrated"]["test"]
    saved = load_checkpoint(tmp_path / "model.pt")
    model = build_model(saved["model_name"], tuple(saved["input_shape"]), saved["num_classes"])
    model.load_state_dict(saved["model"])
    digits = load_dataset("digits")
    assert evaluate(model, *digits.evaluations["test"]) == pytest.approx(recalibrated)
    saved_statistics = {name: tensor.clone() for name, tensor in model.state_dict().items() if "running_" in name}
    recalibrate_batchnorm(model, digits, batch_size=64, seed=0)  # the same batches again: nothing may change
    assert all(torch.allclose(tensor, model.state_dict()[name], atol=1e-6) for name, tensor in saved_statistics.items())


def test_recalibrate_bn_refuses_a_model_without_batchnorm_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "mlp", "--recalibrate-bn", "--quiet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "model 'mlp' has no BatchNorm layer" in capsys.readouterr().err
    assert not (tmp_path / "run.json").exists()


def test_schedule_options_reach_the_pruning_config(capsys):
    args = build_parser().parse_args(["train", "--epochs", "30", "--ramp-shape", "cubic", "--ramp-updates", "epoch",
                                      "--anneal-end-epoch", "28", "--anneal-soft-gradient"])
    _, pruning = _configs(args, steps_per_epoch=5)
    schedule = pruning.schedule
    assert (schedule.ramp_shape, schedule.ramp_updates, schedule.anneal_end_epoch, schedule.steps_per_epoch, schedule.anneal_soft_gradient) == (
        "cubic", "epoch", 28, 5, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--ramp-shape", "exponential"])
    assert "invalid choice: 'exponential'" in capsys.readouterr().err


def test_n_m_masks_anneal_with_the_soft_gradient_and_straight_through_by_default():
    def gradients(*arguments):
        _, pruning = _configs(build_parser().parse_args(["train", "--epochs", "10", *arguments]), steps_per_epoch=5)
        return pruning.schedule.anneal_soft_gradient, pruning.straight_through

    assert gradients("--structure", "1:4") == (True, True) and gradients("--layer-structure", "fc*=2:4") == (True, True)
    assert gradients() == (False, False) and gradients("--structure", "channel") == (False, False)
    assert gradients("--structure", "1:4", "--no-anneal-soft-gradient") == (False, False)
    assert gradients("--structure", "1:4", "--no-straight-through") == (True, False)
    assert gradients("--structure", "1:4", "--no-anneal") == (False, False)  # nothing anneals: no surrogate either
    assert gradients("--structure", "channel", "--anneal-soft-gradient") == (True, False)  # refused for channels
    assert gradients("--structure", "1:4", "--layer-structure", "conv*=channel") == (True, False)
    assert gradients("--straight-through") == (False, True)


def test_a_costly_hard_cut_re_estimates_batchnorm_unless_told_not_to(tmp_path, capsys):
    arguments = ["train", "--model", "resnet20", "--structure", "channel", "--sparsity", "0.5", "--epochs", "2",
                 "--no-anneal", "--no-dense", "--quiet"]  # the fixed tau's hard cut at channels is costly
    with pytest.warns(UserWarning, match="the hard mask removes"):
        assert main([*arguments, "--out", str(tmp_path / "auto")]) == 0
    assert "re-estimating BatchNorm (--no-recalibrate-bn to skip)" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["pdp_accuracy_bn_recalibrated"] is not None
    with pytest.warns(UserWarning, match="the hard mask removes"):
        assert main([*arguments, "--no-recalibrate-bn", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "run.json").read_text())["pdp_accuracy_bn_recalibrated"] is None


def test_straight_through_reaches_the_config_and_is_refused_for_channels(tmp_path, capsys):
    _, pruning = _configs(build_parser().parse_args(["train", "--structure", "1:4", "--straight-through"]), steps_per_epoch=5)
    assert pruning.straight_through
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--structure", "channel", "--straight-through", "--quiet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--straight-through applies to unstructured and N:M masks, not to 'channel'" in capsys.readouterr().err


def test_a_pretrained_model_is_pruned_from_the_first_step_and_reaches_the_target_early():
    def schedule(*arguments):
        _, pruning = _configs(build_parser().parse_args(["train", "--epochs", "6", *arguments]), steps_per_epoch=5)
        return pruning.schedule.warmup_epochs, pruning.schedule.ramp_end_epoch

    assert schedule() == (0.6, 3.0)
    assert schedule("--pretrained", "model.pt") == (0.0, 1.0)
    assert schedule("--pretrained", "model.pt", "--warmup-epochs", "0.5", "--ramp-end-epoch", "2") == (0.5, 2.0)


def test_structured_pruning_anneals_by_default_and_unstructured_keeps_the_paper_s_form():
    def anneal_end(*arguments):
        _, pruning = _configs(build_parser().parse_args(["train", "--epochs", "10", *arguments]), steps_per_epoch=5)
        return pruning.schedule.anneal_end_epoch

    assert anneal_end() is None
    assert anneal_end("--structure", "2:4") == 9 and anneal_end("--structure", "channel") == 9
    assert anneal_end("--layer-structure", "fc*=1:4") == 9
    assert anneal_end("--structure", "channel", "--ramp-end-epoch", "9.5") == 9.75
    assert anneal_end("--structure", "channel", "--no-anneal") is None
    assert anneal_end("--structure", "channel", "--anneal-end-epoch", "8") == 8
    with pytest.raises(ValueError, match="give --anneal-end-epoch or --no-anneal, not both"):
        anneal_end("--anneal-end-epoch", "8", "--no-anneal")


def test_console_script_is_installed():
    executable = shutil.which("pdprune", path=str(Path(sys.executable).parent))
    assert executable is not None, "pip install -e . provides the pdprune command next to python"
    result = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("pdprune ")


@pytest.mark.parametrize("command", ["train", "bench", "report", "export"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pdprune " + command in capsys.readouterr().out


# --- --out: never mixed, resumed with the same command, replaced only with --overwrite --------------

QUICK = ["train", "--epochs", "3", "--quiet"]


def _state(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_second_run_into_the_same_out_is_refused_unless_overwrite_and_never_mixed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*QUICK, "--no-dense", "--model", "mlp", "--structure", "channel", "--sparsity", "0.5", "--out", str(out)]) == 0
    assert (out / "model_compacted.pt").is_file() and not (out / "checkpoints").exists()
    assert capsys.readouterr().err == "", "--quiet: no progress bars"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICK, "--no-dense", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a finished run (run.json); pass --overwrite to replace it" in err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    (out / "notes").mkdir()
    (out / "model.sparse.pt").write_bytes(b"what pdprune export wrote")
    assert main([*QUICK, "--no-dense", "--out", str(out), "--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["model.pt", "model.sparse.pt", "notes", "report.md", "run.json"], (
        "the old model_compacted.pt is gone, the files pdprune train did not write stay")
    assert json.loads((out / "run.json").read_text())["pruning_config"]["structure"] == "unstructured"


class _Interrupt:
    """Ctrl-C right after the `when`-th checkpoint of the training named `name` was written."""

    def __init__(self, monkeypatch, name: str, when: int) -> None:
        import pdprune.train

        self.save, self.name, self.when, self.count = pdprune.train.save_checkpoint, name, when, 0
        monkeypatch.setattr(pdprune.train, "save_checkpoint", self)

    def __call__(self, path, state):
        self.save(path, state)
        if Path(path).name == self.name:
            self.count += 1
            if self.count == self.when:
                raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["dense.pt", "pdp.pt"])
def test_ctrl_c_says_how_to_resume_and_the_same_command_finishes_bit_for_bit(where, tmp_path, capsys, monkeypatch):
    arguments = ["train", "--epochs", "3", "--batch-size", "128", "--quiet"]
    assert main([*arguments, "--out", str(tmp_path / "straight")]) == 0
    capsys.readouterr()
    out = tmp_path / "interrupted"
    interrupt = _Interrupt(monkeypatch, where, when=1)
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    command = err.split("resume from the last finished epoch with: ")[1].strip()
    assert command == f"pdprune train --epochs 3 --batch-size 128 --quiet --out {out}", "without --overwrite, which would start over"
    assert (out / "checkpoints" / where).is_file() and not (out / "run.json").exists() and not (out / "model.pt").exists()
    monkeypatch.setattr(interrupt, "when", 0)  # no more interruptions
    assert main(shlex.split(command)[1:]) == 0
    assert f"resuming the unfinished run in {out}" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["model.pt", "report.md", "run.json"]
    _same_weights(_state(tmp_path / "straight" / "model.pt"), _state(out / "model.pt"))
    straight, resumed = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("straight", "interrupted"))
    for run in ("dense", "pdp"):
        assert resumed[run]["accuracy"] == straight[run]["accuracy"]
        assert resumed[run]["history"] == straight[run]["history"]


def test_an_unfinished_run_with_other_settings_is_not_resumed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _Interrupt(monkeypatch, "pdp.pt", when=1)
    with pytest.raises(SystemExit):
        main([*QUICK, "--no-dense", "--out", str(out)])
    capsys.readouterr()
    saved = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICK, "--no-dense", "--sparsity", "0.8", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run with other settings (--sparsity None there, 0.8 here)" in err
    assert "rerun its command to resume it, pass --overwrite to delete it" in err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == saved


def test_sigint_stops_a_real_process_with_one_line_and_code_130(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "pdprune.cli", "train", "--epochs", "1000", "--no-dense", "--quiet", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a shell's background job ignores SIGINT, and so would the child: give it Ctrl-C back
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "pdp.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [f"pdprune train: interrupted; resume from the last finished epoch with: "
                                        f"pdprune train --epochs 1000 --no-dense --quiet --out {out}"]
    assert (out / "checkpoints" / "pdp.pt").is_file()


def test_progress_shows_batches_rate_and_epoch_within_the_epoch(capsys, monkeypatch):
    import pdprune.train
    from pdprune.train import TrainConfig, train

    digits = load_dataset("digits").subset(256, 64)
    train(build_model("mlp", digits.input_shape, digits.num_classes), digits, TrainConfig(epochs=2, batch_size=32), description="dense")
    err = capsys.readouterr().err
    assert "dense:" in err and "/16 [" in err and ("batch/s" in err or "s/batch" in err), "batches of the run, rate, time left"
    assert "epoch 2/2, loss" in err

    class Bar:  # records what the bar is told, however fast the batches go by
        def __init__(self, **options):
            self.options, self.n, self.postfix, self.seen = options, options["initial"], "", []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return False

        def set_postfix_str(self, text):
            self.postfix = text

        def update(self, count=1):
            self.n += count
            self.seen.append((self.n, self.postfix))

    bars: list[Bar] = []
    monkeypatch.setattr(pdprune.train, "tqdm", Bar)
    train(build_model("mlp", digits.input_shape, digits.num_classes), digits, TrainConfig(epochs=2, batch_size=32), description="dense")
    [bar] = bars
    assert bar.options["total"] == 16 and bar.options["unit"] == "batch"
    assert [n for n, _ in bar.seen] == list(range(1, 17)), "one step per batch"
    assert all(postfix.startswith("epoch 1/2") for _, postfix in bar.seen[:8])
    assert all(postfix.startswith("epoch 2/2, loss") for _, postfix in bar.seen[8:])


def test_train_help_says_how_resume_and_overwrite_work_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the same command resumes it from its last finished epoch" in text
    assert "--overwrite deletes that earlier run first" in text
    assert "exit codes: 0 done; 2 a mistake" in text and "130 interrupted" in text and "--debug" in text


def test_onnx_export_of_the_compacted_model_that_train_wrote(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    from pdprune import load_compacted

    out = tmp_path / "run"
    assert main([*QUICK, "--no-dense", "--structure", "channel", "--sparsity", "0.5", "--out", str(out)]) == 0
    assert main(["export", str(out / "model_compacted.pt"), str(tmp_path / "small.onnx")]) == 0  # ONNX for its suffix
    small = load_compacted(out / "model_compacted.pt", build_model("mlp", (1, 8, 8), 10)).eval()
    x = load_dataset("digits").evaluations["test"][0][:5]
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), small(x).detach(), rtol=1e-4, atol=1e-4)
    assert main(["export", str(out / "model_compacted.pt"), str(tmp_path / "small.sparse.pt")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "small.sparse.pt"), str(tmp_path / "again.onnx"), "--format", "onnx"])
    assert exit_info.value.code == 2
    assert "is a sparse copy of a compacted model" in capsys.readouterr().err
    assert not (tmp_path / "again.onnx").exists()


def test_readme_and_makefile_agree_on_how_pdprune_gets_on_path():
    root = Path(__file__).resolve().parents[1]
    readme, makefile = (root / "README.md").read_text(), (root / "Makefile").read_text()
    assert "source .venv/bin/activate" in readme.split("## ")[0], "the README's first lines say how to get pdprune on PATH"
    demo = makefile.split("\ndemo:")[1].split("\n\n")[0].replace("$(VENV)", ".venv")
    assert "source .venv/bin/activate" in demo, "make demo says it too"
