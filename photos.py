"""People's images to MNIST-like digits: a photo or drawing of one digit, or of a whole number.

MNIST's recipe, which every image goes through before a model sees it: white ink on black, the digit's bounding box
scaled to fit 20x20 keeping its aspect ratio, then placed in a 28x28 field with its centre of mass at the centre.
In this file: reading an image file safely (size limits, EXIF, transparency), one digit (preprocess_image), finding
the image files a command names, then the digits of a whole number (find_digits: marks, lines of writing and the
line reader's input, the digits it reads on them), and the photo with its digits' boxes drawn. Models' weights are
not here: find_digits asks a line reader it is given.
"""
import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import UserError, brief
from data import IMAGE_SIZE
from models import LineReader

# ----------------------------------------------------------------------------- one digit

MAX_IMAGE_PIXELS = 50 * 10**6  # above this, refused before decoding: 50 megapixels is already 200 MB as float

DECODE_SIZE = 2048             # a JPEG larger than this on both sides is decoded at a reduced scale

INK_THRESHOLD = 0.25  # after the contrast stretch, fainter pixels are paper texture or noise...
LOW_INK = 0.10        # ...unless they join ink above it: a thin or faint stroke of the digit (hysteresis)
SPECK_SHARE = 0.02    # a piece of ink smaller than this share of the largest is a speck of dirt or noise
# Each pixel is weighed against the darkest ink within LOCAL_WINDOW of the digit's height around it: below 45% of that
# it is paper (the blurred halo beside a stroke), from 75% on full ink. A thin stroke, which blur and JPEG leave
# fainter than a broad one, is then as much ink as the broad one (chosen on the dev set, tools/dev_set.py).
LOCAL_WINDOW, LOCAL_RAMP = 0.35, (0.45, 0.75)
# MNIST's median stroke width as a share of the digit's height: the first 3,000 MNIST training digits through
# digit_ink's steps up to the width, measured by stroke_width (10th to 90th percentile: 0.088 to 0.172;
# docs/measurements.md). A digit's strokes are brought to it, at WORK_HEIGHT pixels, unless they are within
# STROKE_BAND of it: a hairline is thickened, a broad pen thinned (never so far that the digit loses half its ink or
# falls apart).
MNIST_STROKE = 0.125
WORK_HEIGHT = 64
STROKE_BAND = (0.8, 1.25)

MIN_INK_PIXELS = 12   # fewer than this above the threshold: no digit in the image
NO_DIGIT = "no digit found (the image is blank or has too little contrast)"

def image_name(source, name=None):
    """What messages call an image: `name` when given, else its path, else "the image" (an open PIL image)."""
    if name is not None:
        return name
    return source if isinstance(source, (str, Path)) else "the image"


