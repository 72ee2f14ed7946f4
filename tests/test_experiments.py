from __future__ import annotations

import json

import pytest


class SimulatedCrash(RuntimeError):
    """Stands for a crash or a kill in the middle of a run."""

from pdprune import experiments
from pdprune.experiments import load_grid, run_grid, summarize

GRID = """
name = "smoke"
dataset = "digits"
model = "mlp"
seeds = [0, 1]
train_limit = 300
[train]
epochs = 2
batch_size = 64
[schedule]
warmup_epochs = 0.5
ramp_end_epoch = 1
[[runs]]
methods = ["dense"]
[[runs]]
methods = ["pdp", "gmp"]
sparsities = [0.8]
[[runs]]
methods = ["pdp"]
label = "pdp tau=0.1"
pdp = { temperature = 0.1 }
sparsities = [0.8]
"""


def test_grid_expands_methods_sparsities_and_seeds(tmp_path):
    (tmp_path / "grid.toml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.toml")
    assert len(grid.runs) == 2 * (1 + 2 + 1)
    assert {run.name for run in grid.runs} == {"dense", "pdp", "gmp", "pdp tau=0.1"}
    assert next(run for run in grid.runs if run.label).pdp == {"temperature": 0.1}


def test_a_runs_entry_may_give_its_own_seeds(tmp_path):
    (tmp_path / "grid.toml").write_text(GRID.replace('label = "pdp tau=0.1"', 'label = "pdp tau=0.1"\nseeds = [0, 1, 2]'))
    runs = load_grid(tmp_path / "grid.toml").runs
    assert sorted(run.seed for run in runs if run.label) == [0, 1, 2]
    assert sorted(run.seed for run in runs if run.method == "gmp") == [0, 1]
    (tmp_path / "bad.toml").write_text(GRID.replace('label = "pdp tau=0.1"', 'label = "pdp tau=0.1"\nseeds = []'))
    with pytest.raises(ValueError, match=r"runs\[2\]: seeds must be"):
        load_grid(tmp_path / "bad.toml")


def test_a_runs_entry_may_give_every_method_its_own_schedule(tmp_path):
    entry = '[[runs]]\nmethods = ["gmp"]\nlabel = "gmp early"\nsparsities = [0.8]\nschedule = { ramp_end_epoch = 0.75 }\n'
    (tmp_path / "grid.toml").write_text(GRID + entry)
    runs = load_grid(tmp_path / "grid.toml").runs
    assert {(run.warmup_epochs, run.ramp_end_epoch) for run in runs if run.label == "gmp early"} == {(0.5, 0.75)}
    assert {(run.warmup_epochs, run.ramp_end_epoch) for run in runs if run.method == "gmp" and not run.label} == {(0.5, 1.0)}
    (tmp_path / "bad.toml").write_text(GRID + entry.replace("ramp_end_epoch", "anneal_end_epoch"))
    with pytest.raises(ValueError, match=r"runs\[3\]: schedule takes warmup_epochs and ramp_end_epoch, got \['anneal_end_epoch'\]"):
        load_grid(tmp_path / "bad.toml")


def test_grid_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    (tmp_path / "grid.toml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.toml")
    calls = []
    real_run_one = experiments.run_one

    def interrupted(spec, *args, **kwargs):
        calls.append(spec.key)
        if calls == [run.key for run in grid.runs[:3]]:  # dies on the third run, the first time only
            raise SimulatedCrash
        return real_run_one(spec, *args, **kwargs)

    monkeypatch.setattr(experiments, "run_one", interrupted)
    with pytest.raises(SimulatedCrash):
        run_grid(grid, tmp_path / "out", None, progress=False)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2
    first_two = calls[:2]
    calls.clear()
    rows = run_grid(grid, tmp_path / "out", None, progress=False)
    assert len(rows) == len(grid.runs) and not set(calls) & set(first_two)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(grid.runs)
    row = json.loads(lines[-1])
    assert {"accuracy", "achieved_sparsity", "train_seconds", "spec", "history"} <= set(row)

    table = summarize(rows, tmp_path / "out", "smoke")
    assert "| 80% | pdp tau=0.1 | 2 |" in table and "± " in table
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").stat().st_size > 1000


