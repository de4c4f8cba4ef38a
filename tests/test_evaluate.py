"""evaluate.py: the report files, its numbers against a hand computation, and the submission scorer."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_script
from PIL import Image

import checkpoints
import data
from evaluate import compute_metrics
from models import build_model

CONSTANT_CLASS, CONSTANT_LOGIT = 3, 5.0


@pytest.fixture
def constant_checkpoint(tmp_path):
    """A vgg whose last layer ignores its input and always answers 3 with softmax([5, 0, ..., 0])[0]."""
    model = build_model("vgg")
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[CONSTANT_CLASS] = CONSTANT_LOGIT
    path = tmp_path / "constant.pth"
    checkpoints.save(path, {"model_state": model.state_dict(), "arch": "vgg", "normalization": data.NORMALIZATION,
                            "precision": "fp32", "epoch": 2, "metrics": {}, "versions": {}, "complete": True})
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.45 + e / 10} for e in (1, 2, 3)]
    (tmp_path / "constant.history.json").write_text(json.dumps(history))
    return path


@pytest.fixture
def labelled_csv(tmp_path):
    """30 random images, labels 0..9 three times each."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    labels = torch.arange(30) % 10
    data.write_images_csv(tmp_path / "labelled.csv", images, labels)
    return tmp_path / "labelled.csv"


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
        return image.size, pixels.std()


def test_report_of_a_constant_predictor_matches_the_hand_computation(tmp_path, constant_checkpoint, labelled_csv):
    result = run_script("evaluate.py", "--weights", constant_checkpoint, "--test-csv", labelled_csv, "--out", "report",
                        "--precision", "fp32", cwd=tmp_path)
    report = tmp_path / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 30 and metrics["errors"] == 27 and metrics["accuracy"] == pytest.approx(0.1)
    p_constant = math.exp(CONSTANT_LOGIT) / (math.exp(CONSTANT_LOGIT) + 9)
    p_other = 1 / (math.exp(CONSTANT_LOGIT) + 9)
    expected_loss = -(3 * math.log(p_constant) + 27 * math.log(p_other)) / 30
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert metrics["per_class"]["3"]["precision"] == pytest.approx(0.1)
    assert metrics["per_class"]["3"]["recall"] == pytest.approx(1.0)
    assert metrics["per_class"]["5"]["recall"] == 0
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix[:, CONSTANT_CLASS].tolist() == [3] * 10 and matrix.sum() == 30
    assert metrics["top_confusions"][0] == {"true": 0, "predicted": 3, "count": 3}
    assert len(metrics["top_confusions"]) == 9
    assert "accuracy 0.1000" in result.stdout and "0→3: 3" in result.stdout

    predictions = pd.read_csv(report / "predictions.csv")
    assert list(predictions.columns) == ["index", "true", "predicted", "confidence"]
    assert (predictions["predicted"] == 3).all() and predictions["confidence"].to_numpy() == pytest.approx(p_constant,
                                                                                                           rel=1e-4)
    assert predictions["true"].tolist() == [i % 10 for i in range(30)]

    for name, min_width in (("confusion_matrix.png", 600), ("misclassified.png", 800), ("curves.png", 1000)):
        (width, height), spread = png_size(report / name)
        assert width >= min_width and height >= 300, (name, width, height)
        assert spread > 10, f"{name} looks blank"


