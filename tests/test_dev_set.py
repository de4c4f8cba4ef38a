"""tools/dev_set.py: other writers' digits as phone photos, read as --images reads them, and typefaces.py's fetching."""
import shutil
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from conftest import ROOT, run_script, synthetic_mnist

import checkpoints
import cli
import typefaces
from predict_tta import DigitReader

import dev_set

DEJAVU = {"dejavu-sans": f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf"}  # a stand-in typeface, offline


def test_the_dev_typefaces_and_the_training_typefaces_are_apart_and_leave_out_the_independent_check():
    assert len(typefaces.DEV_FAMILIES) >= 15 and len(typefaces.DEV_FAMILIES) + len(typefaces.TRAIN_FAMILIES) >= 30
    assert not set(typefaces.DEV_FAMILIES) & set(typefaces.TRAIN_FAMILIES)
    independent = {"comic-neue", "dancing-script", "kaushan-script", "kristi"}
    assert not independent & set(typefaces.DEV_FAMILIES + typefaces.TRAIN_FAMILIES)


def test_a_typeface_digit_becomes_a_phone_photo_that_reads_right(tmp_path):
    fonts = typefaces.load_fonts(DEJAVU)
    photos = dev_set.typeface_photos(list(DEJAVU), fonts, 2, seed=0)
    assert [label for _, label, _ in photos] == [d for d in range(10) for _ in range(2)]
    assert photos == dev_set.typeface_photos(list(DEJAVU), fonts, 2, seed=0)       # seeded: the same photos
    reader = DigitReader(checkpoints.RELEASED_MODEL, device="cpu", precision="fp32")
    read = dev_set.read_photos(reader, photos, tmp_path)
    assert (read == np.array([label for _, label, _ in photos])).mean() >= 0.9
    lines = dev_set.table(photos, read).splitlines()
    assert lines[2].startswith("| dev typefaces (1) | 20 |") and "| dejavu-sans |" in lines[6]


def test_pens_are_finer_and_broader():
    font = typefaces.load_fonts(DEJAVU)["dejavu-sans"]
    ink = {pen: (typefaces.digit_ink(font, 8, pen) > 0.5).sum() for pen in (-0.02, 0.0, 0.04)}
    assert ink[-0.02] < ink[0.0] < ink[0.04]


def test_the_uci_half_runs_from_the_command_line_and_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "tools" / "dev_set.py", "--sources", "uci", "--tta", "1",
                             "--limit", "100", "--weights", checkpoints.RELEASED_MODEL, "--scratch", tmp_path],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| UCI digits, even half | 100 |"))
    assert float(row.split("|")[3].strip(" %")) > 80
    assert len(list(tmp_path.glob("uci_*.jpg"))) == 100


def test_without_npm_a_typeface_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                     # no npm here
    with pytest.raises(cli.UserError, match=r"^cannot fetch the typeface caveat with npm .*caveat.woff2"):
        typefaces.fetch(["caveat"], tmp_path / "cache")


def test_training_adds_the_training_typefaces_digits_and_records_them(tmp_path, monkeypatch):
    """train_cnn.py --typefaces N: N drawings of each digit in each training-half typeface join the training set (not
    validation), and the run's settings say so. Offline: each family's file is a stand-in typeface."""
    cache = tmp_path / "typefaces"
    cache.mkdir()
    for family in typefaces.TRAIN_FAMILIES:
        shutil.copy(DEJAVU["dejavu-sans"], cache / f"{family}.woff2")
    monkeypatch.setattr(typefaces, "DEFAULT_CACHE", cache)
    synthetic_mnist(tmp_path / "mnist", n_train=100, n_test=10)
    result = run_script("train_cnn.py", "--data-dir", "mnist", "--epochs", "1", "--batch-size", "32", "--typefaces",
                        "1", "--no-test-report", cwd=tmp_path)
    drawn = 10 * len(typefaces.TRAIN_FAMILIES)
    assert f"{90 + drawn} train / 10 val" in result.stdout
    checkpoint = checkpoints.load(tmp_path / "CNN_best_model.pth")
    assert checkpoint["settings"]["typefaces"] == 1 and len(checkpoint["trained_on"]) > 90
    images, labels = typefaces.training_digits(1, 42, cache)
    assert images.shape == (drawn, 28, 28)
    assert labels.tolist() == [d for _ in typefaces.TRAIN_FAMILIES for d in range(10)]