def test_a_torn_last_line_is_redone(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "acc')
    assert set(experiments._completed(results)) == {"a"}


def test_bad_grid_entries_are_named(tmp_path):
    (tmp_path / "g.toml").write_text(GRID.replace('methods = ["pdp", "gmp"]', 'methods = ["pdp", "magic"]'))
    with pytest.raises(ValueError, match=r"runs\[1\]: unknown method 'magic'"):
        load_grid(tmp_path / "g.toml")


@pytest.mark.parametrize("old,new,message", [
    ('sparsities = [0.8]\n', "sparsities = 0.8\n",
     r"runs\[1\]: sparsities must be a non-empty list of fractions in \[0, 1\), got 0.8; e.g. sparsities = \[0.8\]"),
    ('sparsities = [0.8]\n', "sparsities = []\n", r"runs\[1\]: sparsities must be a non-empty list of fractions in \[0, 1\), got \[\]"),
    ('sparsities = [0.8]\n', "sparsities = [90]\n", r"runs\[1\]: sparsities must be a non-empty list of fractions in \[0, 1\), got \[90\]"),
    ('methods = ["pdp", "gmp"]', 'methods = "pdp"', r"runs\[1\]: methods must be a non-empty list of names, .*got 'pdp'; e.g. methods = \['pdp'\]"),
    ('methods = ["pdp", "gmp"]', "methods = []", r"runs\[1\]: methods must be a non-empty list of names"),
    ('methods = ["pdp", "gmp"]', 'methods = ["pdp", "gmp"]\nsparsity = [0.5]', r"runs\[1\]: unknown keys \['sparsity'\]; a \[\[runs\]\] entry takes \['methods'"),
    ('methods = ["pdp", "gmp"]', 'methods = ["pdp", "gmp"]\nseeds = [0, -1]', r"runs\[1\]: seeds must be a non-empty list of integers >= 0, got \[0, -1\]"),
    ("seeds = [0, 1]", "seeds = [-1]", r"grid '.*g.toml': seeds must be a non-empty list of integers >= 0, got \[-1\]"),
    ('methods = ["pdp", "gmp"]', 'methods = ["pdp", "gmp"]\nstructure = 24', r"runs\[1\]: structure must be 'unstructured', 'channel' or 'N:M'"),
    ("pdp = { temperature = 0.1 }", 'pdp = { temperature = 0.1, sparsity = 0.5, structure = "2:4" }',
     r"runs\[2\]: pdp at sparsity 0.8: pdp settings may not set \['sparsity', 'structure'\]: the entry's sparsities and structure do"),
    ("[schedule]", "[pdp]\nsparsity = 0.5\n[schedule]", r"runs\[1\]: pdp at sparsity 0.8: pdp settings may not set \['sparsity'\]"),
], ids=["scalar-sparsities", "empty-sparsities", "percent", "string-methods", "empty-methods", "unknown-key", "negative-seed",
        "negative-grid-seed", "number-structure", "pdp-sparsity", "grid-pdp-sparsity"])
def test_grid_entries_that_would_expand_into_other_runs_than_they_say_are_refused(tmp_path, old, new, message):
    (tmp_path / "g.toml").write_text(GRID.replace(old, new, 1))
    with pytest.raises(ValueError, match=message):
        load_grid(tmp_path / "g.toml")


def test_every_shipped_grid_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "benchmarks" / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        grid = load_grid(path)
        assert grid.runs and all(run.dataset == grid.config["dataset"] for run in grid.runs)


def test_runs_of_batchnorm_models_also_report_accuracy_with_fresh_statistics(tmp_path):
    grid_text = GRID.replace('model = "mlp"', 'model = "resnet20"').replace("seeds = [0, 1]", "seeds = [0]").replace("train_limit = 300", "train_limit = 64")
    grid_text = grid_text.split("[[runs]]")[0] + '[[runs]]\nmethods = ["pdp"]\nstructure = "channel"\nsparsities = [0.5]\n'
    (tmp_path / "grid.toml").write_text(grid_text)
    [spec] = load_grid(tmp_path / "grid.toml").runs
    row = experiments.run_one(spec, None)
    assert set(row["accuracy_bn_recalibrated"]) == set(row["accuracy"])
    table = summarize([row], tmp_path, "bn")
    assert "BatchNorm re-estimated (%)" in table
    assert f"| {100 * row['accuracy_bn_recalibrated']['test']:.2f} |" in table


def test_a_method_listed_at_a_structure_it_cannot_do_is_not_run_and_the_table_says_so(tmp_path):
    entry = '[[runs]]\nmethods = ["pdp", "gmp", "srste"]\nstructure = "2:4"\n'
    (tmp_path / "grid.toml").write_text(GRID + entry)
    grid = load_grid(tmp_path / "grid.toml")
    assert grid.unsupported == (("gmp", "2:4", 0.5),)
    assert {(run.method, run.structure) for run in grid.runs if run.structure == "2:4"} == {("pdp", "2:4"), ("srste", "2:4")}
    row = {"method": "pdp", "structure": "2:4", "target_sparsity": 0.5, "accuracy": {"test": 0.9}, "achieved_sparsity": 0.5, "train_seconds": 1.0}
    table = summarize([row], tmp_path, "smoke", grid.unsupported)
    assert "| 2:4 | gmp | - | not supported |  |  |" in table.splitlines()
    assert "| 2:4 | pdp | 1 | 90.00 | 50.00% | 1 |" in table.splitlines()


def test_a_baseline_variant_takes_the_peer_s_own_options_under_a_label(tmp_path):
    entry = '[[runs]]\nmethods = ["pquant_pdp"]\nlabel = "pquant_pdp tau=3e-4"\noptions = { temperature = 3e-4 }\nsparsities = [0.8]\n'
    (tmp_path / "grid.toml").write_text(GRID + entry)
    runs = [run for run in load_grid(tmp_path / "grid.toml").runs if run.method == "pquant_pdp"]
    assert {run.options["temperature"] for run in runs} == {3e-4} and runs[0].key == "digits-mlp-pquant_pdp_tau=3e-4-unstructured-0.8-seed0"
    assert all(run.options == {} for run in load_grid(tmp_path / "grid.toml").runs if run.method != "pquant_pdp")
    for bad, message in [
        (entry.replace('label = "pquant_pdp tau=3e-4"\n', ""), r"runs\[3\]: options make a variant: give it a label"),
        (entry.replace("temperature", "temprature"), r"runs\[3\]: 'pquant_pdp' has no option \['temprature'\]; its options: \['temperature'\]"),
        (entry.replace('["pquant_pdp"]', '["gmp"]'), r"runs\[3\]: 'gmp' has no option \['temperature'\]; its options: \[\]"),
        (entry.replace('["pquant_pdp"]', '["pdp"]'), r"runs\[3\]: options are a baseline's own settings; 'pdp' takes none \(PDP's go under pdp"),
    ]:
        (tmp_path / "bad.toml").write_text(GRID + bad)
        with pytest.raises(ValueError, match=message):
            load_grid(tmp_path / "bad.toml")
