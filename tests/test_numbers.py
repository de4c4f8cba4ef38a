"""Whole numbers: DigitReader.read_number (the marks of a photo, its lines of writing, the line reader's digits) and
--images --number, on generated pages and on cases built by hand."""
import io

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_script
from number_page import number_page
from photo_render import render_as_photo
from PIL import Image, ImageDraw

import checkpoints
import cli
import data
import photos
from predict_tta import DigitReader


@pytest.fixture(scope="module")
def reader():
    return DigitReader(checkpoints.RELEASED_MODEL, device="cpu", precision="fp32")   # fp32: the same on every CPU


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return data.load_mnist(mnist_dir, "test")


def page(*digits, size=(360, 120), line=None):
    """White paper with MNIST digits [28, 28] pasted dark, 2x enlarged, at (left, top) each; a ruled line at a row."""
    paper = np.full(size[::-1], 255, dtype=np.uint8)
    for digit, (left, top) in digits:
        big = np.asarray(Image.fromarray(digit.numpy()).resize((56, 56), Image.BILINEAR))
        region = paper[top:top + 56, left:left + 56]
        region[:] = np.minimum(region, 255 - big)
    if line is not None:
        paper[line:line + 2] = 60
    return Image.fromarray(paper)


def test_generated_numbers_are_read_at_small_sizes(reader, mnist_test):
    """Seeded numbers of 3 digits, 28-36 px tall, 4 per condition: read right, each box on its digit; at most one
    number of the 12 misread (the README's table gives the rates, on 1,000 numbers per condition; touching digits,
    read less well, have their own test)."""
    images, labels = mnist_test
    rng = np.random.default_rng(7)
    misread = []
    for condition in ("gaps", "ruled", "two lines"):
        for _ in range(4):
            picks = rng.choice(len(images), 3, replace=False)
            jpeg, text, _, boxes = number_page(images[picks].numpy(), labels[picks].numpy(), rng, condition,
                                               height=rng.uniform(28, 36))
            number = reader.read_number(Image.open(io.BytesIO(jpeg)))
            if number.text != text:
                misread.append((condition, text, number.text))
                continue
            assert number.images.shape == (3, 28, 28) and number.probabilities.shape == (3, 10)
            for (left, top, right, bottom), truth in zip(number.boxes, boxes, strict=True):  # each box on its digit
                centre = ((left + right) / 2, (top + bottom) / 2)
                assert truth[0] <= centre[0] < truth[2] and truth[1] <= centre[1] < truth[3], (condition, text)
    assert len(misread) <= 1, misread


def test_digits_are_ordered_left_to_right_and_line_by_line(reader, mnist_test):
    images, labels = mnist_test
    eight, three, one, four = (images[int(np.flatnonzero(labels == d)[0])] for d in (8, 3, 1, 4))
    # pasted right to left, and the right digit a little higher: still read left to right
    found = reader.read_number(page((eight, (200, 20)), (three, (40, 40))))
    assert found.text == "38" and found.lines == [0, 0] and 40 <= found.boxes[0][0] < found.boxes[0][2] <= 96
    assert 200 <= found.boxes[1][0] < found.boxes[1][2] <= 256
    two_lines = reader.read_number(page((one, (150, 150)), (four, (40, 10)), (eight, (40, 150)), (three, (150, 10)),
                                        size=(260, 240)))
    assert two_lines.text == "43 81" and two_lines.lines == [0, 0, 1, 1]
    assert two_lines.boxes[0][0] < two_lines.boxes[1][0] and two_lines.boxes[2][0] < two_lines.boxes[3][0]
    assert max(b[3] for b in two_lines.boxes[:2]) < min(b[1] for b in two_lines.boxes[2:])