def read_greyscale(source, name=None):
    """An image file (or an open PIL image) -> float [H, W] in 0..1, the way it is meant to be seen.

    Guards every image read: the size is checked from the header before anything is decoded (a large JPEG
    is decoded at a reduced scale instead), a phone's EXIF orientation is applied, and transparency is
    composited onto white paper. Messages call the image `name` (default: image_name's).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    name = image_name(source, name)
    try:
        with warnings.catch_warnings():  # PIL warns from 89 megapixels on; the cap below is stricter and one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source) if isinstance(source, (str, Path)) else contextlib.nullcontext(source)
        with opened as image:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that is enough
            image.draft("RGB", (DECODE_SIZE, DECODE_SIZE))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{name}: {image.width}x{image.height} pixels, more than a photo of a digit needs "
                                f"(at most {MAX_IMAGE_PIXELS // 10**6} megapixels); scale it down")
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                paper = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(paper, image.convert("RGBA"))
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as error:
        raise UserError(f"{name}: not a readable image ({brief(error)})") from None
    return grey

def border_pixels(image):
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])

def ink_on_black(grey, invert="auto"):
    """White ink on black as MNIST has it; 'auto' inverts when the border (the paper) is light."""
    if invert == "yes" or (invert == "auto" and np.median(border_pixels(grey)) > 0.5):
        return 1 - grey
    return grey

def preprocess_image(source, invert="auto", name=None):
    """An image file or a PIL image of a digit -> uint8 [28, 28] as an MNIST sample looks (normalization comes later).

    Messages call the image `name` (default: the path, or "the image"), e.g. "the drawing" for the page's
    canvas.
    """
    name = image_name(source, name)
    stretched = even_out_lighting(ink_on_black(read_greyscale(source, name), invert))
    return mnist_digit(digit_ink(stretched, name)[0])


def digit_ink(stretched, name):
    """(the digit's ink, cropped to it: float [h, w] in 0..1, its strokes of MNIST's width; its box (left, top, right,
    bottom) in the image, the ends exclusive) from a photo's ink stretched to 0..1 over its paper (even_out_lighting).
    Too little ink is an error named after the image."""
    mask = joined_ink(stretched)
    if (mask & (stretched > INK_THRESHOLD)).sum() < MIN_INK_PIXELS:
        raise UserError(f"{name}: {NO_DIGIT}")
    return own_ink(stretched, mask)


def own_ink(stretched, mask):
    """(the ink under `mask` (bool [H, W]), cropped to it, each pixel weighed against the ink near it, its strokes of
    MNIST's width; the mask's box (left, top, right, bottom), the ends exclusive)."""
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    ink = against_local_ink(np.where(mask, stretched, 0)[top:bottom, left:right])
    return at_mnist_stroke(ink), (int(left), int(top), int(right), int(bottom))


def joined_ink(stretched):
    """bool [H, W]: the pixels above LOW_INK that join ink above INK_THRESHOLD (hysteresis), less specks (pieces under
    SPECK_SHARE of the largest)."""
    from scipy import ndimage
    labels, count = ndimage.label(stretched > LOW_INK, np.ones((3, 3)))
    strong = np.bincount(labels[stretched > INK_THRESHOLD], minlength=count + 1)
    area = np.bincount(labels.ravel(), minlength=count + 1)
    strong[0] = area[0] = 0                                              # label 0 is the paper
    return ((strong > 0) & (area >= SPECK_SHARE * area.max()))[labels]


def against_local_ink(ink):
    """A digit's ink (float [h, w], 0 off the digit) -> 0..1: each pixel against the darkest ink within LOCAL_WINDOW
    of the height around it, through LOCAL_RAMP."""
    from scipy import ndimage
    local = ndimage.maximum_filter(ink, size=max(3, round(LOCAL_WINDOW * ink.shape[0])))
    low, high = LOCAL_RAMP
    return np.clip((ink / np.maximum(local, 1e-6) - low) / (high - low), 0, 1).astype(np.float32)


def at_mnist_stroke(ink):
    """The ink (float [h, w] 0..1) at WORK_HEIGHT on its longer side, its strokes brought to MNIST_STROKE of its height
    unless within STROKE_BAND of it, cropped again."""
    size = [max(1, round(side * WORK_HEIGHT / max(ink.shape))) for side in ink.shape]
    return cropped(with_mnist_stroke(np.pad(rescaled(ink, size), 8)))


def rescaled(ink, size):
    """float [h, w] -> float `size`: bilinear when it grows, max-pooled when it shrinks (no thin stroke fades)."""
    return resized(ink, size) if size[0] >= ink.shape[0] else max_pooled(ink, size)


def with_mnist_stroke(ink):
    """Ink at WORK_HEIGHT (float [h, w] 0..1, with room around it) with its strokes brought to MNIST_STROKE of the
    height its ink spans, unless within STROKE_BAND of it; the same shape."""
    from scipy import ndimage
    strokes = ink > 0.5
    if strokes.any():
        width = stroke_width(strokes)
        rows = np.flatnonzero(strokes.any(1))
        target = MNIST_STROKE * (rows[-1] - rows[0] + 1)
        if width < STROKE_BAND[0] * target:
            ink = ndimage.grey_dilation(ink, footprint=disk(max(1, round((target - width) / 2))))
        elif width > STROKE_BAND[1] * target:
            thinner = ndimage.grey_erosion(ink, footprint=disk(max(1, round((width - target) / 2))))
            kept = thinner > 0.5
            if kept.sum() >= 0.5 * strokes.sum() and ndimage.label(kept)[1] <= ndimage.label(strokes)[1]:
                ink = thinner
    return ink


def cropped(ink, level=0.05):
    """float [h, w] cut down to the rows and columns that hold ink above `level`."""
    rows, columns = np.flatnonzero(ink.max(1) > level), np.flatnonzero(ink.max(0) > level)
    return ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]


def stroke_width(strokes):
    """The median width in pixels of a digit's strokes (bool [h, w]): twice their depth along their middle, where the
    distance to the paper peaks."""
    from scipy import ndimage
    depth = ndimage.distance_transform_edt(strokes)
    middle = strokes & (depth >= ndimage.maximum_filter(depth, 3))
    return 2 * float(np.median(depth[middle]))


def disk(radius):
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius + 0.5


def above_threshold(stretched):
    """What is fainter than INK_THRESHOLD is paper, the rest is stretched to 0..1 (a page's ink, for finding marks)."""
    return np.clip((stretched - INK_THRESHOLD) / (1 - INK_THRESHOLD), 0, 1)


def ink_box(image, name):
    """(top, bottom, left, right) of the ink, the ends exclusive; too little ink is an error named after the image."""
    ink = image > 0
    if ink.sum() < MIN_INK_PIXELS:
        raise UserError(f"{name}: {NO_DIGIT}")
    rows, columns = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return rows[0], rows[-1] + 1, columns[0], columns[-1] + 1


def resized(image, size):
    """float [h, w] -> float size (height, width), bilinear and antialiased when shrinking, clamped to 0..1."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]  # [1, 1, H, W]
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0].clamp_(0, 1).numpy()


def max_pooled(image, size):
    """float [h, w] -> float size, smaller: each pixel the darkest ink it covers, so that no stroke, however thin,
    fades when the digit shrinks."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.adaptive_max_pool2d(tensor, tuple(size))[0, 0].numpy()


def fit_in_box(image, box=20):
    """Resize so the longer side is `box` pixels, keeping the aspect ratio."""
    scale = box / max(image.shape)
    return resized(image, [max(1, round(side * scale)) for side in image.shape])


def centre_by_mass(image, size=IMAGE_SIZE):
    """Paste into a size x size black field with the centre of mass at the field's centre."""
    height, width = image.shape
    total = image.sum()
    centre_y = (image.sum(1) * np.arange(height)).sum() / total
    centre_x = (image.sum(0) * np.arange(width)).sum() / total
    top = int(np.clip(round((size - 1) / 2 - centre_y), 0, size - height))
    left = int(np.clip(round((size - 1) / 2 - centre_x), 0, size - width))
    field = np.zeros((size, size), dtype=np.float32)
    field[top:top + height, left:left + width] = image
    return field


def mnist_digit(ink):
    """The ink of one digit, cropped to it (float [h, w] 0..1) -> uint8 [28, 28] fitted in 20x20 and centred by mass."""
    field = centre_by_mass(fit_in_box(ink))
    return torch.from_numpy(np.round(field * 255).astype(np.uint8))


def even_out_lighting(grey):
    """White ink on black [H, W] -> the ink stretched to 0..1 above the paper's level, which is fitted as a smooth
    surface over the whole page (so a lighting gradient is followed) and subtracted."""
    height, width = grey.shape
    small = F.interpolate(torch.from_numpy(grey)[None, None], size=(min(height, 64), min(width, 64)),
                          mode="area")[0, 0].numpy()                      # [h, w] <= 64x64
    terms = quadratic_terms(*small.shape)
    paper = small <= np.median(small)                                    # the paper, first guess: the darker half
    for _ in range(3):
        coefficients = np.linalg.lstsq(terms[paper], small[paper], rcond=None)[0]
        residual = small - terms @ coefficients
        paper = residual <= 0.15 * max(residual.max(), 1e-6)
    lifted = np.clip(grey - quadratic_terms(height, width) @ coefficients, 0, None)
    return (lifted / max(lifted.max(), 1e-6)).astype(np.float32)


def quadratic_terms(height, width):
    """float [height, width, 6]: 1, x, y, x^2, xy, y^2 over the page, x and y from 0 to 1."""
    ys, xs = np.mgrid[0:1:height * 1j, 0:1:width * 1j]
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], -1)


