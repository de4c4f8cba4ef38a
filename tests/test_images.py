"""predict_tta.py --images: people's own pictures of digits, made MNIST-like before prediction."""
import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, run_script
from photo_render import render_as_photo
from PIL import Image

import cli
import data
import photos


@pytest.fixture(scope="module")
def mnist_photos(tmp_path_factory, mnist_dir):
    """20 MNIST test digits re-rendered as colour 'photos' (dark on light, 4x larger, off-centre, noisy)."""
    folder = tmp_path_factory.mktemp("photos")
    images, labels = data.load_mnist(mnist_dir, "test")
    rng = np.random.default_rng(0)
    for i in range(20):
        render_as_photo(images[i].numpy(), rng).save(folder / f"digit{i:02d}_label{labels[i]}.png")
    return folder, images[:20], labels[:20]


def test_preprocessing_recovers_the_mnist_digit_from_a_photo(mnist_photos):
    folder, images, _ = mnist_photos
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        recovered = photos.preprocess_image(path)
        assert recovered.shape == (28, 28) and recovered.dtype.is_floating_point is False
        ours = np.abs(recovered.numpy() / 255 - images[i].numpy() / 255).mean()
        naive = np.asarray(Image.open(path).convert("L").resize((28, 28)), dtype=np.float32) / 255
        assert ours < 0.12, (path.name, ours)
        assert ours < np.abs(naive - images[i].numpy() / 255).mean() / 3  # far closer than a plain resize


def test_each_step_does_its_job():
    light = np.full((40, 60), 0.9, dtype=np.float32)
    light[10:30, 20:26] = 0.1                                   # a dark bar on light paper
    white_on_black = photos.ink_on_black(light, "auto")
    assert white_on_black[0, 0] == pytest.approx(0.1) and white_on_black[15, 22] == pytest.approx(0.9)
    assert photos.ink_on_black(light, "no")[0, 0] == pytest.approx(0.9)
    assert photos.ink_on_black(1 - light, "yes")[0, 0] == pytest.approx(0.9)  # "yes" inverts even a dark border
    noise = np.random.default_rng(0).normal(0, 0.03, light.shape).astype(np.float32)
    clean = photos.remove_background(white_on_black + noise)
    assert clean[0:8].max() == 0 and clean[15, 22] > 0.8         # texture gone, ink kept
    digit = photos.crop_to_ink(clean, "bar.png")
    assert digit.shape == (20, 6)
    boxed = photos.fit_in_box(digit)
    assert boxed.shape == (20, 6)
    field = photos.centre_by_mass(boxed)
    centre = (field.sum(1) * np.arange(28)).sum() / field.sum(), (field.sum(0) * np.arange(28)).sum() / field.sum()
    assert abs(centre[0] - 13.5) <= 0.5 and abs(centre[1] - 13.5) <= 0.5
    assert photos.fit_in_box(np.ones((100, 50), dtype=np.float32)).shape == (20, 10)


def test_transparent_drawing_is_read_as_ink_on_white_paper(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 28:36] = (0, 0, 0, 255)                          # opaque black stroke, transparent elsewhere
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "drawing.png")
    digit = photos.preprocess_image(tmp_path / "drawing.png")
    assert digit.max() == 255 and digit[0, 0] == 0 and (digit > 0).sum() > 20


def test_images_are_predicted_with_the_runner_up(mnist_photos, small_vgg, tmp_path):
    folder, _, labels = mnist_photos
    result = run_script("predict_tta.py", "--weights", small_vgg, "--images", folder, "--out", "predictions.csv",
                        "--show-preprocessed", "seen", cwd=tmp_path)
    lines = [line for line in result.stdout.splitlines() if ".png: " in line]
    assert len(lines) == 20
    assert lines[0].startswith(f"{folder / 'digit00_label7.png'}: ") and ", next " in lines[0]
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert list(frame.columns) == ["path", "label", "probability"] + [f"p{d}" for d in range(10)]
    assert np.allclose(frame[[f"p{d}" for d in range(10)]].sum(axis=1), 1, atol=1e-4)
    accuracy = (frame["label"].to_numpy() == labels.numpy()).mean()
    assert accuracy >= 0.85, frame[["path", "label", "probability"]]
    seen = sorted((tmp_path / "seen").glob("*.png"))
    assert len(seen) == 20 and Image.open(seen[0]).size == (28, 28)


def test_bad_files_are_reported_and_the_others_still_predicted(mnist_photos, small_vgg, tmp_path):
    folder, _, _ = mnist_photos
    Image.new("RGB", (120, 90), "white").save(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "empty").mkdir()
    result = run_script("predict_tta.py", "--weights", small_vgg, "--no-tta", "--images",
                        folder / "digit00_label7.png", tmp_path / "blank.png", tmp_path / "notes.png",
                        tmp_path / "empty", tmp_path / "missing.jpg", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "digit00_label7.png: " in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 5 and "Traceback" not in result.stderr
    assert errors[-1] == "error: 4 of the inputs could not be predicted (each named above)"
    assert any("blank.png: no digit found" in e for e in errors)
    assert any("notes.png: not a readable image" in e for e in errors)
    assert any("empty: no image files" in e for e in errors)
    assert any("missing.jpg: no such file or folder" in e for e in errors)


def test_image_options_need_images(tmp_path):
    for option in (["--show-preprocessed", "x"], ["--number"]):
        result = run_script("predict_tta.py", *option, cwd=tmp_path, check=False)
        assert result.returncode == 2 and "--invert, --number and --show-preprocessed go with --images" in result.stderr
    assert_user_error(run_script("predict_tta.py", "--weights", "nowhere.pth", "--images", ".", cwd=tmp_path,
                                 check=False),
                      "nowhere.pth: no such checkpoint")


def test_a_pil_image_is_preprocessed_as_its_file_and_named_in_messages(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 28:36] = (0, 0, 0, 255)
    drawing = Image.fromarray(rgba, mode="RGBA")
    drawing.save(tmp_path / "drawing.png")
    assert np.array_equal(photos.preprocess_image(drawing, name="the drawing"),
                          photos.preprocess_image(tmp_path / "drawing.png"))
    with pytest.raises(cli.UserError, match="^the drawing: no digit found"):
        photos.preprocess_image(Image.new("RGBA", (64, 64)), name="the drawing")
    with pytest.raises(cli.UserError, match="^the photo: 8000x7000 pixels"):
        photos.preprocess_image(Image.new("L", (8000, 7000)), name="the photo")