def test_pieces_of_one_digit_are_joined(reader):
    paper = Image.new("L", (300, 140), "white")
    pen = ImageDraw.Draw(paper)
    pen.line([(60, 40), (60, 70), (85, 68), (92, 85), (85, 102), (58, 104)], fill=0, width=6)  # a 5's body
    pen.line([(66, 30), (95, 30)], fill=0, width=6)                   # its bar, apart from the body
    pen.line([(160, 30), (160, 80), (200, 80)], fill=0, width=6)      # a 4 in two strokes that do not meet
    pen.line([(190, 40), (190, 110)], fill=0, width=6)
    pen.line([(250, 40), (250, 70)], fill=0, width=6)                 # a 1 broken in the middle
    pen.line([(250, 74), (250, 104)], fill=0, width=6)
    found = reader.read_number(paper)
    assert found.text == "541"
    assert found.boxes[0][1] <= 28 and found.boxes[0][3] >= 106       # the 5 with its bar
    assert found.boxes[1][0] <= 158 and found.boxes[1][2] >= 192      # the 4's two strokes
    assert found.boxes[2][1] <= 40 and found.boxes[2][3] >= 104       # the 1's two pieces, joined


def test_a_digit_broken_across_its_middle_and_one_written_flat_are_kept(reader):
    """Both are made of marks under half the writing's height: two over each other, a digit tall together, are one
    digit, however far apart (a small 5 too, its bar leaning off its body); a mark that joins nothing is a digit when
    it is about as wide as the writing is tall and beside the others, not over one (a bar too long to join its digit),
    though a slanted neighbour may reach over its end."""
    paper = Image.new("L", (580, 140), "white")
    pen = ImageDraw.Draw(paper)
    for left in (40, 140):                                            # two whole digits set the writing's height
        pen.line([(left, 30), (left + 30, 30), (left + 10, 110)], fill=0, width=6)
    pen.line([(240, 30), (270, 30), (270, 55)], fill=0, width=6)      # a 3's top half, 25 px...
    pen.line([(270, 85), (270, 110), (240, 110)], fill=0, width=6)    # ...over its bottom half, 30 px below it
    pen.line([(390, 50), (310, 50), (310, 70), (390, 70), (390, 85), (310, 85)], fill=0, width=6)  # a 5, flat
    pen.line([(440, 50), (440, 110)], fill=0, width=6)                # a 1 under a long bar, too wide to join it
    pen.line([(430, 30), (545, 30)], fill=0, width=6)
    found = reader.read_number(paper)
    assert len(found.boxes) == 5, (found.text, found.boxes)
    assert found.boxes[4][1] >= 45                                     # the 1, its bar dropped
    assert found.boxes[2][1] <= 30 and found.boxes[2][3] >= 110       # the 3's halves, joined
    assert found.boxes[3][0] <= 310 and found.boxes[3][2] >= 390      # the flat 5, kept

    paper = Image.new("L", (320, 140), "white")                       # a flat 5 that a slanted 7 reaches under
    pen = ImageDraw.Draw(paper)
    for left in (40, 140):
        pen.line([(left, 30), (left + 30, 30), (left + 10, 110)], fill=0, width=6)
    pen.line([(180, 50), (260, 50)], fill=0, width=6)
    pen.line([(180, 70), (260, 70), (260, 85), (180, 85)], fill=0, width=6)
    pen.line([(276, 30), (294, 30), (262, 110)], fill=0, width=6)
    found = reader.read_number(paper)
    assert len(found.boxes) == 4, (found.text, found.boxes)
    assert found.boxes[2][0] <= 180 and found.boxes[2][2] >= 260      # kept: over none of the others

    paper = Image.new("L", (340, 140), "white")                       # a small 5 whose bar leans off its body
    pen = ImageDraw.Draw(paper)
    for left in (40, 140):
        pen.line([(left, 30), (left + 30, 30), (left + 10, 110)], fill=0, width=6)
    pen.line([(256, 60), (290, 60)], fill=0, width=6)                 # shares a third of its columns with the body
    pen.line([(240, 66), (240, 80), (262, 80), (268, 92), (262, 104), (238, 104)], fill=0, width=6)
    found = reader.read_number(paper)
    assert len(found.boxes) == 3, (found.text, found.boxes)
    assert found.boxes[2][1] <= 58 and found.boxes[2][3] >= 106       # bar and body, joined


