"""The released model in weights/ and the record of training images: which model a prediction uses when none is
named, the SHA-256 check, and scores on images a model trained on marked as not fair."""
import json
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, assert_user_error, run_script
from PIL import Image

import checkpoints
import cli
import data
import predict_tta
from predict_tta import DigitReader

RELEASED = "using the released model weights/vgg_mnist.pth"


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    """((train images, labels), (test images, labels)) of the real MNIST."""
    return data.load_mnist(mnist_dir, "train"), data.load_mnist(mnist_dir, "test")


@pytest.fixture(scope="module")
def photo(tmp_path_factory, mnist):
    """MNIST's first test digit (a 7) as a photo: dark ink on white paper, 112 pixels a side."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(255 - mnist[1][0][0].numpy()).resize((112, 112)).save(path)
    return path


# ----------------------------------------------------------------------------- the released model

def test_the_released_model_is_its_manifests_file_and_records_its_training_images():
    manifest = json.loads(checkpoints.RELEASE_MANIFEST.read_text())
    released = checkpoints.RELEASED_MODEL
    assert manifest["file"] == released.name and released.stat().st_size <= 8 * 10**6
    checkpoint = checkpoints.load(checkpoints.RELEASED_MODEL)  # checks the SHA-256 first
    assert checkpoints.is_complete(checkpoint) and checkpoint["arch"] == "vgg"
    assert len(checkpoint["trained_on"]) == 54000 and manifest["mnist_test_accuracy"] >= 0.996
    assert manifest["parity"]["labels_differ"] == 0 and manifest["parity"]["max_probability_difference"] <= 1e-3


def test_adding_a_line_reader_to_the_released_model_leaves_its_digit_weights_as_they_are(tmp_path, monkeypatch,
                                                                                          mnist_dir):
    import argparse

    import release
    run_script("train_reader.py", "--data-dir", mnist_dir, "--epochs", "1", "--steps", "2", "--batch-size", "8",
               "--val-lines", "24", "--limit", "300", "--precision", "fp32", cwd=tmp_path)
    shutil.copytree(checkpoints.RELEASED_MODEL.parent, tmp_path / "weights")
    monkeypatch.setattr(checkpoints, "RELEASED_MODEL", tmp_path / "weights" / checkpoints.RELEASED_MODEL.name)
    monkeypatch.setattr(checkpoints, "RELEASE_MANIFEST", tmp_path / "weights" / checkpoints.RELEASE_MANIFEST.name)
    before = checkpoints.load(checkpoints.RELEASED_MODEL)
    trained = checkpoints.load(tmp_path / "line_reader.pth")
    options = dict(line_reader=tmp_path / "line_reader.pth", data_dir=mnist_dir, command="python train_reader.py",
                   commit="abc1234", training_seconds=12.3, remark="")
    unfinished = {**trained, "complete": False}
    checkpoints.save(tmp_path / "unfinished.pth", unfinished)
    with pytest.raises(SystemExit, match="unfinished.pth: not a finished line reader"):
        release.add_line_reader(argparse.Namespace(**{**options, "line_reader": tmp_path / "unfinished.pth"}))
    release.add_line_reader(argparse.Namespace(**options))
    assert not (tmp_path / "weights" / "candidate.pth").exists()
    after = checkpoints.load(checkpoints.RELEASED_MODEL)       # its new SHA-256 is the manifest's
    assert all(torch.equal(tensor, after["model_state"][name]) for name, tensor in before["model_state"].items())
    stored = after["line_reader"]
    assert all(torch.equal(tensor, stored[name]) for name, tensor in trained["model_state"].items())
    assert "pair_detector" not in after                          # what the reader replaces
    manifest = json.loads(checkpoints.RELEASE_MANIFEST.read_text())
    assert manifest["line_reader"]["validation_lines"] == 24
    assert manifest["line_reader"]["precision"] == "fp32, as trained"
    assert manifest["line_reader"]["commit"] == "abc1234" and manifest["line_reader"]["training_seconds"] == 12
    assert "pair_detector" not in manifest and manifest["mnist_test_accuracy"] == json.loads(
        (ROOT / "weights" / "manifest.json").read_text())["mnist_test_accuracy"]


def test_a_photo_is_read_on_a_fresh_clone_with_the_released_model(tmp_path, photo):
    result = run_script("predict_tta.py", "--images", photo, cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(RELEASED) and "MNIST test accuracy 0.99" in lines[0]
    assert lines[1].startswith(f"{photo}: 7 ")


def test_the_reader_without_weights_uses_the_released_model_from_any_folder(tmp_path, monkeypatch, capsys, mnist):
    monkeypatch.chdir(tmp_path)
    reader = DigitReader()
    assert reader.paths == [checkpoints.RELEASED_MODEL] and capsys.readouterr().out.startswith(RELEASED)
    images, labels = mnist[1][0][:200], mnist[1][1][:200]
    assert (reader.predict(images)[0] == labels).float().mean() >= 0.98
    assert reader.trained_on(images) == {"images": 0, "of": 200, "models": 0, "unrecorded": 0}
    # the first 6,000 training images, less those the release run held out for validation (train_cnn.py's split)
    held_out = torch.as_tensor(data.stratified_split(mnist[0][1], 0.1, 42)[1])
    expected = 6000 - int((held_out < 6000).sum())
    assert reader.trained_on(mnist[0][0][:6000]) == {"images": expected, "of": 6000, "models": 1, "unrecorded": 0}


def test_pipeline_a_model_in_the_working_folder_comes_first_and_an_unfinished_one_is_skipped(tmp_path, small_vgg,
                                                                                             photo):
    shutil.copy(small_vgg, tmp_path / "CNN_best_model.pth")
    used = run_script("predict_tta.py", "--images", photo, cwd=tmp_path)
    assert used.stdout.startswith("using CNN_best_model.pth (pipeline A's model in this folder")
    checkpoint = checkpoints.load(small_vgg)
    checkpoints.save(tmp_path / "CNN_best_model.pth", {**checkpoint, "complete": False})
    skipped = run_script("predict_tta.py", "--images", photo, cwd=tmp_path).stdout.splitlines()
    assert skipped[0] == f"skipping CNN_best_model.pth: {predict_tta.UNFINISHED}" and skipped[1].startswith(RELEASED)


def test_an_unfinished_checkpoint_is_skipped_with_the_same_line_as_a_file_or_in_a_folder(tmp_path, small_vgg, photo):
    (tmp_path / "models").mkdir()
    checkpoint = checkpoints.load(small_vgg)
    checkpoints.save(tmp_path / "models" / "running.pth", {**checkpoint, "complete": False})
    shutil.copy(small_vgg, tmp_path / "models" / "done.pth")
    folder = run_script("predict_tta.py", "--weights", "models", "--images", photo, cwd=tmp_path)
    assert f"skipping models/running.pth: {predict_tta.UNFINISHED}" in folder.stdout and f"{photo}: 7 " in folder.stdout
    alone = run_script("predict_tta.py", "--weights", "models/running.pth", "--images", photo, cwd=tmp_path,
                       check=False)
    assert alone.stdout.strip() == f"skipping models/running.pth: {predict_tta.UNFINISHED}"
    assert_user_error(alone, "no complete checkpoint in models/running.pth", "rerun its training command")


def test_a_copy_of_the_scripts_without_weights_says_where_the_file_goes(tmp_path, monkeypatch, photo):
    monkeypatch.setattr(checkpoints, "RELEASED_MODEL", tmp_path / "weights" / "vgg_mnist.pth")
    for script in ("predict_tta.py", "evaluate.py"):
        result = run_script(script, *(["--images", photo] if script == "predict_tta.py" else []), cwd=tmp_path,
                            check=False)
        assert_user_error(result, "vgg_mnist.pth is missing",
                          "copy the repository's weights/ folder beside predict_tta.py")


@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_a_damaged_released_model_is_one_line_before_it_is_read(tmp_path, monkeypatch, photo, damage):
    (tmp_path / "weights").mkdir()
    copy = tmp_path / "weights" / "vgg_mnist.pth"
    payload = bytearray(checkpoints.RELEASED_MODEL.read_bytes())
    if damage == "changed":
        payload[len(payload) // 2] ^= 1  # one bit inside the weights: torch.load alone would not notice
    else:
        payload = payload[:len(payload) // 3]
    copy.write_bytes(bytes(payload))
    shutil.copy(checkpoints.RELEASE_MANIFEST, tmp_path / "weights" / "manifest.json")
    monkeypatch.setattr(checkpoints, "RELEASED_MODEL", copy)
    monkeypatch.setattr(checkpoints, "RELEASE_MANIFEST", tmp_path / "weights" / "manifest.json")
    result = run_script("predict_tta.py", "--weights", copy, "--images", photo, cwd=tmp_path, check=False)
    assert_user_error(result, f"{copy}: its SHA-256 is not the one in manifest.json", "git checkout -- weights/")


def test_make_demo_and_evaluate_read_with_the_released_model_and_never_train():
    for target in ("demo", "evaluate"):
        commands = subprocess.run(["make", "-n", target, "PYTHON=python3"], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout
        assert "train_cnn.py" not in commands and "--weights" not in commands
    picked = subprocess.run(["make", "-n", "demo", "PYTHON=python3", "WEIGHTS=models"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "--weights models --demo" in picked


def test_make_evaluate_on_a_fresh_clone_reports_the_released_models_fair_score(tmp_path, mnist_dir):
    result = run_script("evaluate.py", "--data-dir", mnist_dir, "--out", "report", cwd=tmp_path)
    assert result.stdout.startswith(RELEASED) and "not a fair score" not in result.stdout
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    manifest = json.loads(checkpoints.RELEASE_MANIFEST.read_text())
    assert metrics["fair_score"] is True and metrics["trained_on"]["images"] == 0
    assert abs(metrics["accuracy"] - manifest["mnist_test_accuracy"]) <= 0.0005  # auto precision against fp32


# ----------------------------------------------------------------------------- scores on images a model trained on

def kaggle_like_split(folder, mnist, train_rows, test_rows):
    """A labelled Kaggle-format CSV of MNIST's first `train_rows` training and `test_rows` test images, as Kaggle's
    files mix them."""
    (train_images, train_labels), (test_images, test_labels) = mnist
    data.write_images_csv(folder / "mixed.csv", torch.cat([train_images[:train_rows], test_images[:test_rows]]),
                          torch.cat([train_labels[:train_rows], test_labels[:test_rows]]))
    return folder / "mixed.csv"


def test_an_mnist_trained_model_scored_on_a_kaggle_like_split_says_how_many_it_trained_on(tmp_path, small_vgg, mnist):
    mixed = kaggle_like_split(tmp_path, mnist, 400, 200)
    # small_vgg trained on the first 3,000 training images less its stratified validation tenth (seed 42)
    trained, held_out = data.stratified_split(mnist[0][1][:3000], 0.1, 42)
    expected = int((torch.as_tensor(trained) < 400).sum())
    assert 300 < expected < 400 and (torch.as_tensor(held_out) < 400).sum() == 400 - expected
    warning = (f"warning: {expected} of 600 images are among the training images of 1 of 1 models: "
               "an accuracy on them is not a fair score")
    mark = f"(not a fair score: {expected} of 600 images trained on)"

    report = run_script("evaluate.py", "--weights", small_vgg, "--test-csv", mixed, "--out", "report", cwd=tmp_path)
    assert warning in report.stdout.splitlines()
    assert next(line for line in report.stdout.splitlines() if line.startswith("accuracy ")).endswith(mark)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["fair_score"] is False and metrics["trained_on"] == {"images": expected, "of": 600, "models": 1,
                                                                        "unrecorded": 0}
    predicted = run_script("predict_tta.py", "--weights", small_vgg, "--test-csv", mixed, "--no-tta",
                           "--out", "submission.csv", cwd=tmp_path)  # scored by the CSV's own label column
    assert warning in predicted.stdout.splitlines() and predicted.stdout.splitlines()[-1].endswith(mark)


def test_a_model_trained_on_a_kaggle_train_csv_scored_on_mnists_test_set_is_not_warned(tmp_path, mnist, mnist_dir):
    # the first 300 of MNIST's training images, written as export-kaggle writes its train.csv
    data.write_images_csv(tmp_path / "train.csv", mnist[0][0][:300], mnist[0][1][:300])
    run_script("train_cnn.py", "--train-csv", "train.csv", "--epochs", "1", "--batch-size", "32", cwd=tmp_path)
    record = checkpoints.load(tmp_path / "CNN_best_model.pth")["trained_on"]
    assert 200 < len(record) < 270  # less the CSV's held-out test rows and the validation rows
    result = run_script("evaluate.py", "--data-dir", mnist_dir, "--out", "report", cwd=tmp_path)
    assert result.stdout.startswith("using CNN_best_model.pth") and "not a fair score" not in result.stdout
    assert "warning" not in result.stdout and "note" not in result.stdout
    # and its own held-out rows are no training images of it either
    kept, held_out = data.stratified_split(mnist[0][1][:300], 0.1, 42)
    reader = DigitReader(tmp_path / "CNN_best_model.pth", "cpu")
    assert reader.trained_on(mnist[0][0][:300][held_out])["images"] == 0
    assert reader.trained_on(mnist[0][0][:300][kept])["images"] == len(record)


def test_a_checkpoint_without_a_record_is_read_as_before_and_noted_once(tmp_path, small_vgg, mnist):
    mixed = kaggle_like_split(tmp_path, mnist, 400, 200)
    checkpoint = checkpoints.load(small_vgg)
    del checkpoint["trained_on"]
    checkpoints.save(tmp_path / "old.pth", checkpoint)
    old = run_script("evaluate.py", "--weights", "old.pth", small_vgg, "--test-csv", mixed, "--out", "r", cwd=tmp_path)
    lines = old.stdout.splitlines()
    assert lines.count("note: 1 of 2 models were saved without a record of their training images, so they are not "
                       "checked") == 1
    assert any(line.startswith("warning: ") and "training images of 1 of 2 models" in line for line in lines)
    alone = DigitReader(tmp_path / "old.pth", "cpu")
    same = DigitReader(small_vgg, "cpu")
    images = mnist[1][0][:100]
    assert torch.equal(alone.probabilities(images), same.probabilities(images))
    assert alone.trained_on(images) == {"images": 0, "of": 100, "models": 0, "unrecorded": 1}


def test_a_record_that_is_not_a_sorted_hash_tensor_is_one_line(tmp_path, small_vgg):
    checkpoint = checkpoints.load(small_vgg)
    checkpoints.save(tmp_path / "bad.pth", {**checkpoint, "trained_on": checkpoint["trained_on"].flip(0)})
    with pytest.raises(cli.UserError, match="bad.pth: trained_on must be a sorted int64 tensor of image hashes"):
        checkpoints.load(tmp_path / "bad.pth")


def test_image_hashes_depend_on_the_pixels_alone(mnist):
    images = mnist[1][0][:50]
    hashes = checkpoints.image_hashes(images)
    assert hashes.dtype == torch.int64 and hashes.shape == (50,) and len(hashes.unique()) == 50
    assert torch.equal(checkpoints.image_hashes(images.flip(0)), hashes.flip(0))   # an image's hash, not its position
    changed = images.clone()
    changed[7, 14, 14] ^= 1
    assert (checkpoints.image_hashes(changed) != hashes).tolist() == [i == 7 for i in range(50)]