# ----------------------------------------------------------------------------- finding image files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def find_images(paths):
    """(image files, problems): folders are searched (not recursively) for image files; problems name bad paths."""
    files, problems = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            # a FIFO or device named like an image would block the read forever: only regular files are read
            problems += [f"{p}: not a regular file, skipped" for p in found if not p.is_file()]
            files += [p for p in found if p.is_file()]
        elif path.is_file():
            files.append(path)
        elif path.exists():
            problems.append(f"{path}: not a regular file or folder, skipped")
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


# ----------------------------------------------------------------------------- the digits of a number in a photo

# Threshold the page once, label the ink's connected components, join the pieces of one digit, drop specks and ruled
# lines, order the marks in lines of writing; then the line reader (models.LineReader) reads each line, deciding
# where its digits are, and each digit's own pixels are read as a photo of it alone would be, the image the digit
# classifier sees. Lengths are in units of the writing's height, measured from the page.

MAX_DIGITS = 64            # more digit-sized marks than this is not a number
FAINT_INK = 0.12           # smoothed ink above this joins the pieces of a digit (below INK_THRESHOLD)
SPECK = 0.15               # components smaller than this many heights squared are specks of dirt or noise
RULED_LINE = 2.0           # a horizontal run of ink this many heights long is a ruled line (no digit stroke is)
JOIN_GAP = 0.15            # pieces of one digit: over each other, at most this far apart, together a digit tall
JOIN_HEIGHT = 1.3
SMALL, NEAR, JOIN_WIDTH = 0.5, 0.3, 1.2   # fragments: under half a height tall, joined within 0.3 heights
JOIN_SHARE = 0.25          # two fragments over each other share this much of the narrower's columns (a 5's bar leans)
FLAT = 0.8                 # a fragment this many heights wide that joins nothing is a digit written flat


