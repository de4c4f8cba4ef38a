"""End-to-end runs of pipeline A on a few hundred real MNIST images, and its error paths."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error, killed_once_saved, run_script, synthetic_mnist

import checkpoints
import data
import train_cnn

SMOKE = ["--limit", "600", "--batch-size", "64"]


def test_one_epoch_writes_checkpoint_and_history_and_beats_chance(tmp_path, mnist_dir):
    # batch 16: enough steps in one epoch for BatchNorm's running statistics to settle
    args = ["--data-dir", mnist_dir, "--epochs", "1", "--limit", "600", "--batch-size", "16"]
    result = run_script("train_cnn.py", *args, cwd=tmp_path)
    assert "540 train / 60 val / 600 test images" in result.stdout
    checkpoint = checkpoints.load(tmp_path / "CNN_best_model.pth")
    assert checkpoint["arch"] == "vgg" and checkpoint["complete"] is True and checkpoint["epoch"] == 1
    assert checkpoint["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert set(checkpoint["metrics"]) == {"val_loss", "val_accuracy"}
    assert checkpoint["precision"] in ("fp32", "bf16")
    assert {"torch", "torchvision", "python"} <= set(checkpoint["versions"])
    history = json.loads((tmp_path / "CNN_best_model.history.json").read_text())
    assert len(history) == 1
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
            "images_per_second"} <= set(history[0])
    test_accuracy = float(result.stdout.split("test loss")[1].split("accuracy")[1].split()[0])
    assert test_accuracy > 0.3  # chance is 0.1
    assert not (tmp_path / "CNN_best_model.resume.pth").exists()
    # the lock file stays (removing it could let a third run lock a file a second run still holds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CNN_best_model.history.json", "CNN_best_model.lock",
                                                          "CNN_best_model.pth"]

    again = run_script("train_cnn.py", *args, cwd=tmp_path)
    assert "using CNN_best_model.pth" in again.stdout and "epoch   1" not in again.stdout
    assert again.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]  # same test report


def history_losses(folder):
    history = json.loads((folder / "CNN_best_model.history.json").read_text())
    return [(h["train_loss"], h["val_loss"], h["val_accuracy"]) for h in history]


def test_same_seed_in_fp32_gives_the_same_run(tmp_path, mnist_dir):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_script("train_cnn.py", "--data-dir", mnist_dir, "--epochs", "2", "--precision", "fp32", *SMOKE,
                   cwd=tmp_path / name)
    assert history_losses(tmp_path / "a") == history_losses(tmp_path / "b")


def test_killed_run_resumes_where_it_stopped_and_matches_an_uninterrupted_run(tmp_path, mnist_dir):
    args = ["--data-dir", mnist_dir, "--epochs", "3", "--patience", "10", "--precision", "fp32", "--ema-decay", "0.99",
            "--schedule", "warmup-cosine", *SMOKE]  # the averaged weights and the per-step schedule resume exactly too
    (tmp_path / "straight").mkdir()
    run_script("train_cnn.py", *args, cwd=tmp_path / "straight")

    folder = tmp_path / "killed"
    folder.mkdir()
    resume_file = folder / "CNN_best_model.resume.pth"
    assert killed_once_saved([sys.executable, ROOT / "train_cnn.py", *args], resume_file, cwd=folder), \
        "the run ended before its first epoch was saved"
    assert checkpoints.load(folder / "CNN_best_model.pth")["complete"] is False

    resumed = run_script("train_cnn.py", *args, cwd=folder)
    assert "resuming CNN_best_model.pth after epoch" in resumed.stdout
    assert history_losses(folder) == history_losses(tmp_path / "straight")
    resumed_checkpoint = checkpoints.load(folder / "CNN_best_model.pth")
    assert resumed_checkpoint["complete"] is True
    assert torch.equal(resumed_checkpoint["trained_on"],
                       checkpoints.load(tmp_path / "straight" / "CNN_best_model.pth")["trained_on"])
    assert not resume_file.exists()


def test_trains_on_a_kaggle_csv_with_a_held_out_test_part(tmp_path, mnist_dir):
    images, labels = data.load_mnist(mnist_dir, "test")
    data.write_images_csv(tmp_path / "train.csv", images[:500], labels[:500])
    result = run_script("train_cnn.py", "--train-csv", "train.csv", "--epochs", "1", "--batch-size", "64", cwd=tmp_path)
    assert "405 train / 45 val / 50 test images" in result.stdout
    assert "accuracy" in result.stdout.splitlines()[-1]
    # without the report the test rows are still held out: the same training data, so the same run, reused
    trial = run_script("train_cnn.py", "--train-csv", "train.csv", "--epochs", "1", "--batch-size", "64",
                       "--no-test-report", cwd=tmp_path)
    assert "405 train / 45 val / no test set (--no-test-report)" in trial.stdout
    assert "using CNN_best_model.pth" in trial.stdout and "test loss" not in trial.stdout


def test_a_trial_never_reads_the_test_set_and_the_same_command_reports_later(tmp_path, mnist_dir):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (mnist_dir / "MNIST" / "raw").glob("train-*"):
        shutil.copy(path, raw)
    args = ["--data-dir", "mnist", "--epochs", "1", "--limit", "300", "--batch-size", "32"]
    trial = run_script("train_cnn.py", *args, "--no-test-report", cwd=tmp_path)  # MNIST's test files are absent
    assert "270 train / 30 val / no test set (--no-test-report)" in trial.stdout and "test loss" not in trial.stdout
    assert trial.stdout.splitlines()[-1] == ("test set not read (--no-test-report); CNN_best_model.pth is the model "
                                             "chosen by validation")
    assert checkpoints.is_complete(checkpoints.load(tmp_path / "CNN_best_model.pth"))

    for path in (mnist_dir / "MNIST" / "raw").glob("t10k-*"):
        shutil.copy(path, raw)
    report = run_script("train_cnn.py", *args, cwd=tmp_path)
    assert "using CNN_best_model.pth" in report.stdout and "epoch   1" not in report.stdout
    assert "300 test images" in report.stdout and "errors in 300 images" in report.stdout.splitlines()[-1]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=40)
    assert_user_error(run_script("train_cnn.py", "--train-csv", "missing.csv", cwd=tmp_path, check=False),
                      "missing.csv: no such file")
    (tmp_path / "bad.csv").write_text("label,pixel0\n1,2\n")
    assert_user_error(run_script("train_cnn.py", "--train-csv", "bad.csv", cwd=tmp_path, check=False),
                      "bad.csv: missing column pixel1")
    (tmp_path / "CNN_best_model.pth").write_bytes(b"garbage")
    assert_user_error(run_script("train_cnn.py", "--data-dir", "mnist", cwd=tmp_path, check=False),
                      "CNN_best_model.pth: not a readable checkpoint")
    (tmp_path / "blocker").write_text("")
    assert_user_error(run_script("train_cnn.py", "--data-dir", "mnist", "--checkpoint", "blocker/m.pth",
                                 cwd=tmp_path, check=False), "cannot write blocker/m.pth")
    if not torch.cuda.is_available():
        assert_user_error(run_script("train_cnn.py", "--device", "cuda:0", cwd=tmp_path, check=False),
                          "no CUDA GPU is available")
    flag = run_script("train_cnn.py", "--epochs", "0", cwd=tmp_path, check=False)
    assert flag.returncode == 2 and "--epochs: must be a positive integer" in flag.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CNN_best_model.lock", "CNN_best_model.pth", "bad.csv",
                                                          "blocker", "mnist"]


def test_checkpoint_of_another_architecture_is_refused(tmp_path, mnist_dir):
    from models import build_model
    checkpoints.save(tmp_path / "CNN_best_model.pth", {"model_state": build_model("resnet").state_dict(),
                                                       "arch": "resnet", "normalization": data.NORMALIZATION,
                                                       "complete": True, "epoch": 1})
    assert_user_error(run_script("train_cnn.py", "--data-dir", mnist_dir, "--limit", "100", cwd=tmp_path, check=False),
                      "holds a resnet model, not pipeline A's vgg")


@pytest.mark.parametrize("script, flag", [("train_cnn.py", "--epochs"), ("train_kfold.py", "--epochs"),
                                          ("predict_tta.py", "--tta"), ("evaluate.py", "--max-errors")])
def test_a_bad_flag_is_a_short_usage_line_and_the_error(tmp_path, script, flag):
    result = subprocess.run([sys.executable, str(ROOT / script), flag, "-1"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 2 and not list(tmp_path.iterdir())
    assert result.stderr.splitlines() == [f"usage: {script} [options]; see --help",
                                          f"{script}: error: argument {flag}: must be a positive integer, got -1"]


def test_help_of_the_training_scripts_is_in_argument_groups(tmp_path):
    groups = ["data", "model and length", "optimizer", "regularization", "schedule", "time budget", "device", "files"]
    for script in ("train_cnn.py", "train_kfold.py"):
        result = run_script(script, "--help", cwd=tmp_path, check=False)
        assert result.returncode == 0
        headings = [line[:-1] for line in result.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
        assert headings == ["options", *groups], headings


def test_a_model_finished_before_the_recipe_table_is_reused_by_its_command(tmp_path, mnist_dir):
    """The released model was trained at the commit before RECIPE and the help groups (its manifest names it): today's
    code makes the same settings of its command, so the finished model is reused, not retrained, and a resume file of
    that run, which records the same settings, is resumed on the machine that wrote it."""
    manifest = json.loads(checkpoints.RELEASE_MANIFEST.read_text())
    argv = manifest["command"].split()[2:]  # after "python train_cnn.py"
    argv[argv.index("--data-dir") + 1] = str(mnist_dir)
    saved = checkpoints.load(checkpoints.RELEASED_MODEL)["settings"]
    args = train_cnn.parse_args(argv)
    settings, _ = train_cnn.training_settings(args, {"arch": "vgg", "data": saved["data"], "monitor": "val_loss",
                                                     "split": {"val_fraction": args.val_fraction},
                                                     "precision": saved["precision"]})
    assert settings == saved
    shutil.copy(checkpoints.RELEASED_MODEL, tmp_path / "CNN_best_model.pth")
    result = run_script("train_cnn.py", *argv, cwd=tmp_path)
    assert "using CNN_best_model.pth (epoch 30)" in result.stdout and "train loss" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("test loss") and "accuracy 0.997" in result.stdout
