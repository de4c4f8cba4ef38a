"""--budget: the plan's arithmetic, the schedule at zero on the planned step, resume and rerun keeping the plan,
k-fold sharing one measurement per architecture, the separate checkpoint, and each error.

The plans here come from a fixed speed put in place of the measurement, so that they do not depend on the
machine; how close a real budget lands is measured in docs/measurements.md, not asserted here.
"""
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_user_error, run_script, synthetic_mnist

import checkpoints
import cli
import data
import train_cnn

SPEED = {"step_seconds": 0.05, "val_image_seconds": 1e-4, "save_seconds": 0.05}
TINY = ["--data-dir", "mnist", "--batch-size", "16", "--precision", "fp32"]


@pytest.fixture
def fixed_speed(monkeypatch):
    """measure_speed replaced by SPEED; the calls are counted (run, arch)."""
    calls = []

    def measure(run, device, train_set, val_set):
        calls.append(run.settings["arch"])
        return dict(SPEED)
    monkeypatch.setattr(train_cnn, "measure_speed", measure)  # the one planner, which train_kfold.py calls too
    return calls


def test_the_plan_is_the_most_steps_that_fit():
    # 10 steps an epoch at 1 s each, 2 s of validation per epoch: 82 steps (9 epochs) take 82 + 18 = 100 s
    assert train_cnn.plan_steps(100, [(10, 1.0, 2.0, 0.0)]) == 82
    assert train_cnn.plan_steps(101, [(10, 1.0, 2.0, 0.0)]) == 83  # 83 + 9 epochs' 18 s
    # two jobs share the time by their cost: each gets the same steps
    n = train_cnn.plan_steps(300, [(10, 1.0, 2.0, 5.0), (20, 3.0, 1.0, 5.0)])
    def cost(n):
        return n * 1.0 + math.ceil(n / 10) * 2.0 + 5 + n * 3.0 + math.ceil(n / 20) * 1.0 + 5
    assert cost(n) <= 300 < cost(n + 1)
    assert train_cnn.plan_steps(2.5, [(10, 1.0, 2.0, 0.0)]) == 0  # one step and its validation do not fit


def test_a_step_costs_what_the_fastest_measured_round_took(monkeypatch):
    # a fake clock that each round of steps advances: the warm-up, then a round slowed by other work, then two
    clock = [0.0]
    round_seconds = iter([9.0, 6.0, 0.5, 0.8])
    calls = []

    def timed_round(model, images, labels, training, settings):
        calls.append(len(images))
        clock[0] += next(round_seconds)
    monkeypatch.setattr(train_cnn, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(train_cnn, "train_one_epoch", timed_round)
    settings = {"arch": "vgg", "batch_size": 4, "precision": "fp32", "augmentation": "light", "optimizer": "adam",
                "lr": 1e-3, "weight_decay": 0.0, "schedule": "warmup-linear", "warmup_epochs": 0.5, "epochs": None,
                "planned_steps": None, "label_smoothing": 0.1, "ema_decay": 0.999, "normalization": data.NORMALIZATION}
    images, labels = torch.zeros(50, 28, 28, dtype=torch.uint8), torch.zeros(50, dtype=torch.long)
    run = checkpoints.Run(Path("unused.pth"), settings, frozenset(), seed=0)
    speed = train_cnn.measure_speed(run, torch.device("cpu"), (images, labels), (images, labels))
    assert calls == [4 * train_cnn.WARMUP_STEPS] + [4 * train_cnn.MEASURED_STEPS] * train_cnn.MEASURED_ROUNDS
    assert speed["step_seconds"] == pytest.approx(0.5 / train_cnn.MEASURED_STEPS)


def test_the_budget_schedules_reach_zero_after_the_planned_step():
    for schedule in train_cnn.BUDGET_SCHEDULES:
        settings = {"schedule": schedule, "epochs": 3, "warmup_epochs": 0.5, "planned_steps": 25}
        factors = [train_cnn.lr_factor(step, 10, settings) for step in range(26)]
        assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # half an epoch of warm-up
        assert all(a > b for a, b in itertools.pairwise(factors[5:25])) and factors[24] > 0
        assert factors[25] == pytest.approx(0, abs=1e-12)  # the rate after the 25th and last step
    linear = {"schedule": "warmup-linear", "epochs": 3, "warmup_epochs": 0.5, "planned_steps": 25}
    assert train_cnn.lr_factor(15, 10, linear) == pytest.approx(1 - 10 / 20)


def test_a_budget_run_trains_its_planned_steps_into_its_own_checkpoint(tmp_path, fixed_speed):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    result = run_script("train_cnn.py", *TINY, "--budget", "2s", cwd=tmp_path)
    checkpoint = checkpoints.load(tmp_path / "CNN_budget_2s.pth")
    settings = checkpoint["settings"]
    # 180 training images in batches of 16: 12 steps an epoch (the last batch of 4 included)
    step, epoch = 0.05, 2 * 20 * 1e-4 + 0.05
    assert settings["budget"] == 2.0 and 1 <= settings["planned_steps"] <= train_cnn.plan_steps(2.0, [(12, step, epoch,
                                                                                                       0)])
    planned = settings["planned_steps"]
    assert settings["epochs"] == math.ceil(planned / 12) and settings["schedule"] == "warmup-linear"
    assert f"budget 2s: {planned} steps = {planned / 12:.2f} epochs, at 320 img/s measured (fp32)" in result.stdout
    history = json.loads((tmp_path / "CNN_budget_2s.history.json").read_text())
    assert len(history) == settings["epochs"] and "training took" in result.stdout
    # each epoch's rate is its highest: the peak inside the warm-up epoch, then each decaying epoch's first step
    assert history[0]["lr"] == pytest.approx(6e-3)
    assert [h["lr"] for h in history[1:]] == pytest.approx(
        [6e-3 * train_cnn.lr_factor(12 * k, 12, settings) for k in range(1, len(history))])
    plan = json.loads((tmp_path / "CNN_budget_2s.plan.json").read_text())
    assert plan["settings"] == settings and plan["measured"] == SPEED
    # the default checkpoint is another file: a plain run is not refused for the budget run's settings
    assert not (tmp_path / "CNN_best_model.pth").exists()
    plain = run_script("train_cnn.py", *TINY, "--epochs", "1", cwd=tmp_path)
    assert "CNN_best_model.pth" in plain.stdout and checkpoints.load(tmp_path / "CNN_best_model.pth")["complete"]
    # and the budget run is reused, not measured again
    again = run_script("train_cnn.py", *TINY, "--budget", "2s", cwd=tmp_path)
    assert "using CNN_budget_2s.pth" in again.stdout and fixed_speed == ["vgg"]


def test_a_resumed_budget_run_keeps_its_plan_on_another_machine(tmp_path, monkeypatch, fixed_speed):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    args = [*TINY, "--budget", "4s"]
    def write_json_then_stop_after_the_history(path, obj):  # like Ctrl-C once the first epoch is saved
        cli.write_json(path, obj)
        if str(path).endswith(".history.json"):
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "write_json", write_json_then_stop_after_the_history)
        assert run_script("train_cnn.py", *args, cwd=tmp_path, check=False).returncode == 130
    planned = json.loads((tmp_path / "CNN_budget_4s.plan.json").read_text())["settings"]["planned_steps"]
    assert planned > 12  # more than one epoch: the run was cut short
    # "another machine": ten times slower; the resumed run must not measure, and keeps its steps
    SPEED["step_seconds"] *= 10
    try:
        resumed = run_script("train_cnn.py", *args, cwd=tmp_path)
    finally:
        SPEED["step_seconds"] /= 10
    assert fixed_speed == ["vgg"] and "resuming CNN_budget_4s.pth after epoch 1" in resumed.stdout
    assert checkpoints.load(tmp_path / "CNN_budget_4s.pth")["settings"]["planned_steps"] == planned