def test_touching_digits_are_read_apart(reader, mnist_test):
    images, labels = mnist_test
    picks = [int(np.flatnonzero(labels == d)[3]) for d in (2, 0, 7)]
    two, zero, seven = (images[k] for k in picks)
    # the 2 and the 0 overlap by 4 px (2 at 28 px): one blob of ink
    photo = page((two, (40, 30)), (zero, (40 + 36, 30)), (seven, (200, 30)))
    number = reader.read_number(photo)
    assert number.text == "207" and len(number.boxes) == 3
    (left, _, right, _), (left0, _, right0, _) = number.boxes[:2]
    assert 40 <= left < right <= left0 + 6 and right0 <= 76 + 56


def test_a_line_of_touching_digits_is_read_right_with_its_boxes_in_order(reader, mnist_test):
    """Six digits 56 px tall, 34 px apart: the wide ones' ink (about 40 px) overlaps its neighbours'."""
    images, labels = mnist_test
    digits = [images[int(np.flatnonzero(labels == d)[5])] for d in (3, 0, 4, 8, 5, 9)]
    lefts = [20 + 34 * k for k in range(6)]
    number = reader.read_number(page(*[(digit, (left, 30)) for digit, left in zip(digits, lefts, strict=True)],
                                     size=(300, 120)))
    assert number.text == "304859", number.text
    assert number.lines == [0] * 6 and number.probabilities.shape == (6, 10) and number.images.shape == (6, 28, 28)
    centres = [(left + right) / 2 for left, _, right, _ in number.boxes]
    assert centres == sorted(centres)
    for centre, left in zip(centres, lefts, strict=True):           # each box on its own digit's 56 px
        assert left + 8 <= centre <= left + 48, (centres, lefts)


def test_ruled_lines_are_removed_and_specks_dropped(reader, mnist_test):
    images, labels = mnist_test
    digits = [images[int(np.flatnonzero(labels == d)[1])] for d in (4, 7, 1)]
    for row in (86, 70):                                             # under the digits, through their lower third
        photo = page(*[(digit, (40 + 90 * k, 30)) for k, digit in enumerate(digits)], line=row)
        speckled = np.asarray(photo).copy()
        speckled[10, 10] = speckled[100, 300] = speckled[12, 200:202] = 0
        found = reader.read_number(Image.fromarray(speckled))
        assert found.text == "471" and all(right - left < 60 for left, _, right, _ in found.boxes), row


def test_a_lone_noise_pixel_is_paper_not_ink(reader, mnist_test):
    """A half-dark pixel alone is above the ink threshold but too faint once smoothed to join any digit's ink: it
    must stay paper, not take the page's paper (label 0 of the faint ink) into the ink with it (a 4-digit page
    read as "no digit found")."""
    images, labels = mnist_test
    digits = [images[int(np.flatnonzero(labels == d)[1])] for d in (4, 7, 1)]
    noisy = np.asarray(page(*[(digit, (40 + 90 * k, 30)) for k, digit in enumerate(digits)])).copy()
    noisy[10, 10] = 128
    found = reader.read_number(Image.fromarray(noisy))
    assert len(found.boxes) == 3 and all(right - left < 60 for left, _, right, _ in found.boxes), found.boxes


def test_a_faint_digit_beside_a_dark_one_is_stretched_as_if_alone(reader, mnist_test):
    """Each digit's contrast is stretched to its own darkest ink, as preprocess_image stretches a photo of one digit:
    a digit written faint beside a dark one is not dimmed by the page's darker ink (it was, to a fifth of its ink)."""
    images, labels = mnist_test
    three = images[int(np.flatnonzero(labels == 3)[0])]
    faint = (three.float() * 0.45).round().to(torch.uint8)            # a grey pen: 45% of the dark one's contrast
    found = reader.read_number(page((three, (40, 30)), (faint, (160, 30))))
    alone = photos.preprocess_image(page((faint, (160, 30)))).float()
    assert len(found.boxes) == 2 and found.images[1].max() >= 250
    assert found.images[1].float().sum() >= 0.9 * alone.sum(), (found.images[1].float().sum(), alone.sum())


