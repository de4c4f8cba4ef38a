"""Nothing lost, nothing poisoned, every bad input one line: hostile but fair inputs against every script."""
import gzip
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_user_error, run_script, synthetic_mnist
from PIL import Image

import checkpoints
import cli
import data
from data import UserError
from models import LineReader, build_model
import photos

# ----------------------------------------------------------------------------- checkpoints


def checkpoint(**changes):
    return {"model_state": build_model("vgg").state_dict(), "arch": "vgg", "normalization": dict(data.NORMALIZATION),
            "epoch": 1, "complete": True, **changes}


def nan_weights():
    state = build_model("vgg").state_dict()
    state["head.1.weight"][0, 0] = float("nan")
    return state


@pytest.mark.parametrize("changes, message", [
    ({"model_state": [1, 2]}, "model_state is not a dict of named tensors (found list)"),
    ({"model_state": None}, "model_state is not a dict of named tensors (found NoneType)"),
    ({"arch": 3}, "unknown architecture 3"),
    ({"arch": "lenet"}, "unknown architecture 'lenet'"),
    ({"normalization": {}}, "normalization must be"),
    ({"normalization": "mnist"}, "normalization must be"),
    ({"normalization": {"mean": 0.1, "std": 0.0}}, "normalization must be"),
    ({"normalization": {"mean": float("nan"), "std": 0.3}}, "normalization must be"),
    ({"epoch": "one"}, "epoch must be a whole number"),
    ({"model_state": nan_weights()}, "the weights are not finite (head.1.weight holds NaN or Inf)"),
])
def test_checkpoint_fields_are_checked_when_loaded(tmp_path, changes, message):
    checkpoints.save(tmp_path / "m.pth", checkpoint(**changes))
    with pytest.raises(UserError, match=f"m.pth: {message[:30].replace('(', '.').replace(')', '.')}") as caught:
        checkpoints.load(tmp_path / "m.pth")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_line_reader_that_does_not_fit_is_one_line(tmp_path):
    from predict_tta import DigitReader
    reader = LineReader().state_dict()
    checkpoints.save(tmp_path / "m.pth", checkpoint(line_reader=reader))
    assert isinstance(DigitReader(tmp_path / "m.pth", device="cpu").line_reader, LineReader)
    cases = [(checkpoint(line_reader={**reader, "classes.weight": torch.zeros(11, 64)}),
              "its line reader does not fit models.LineReader (size mismatch for classes.weight"),
             (checkpoint(line_reader={**reader, "classes.bias": torch.full((11,), float("inf"))}),
              "the weights are not finite (classes.bias holds NaN or Inf)")]
    for broken, message in cases:
        checkpoints.save(tmp_path / "m.pth", broken)
        with pytest.raises(UserError) as caught:
            DigitReader(tmp_path / "m.pth", device="cpu")
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_checkpoint_without_epoch_is_not_one_of_ours(tmp_path):
    broken = checkpoint()
    del broken["epoch"]
    checkpoints.save(tmp_path / "m.pth", broken)
    with pytest.raises(UserError, match="it needs model_state, arch, normalization, epoch"):
        checkpoints.load(tmp_path / "m.pth")


def test_a_nan_model_in_a_models_folder_stops_prediction_naming_it(tmp_path):
    (tmp_path / "models").mkdir()
    checkpoints.save(tmp_path / "models" / "good.pth", checkpoint())
    checkpoints.save(tmp_path / "models" / "bad.pth", checkpoint(model_state=nan_weights()))
    data.write_images_csv(tmp_path / "test.csv", torch.zeros(5, 28, 28, dtype=torch.uint8))
    result = run_script("predict_tta.py", "--test-csv", "test.csv", "--weights", "models", cwd=tmp_path, check=False)
    assert_user_error(result, "bad.pth: the weights are not finite")
    assert not (tmp_path / "submission.csv").exists()


