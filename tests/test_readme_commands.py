"""Every command line the README shows, as written there, on a few hundred real MNIST images (--limit / small CSVs)."""
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script, synthetic_mnist

import checkpoints
import data

QUICK = ["--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist_dir):
    """A folder like a user's: Kaggle-format CSVs of 400 training and 200 test digits, and its answer key."""
    folder = tmp_path_factory.mktemp("readme")
    images, labels = data.load_mnist(mnist_dir, "test")
    kaggle = folder / "data" / "digit-recognizer"
    data.write_images_csv(kaggle / "train.csv", images[:400], labels[:400])
    data.write_images_csv(kaggle / "test.csv", images[400:600])
    data.write_submission(kaggle / "test_labels.csv", labels[400:600])
    data.write_images_csv(folder / "labelled.csv", images[400:600], labels[400:600])
    return folder


def test_pipeline_a_commands(workspace, mnist_dir):
    # python train_cnn.py --data-dir ../shared/data ; python train_cnn.py --epochs 3 --limit 2000 --retrain
    first = run_script("train_cnn.py", "--data-dir", mnist_dir, "--limit", "300", *QUICK, cwd=workspace)
    again = run_script("train_cnn.py", "--data-dir", mnist_dir, "--limit", "300", *QUICK, "--retrain", cwd=workspace)
    assert "test loss" in first.stdout and "training took" in again.stdout
    # the data source by alias and by --data: the same 400 rows, the same split
    alias = run_script("train_cnn.py", "--train-csv", "data/digit-recognizer/train.csv", "--checkpoint", "csv.pth",
                       *QUICK, cwd=workspace)
    explicit = run_script("train_cnn.py", "--data", "csv", "--train-csv", "data/digit-recognizer/train.csv",
                          "--checkpoint", "csv.pth", *QUICK, cwd=workspace)
    assert "324 train / 36 val / 40 test images" in alias.stdout and "using csv.pth" in explicit.stdout
    # python evaluate.py --weights CNN_best_model.pth (the MNIST test set; --limit does not apply, all 10,000)
    report = run_script("evaluate.py", "--weights", "CNN_best_model.pth", "--data-dir", mnist_dir, cwd=workspace)
    assert "on 10000 images (MNIST test set)" in report.stdout
    assert (workspace / "reports" / "CNN_best_model" / "metrics.json").is_file()
    # python predict_tta.py --weights CNN_best_model.pth --data mnist --no-tta
    plain = run_script("predict_tta.py", "--weights", "CNN_best_model.pth", "--data", "mnist", "--data-dir", mnist_dir,
                       "--no-tta", "--out", "mnist_submission.csv", cwd=workspace)
    assert "1 models x 1 TTA variants" in plain.stdout and "(" in plain.stdout.splitlines()[-1]


def test_pipeline_b_commands(workspace):
    # python train_kfold.py --folds 0 1 && python train_kfold.py --folds 2 3 4   (the default CSV, the same folder)
    run_script("train_kfold.py", "--n-folds", "2", "--folds", "0", "--archs", "widecnn", *QUICK, cwd=workspace)
    second = run_script("train_kfold.py", "--n-folds", "2", "--folds", "1", "--archs", "widecnn", *QUICK, cwd=workspace)
    assert "ensemble (OOF)" in second.stdout and "on 400 images" in second.stdout
    # python predict_tta.py --test-csv data/digit-recognizer/test.csv  (every complete model in models/)
    predicted = run_script("predict_tta.py", "--test-csv", "data/digit-recognizer/test.csv",
                           "--labels", "data/digit-recognizer/test_labels.csv", cwd=workspace)
    assert "2 models x 4 TTA variants" in predicted.stdout and "accuracy" in predicted.stdout
    # python evaluate.py --weights models --tta 4 ; --test-csv labelled.csv ; --test-csv with --labels ; --submission
    ensemble = run_script("evaluate.py", "--weights", "models", "--tta", "4", "--test-csv", "labelled.csv",
                          cwd=workspace)
    by_labels = run_script("evaluate.py", "--weights", "models", "--tta", "4", "--test-csv",
                           "data/digit-recognizer/test.csv", "--labels", "data/digit-recognizer/test_labels.csv",
                           "--out", "reports/by_labels", cwd=workspace)
    scored = run_script("evaluate.py", "--submission", "submission.csv", "--labels",
                        "data/digit-recognizer/test_labels.csv",
                        cwd=workspace)
    accuracy = {r.stdout.split("accuracy ")[1].split()[0] for r in (ensemble, by_labels, scored)}
    assert len(accuracy) == 1  # the same predictions, read three ways
    truth = pd.read_csv(workspace / "data" / "digit-recognizer" / "test_labels.csv")["Label"].to_numpy()
    submission = pd.read_csv(workspace / "submission.csv")["Label"].to_numpy()
    assert float(accuracy.pop()) == pytest.approx((truth == submission).mean(), abs=1e-4)


def test_budget_commands(workspace, mnist_dir):
    # python train_kfold.py --data mnist --archs vgg --n-folds 10 --optimizer adam --augmentation light --budget 105m
    # (one fold of 300 digits, in 20 s; the speed is measured, so the plan is this machine's)
    ensemble = run_script("train_kfold.py", "--data", "mnist", "--data-dir", mnist_dir, "--limit", "300", "--archs",
                          "vgg",
                          "--n-folds", "10", "--folds", "0", "--optimizer", "adam", "--augmentation", "light",
                          "--batch-size", "32", "--budget", "20s", "--out", "budget_models", cwd=workspace)
    assert "[vgg fold 0] budget 20s:" in ensemble.stdout and "training took" in ensemble.stdout
    settings = checkpoints.load(workspace / "budget_models" / "vgg_fold0.pth")["settings"]
    assert settings["schedule"] == "warmup-linear" and settings["augmentation"] == "light"
    assert settings["planned_steps"] >= 1


@pytest.mark.parametrize("target, script", [("train", "train_cnn.py"), ("kfold", "train_kfold.py"),
                                            ("submission", "train_kfold.py")])
def test_make_passes_budget_to_the_training_script(target, script):
    # make train BUDGET=3m, and the same variable for both pipeline-B targets (make -n: the commands, not run)
    commands = subprocess.run(["make", "-n", target, "BUDGET=3m", "PYTHON=python3"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.splitlines()
    training = [line for line in commands if script in line]
    assert len(training) == 1 and "--budget 3m" in " ".join(training[0].split())


def test_export_and_image_commands(workspace, tmp_path, small_vgg):
    # python data.py export-kaggle --data-dir data --out data/digit-recognizer
    synthetic_mnist(tmp_path / "data", n_train=30, n_test=20)
    exported = run_script("data.py", "export-kaggle", "--data-dir", "data", "--out", "data/digit-recognizer",
                          cwd=tmp_path)
    assert "train.csv (30 rows)" in exported.stdout
    # python predict_tta.py --weights CNN_best_model.pth --images photo.jpg my_digits/ --show-preprocessed seen/
    images, _ = data.load_csv(workspace / "labelled.csv", labelled=True)
    from PIL import Image
    Image.fromarray(255 - images[0].numpy()).resize((112, 112)).save(tmp_path / "photo.jpg")
    (tmp_path / "my_digits").mkdir()
    for i in range(1, 4):
        Image.fromarray(255 - images[i].numpy()).resize((84, 84)).save(tmp_path / "my_digits" / f"{i}.png")
    result = run_script("predict_tta.py", "--weights", small_vgg, "--images", "photo.jpg",
                        "my_digits/", "--show-preprocessed", "seen/", cwd=tmp_path)
    assert result.stdout.startswith("photo.jpg: ") and len(list((tmp_path / "seen").iterdir())) == 4
    assert np.asarray(Image.open(tmp_path / "seen" / "photo_28x28.png")).shape == (28, 28)