def test_kfold_measures_each_architecture_once_and_records_each_jobs_plan(tmp_path, fixed_speed):
    synthetic_mnist(tmp_path / "mnist", n_train=120, n_test=10)
    args = ["--data", "mnist", "--data-dir", "mnist", "--n-folds", "2", "--archs", "vgg", "widecnn", "--batch-size",
            "16",
            "--precision", "fp32", "--budget", "2s"]
    result = run_script("train_kfold.py", *args, cwd=tmp_path)
    assert sorted(fixed_speed) == ["vgg", "widecnn"]  # once per architecture, not per job
    paths = sorted((tmp_path / "models").glob("*.pth"))
    plans = [checkpoints.load(path)["settings"]["planned_steps"] for path in paths]
    assert len(plans) == 4 and len(set(plans)) == 1 and plans[0] >= 1  # the same steps for every job
    jobs = [(4, 0.05, 2 * 60 * 1e-4 + 0.05, 60 * 1e-4)] * 4  # 60 training images a job: 4 steps an epoch
    assert plans[0] <= train_cnn.plan_steps(2.0, jobs)
    assert "training took" in result.stdout and "s of --budget 2s" in result.stdout
    rerun = run_script("train_kfold.py", *args, cwd=tmp_path)
    assert rerun.stdout.count("complete, skipped") == 4 and sorted(fixed_speed) == ["vgg", "widecnn"]


@pytest.mark.parametrize("flags, message", [
    (["--budget", "10m", "--epochs", "3"], "give --budget or --epochs, not both"),
    (["--budget", "10m", "--schedule", "step"],
     "--schedule step does not end at zero on a planned step; with --budget use warmup-linear or warmup-cosine"),
    (["--budget", "10m", "--schedule", "cosine"], "--schedule cosine does not end at zero"),
])
def test_budget_flag_conflicts_are_one_line(tmp_path, flags, message):
    for script in ("train_cnn.py", "train_kfold.py"):
        assert_user_error(run_script(script, *flags, cwd=tmp_path, check=False), message)
        assert not list(tmp_path.iterdir())


def test_a_malformed_budget_is_a_flag_error(tmp_path):
    result = run_script("train_cnn.py", "--budget", "10 minutes", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("argument --budget: must be a duration such as 90s, 10m, 2h or "
                                                   "1h30m, got 10 minutes")


def test_a_budget_too_short_for_one_step_and_one_validation_is_one_line(tmp_path, monkeypatch, fixed_speed):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    SPEED["step_seconds"] *= 200  # 10 s a step
    try:
        result = run_script("train_cnn.py", *TINY, "--budget", "5s", cwd=tmp_path, check=False)
    finally:
        SPEED["step_seconds"] /= 200
    assert_user_error(result, "--budget 5s is too short for this run", "one step with one validation pass needs 10.",
                      "give at least")
    assert not (tmp_path / "CNN_budget_5s.pth").exists()
