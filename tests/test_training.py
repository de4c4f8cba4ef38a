"""The training machinery on its own: schedules per step, the EMA, settings checks, dealing jobs to ranks."""
import itertools
import math

import pytest
import torch
from conftest import assert_user_error, random_steps, run_script, synthetic_mnist

import checkpoints
import cli
import data
from models import build_model
import train_cnn
import train_kfold
from train_kfold import TRAINING_COST

STEPS = 10  # optimizer steps per epoch in these tests


def settings(**changes):
    base = {"schedule": "warmup-cosine", "epochs": 4, "warmup_epochs": 0.5, "lr_step": 2, "lr_gamma": 0.5}
    return {**base, **changes}


def factors(s):
    return [train_cnn.lr_factor(step, STEPS, s) for step in range(STEPS * s["epochs"])]


def test_warmup_cosine_rises_linearly_then_falls_to_zero_at_the_last_step():
    f = factors(settings())
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])      # half an epoch of warm-up, ending at the peak
    assert all(a >= b for a, b in itertools.pairwise(f[5:]))     # then only down
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 34 / 35)))  # the last step is a hair above 0
    assert f[-1] < 0.003
    assert factors(settings(warmup_epochs=0))[0] == 1.0          # no warm-up: start at the peak


def test_step_and_cosine_repeat_torchs_per_epoch_schedulers():
    for name, make in (("step", lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)),
                       ("cosine", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4))):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        reference = make(optimizer)
        expected = []
        for _ in range(4):
            expected += [optimizer.param_groups[0]["lr"]] * STEPS
            optimizer.step()
            reference.step()
        assert factors(settings(schedule=name)) == pytest.approx(expected)


def test_the_schedule_is_set_every_step_through_lambda_lr():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = train_cnn.make_schedule(optimizer, settings(), STEPS)
    seen = []
    for _ in range(STEPS * 4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.1 * f for f in factors(settings())])


def test_steps_per_epoch_skips_a_last_batch_of_one():
    assert train_cnn.steps_per_epoch(256, 128) == 2
    assert train_cnn.steps_per_epoch(257, 128) == 2  # the lone image is skipped (BatchNorm)
    assert train_cnn.steps_per_epoch(258, 128) == 3


