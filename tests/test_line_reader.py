"""The line reader: its synthetic lines (writing.py), its decoding, a line's digits on a page, and its training."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, killed_once_saved, run_script

import checkpoints
import cli
import data
import photos
import writing
from models import LineReader


@pytest.fixture(scope="module")
def digits(mnist_dir):
    images, labels = data.load_mnist(mnist_dir, "train")
    return images[:500], labels[:500]


def test_lines_hold_their_digits_left_to_right_at_the_readers_height(digits):
    images, labels = digits
    lines, targets, lengths, widths = writing.digit_lines(images, labels, 32, torch.Generator().manual_seed(0))
    assert lines.shape[:3] == (32, 1, photos.LINE_HEIGHT) and lines.shape[3] == int(widths.max()) + photos.LINE_MARGIN
    assert lines.dtype == torch.float32 and 0 <= float(lines.min()) and float(lines.max()) <= 1
    assert ((1 <= lengths) & (lengths <= writing.MAX_LINE_DIGITS)).all() and len(targets) == int(lengths.sum())
    assert set(targets.tolist()) <= set(range(10))
    for line, width in zip(lines, widths, strict=True):
        assert line[..., width:].abs().sum() == 0                       # nothing beyond the line's own width
        assert float(line.amax()) == pytest.approx(1.0)                  # each line stretched to its darkest ink
        assert line[0].amax(1).gt(0.2).sum() >= 18                     # the writing spans most of the height
    # seeded: the same generator state gives the same lines
    again = writing.digit_lines(images, labels, 32, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], lines) and torch.equal(again[1], targets)


def test_a_line_of_one_digit_is_that_digit_across_the_line(digits):
    images, labels = digits
    one = images[labels == 0][:1].expand(20, -1, -1).contiguous()      # a pool of one 0: every line is 0s
    lines, targets, lengths, widths = writing.digit_lines(one, torch.zeros(20, dtype=torch.long), 20,
                                                          torch.Generator().manual_seed(1))
    assert (targets == 0).all()
    single = int(torch.nonzero(lengths == 1)[0])
    columns = lines[single, 0].amax(0) > 0.3
    inked = torch.nonzero(columns).flatten()
    # one digit, about as wide as a 0 written LINE_HEIGHT - 2 * LINE_MARGIN tall (MNIST's 0 is a little narrower)
    assert 8 <= int(inked[-1] - inked[0]) <= int(widths[single])


def frames(*classes, sure=0.9):
    """Per-frame probabilities [T, 11] saying these classes (0 the blank, k + 1 the digit k)."""
    probabilities = torch.full((len(classes), 11), (1 - sure) / 10)
    probabilities[torch.arange(len(classes)), torch.tensor(classes)] = sure
    return probabilities


def test_greedy_decoding_collapses_repeats_and_keeps_digits_apart_by_blanks():
    logits = frames(0, 4, 4, 0, 4, 0, 8, 1, 1, 0, 3).log()[None]        # 3 . 3 . 7 0 . (the last frame beyond)
    assert LineReader.decode(logits, torch.tensor([40])) == [[(3, 1, 2), (3, 4, 4), (7, 6, 6), (0, 7, 8)]]
    assert LineReader.decode(logits, torch.tensor([12])) == [[(3, 1, 2)]]  # 3 frames of 4 px


def test_a_lines_digits_own_its_columns_between_their_frames():
    ink = np.zeros((20, 60), dtype=np.float32)
    ink[2:18, 4:14] = ink[2:18, 24:30] = ink[2:18, 44:56] = 1          # three marks, left to right
    mark = photos.Mark(ink > 0, (slice(0, 20), slice(0, 60)))
    line = photos.Line(torch.zeros(photos.LINE_HEIGHT, 60), mark, scale=1.0)
    # the reader says 5 over the first, 2 over the second, 9 over the third (frame k covers columns 4k..4k+3)
    read = photos.line_digits(line, frames(0, 6, 6, 0, 0, 0, 3, 0, 0, 0, 0, 10, 10, 0, 0))
    assert [part.box_ltrb for part, _ in read] == [(4, 2, 14, 18), (24, 2, 30, 18), (44, 2, 56, 18)]
    assert [int(p.argmax()) for _, p in read] == [5, 2, 9]
    assert all(float(p.sum()) == pytest.approx(1) for _, p in read)
    # a flat digit (page columns 4-39) and a 1 after a gap: the edge is in the gap, not halfway between their frames
    ink = np.zeros((20, 60), dtype=np.float32)
    ink[8:14, 4:40] = ink[2:18, 44:48] = 1
    mark = photos.Mark(ink > 0, (slice(0, 20), slice(0, 60)))
    image = torch.zeros(photos.LINE_HEIGHT, 66)
    image[:, photos.LINE_MARGIN:photos.LINE_MARGIN + 60] = torch.from_numpy(ink.sum(0))   # the ink of each column
    wide = photos.Line(image, mark, scale=1.0)
    read = photos.line_digits(wide, frames(0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0))
    assert [part.box_ltrb for part, _ in read] == [(4, 8, 40, 14), (44, 2, 48, 18)]
    # nothing read at all: the frame least sure of a blank still says a digit
    silent = frames(*[0] * 15)
    silent[7] = torch.tensor([0.4, 0.0, 0.6, *[0.0] * 8])
    assert [(part.box_ltrb, int(p.argmax())) for part, p in photos.line_digits(line, silent)] == [
        ((4, 2, 56, 18), 1)]


SMOKE = ["--epochs", "3", "--steps", "3", "--batch-size", "8", "--val-lines", "16", "--limit", "300",
         "--precision", "fp32"]


def test_train_reader_trains_saves_and_reuses_its_line_reader(tmp_path, mnist_dir):
    result = run_script("train_reader.py", "--data-dir", mnist_dir, *SMOKE, cwd=tmp_path)
    assert "lines of 270 digits, validation: 16 lines of 30 held-out digits" in result.stdout
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == 3
    checkpoint = checkpoints.load(tmp_path / "line_reader.pth")
    assert checkpoint["arch"] == "line-reader" and checkpoint["complete"] is True
    assert checkpoints.load_line_reader(tmp_path / "line_reader.pth", "cpu", checkpoint) is not None
    again = run_script("train_reader.py", "--data-dir", mnist_dir, *SMOKE, cwd=tmp_path)
    assert "line_reader.pth is finished" in again.stdout
    other = run_script("train_reader.py", "--data-dir", mnist_dir, *SMOKE[:-2], "--precision", "fp32", "--lr", "1e-3",
                       cwd=tmp_path, check=False)
    assert other.returncode == 2 and "--lr" in other.stderr
    # a line reader is not a digit classifier: named as --weights it is one line
    named = run_script("predict_tta.py", "--images", ROOT / "README.md", "--weights", "line_reader.pth", cwd=tmp_path,
                       check=False)
    assert named.returncode == 2 and "a line reader (train_reader.py), not a digit classifier" in named.stderr


def test_a_killed_reader_run_resumes_exactly(tmp_path, mnist_dir):
    args = ["--data-dir", mnist_dir, *SMOKE]
    (tmp_path / "straight").mkdir()
    run_script("train_reader.py", *args, cwd=tmp_path / "straight")
    folder = tmp_path / "killed"
    folder.mkdir()
    resume_file = folder / "line_reader.resume.pth"
    assert killed_once_saved([sys.executable, ROOT / "train_reader.py", *args], resume_file, cwd=folder), \
        "the run ended before its first epoch was saved"
    resumed = run_script("train_reader.py", *args, cwd=folder)
    assert "resuming line_reader.pth after epoch" in resumed.stdout
    losses = lambda folder: [(r["train_loss"], r["val_loss"]) for r in cli.read_json(  # noqa: E731
        checkpoints.history_path(folder / "line_reader.pth"))]
    assert losses(folder) == losses(tmp_path / "straight")
    assert not resume_file.exists()


def test_dev_numbers_prints_whole_numbers_against_one_by_one(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "tools" / "dev_numbers.py", "--sources", "uci", "--uci", "6",
                             "--tta", "1", "--weights", checkpoints.RELEASED_MODEL, "--scratch", tmp_path],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| UCI, even half | 6 |"))
    assert len(row.split("|")) == 7
    assert len(list(tmp_path.glob("uci_*_digit*.jpg"))) == 24 and len(list(tmp_path.glob("uci_*.jpg"))) == 30