@dataclass
class FoundDigits:
    """The digits of a photo in reading order: images uint8 [N, 28, 28], MNIST-like; for each its box
    (left, top, right, bottom; the ends exclusive, in the photo's pixels) and its line (0 first)."""
    images: torch.Tensor
    boxes: list
    lines: list
    probabilities: torch.Tensor = None  # float [N, 10] as the line reader read them; None for one digit alone


def find_digits(source, read_lines, invert="auto", name=None):
    """A photo or drawing of a number (a path or PIL image) -> FoundDigits, left to right, line by line.

    `read_lines` reads lines of writing as line_of makes them ([float [LINE_HEIGHT, W]] -> the line reader's
    probabilities per frame, [float [T, 11]]): it decides where each line's digits are, and reads them. A photo of
    one mark that the reader reads as one digit, with no ruled line removed, gives exactly preprocess_image's digit
    and no probabilities: one digit alone reads as --images reads it. No digit, or more than MAX_DIGITS marks, is one
    line (UserError).
    """
    name = image_name(source, name)
    stretched, ink, ruled, marks = find_marks(source, invert, name)
    lines = writing_lines(marks, ink)
    rows = [line_digits(line, frames) for line, frames in zip(lines, read_lines([line.image for line in lines]),
                                                              strict=True)]
    if len(marks) == 1 and not ruled and len(rows[0]) == 1:
        alone, box = digit_ink(stretched, name)                          # preprocess_image's path from here
        return FoundDigits(mnist_digit(alone)[None], [box], [0])
    digits = [(k, mark, p) for k, row in enumerate(rows) for mark, p in row]
    return FoundDigits(torch.stack([number_digit(mark, stretched) for _, mark, _ in digits]),
                       [mark.box_ltrb for _, mark, _ in digits], [k for k, _, _ in digits],
                       torch.stack([p for _, _, p in digits]))


# The line reader's input (models.LineReader): a line of writing at WORK_HEIGHT with MNIST's stroke width, then scaled
# to fill LINE_HEIGHT less LINE_MARGIN above and below it, with LINE_MARGIN beside it (writing.digit_lines makes its
# training lines so).
LINE_HEIGHT = 32
LINE_MARGIN = 3
EDGE_FRAMES = 2  # a digit's first frame is this close to where it begins (digit_edges)


@dataclass
class Line:
    """A line of writing: its ink as the line reader reads it (float [LINE_HEIGHT, W] 0..1), its mark on the page (all
    its pixels), and the line image's pixels per page pixel."""
    image: torch.Tensor
    mark: "Mark"
    scale: float


def writing_lines(marks, ink):
    """[Line] of a page's marks (find_marks; ink: the page's, above_threshold's 0..1), top line first."""
    return [line_of(functools.reduce(Mark.joined, row), ink) for row in reading_lines(marks)]


def line_of(mark, ink):
    """The Line of the mark of a whole line."""
    work = rescaled(mark.ink(ink), (WORK_HEIGHT, max(1, round(mark.width * WORK_HEIGHT / mark.height))))
    work = with_mnist_stroke(np.pad(work, 8))[8:-8, 8:-8]
    scale = (LINE_HEIGHT - 2 * LINE_MARGIN) / mark.height
    image = np.pad(resized(work, (LINE_HEIGHT - 2 * LINE_MARGIN, max(1, round(mark.width * scale)))), LINE_MARGIN)
    return Line(torch.from_numpy(image / max(float(image.max()), 1e-3)), mark, scale)


