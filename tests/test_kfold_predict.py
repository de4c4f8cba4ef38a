"""Pipeline B end to end on a few hundred real MNIST images: k-fold training, resume, torchrun, TTA prediction."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, assert_user_error, killed_once_saved, run_script

import checkpoints
import data
from predict_tta import DigitReader
import train_kfold

TINY = ["--n-folds", "2", "--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory, mnist_dir):
    """Kaggle-format train.csv (400 MNIST test digits), test.csv (300 others) and its answer key."""
    folder = tmp_path_factory.mktemp("kaggle")
    images, labels = data.load_mnist(mnist_dir, "test")
    data.write_images_csv(folder / "train.csv", images[:400], labels[:400])
    data.write_images_csv(folder / "test.csv", images[400:700])
    pd.DataFrame({"ImageId": np.arange(1, 301), "Label": labels[400:700].numpy()}).to_csv(folder / "test_labels.csv",
                                                                                          index=False)
    return folder


@pytest.fixture(scope="module")
def trained(kaggle_dir):
    """Both architectures over 2 folds for 1 epoch: 4 checkpoints in models/."""
    result = run_script("train_kfold.py", "--train-csv", "train.csv", *TINY, cwd=kaggle_dir)
    return kaggle_dir, result


def test_kfold_writes_every_job_and_a_summary(trained):
    folder, result = trained
    models = folder / "models"
    for arch in ("resnet", "widecnn"):
        for fold in (0, 1):
            checkpoint = checkpoints.load(models / f"{arch}_fold{fold}.pth")
            assert checkpoint["arch"] == arch and checkpoint["complete"] is True
            assert len(json.loads((models / f"{arch}_fold{fold}.history.json").read_text())) == 1
            oof = np.load(models / f"{arch}_fold{fold}.oof.npz")
            assert oof["probs"].shape == (200, 10) and np.allclose(oof["probs"].sum(1), 1, atol=1e-4)
    summary = json.loads((models / "summary.json").read_text())
    assert set(summary["architectures"]) == {"resnet", "widecnn"}
    assert set(summary["architectures"]["resnet"]) == {"fold0", "fold1", "out_of_fold", "images"}
    assert summary["architectures"]["widecnn"]["images"] == 400 and summary["ensemble_images"] == 400
    assert 0 <= summary["ensemble_out_of_fold"] <= 1
    assert "ensemble (OOF)" in result.stdout
    assert not list(models.glob("*.resume.pth"))


def test_each_fold_records_its_own_training_images_and_an_ensemble_counts_them(trained):
    folder, _ = trained
    images, labels = data.load_csv(folder / "train.csv", labelled=True)
    folds = train_kfold.fold_indices(labels, 2, 42)
    models = [folder / "models" / f"resnet_fold{fold}.pth" for fold in (0, 1)]
    for path, (train_index, _) in zip(models, folds, strict=True):
        record = checkpoints.load(path)["trained_on"]
        assert len(record) == len(train_index)
        assert torch.equal(record, checkpoints.image_hashes(images[train_index]).sort().values)
    reader = DigitReader(models, "cpu")
    fold0_validation = folds[0][1]  # fold 1 trained on these, fold 0 did not
    assert reader.trained_on(images[fold0_validation]) == {"images": len(fold0_validation), "of": len(fold0_validation),
                                                           "models": 1, "unrecorded": 0}
    assert reader.trained_on(images) == {"images": 400, "of": 400, "models": 2, "unrecorded": 0}
    assert reader.trained_on(data.load_csv(folder / "test.csv", labelled=False)[0])["images"] == 0


def test_rerun_skips_complete_jobs(trained):
    folder, _ = trained
    result = run_script("train_kfold.py", "--train-csv", "train.csv", *TINY, cwd=folder)
    assert result.stdout.count("complete, skipped") == 4 and "train loss" not in result.stdout


def test_job_seeds_follow_the_architecture_name_and_are_recorded(trained):
    folder, _ = trained
    from models import MODELS
    for arch in ("resnet", "widecnn"):
        for fold in (0, 1):
            settings = checkpoints.load(folder / "models" / f"{arch}_fold{fold}.pth")["settings"]
            assert settings["job_seed"] == 42 + 100 * fold + list(MODELS).index(arch)  # the seed jobs had before
    assert [train_kfold.job_seed(7, arch, 3) for arch in MODELS] == [307, 308, 309]


def test_a_finished_folder_written_before_job_seeds_were_recorded_is_skipped(trained, tmp_path):
    folder, _ = trained
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.csv").write_bytes((folder / "train.csv").read_bytes())
    for path in (folder / "models").iterdir():
        if path.suffix in (".pth", ".npz", ".json"):
            (old / "models").mkdir(exist_ok=True)
            (old / "models" / path.name).write_bytes(path.read_bytes())
    for path in (old / "models").glob("*.pth"):  # as k-fold checkpoints were before the job seed was recorded
        checkpoint = checkpoints.load(path)
        del checkpoint["settings"]["job_seed"]
        checkpoints.save(path, checkpoint)
    result = run_script("train_kfold.py", "--train-csv", "train.csv", *TINY, cwd=old)
    assert result.stdout.count("complete, skipped") == 4 and "train loss" not in result.stdout


@pytest.mark.parametrize("changed, message", [
    (["--seed", "7"], "models/resnet_fold0.pth was trained with --seed 42, this run has 7"),
    (["--n-folds", "3"],
     "models/resnet_fold0.pth was trained with split {'n_folds': 2, 'fold': 0}, this run has {'n_folds': 3"),
    (["--limit", "300"], "models/resnet_fold0.pth was trained with data '400 images"),
])
def test_complete_jobs_of_other_settings_are_not_skipped_silently(trained, changed, message):
    folder, _ = trained
    args = ["--train-csv", "train.csv", *TINY, *changed]
    assert_user_error(run_script("train_kfold.py", *args, cwd=folder, check=False), message, "--retrain")


def read_submission(path):
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["ImageId", "Label"]
    return frame


def test_predict_both_architectures_with_tta_writes_a_valid_submission(trained):
    folder, _ = trained
    result = run_script("predict_tta.py", "--test-csv", "test.csv", "--labels", "test_labels.csv",
                        "--save-probs", "probs.npy", cwd=folder)
    assert "4 models x 4 TTA variants = 16 forward passes per image" in result.stdout
    submission = read_submission(folder / "submission.csv")
    assert len(submission) == 300 and submission["ImageId"].tolist() == list(range(1, 301))
    assert submission["Label"].between(0, 9).all()
    probs = np.load(folder / "probs.npy")
    assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == submission["Label"].to_numpy()).all()
    accuracy = float(result.stdout.split("accuracy ")[1].split()[0])
    truth = pd.read_csv(folder / "test_labels.csv")["Label"].to_numpy()
    assert accuracy == pytest.approx((truth == submission["Label"].to_numpy()).mean(), abs=1e-4)


def test_tta_is_deterministic_and_no_tta_differs(trained):
    folder, _ = trained
    # 72 of the test rows in batches of 32: three batches, the last one partial, as a full test set ends
    images, _ = data.load_csv(folder / "test.csv", labelled=False)
    data.write_images_csv(folder / "test72.csv", images[:72])
    small = ["--test-csv", "test72.csv", "--batch-size", "32"]
    for name in ("a.csv", "b.csv"):
        run_script("predict_tta.py", *small, "--out", name, "--save-probs", name + ".npy", cwd=folder)
    assert (folder / "a.csv").read_text() == (folder / "b.csv").read_text()
    assert np.array_equal(np.load(folder / "a.csv.npy"), np.load(folder / "b.csv.npy"))
    plain = run_script("predict_tta.py", *small, "--no-tta", "--weights", "models/resnet_fold0.pth",
                       "--out", "plain.csv", "--save-probs", "plain.npy", cwd=folder)
    assert "1 models x 1 TTA variants = 1 forward passes per image" in plain.stdout
    assert not np.allclose(np.load(folder / "plain.npy"), np.load(folder / "a.csv.npy"))


def test_predict_user_errors(trained, tmp_path):
    folder, _ = trained
    (tmp_path / "empty_models").mkdir()
    assert_user_error(run_script("predict_tta.py", "--test-csv", folder / "test.csv", "--weights", "empty_models",
                                 cwd=tmp_path, check=False), "empty_models: no complete checkpoint")
    assert_user_error(run_script("predict_tta.py", "--test-csv", folder / "test.csv", "--weights", "nothing_here",
                                 cwd=tmp_path, check=False), "nothing_here: no such checkpoint file or folder")
    (tmp_path / "test.csv").write_text("pixel0,pixel1\n0,0\n")
    assert_user_error(run_script("predict_tta.py", "--test-csv", "test.csv", "--weights", folder / "models",
                                 cwd=tmp_path, check=False), "test.csv: missing column pixel2")
    (tmp_path / "labels.csv").write_text("ImageId,Label\n" + "".join(f"{i},1\n" for i in range(1, 300)))
    assert_user_error(run_script("predict_tta.py", "--test-csv", folder / "test.csv", "--weights", folder / "models",
                                 "--labels", "labels.csv", cwd=tmp_path, check=False), "labels.csv: 299 rows, expected")
    assert_user_error(run_script("predict_tta.py", "--tta", "5", cwd=tmp_path, check=False),
                      "--tta must be between 1 and 4")
    assert not (tmp_path / "submission.csv").exists()


def test_killed_kfold_resumes_the_interrupted_fold_and_skips_finished_ones(kaggle_dir, tmp_path):
    args = [sys.executable, str(ROOT / "train_kfold.py"), "--train-csv", kaggle_dir / "train.csv", "--archs", "widecnn",
            "--n-folds", "2", "--epochs", "3", "--batch-size", "32", "--out", tmp_path / "models"]
    fold0_done = tmp_path / "models" / "widecnn_fold0.oof.npz"
    fold1_resume = tmp_path / "models" / "widecnn_fold1.resume.pth"
    assert killed_once_saved(args, fold0_done, fold1_resume), "the run ended before fold 1 saved an epoch"

    result = subprocess.run(list(map(str, args)), capture_output=True, text=True, check=True)
    assert "[widecnn fold 0] complete, skipped" in result.stdout
    assert "[widecnn fold 1] resuming" in result.stdout
    history = json.loads((tmp_path / "models" / "widecnn_fold1.history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert checkpoints.load(tmp_path / "models" / "widecnn_fold1.pth")["complete"] is True


def test_torchrun_two_cpu_ranks_share_the_jobs(kaggle_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_kfold.py"),
         "--train-csv", str(kaggle_dir / "train.csv"), *TINY, "--out", str(tmp_path / "models"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: device cpu, precision" in result.stdout and "rank 1: device cpu" in result.stdout
    assert f"{max(1, torch.get_num_threads() // 2)} threads" in result.stdout  # each rank takes its share of the cores
    assert "jobs resnet/0, widecnn/0" in result.stdout and "jobs resnet/1, widecnn/1" in result.stdout
    summary = json.loads((tmp_path / "models" / "summary.json").read_text())
    assert summary["ensemble_images"] == 400
    assert len(list((tmp_path / "models").glob("*_fold?.pth"))) == 4


def test_export_kaggle_writes_the_three_csvs(tmp_path):
    from conftest import synthetic_mnist
    synthetic_mnist(tmp_path / "mnist", n_train=30, n_test=20)
    result = run_script("data.py", "export-kaggle", "--data-dir", "mnist", "--out", "kaggle", cwd=tmp_path)
    assert "train.csv (30 rows)" in result.stdout
    train_images, train_labels = data.load_csv(tmp_path / "kaggle" / "train.csv", labelled=True)
    test_images, _ = data.load_csv(tmp_path / "kaggle" / "test.csv", labelled=False)
    original, original_labels = data.load_mnist(tmp_path / "mnist", "train")
    assert (train_images == original).all() and (train_labels == original_labels).all()
    assert test_images.shape == (20, 28, 28)
    key = data.load_submission_csv(tmp_path / "kaggle" / "test_labels.csv", 20)
    assert (key == data.load_mnist(tmp_path / "mnist", "test")[1]).all()