def test_metrics_agree_with_a_hand_computation():
    labels = np.array([0, 0, 1, 1, 2, 2, 4, 9])
    predicted = np.array([0, 1, 1, 1, 2, 0, 9, 4])
    metrics = compute_metrics(labels, predicted, probs=np.full((8, 10), 0.1))
    assert metrics["accuracy"] == pytest.approx(4 / 8) and metrics["errors"] == 4
    assert metrics["per_class"]["1"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["0"]["recall"] == pytest.approx(1 / 2)
    assert metrics["loss"] == pytest.approx(-math.log(0.1))
    assert [(c["true"], c["predicted"]) for c in metrics["top_confusions"]] == [(0, 1), (2, 0), (4, 9), (9, 4)]


def test_a_models_folder_gets_one_curve_per_checkpoint_and_tta(tmp_path, constant_checkpoint, labelled_csv):
    folder = tmp_path / "models"
    folder.mkdir()
    for fold in (0, 1):
        (folder / f"vgg_fold{fold}.pth").write_bytes(constant_checkpoint.read_bytes())
        (folder / f"vgg_fold{fold}.history.json").write_text((tmp_path / "constant.history.json").read_text())
    result = run_script("evaluate.py", "--weights", folder, "--test-csv", labelled_csv, "--tta", "4", cwd=tmp_path)
    assert "2 models x 4 TTA variants on 30 images" in result.stdout
    report = tmp_path / "reports" / "models"
    assert sorted(p.name for p in report.iterdir()) == ["confusion_matrix.png", "curves.png", "metrics.json",
                                                        "misclassified.png", "predictions.csv"]
    assert json.loads((report / "metrics.json").read_text())["tta_variants"] == 4


def write_ids(path, labels, header="ImageId,Label", ids=None):
    ids = ids if ids is not None else range(1, len(labels) + 1)
    path.write_text(header + "\n" + "".join(f"{i},{label}\n" for i, label in zip(ids, labels, strict=True)))
    return path


def test_submission_scoring(tmp_path):
    truth = [i % 10 for i in range(20)]
    guess = truth[:]
    guess[4], guess[9] = 9, 4
    write_ids(tmp_path / "labels.csv", truth)
    write_ids(tmp_path / "submission.csv", guess)
    result = run_script("evaluate.py", "--submission", "submission.csv", "--labels", "labels.csv", cwd=tmp_path)
    assert "accuracy 0.9000" in result.stdout and "errors 2 of 20" in result.stdout
    metrics = json.loads((tmp_path / "reports" / "submission" / "metrics.json").read_text())
    assert metrics["errors"] == 2 and {(c["true"],
                                        c["predicted"]) for c in metrics["top_confusions"]} == {(4, 9), (9, 4)}
    assert (tmp_path / "reports" / "submission" / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("write, message", [
    (lambda p, t: write_ids(p, t, header="Id,Label"), "the header must be ImageId,Label, found Id,Label"),
    (lambda p, t: write_ids(p, t[:-1]), "19 rows, expected one per test image (20)"),
    (lambda p, t: write_ids(p, t, ids=[2, 1] + list(range(3, 21))), "line 2: ImageId 2, expected 1"),
    (lambda p, t: write_ids(p, [11] + t[1:]), "line 2, column Label: value 11 is not an integer in 0..9"),
    (lambda p, t: write_ids(p, ["seven"] + t[1:]), "line 2, column Label: value 'seven' is not an integer"),
    (lambda p, t: p.write_text(""), "the file is empty"),
])
def test_submission_scorer_catches_each_format_fault(tmp_path, write, message):
    truth = [i % 10 for i in range(20)]
    write_ids(tmp_path / "labels.csv", truth)
    write(tmp_path / "submission.csv", truth)
    assert_user_error(run_script("evaluate.py", "--submission", "submission.csv", "--labels", "labels.csv",
                                 cwd=tmp_path, check=False), "submission.csv: " + message)


def test_evaluate_user_errors(tmp_path, constant_checkpoint, labelled_csv):
    assert_user_error(run_script("evaluate.py", "--weights", "missing.pth", "--test-csv", labelled_csv, cwd=tmp_path,
                                 check=False), "missing.pth: no such checkpoint")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_script("evaluate.py", "--weights", "empty", "--test-csv", labelled_csv, cwd=tmp_path,
                                 check=False),
                      "empty: no complete checkpoint")
    checkpoint = checkpoints.load(constant_checkpoint)
    checkpoint["arch"] = "lenet"
    checkpoints.save(tmp_path / "lenet.pth", checkpoint)
    assert_user_error(run_script("evaluate.py", "--weights", "lenet.pth", "--test-csv", labelled_csv, cwd=tmp_path,
                                 check=False), "unknown architecture 'lenet'")
    data.write_images_csv(tmp_path / "unlabelled.csv", torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert_user_error(run_script("evaluate.py", "--weights", constant_checkpoint, "--test-csv", "unlabelled.csv",
                                 cwd=tmp_path, check=False), "unlabelled.csv: no labels to evaluate against")
    result = run_script("evaluate.py", "--submission", "s.csv", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--submission needs --labels" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_evaluates_the_trained_model_on_mnist(tmp_path, small_vgg, mnist_dir):
    result = run_script("evaluate.py", "--weights", small_vgg, "--data-dir", mnist_dir, "--out", "r", cwd=tmp_path)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["images"] == 10000 and metrics["accuracy"] > 0.9
    assert "most frequent confusions" in result.stdout
    (width, height), spread = png_size(tmp_path / "r" / "misclassified.png")
    assert spread > 10 and height > 600  # 48 errors: six rows of digits


@pytest.mark.parametrize("history", ['[{"epoch": 1, "train_loss"', '{"epoch": 1}', '[{"epoch": 1, "val_loss": "x"}]'])
def test_a_broken_history_stops_the_report_before_anything_is_written(tmp_path, constant_checkpoint, labelled_csv,
                                                                      history):
    report = tmp_path / "report"
    run_script("evaluate.py", "--weights", constant_checkpoint, "--test-csv", labelled_csv, "--out", report,
               cwd=tmp_path)
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    (tmp_path / "constant.history.json").write_text(history)
    result = run_script("evaluate.py", "--weights", constant_checkpoint, "--test-csv", labelled_csv, "--out", report,
                        cwd=tmp_path, check=False)
    assert_user_error(result, "constant.history.json: not a")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # the old report, whole and untouched
