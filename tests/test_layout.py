"""The layout holds: the scripts run as a Kaggle kernel copies them, and files written before the restructure of
data.py (into data, photos, checkpoints, cli, augmentation and demo) still resume and load."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT, run_script, synthetic_mnist
from photo_render import render_as_photo

import data
from models import build_model


def test_a_kaggle_kernel_copy_of_the_scripts_and_weights_reads_a_photo_from_another_folder(tmp_path, mnist_dir):
    """As a kernel's input: every *.py and weights/ in one folder, nothing else (no tests/, no tools/), read from a
    working folder elsewhere, with no path set up; the input folder is left as it was (Kaggle's is read-only)."""
    kernel_input = tmp_path / "input" / "digits"
    kernel_input.mkdir(parents=True)
    for script in ROOT.glob("*.py"):
        shutil.copy(script, kernel_input)
    shutil.copytree(ROOT / "weights", kernel_input / "weights")
    before = sorted(path.relative_to(kernel_input) for path in kernel_input.rglob("*"))
    working = tmp_path / "working"
    working.mkdir()
    images, labels = data.load_mnist(mnist_dir, "test")
    render_as_photo(images[0].numpy(), np.random.default_rng(0)).save(working / "photo.png")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["PYTHONDONTWRITEBYTECODE"] = "1"  # as on Kaggle's read-only input: no __pycache__ written there
    result = subprocess.run([sys.executable, kernel_input / "predict_tta.py", "--images", "photo.png", "--precision",
                             "fp32"], cwd=working, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "using the released model weights/vgg_mnist.pth" in result.stdout
    assert result.stdout.splitlines()[-1].startswith(f"photo.png: {int(labels[0])} (")
    assert sorted(path.relative_to(kernel_input) for path in kernel_input.rglob("*")) == before


def pipeline_a_settings(fingerprint, epochs):
    """The run settings train_cnn.py recorded before the restructure for `--epochs EPOCHS --batch-size 16
    --precision fp32` on MNIST, spelled out."""
    return {"arch": "vgg", "data": fingerprint, "split": {"val_fraction": 0.1}, "monitor": "val_loss",
            "precision": "fp32", "normalization": {"mean": 0.1307, "std": 0.3081}, "seed": 42, "optimizer": "adam",
            "lr": 0.001, "schedule": "step", "epochs": epochs, "batch_size": 16, "label_smoothing": 0.1,
            "augmentation": "light", "ema_decay": 0.999, "patience": 5, "lr_step": 10, "lr_gamma": 0.5}


def fingerprint_of(mnist):
    """What the run settings call the data: its size and a SHA-256 of its images and labels."""
    images, labels = data.load_mnist(mnist, "train")
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return f"{len(labels)} images, sha256 {digest.hexdigest()[:16]}"


def epoch_record(epoch):
    return {"epoch": epoch, "train_loss": 2.3, "train_accuracy": 0.1, "val_loss": 2.3, "val_accuracy": 0.1,
            "lr": 0.001, "seconds": 1.0, "images_per_second": 180.0, "raw_val_loss": 2.3, "raw_val_accuracy": 0.1}


def test_a_resume_file_and_a_finished_model_written_before_the_restructure_are_used(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    settings = pipeline_a_settings(fingerprint_of(tmp_path / "mnist"), epochs=2)
    model = build_model("vgg")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # 180 training images in batches of 16: 12 steps in the first epoch
    schedule = {"base_lrs": [0.001], "last_epoch": 12, "_step_count": 13, "_is_initial": False,
                "_get_lr_called_within_step": False, "_last_lr": [0.001], "lr_lambdas": [None]}
    resume = {"model_state": weights, "optimizer_state": optimizer.state_dict(), "scheduler_state": schedule,
              "scaler_state": {}, "arch": "vgg", "settings": settings,
              "rng": {"shuffle": torch.Generator().manual_seed(43).get_state(),
                      "augment": torch.Generator().manual_seed(44).get_state(), "device": "cpu",
                      "torch": torch.get_rng_state()},
              "progress": {"epoch": 1, "best": 9.0, "best_epoch": 1, "stale_epochs": 0, "history": [epoch_record(1)]},
              "average": {"model_state": weights, "updates": 12}}
    best = {"model_state": weights, "arch": "vgg", "normalization": {"mean": 0.1307, "std": 0.3081},
            "precision": "fp32", "epoch": 1, "metrics": {"val_loss": 9.0, "val_accuracy": 0.1}, "settings": settings,
            "versions": {"python": "3.11.7", "torch": "2.14.1", "torchvision": "0.29.1"}, "complete": False,
            "trained_on": torch.tensor([-5, 3, 17])}
    torch.save(resume, tmp_path / "CNN_best_model.resume.pth")
    torch.save(best, tmp_path / "CNN_best_model.pth")
    flags = ["--data-dir", "mnist", "--epochs", "2", "--batch-size", "16", "--precision", "fp32", "--device", "cpu"]

    resumed = run_script("train_cnn.py", *flags, cwd=tmp_path)
    assert "resuming CNN_best_model.pth after epoch 1 from CNN_best_model.resume.pth" in resumed.stdout
    assert "epoch   2" in resumed.stdout and "epoch   1" not in resumed.stdout
    assert not (tmp_path / "CNN_best_model.resume.pth").exists()
    history = (tmp_path / "CNN_best_model.history.json").read_text()
    assert '"epoch": 1' in history and '"epoch": 2' in history

    # a finished model of the same settings, as the old code wrote it, is reused, not trained again
    torch.save({**best, "epoch": 2, "complete": True}, tmp_path / "CNN_best_model.pth")
    reused = run_script("train_cnn.py", *flags, cwd=tmp_path)
    assert "using CNN_best_model.pth (epoch 2); --retrain to train again" in reused.stdout
    assert "test loss" in reused.stdout and "epoch   " not in reused.stdout