def test_finite_weights_with_non_finite_outputs_are_refused_before_writing(tmp_path):
    state = build_model("vgg").state_dict()
    state["head.2.bias"][:] = 1e30                       # finite, but the logits overflow to Inf, softmax to NaN
    state["head.5.weight"][:] = 1e9
    checkpoints.save(tmp_path / "huge.pth", checkpoint(model_state=state))
    data.write_images_csv(tmp_path / "test.csv", torch.full((5, 28, 28), 200, dtype=torch.uint8))
    (tmp_path / "submission.csv").write_text("ImageId,Label\n1,7\n")
    result = run_script("predict_tta.py", "--test-csv", "test.csv", "--weights", "huge.pth", "--no-tta",
                        "--precision", "fp32", cwd=tmp_path, check=False)
    assert_user_error(result, "huge.pth: the model's outputs are NaN or Inf on these images; nothing was written")
    assert (tmp_path / "submission.csv").read_text() == "ImageId,Label\n1,7\n"


def test_a_resume_file_of_another_architecture_is_refused(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=200)
    checkpoints.save(tmp_path / "CNN_best_model.resume.pth", {
        "model_state": build_model("resnet").state_dict(), "optimizer_state": {}, "scheduler_state": {},
        "scaler_state": {}, "rng": {}, "progress": {}, "arch": "resnet"})
    assert_user_error(run_script("train_cnn.py", "--data-dir", "mnist", cwd=tmp_path, check=False),
                      "CNN_best_model.resume.pth: the resume file of a 'resnet' run, not vgg")


# ----------------------------------------------------------------------------- outputs


def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=40)
    data.write_images_csv(tmp_path / "train.csv", torch.zeros(40, 28, 28, dtype=torch.uint8), torch.arange(40) % 10)
    data.write_images_csv(tmp_path / "test.csv", torch.zeros(5, 28, 28, dtype=torch.uint8))
    data.write_images_csv(tmp_path / "predictions.csv", torch.zeros(5, 28, 28, dtype=torch.uint8), torch.arange(5))
    checkpoints.save(tmp_path / "m.pth", checkpoint())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for script, args, message in (
        ("train_cnn.py", ["--train-csv", "train.csv", "--checkpoint", "train.csv"],
         "--checkpoint would overwrite an input (train.csv is --train-csv train.csv)"),
        ("train_cnn.py", ["--train-csv", "train.csv", "--checkpoint", "./train.csv"], "--checkpoint would overwrite"),
        ("train_kfold.py", ["--train-csv", "summary.json", "--out", "."], "--out would overwrite an input"),
        ("predict_tta.py", ["--test-csv", "test.csv", "--weights", "m.pth", "--out", "test.csv"],
         "--out would overwrite an input (test.csv is --test-csv test.csv)"),
        ("predict_tta.py", ["--test-csv", "test.csv", "--weights", "m.pth", "--out", "m.pth"],
         "(m.pth is --weights m.pth)"),
        ("predict_tta.py", ["--test-csv", "test.csv", "--weights", ".", "--save-probs", "m.pth"], "--save-probs would"),
        ("evaluate.py", ["--weights", "m.pth", "--test-csv", "predictions.csv", "--out", "."],
         "--out would overwrite an input (predictions.csv is --test-csv predictions.csv)"),
    ):
        if script == "train_kfold.py":
            (tmp_path / "summary.json").write_text("{}")
            before["summary.json"] = b"{}"
        assert_user_error(run_script(script, *args, cwd=tmp_path, check=False), message)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written


def test_a_folder_as_an_output_file_is_refused_before_any_work(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=40)
    data.write_images_csv(tmp_path / "test.csv", torch.zeros(5, 28, 28, dtype=torch.uint8))
    checkpoints.save(tmp_path / "m.pth", checkpoint())
    (tmp_path / "folder").mkdir()
    for script, args in (("train_cnn.py", ["--data-dir", "mnist", "--checkpoint", "folder"]),
                         ("predict_tta.py", ["--test-csv", "test.csv", "--weights", "m.pth", "--out", "folder"]),
                         ("predict_tta.py", ["--test-csv", "test.csv", "--weights", "m.pth", "--save-probs", "folder"]),
                         ("predict_tta.py", ["--weights", "m.pth", "--images", "test.csv", "--show-preprocessed",
                                             "test.csv"])):
        result = run_script(script, *args, cwd=tmp_path, check=False)
        assert_user_error(result, "folder" if "folder" in args else "test.csv")
        assert "predicted" not in result.stdout and "epoch" not in result.stdout
    (tmp_path / "report").write_text("")
    assert_user_error(run_script("evaluate.py", "--weights", "m.pth", "--data-dir", "mnist", "--out", "report",
                                 cwd=tmp_path, check=False), "--out report: a file is in the way of this output folder")