def line_digits(line, frames):
    """What the line reader read on a line: [(the digit's Mark, its probabilities float [10])], left to right.

    frames: the reader's probabilities per frame, float [T, 11] (class 0 the blank, k + 1 the digit k). A digit owns
    the line's pixels up to the column of least ink just before the next digit's frames (digit_edges); its
    probabilities are its surest frame's. A line always gets a digit: if the reader reads none, its frame least sure
    of a blank says one.
    """
    spans = LineReader.decode(frames[None], torch.tensor([line.image.shape[1]]))[0]
    if not spans:
        frame = int(frames[:, 0].argmin())
        spans = [(int(frames[frame, 1:].argmax()), frame, frame)]
    bounds = [-math.inf, *digit_edges(spans, line.image), math.inf]
    columns = (np.arange(line.mark.width) + 0.5) * line.scale + LINE_MARGIN  # each page column's centre, in the line
    digits = []
    for (_, first, last), start, stop in zip(spans, bounds, bounds[1:], strict=False):
        part = line.mark.part(line.mark.pixels & ((columns >= start) & (columns < stop))[None])
        if part is not None:
            surest = frames[first + int(frames[first:last + 1, 0].argmin())]
            digits.append((part, surest[1:] / surest[1:].sum()))
    return digits


def digit_edges(spans, image):
    """Where each digit of a line ends and the next begins, in the line image's columns (float): the column of least
    ink (the rightmost of several) from EDGE_FRAMES frames before the next digit's first frame to the middle of that
    frame. The reader says a digit on its first columns, so the gap or the place where two digits touch lies just
    before its frames (chosen on numbers of training digits and the dev numbers: docs/measurements.md, The line
    reader). spans: LineReader.decode's (digit, first frame, last frame)."""
    profile = image.sum(0).numpy()                                       # ink per column [W]
    stride, edges = LineReader.STRIDE, []
    for (_, _, last), (_, first, _) in zip(spans, spans[1:], strict=False):
        start = max(stride * (last + 1), stride * (first - EDGE_FRAMES))
        columns = np.arange(start, max(start, min(stride * first + stride // 2, len(profile) - 1)) + 1)
        edges.append(columns[np.lexsort((-columns, profile[columns]))[0]] + 0.5)
    return edges


def number_digit(mark, stretched):
    """uint8 [28, 28]: one digit of a number as a photo of it alone is read (digit_ink's steps), from its own pixels of
    the page's ink stretched over the paper: its faint strokes kept, each pixel weighed against the ink near it (so a
    digit written fainter than its neighbours reads as it would alone), MNIST's stroke width, MNIST's recipe."""
    own = np.where(mark.pixels, stretched[mark.box], 0)
    mask = joined_ink(own)
    return mnist_digit(own_ink(own, mask if mask.any() else own > 0)[0])


def find_marks(source, invert="auto", name=None):
    """(the ink stretched over the paper [H, W] (even_out_lighting), the ink 0..1 less ruled lines, whether a ruled
    line was removed, the marks: one per digit, or per group of touching digits) for a photo; no digit or more than
    MAX_DIGITS is a UserError."""
    from scipy import ndimage
    name = image_name(source, name)
    grey = ink_on_black(read_greyscale(source, name), invert)
    stretched = even_out_lighting(grey)                                  # float [H, W] 0..1
    ink = above_threshold(stretched)                                     # 0 where paper
    ink_box(ink, name)                                                   # too little ink: "no digit found"
    # A digit's pieces stay one component where faint ink joins them: the smoothed ink above a lower threshold,
    # where it holds ink above the threshold. Label 0 is the paper: a noise pixel above the threshold that smoothing
    # leaves faint must not make the whole page ink.
    faint = ndimage.gaussian_filter(stretched, 1.0) > FAINT_INK
    labels, _ = ndimage.label(faint, np.ones((3, 3)))
    mask = np.isin(labels, np.setdiff1d(labels[ink > 0], [0]))
    height = writing_height(ndimage.label(mask, np.ones((3, 3)))[0])
    ruled_lines = long_runs(mask, RULED_LINE * height)
    if ruled_lines.any():
        mask = remove_lines(mask, ruled_lines)
        ink = np.where(mask, ink, 0)
    labels, _ = ndimage.label(mask, np.ones((3, 3)))
    pieces = [Mark(labels[box] == k + 1, box) for k, box in enumerate(ndimage.find_objects(labels))]
    pieces = [piece.trimmed(ink) for piece in pieces if piece.ink_area(ink) >= (SPECK * height) ** 2]
    marks = join_pieces(pieces, height)
    if not marks:
        raise UserError(f"{name}: {NO_DIGIT}")
    if len(marks) > MAX_DIGITS:
        raise UserError(f"{name}: {len(marks)} digit-sized marks, more than a number has (at most {MAX_DIGITS}): "
                        "not a number")
    return stretched, ink, bool(ruled_lines.any()), marks


def writing_height(labels):
    """The height of the writing in pixels: the 75th percentile of the large components' heights (a fifth of the
    largest's area or more): a digit in pieces (a 5's bar, a broken stroke) brings lower heights with it."""
    from scipy import ndimage
    boxes = ndimage.find_objects(labels)
    areas = np.bincount(labels.ravel())[1:]
    large = areas >= 0.2 * areas.max()
    return float(np.percentile([box[0].stop - box[0].start for box, big in zip(boxes, large, strict=True) if big], 75))


def long_runs(mask, length):
    """bool [H, W]: the pixels of horizontal runs of ink at least `length` long (gaps of one or two pixels bridged)."""
    from scipy import ndimage
    bridged = ndimage.binary_closing(mask, np.ones((1, 5)))
    edges = np.diff(np.pad(bridged, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    starts, ends = np.argwhere(edges == 1), np.argwhere(edges == -1)   # row by row, in the same order
    runs = np.zeros_like(mask)
    for (row, start), (_, end) in zip(starts, ends, strict=True):
        if end - start >= length:
            runs[row, start:end] = True
    return runs & mask


def remove_lines(mask, ruled_lines):
    """The ink less its ruled lines, except where a digit's stroke crosses one (ink just above and just below)."""
    from scipy import ndimage
    thickness = max(1, int(np.ceil(ruled_lines.sum() / max(ruled_lines.any(0).sum(), 1))))  # pixels per column of line
    rest = mask & ~ruled_lines
    crossings = ndimage.binary_closing(rest, np.ones((thickness + 3, 1))) & ruled_lines
    return rest | crossings


class Mark:
    """Some of a photo's ink: its own pixels (bool, inside its box) and where that box lies (rows, columns slices)."""

    def __init__(self, pixels, box):
        self.pixels, self.box = pixels, box
        self.top, self.bottom = box[0].start, box[0].stop
        self.left, self.right = box[1].start, box[1].stop
        self.area = int(pixels.sum())

    @property
    def height(self):
        return self.bottom - self.top

    @property
    def width(self):
        return self.right - self.left

    @property
    def box_ltrb(self):
        return (int(self.left), int(self.top), int(self.right), int(self.bottom))

    def ink(self, ink):
        """The page's ink inside this mark's pixels: float [h, w]."""
        return np.where(self.pixels, ink[self.box], 0)

    def ink_area(self, ink):
        return int((self.ink(ink) > 0).sum())

    def trimmed(self, ink):
        """This mark with its pixels and box cut down to where it has ink above the threshold."""
        return self.part(self.pixels & (ink[self.box] > 0))

    def joined(self, other):
        top, left = min(self.top, other.top), min(self.left, other.left)
        bottom, right = max(self.bottom, other.bottom), max(self.right, other.right)
        pixels = np.zeros((bottom - top, right - left), dtype=bool)
        for mark in (self, other):
            pixels[mark.top - top:mark.bottom - top, mark.left - left:mark.right - left] |= mark.pixels
        return Mark(pixels, (slice(top, bottom), slice(left, right)))

    def part(self, pixels):
        """The mark made of these of its pixels (bool, its box's shape), its box cut down to them; None for none."""
        if not pixels.any():
            return None
        rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
        box = (slice(self.top + rows[0], self.top + rows[-1] + 1), slice(self.left + cols[0], self.left + cols[-1] + 1))
        return Mark(pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], box)


def join_pieces(pieces, height):
    """Marks, one per digit: pieces over each other (a 5's bar, a 4 in two strokes, a broken stroke) are joined when
    they overlap sideways by half the narrower one, lie at most JOIN_GAP heights apart and make at most JOIN_HEIGHT
    heights together."""
    marks = sorted(pieces, key=lambda mark: mark.left)
    joined = True
    while joined:
        joined = False
        for i, j in itertools.combinations(range(len(marks)), 2):
            a, b = marks[i], marks[j]
            gap = max(a.top, b.top) - min(a.bottom, b.bottom)
            tall = max(a.bottom, b.bottom) - min(a.top, b.top)
            if over_each_other(a, b) and gap <= JOIN_GAP * height and tall <= JOIN_HEIGHT * height:
                marks[i] = a.joined(b)
                del marks[j]
                joined = True
                break
    return join_fragments(marks, height)


def join_fragments(marks, height):
    """Marks less than SMALL heights tall (a bar, a tail, a broken stroke's end): two over each other (sharing
    JOIN_SHARE of the narrower one's columns: a slanted 5's bar leans off its body) that are a digit tall together
    are one digit (a small 5, or a digit broken across its middle); the rest are joined to the nearest mark when it is
    at most NEAR heights away and the two are at most a digit wide and JOIN_HEIGHT tall together. A fragment that
    joins nothing is dropped (over or under a digit, a bar or a tail too far out), unless it is FLAT heights wide or
    more and beside the others (over none of them, though a slanted neighbour may reach over its end): a digit written
    flat (a wide 5 or 2)."""
    whole = [m for m in marks if m.height >= SMALL * height]
    fragments = [m for m in marks if m.height < SMALL * height]
    for a, b in itertools.combinations(fragments, 2):
        joined = a.joined(b)
        if (a in fragments and b in fragments and over_each_other(a, b, JOIN_SHARE)
                and joined.width <= JOIN_WIDTH * height and SMALL * height <= joined.height <= JOIN_HEIGHT * height):
            whole.append(joined)
            fragments = [m for m in fragments if m is not a and m is not b]
    for fragment in sorted(fragments, key=lambda m: -m.area):
        near = [(distance, k) for k, m in enumerate(whole) if (distance := box_distance(m, fragment)) <= NEAR * height]
        for _, k in sorted(near):
            joined = whole[k].joined(fragment)
            if joined.width <= JOIN_WIDTH * height and joined.height <= JOIN_HEIGHT * height:
                whole[k] = joined
                break
        else:
            if fragment.width >= FLAT * height and not any(over_each_other(fragment, m) for m in whole):
                whole.append(fragment)
    return sorted(whole, key=lambda mark: mark.left)


def sideways_overlap(a, b):
    """How many columns two marks share (negative: the gap between them)."""
    return min(a.right, b.right) - max(a.left, b.left)


def over_each_other(a, b, share=0.5):
    """Whether two marks share at least this share of the narrower one's columns: one above the other."""
    return sideways_overlap(a, b) >= share * min(a.width, b.width)


def box_distance(a, b):
    """The distance between two marks' boxes, 0 where they overlap."""
    return math.hypot(max(0, a.left - b.right, b.left - a.right), max(0, a.top - b.bottom, b.top - a.bottom))


def reading_lines(marks):
    """The marks in lines of writing, top line first, each left to right: a mark belongs to the line above when it
    overlaps that line's rows by a quarter of its own height."""
    lines = []
    for mark in sorted(marks, key=lambda m: (m.top + m.bottom) / 2):
        if lines and mark.top < lines[-1]["bottom"] - 0.25 * mark.height:
            lines[-1]["marks"].append(mark)
            lines[-1]["bottom"] = max(lines[-1]["bottom"], mark.bottom)
        else:
            lines.append({"marks": [mark], "bottom": mark.bottom})
    return [sorted(line["marks"], key=lambda m: (m.left + m.right) / 2) for line in lines]


# ----------------------------------------------------------------------------- the boxes found, drawn

def boxed_photo(source, boxes, labels):
    """The photo as it was read (upright, grey) with each digit's box (left, top, right, bottom) drawn and numbered in
    reading order, with its label."""
    from PIL import Image, ImageDraw
    photo = Image.fromarray(np.round(read_greyscale(source) * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(photo)
    width = max(1, round(max(photo.size) / 300))
    for k, (left, top, right, bottom) in enumerate(boxes, 1):
        draw.rectangle([left, top, right - 1, bottom - 1], outline=(220, 30, 30), width=width)
        draw.text((left, max(0, top - 12)), f"{k}: {int(labels[k - 1])}", fill=(220, 30, 30))
    return photo