def test_one_digit_alone_reads_exactly_as_images_does(reader, mnist_test, tmp_path):
    images, _ = mnist_test
    rng = np.random.default_rng(3)
    for k in range(8):
        path = tmp_path / f"digit{k}.png"
        render_as_photo(images[k].numpy(), rng).save(path)
        number = reader.read_number(path)
        assert torch.equal(number.images, reader.digits(path)), path.name
        assert torch.equal(number.probabilities, reader.predict(path)[1]) and number.lines == [0]


def test_no_digit_and_too_many_marks_are_one_line(reader, tmp_path):
    Image.new("L", (200, 100), "white").save(tmp_path / "blank.png")
    dots = Image.new("L", (800, 400), "white")
    pen = ImageDraw.Draw(dots)
    for k in range(70):                                              # 70 digit-sized blobs
        x, y = 30 + (k % 14) * 54, 30 + (k // 14) * 72
        pen.ellipse([x, y, x + 22, y + 40], outline=0, width=5)
    dots.save(tmp_path / "dots.png")
    with pytest.raises(cli.UserError, match=r"blank.png: no digit found"):
        reader.read_number(tmp_path / "blank.png")
    for read in (reader.read_number, reader.predict):                 # an open PIL image has no name of its own
        with pytest.raises(cli.UserError, match=r"^the image: no digit found"):
            read(Image.new("L", (200, 100), "white"))
    with pytest.raises(cli.UserError, match=r"^\S*dots.png: 70 digit-sized marks, more than a number has "
                       r"\(at most 64\): not a number$"):
        reader.read_number(tmp_path / "dots.png")


def test_number_on_the_command_line(mnist_test, tmp_path):
    images, labels = mnist_test
    rng = np.random.default_rng(11)
    texts = {}
    for name, condition in (("meter", "gaps"), ("sums", "two lines")):
        picks = rng.choice(len(images), 4, replace=False)
        jpeg, texts[name], _, _ = number_page(images[picks].numpy(), labels[picks].numpy(), rng, condition,
                                              height=40)
        (tmp_path / f"{name}.jpg").write_bytes(jpeg)
    (tmp_path / "notes.png").write_text("not an image")
    result = run_script("predict_tta.py", "--weights", checkpoints.RELEASED_MODEL, "--precision", "fp32", "--images",
                        "meter.jpg", "sums.jpg", "notes.png", "--number", "--out", "digits.csv",
                        "--show-preprocessed", "seen", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == ("error: 1 of the inputs could not be read "
                                                                         "(each named above)")
    lines = result.stdout.splitlines()
    for name in ("meter", "sums"):
        line = next(line for line in lines if line.startswith(f"{name}.jpg: "))
        read, sureness = line.removeprefix(f"{name}.jpg: ").split("  ")
        assert read == texts[name]
        assert len(sureness.strip("()").split()) == 4 and all(0 < float(p) <= 1 for p in sureness.strip("()").split())
    frame = pd.read_csv(tmp_path / "digits.csv")
    assert list(frame.columns[:9]) == ["path", "line", "position", "left", "top", "right", "bottom", "label",
                                       "probability"]
    assert len(frame) == 8 and frame.groupby("path").size().tolist() == [4, 4]
    sums = frame[frame.path == "sums.jpg"]
    assert "".join(map(str, sums.label)) == texts["sums"].replace(" ", "")
    assert sums.line.tolist() == [1] * len(texts["sums"].split()[0]) + [2] * len(texts["sums"].split()[1])
    assert np.allclose(frame[[f"p{d}" for d in range(10)]].sum(axis=1), 1, atol=1e-4)
    seen = sorted(p.name for p in (tmp_path / "seen").iterdir())
    assert seen == sorted([f"{n}_digit{k}_28x28.png" for n in ("meter", "sums") for k in range(1, 5)] +
                          ["meter_boxes.png", "sums_boxes.png"])
    assert Image.open(tmp_path / "seen" / "meter_boxes.png").size == Image.open(tmp_path / "meter.jpg").size
    assert "notes.png: not a readable image" in result.stderr