def test_atomic_writes_clean_the_leftovers_of_killed_writers_only(tmp_path):
    target = tmp_path / "model.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".model.pth.{dead.stdout.strip()}.abc123.tmp"     # a writer that no longer exists
    alive = tmp_path / f".model.pth.{os.getpid()}.def456.tmp"              # a writer that is still running
    other = tmp_path / f".other.pth.{dead.stdout.strip()}.xyz.tmp"         # another file's: not ours to remove
    for path in (orphan, alive, other):
        path.write_text("partial")
    cli.write_json(target, {"ok": 1})
    assert not orphan.exists() and alive.exists() and other.exists()


# ----------------------------------------------------------------------------- locks


def wait_for(path, process, seconds=300):
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the first run ended before it wrote " + path.name


def test_a_second_run_on_a_checkpoint_in_use_stops_at_once_and_leaves_the_first_alone(tmp_path):
    synthetic_mnist(tmp_path / "mnist", n_train=500, n_test=20)  # short epochs; 50 of them outlast the second runs
    args = [sys.executable, str(ROOT / "train_cnn.py"), "--data-dir", "mnist", "--epochs", "50", "--batch-size", "16"]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "CNN_best_model.resume.pth", first)
        for extra in ([], ["--retrain"]):
            second = subprocess.run(args + extra, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            in_use = "CNN_best_model.pth is in use by another training run (it holds CNN_best_model.lock)"
            assert in_use in second.stderr
            assert (tmp_path / "CNN_best_model.resume.pth").exists()  # --retrain did not delete the first run's state
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock went with the killed process: the same command now resumes
    resumed = run_script("train_cnn.py", "--data-dir", "mnist", "--epochs", "1", "--batch-size", "16", "--limit", "100",
                         "--retrain", cwd=tmp_path)
    assert "epoch   1" in resumed.stdout


def test_a_second_kfold_run_on_the_same_folder_stops_at_once(tmp_path):
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
    data.write_images_csv(tmp_path / "train.csv", images, torch.arange(200) % 10)
    args = [sys.executable, str(ROOT / "train_kfold.py"), "--train-csv", "train.csv", "--n-folds", "2", "--archs",
            "widecnn", "--epochs", "50", "--batch-size", "16"]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "models" / "widecnn_fold0.resume.pth", first)
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "models/widecnn_fold0.pth is in use by another training run" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# ----------------------------------------------------------------------------- data files


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision.datasets

    class HalfwayMNIST:  # torchvision's MNIST that extracted one file, then lost the network
        def __init__(self, root, **kwargs):
            raw = os.path.join(root, "MNIST", "raw")
            os.makedirs(raw)
            with open(os.path.join(raw, "train-images-idx3-ubyte"), "wb") as f:
                f.write(bytes(1000))
            raise RuntimeError("Error downloading train-labels-idx1-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", HalfwayMNIST)
    (tmp_path / "existing").mkdir()
    for data_dir in (tmp_path / "existing", tmp_path / "new" / "deeper"):
        with pytest.raises(UserError, match="the download failed"):
            data.load_mnist(data_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and not list((tmp_path / "existing").iterdir())


def test_csv_faults_quote_at_most_a_hundred_characters_of_a_cell(tmp_path):
    path = tmp_path / "test.csv"
    header = ",".join(data.PIXEL_COLUMNS)
    path.write_text(header + "\n" + "x" * 5_000_000 + ",0" * 783 + "\n")
    with pytest.raises(UserError) as caught:
        data.load_csv(path, labelled=False)
    message = str(caught.value)
    assert "line 2, column pixel0" in message and len(message) - len(str(path)) < 200


def test_true_is_not_a_pixel_value_and_a_gzipped_csv_is_read(tmp_path):
    rows = "\n".join(",".join(["True"] + ["0"] * 783) for _ in range(2))
    (tmp_path / "bools.csv").write_text(",".join(data.PIXEL_COLUMNS) + "\n" + rows + "\n")
    with pytest.raises(UserError, match="line 2, column pixel0: value True is not an integer in 0..255"):
        data.load_csv(tmp_path / "bools.csv", labelled=False)
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    data.write_images_csv(tmp_path / "plain.csv", images, torch.arange(4))
    (tmp_path / "packed.csv").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    loaded, labels = data.load_csv(tmp_path / "packed.csv", labelled=True)
    assert torch.equal(loaded, images) and labels.tolist() == [0, 1, 2, 3]


def test_unsupported_devices_and_slow_precisions_are_one_line(tmp_path, capsys):
    for device in ("meta", "xpu"):
        assert_user_error(run_script("train_cnn.py", "--device", device, cwd=tmp_path, check=False),
                          f"--device {device}: not supported here")
    assert data.pick_precision("fp16", torch.device("cpu")) == "fp16"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: --precision fp16 on this CPU runs many times slower")
    assert data.pick_precision("fp32", torch.device("cpu")) == "fp32" and not capsys.readouterr().err


# ----------------------------------------------------------------------------- images


def png_header(width, height):
    """A PNG that announces width x height pixels but holds no pixel data: PIL reads the size without decoding."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0,
                                                             0)) + chunk(b"IEND", b"")


def test_huge_images_are_refused_from_their_header(tmp_path):
    (tmp_path / "100mp.png").write_bytes(png_header(10_000, 10_000))     # below PIL's own error limit
    (tmp_path / "400mp.png").write_bytes(png_header(20_000, 20_000))     # above it: PIL's DecompressionBombError
    with pytest.raises(UserError, match=r"100mp.png: 10000x10000 pixels, more than a photo of a digit needs"):
        photos.preprocess_image(tmp_path / "100mp.png")
    with pytest.raises(UserError, match="400mp.png: not a readable image"):
        photos.preprocess_image(tmp_path / "400mp.png")


def upright_seven():
    image = Image.new("L", (60, 90), "white")
    pixels = image.load()
    for x in range(10, 50):
        for y in range(10, 18):
            pixels[x, y] = 0                                  # the bar at the top
    for t in range(70):
        for w in range(8):
            pixels[max(0, 45 - t // 2 - w // 2), 18 + t] = 0  # the stroke down to the left
    return image


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                    (3, Image.Transpose.ROTATE_180)])
def test_phone_photos_are_turned_the_right_way_up(tmp_path, orientation, transpose):
    upright = upright_seven()
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation                 # the camera stored the pixels turned; the tag says how to turn them back
    upright.transpose(transpose).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    expected = photos.preprocess_image(tmp_path / "upright.jpg").float()
    turned = photos.preprocess_image(tmp_path / "phone.jpg").float()
    assert (turned - expected).abs().mean() < 4                # the same digit, up to JPEG noise
    raw = np.asarray(Image.open(tmp_path / "phone.jpg").convert("L").resize((28, 28)), dtype=np.float32)
    assert raw.shape == (28, 28)


def test_a_fifo_and_a_huge_image_are_skipped_the_others_predicted_and_names_kept_apart(tmp_path, small_vgg):
    folder = tmp_path / "photos"
    folder.mkdir()
    for suffix in ("jpg", "jpeg", "png"):
        upright_seven().save(folder / f"digit.{suffix}")
    os.mkfifo(folder / "pipe.png")
    (folder / "zbomb.png").write_bytes(png_header(10_000, 10_000))
    result = run_script("predict_tta.py", "--weights", small_vgg, "--no-tta", "--images", folder,
                        "--show-preprocessed", "seen", cwd=tmp_path, check=False)
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert errors[0] == f"error: {folder / 'pipe.png'}: not a regular file, skipped"
    assert errors[1].startswith(f"error: {folder / 'zbomb.png'}: 10000x10000 pixels, "
                                "more than a photo of a digit needs")
    assert errors[2] == "error: 2 of the inputs could not be predicted (each named above)" and len(errors) == 3
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == [
        "digit.jpeg_28x28.png", "digit.jpg_28x28.png", "digit.png_28x28.png"]
    assert "wrote 3 preprocessed images" in result.stdout and result.stdout.count("digit.") == 3