def test_weight_average_follows_the_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("vgg")
    average = train_cnn.EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    for _ in random_steps(model, optimizer, steps=30, batch_size=8):
        average.update(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    averaged = average.module.state_dict()
    assert set(averaged) == set(model.state_dict())  # plain keys: no "module." prefix, no n_averaged
    raw = model.state_dict()
    weight, running_mean = "head.1.weight", "features.0.1.running_mean"
    assert not torch.allclose(averaged[weight], raw[weight])
    assert not torch.allclose(averaged[running_mean], raw[running_mean])
    # the same average by hand: a copy at the first update, then decay (1 + t) / (10 + t) after t updates, capped at 0.9
    for name in (weight, running_mean):
        expected = snapshots[0][name].clone()
        for t, snapshot in enumerate(snapshots[1:], start=1):
            decay = min(0.9, (1 + t) / (10 + t))
            expected = decay * expected + (1 - decay) * snapshot[name]
        assert torch.allclose(averaged[name], expected, atol=1e-6), name


def test_weight_average_state_round_trips():
    model = build_model("widecnn")
    average = train_cnn.EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        average.update(model)
    copy = train_cnn.EMA(build_model("widecnn"), decay=0.99)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 3
    for name, tensor in average.module.state_dict().items():
        assert torch.equal(copy.module.state_dict()[name], tensor)


def test_averaged_weights_are_the_ones_saved_validated_and_loaded(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    run_script("train_cnn.py", "--data-dir", "mnist", "--epochs", "2", "--batch-size", "16", "--ema-decay", "0.9",
               "--precision", "fp32", cwd=tmp_path)
    checkpoint = checkpoints.load(tmp_path / "CNN_best_model.pth")
    assert checkpoint["settings"]["ema_decay"] == 0.9
    history = __import__("json").loads((tmp_path / "CNN_best_model.history.json").read_text())
    assert all("raw_val_accuracy" in h for h in history)       # the plain weights, validated beside the average
    assert any(h["raw_val_loss"] != h["val_loss"] for h in history)
    model, _ = checkpoints.load_model(tmp_path / "CNN_best_model.pth", torch.device("cpu"))
    assert set(model.state_dict()) == set(checkpoint["model_state"])


def test_rank_dealing_balances_costs_and_is_what_each_rank_runs():
    jobs = [(arch, fold) for arch in ("resnet", "widecnn") for fold in range(5)]
    dealt = train_kfold.deal_jobs(jobs, 2, {job: TRAINING_COST[job[0]] for job in jobs})
    assert dealt == [[("resnet", 0), ("resnet", 2), ("resnet", 4), ("widecnn", 3)],
                     [("resnet", 1), ("resnet", 3), ("widecnn", 0), ("widecnn", 1), ("widecnn", 2), ("widecnn", 4)]]
    loads = [sum(TRAINING_COST[arch] for arch, _ in mine) for mine in dealt]
    assert abs(loads[0] - loads[1]) <= max(TRAINING_COST.values())  # within one job of each other
    done = {job: (0.0 if job[0] == "resnet" and job[1] < 3 else TRAINING_COST[job[0]]) for job in jobs}
    resumed = train_kfold.deal_jobs(jobs, 2, done)  # finished jobs cost nothing: the rest is shared out evenly
    assert resumed[0][0] == ("resnet", 3) and resumed[1][0] == ("resnet", 4)
    loads = [sum(done[job] for job in mine) for mine in resumed]
    assert sorted(loads) == pytest.approx([4.3, 5.3])


@pytest.mark.parametrize("flag, value, message", [
    ("--ema-decay", "1", "--ema-decay: must be in [0, 1)"),
    ("--lr", "nan", "--lr: must be a positive number"),
    ("--lr", "-1", "--lr: must be a positive number"),
    ("--warmup-epochs", "-1", "--warmup-epochs: must be a number >= 0"),
    ("--label-smoothing", "5", "--label-smoothing: must be in [0, 1)"),
    ("--seed", "-1", "--seed: must be an integer in 0.."),
    ("--schedule", "linear", "--schedule: invalid choice"),
])
def test_training_flags_are_validated_in_both_scripts(tmp_path, flag, value, message):
    for script in ("train_cnn.py", "train_kfold.py"):
        result = run_script(script, flag, value, cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
        assert not list(tmp_path.iterdir())


def test_a_diverging_run_stops_and_marks_nothing_complete(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    result = run_script("train_cnn.py", "--data-dir", "mnist", "--epochs", "2", "--batch-size", "16", "--lr", "1e30",
                        cwd=tmp_path, check=False)
    assert_user_error(result, "training diverged in epoch 1", "NaN or Inf", "(try a lower --lr)")
    checkpoint = tmp_path / "CNN_best_model.pth"
    assert not checkpoint.exists() or not checkpoints.load(checkpoint)["complete"]


def interrupt_after_first_epoch(monkeypatch):
    """Make the next run stop like Ctrl-C right after its first epoch's resume file is written."""
    def write_json_then_stop(path, obj):
        cli.write_json(path, obj)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoints, "write_json", write_json_then_stop)  # the history, written by save_epoch


def test_a_run_resumed_with_other_settings_is_refused_naming_the_setting(tmp_path, monkeypatch):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    args = ["--data-dir", "mnist", "--epochs", "3", "--batch-size", "16"]
    with monkeypatch.context() as patch:
        interrupt_after_first_epoch(patch)
        assert run_script("train_cnn.py", *args, cwd=tmp_path, check=False).returncode == 130
    assert (tmp_path / "CNN_best_model.resume.pth").exists()
    for changed, message in ((["--lr", "0.01"], "was trained with --lr 0.001, this run has 0.01"),
                             (["--seed", "7"], "was trained with --seed 42, this run has 7"),
                             (["--limit", "100"], "was trained with data '200 images"),
                             (["--schedule", "cosine"], "was trained with --schedule 'step', this run has 'cosine'"),
                             (["--ema-decay", "0"], "was trained with --ema-decay 0.999, this run has 0.0")):
        assert_user_error(run_script("train_cnn.py", *args, *changed, cwd=tmp_path, check=False),
                          "CNN_best_model.resume.pth " + message, "--retrain")
    # more epochs and more patience are fine under the step schedule: the run continues
    resumed = run_script("train_cnn.py", "--data-dir", "mnist", "--epochs", "4", "--patience", "9", "--batch-size",
                         "16",
                         cwd=tmp_path)
    assert "resuming CNN_best_model.pth after epoch 1" in resumed.stdout and "epoch   4" in resumed.stdout
    # a finished run is not reused for other settings either
    assert_user_error(run_script("train_cnn.py", *args, "--label-smoothing", "0", cwd=tmp_path, check=False),
                      "CNN_best_model.pth was trained with --label-smoothing 0.1, this run has 0.0")


def test_a_checkpoint_without_settings_is_refused_with_advice_to_retrain(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    checkpoint = {"model_state": build_model("vgg").state_dict(), "arch": "vgg",
                  "normalization": dict(data.NORMALIZATION),
                  "epoch": 3, "complete": True}
    checkpoints.save(tmp_path / "CNN_best_model.pth", checkpoint)
    result = run_script("train_cnn.py", "--data-dir", "mnist", cwd=tmp_path, check=False)
    assert_user_error(result, "CNN_best_model.pth records no run settings", "pass --retrain to train it again")
