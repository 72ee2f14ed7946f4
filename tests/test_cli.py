from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
    assert "sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err


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
    args = build_parser().parse_args(["train", "--epochs", "30", "--ramp-shape", "cubic", "--anneal-end-epoch", "28", "--anneal-soft-gradient"])
    _, pruning = _configs(args, steps_per_epoch=5)
    schedule = pruning.schedule
    assert (schedule.ramp_shape, schedule.anneal_end_epoch, schedule.steps_per_epoch, schedule.anneal_soft_gradient) == ("cubic", 28, 5, True)
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
    assert "straight_through applies to unstructured and N:M masks, not to 'channel'" in capsys.readouterr().err


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
