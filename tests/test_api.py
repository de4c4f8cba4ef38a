"""predict_tta.DigitReader, the Python entry point, and --export: one ONNX graph, checked in onnxruntime first."""
import os
import re
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, assert_user_error, run_script

import checkpoints
import data
from data import UserError
from models import build_model
import predict_tta
from predict_tta import DigitReader


def require_onnx():
    """Skip without onnx, onnxscript and onnxruntime; under CI=true fail, so CI cannot pass without these tests."""
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401, E401
    except ImportError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the export tests' packages are missing ({error}): pip install -r "
                        "requirements-export.txt")
        pytest.skip(f"ONNX packages missing ({error}): pip install -r requirements-export.txt")
        raise


@pytest.fixture(scope="module")
def photos(tmp_path_factory, mnist_dir):
    """12 MNIST test digits as photos (PNG files, dark on light, larger than 28x28) and the digits themselves."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("photos")
    images, labels = data.load_mnist(mnist_dir, "test")
    for i in range(12):
        Image.fromarray(255 - images[i].numpy()).resize((84, 84)).save(folder / f"digit{i:02d}.png")
    return folder, images[:12]


def test_the_reader_gives_what_images_and_the_csv_prediction_give(small_vgg, photos, tmp_path):
    folder, digits = photos
    reader = DigitReader(small_vgg, device="cpu", tta=4)
    # --images on the folder: the same probabilities as the reader on the same files, in the same order
    run_script("predict_tta.py", "--weights", small_vgg, "--images", folder, "--out", "images.csv", "--device", "cpu",
               cwd=tmp_path)
    by_images = pd.read_csv(tmp_path / "images.csv")
    files = sorted(folder.iterdir())
    probs = reader.probabilities(torch.cat([reader.digits(path) for path in files]))
    assert list(by_images["path"]) == [str(path) for path in files]
    written = probs.numpy().round(6).astype(str).astype(np.float64)  # as --images writes them: 6 decimals
    assert np.array_equal(by_images[[f"p{d}" for d in range(10)]].to_numpy(), written)
    assert np.array_equal(by_images["label"].to_numpy(), probs.argmax(1).numpy())
    labels, one = reader.predict(files[0])  # one file on its own: a batch of one, as the page predicts it
    assert labels.shape == (1,) and one.shape == (1, 10) and labels[0] == one[0].argmax()
    # the CSV prediction (submission.csv and --save-probs) on MNIST-like digits
    data.write_images_csv(tmp_path / "test.csv", digits)
    run_script("predict_tta.py", "--weights", small_vgg, "--test-csv", "test.csv", "--save-probs", "p.npy",
               "--device", "cpu", cwd=tmp_path)
    labels, probs = reader.predict(digits.numpy())
    assert np.array_equal(np.load(tmp_path / "p.npy"), probs.numpy())
    assert np.array_equal(pd.read_csv(tmp_path / "submission.csv")["Label"].to_numpy(), labels.numpy())
    assert torch.equal(reader.predict(digits[0])[1], reader.predict(digits[:1])[1])  # [28, 28] is one digit


def test_the_reader_refuses_what_is_not_mnist_like_in_one_line(small_vgg):
    reader = DigitReader([small_vgg], device="cpu")
    for bad, message in ((np.zeros((28, 28), np.float32),
                          r"digits must be uint8 0..255 \(white on black, as MNIST\), not float32"),
                         (torch.zeros(3, 28, dtype=torch.uint8),
                          r"digits must be shaped \[28, 28\] or \[N, 28, 28\], not \[3, 28\]"),
                         (np.zeros((0, 28, 28), np.uint8), r"not \[0, 28, 28\]"),
                         ([[0] * 28] * 28, "cannot read digits from a list")):
        with pytest.raises(UserError, match=message):
            reader.predict(bad)
    with pytest.raises(UserError, match="nowhere.pth: no such checkpoint file or folder; make one with `make train`"):
        DigitReader("nowhere.pth")


def test_the_readme_example_runs_as_written(small_vgg, photos, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"### Using the model from Python and other runtimes\n.*?```python\n(.*?)```", readme, re.S)[1]
    shutil.copy(small_vgg, tmp_path / "CNN_best_model.pth")
    shutil.copy(photos[0] / "digit00.png", tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["labels"].shape == (2,) and namespace["probs"].shape == (2, 10)


def small_ensemble(folder, small_vgg):
    """The small trained vgg and a freshly initialised widecnn: a two-model ensemble."""
    torch.manual_seed(0)
    checkpoints.save(folder / "widecnn.pth", {"model_state": build_model("widecnn").state_dict(), "arch": "widecnn",
                                              "normalization": data.NORMALIZATION, "epoch": 1, "complete": True})
    return [small_vgg, folder / "widecnn.pth"]


@pytest.mark.parametrize("models", [1, 2])
def test_export_writes_a_graph_that_onnxruntime_runs_as_pytorch_does(small_vgg, tmp_path, mnist_dir, models):
    require_onnx()
    import onnxruntime
    weights = [small_vgg] if models == 1 else small_ensemble(tmp_path, small_vgg)
    result = run_script("predict_tta.py", "--weights", *weights, "--export", "digits.onnx", "--data-dir", mnist_dir,
                        cwd=tmp_path)
    assert f"wrote digits.onnx: {models} model(s)" in result.stdout
    assert "on 1000 MNIST test digits (all labels" in result.stdout
    difference = float(re.search(r"largest probability difference (\S+)\)", result.stdout)[1])
    assert difference <= predict_tta.PARITY_TOLERANCE
    session = onnxruntime.InferenceSession(str(tmp_path / "digits.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["digits"] and session.get_inputs()[0].type == "tensor(uint8)"
    digits = data.load_mnist(mnist_dir, "test")[0][:37]  # any batch size: the batch dimension is free
    probs = session.run(None, {"digits": digits.numpy()})[0]
    expected = DigitReader(weights, device="cpu", precision="fp32").probabilities(digits).numpy()
    assert probs.shape == (37, 10) and np.abs(probs - expected).max() <= predict_tta.PARITY_TOLERANCE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_export_that_disagrees_with_pytorch_is_refused_and_nothing_written(small_vgg, tmp_path, monkeypatch):
    require_onnx()
    forward = predict_tta.EnsembleGraph.forward
    monkeypatch.setattr(predict_tta.EnsembleGraph, "forward", lambda self, digits: forward(self, digits // 2))
    result = run_script("predict_tta.py", "--weights", small_vgg, "--export", "digits.onnx", "--data-dir", "absent",
                        cwd=tmp_path, check=False)
    assert_user_error(result, "the exported graph disagrees with PyTorch on 1000 random digits",
                      "digits.onnx was not written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_without_the_onnx_packages_says_how_to_install_them(small_vgg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = run_script("predict_tta.py", "--weights", small_vgg, "--export", "digits.onnx", cwd=tmp_path, check=False)
    assert_user_error(result, "--export needs onnx, onnxscript and onnxruntime",
                      "pip install -r requirements-export.txt")
    result = run_script("predict_tta.py", "--weights", small_vgg, "--export", small_vgg, cwd=tmp_path, check=False)
    assert_user_error(result, "--export would overwrite an input")
    result = run_script("predict_tta.py", "--weights", small_vgg, "--export", "x.onnx", "--tta", "2", cwd=tmp_path,
                        check=False)
    assert_user_error(result, "--export writes the model as a graph; it takes no --tta")
