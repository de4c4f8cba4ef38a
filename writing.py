"""Synthetic writing: ink photographed with a phone, and lines of handwritten digits for the line reader.

tools/dev_set.py and tools/dev_numbers.py make their photos with phone_photo; train_reader.py trains on digit_lines,
made on the fly as photos.line_of makes a photo's line of writing. In this file: the photo, then the lines.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from photos import LINE_HEIGHT, LINE_MARGIN


def phone_photo(ink, rng, height=None, turn=8.0):
    """JPEG bytes of `ink` (float [h, w] in 0..1, cropped to the digit) written on paper and photographed: the digit
    `height` px tall (default: 28-150), turned up to `turn` degrees either way, blurred a little, in dark ink of some
    shade on light tinted paper under a lighting gradient, with noise."""
    height = rng.uniform(28, 150) if height is None else height
    ink = np.clip(ndimage.zoom(ink, height / ink.shape[0], order=1), 0, 1)
    ink = np.clip(ndimage.rotate(ink, rng.uniform(-turn, turn), order=1), 0, 1)
    ink = ndimage.gaussian_filter(ink, rng.uniform(0.3, 1.2))                      # focus and motion, in pixels
    margin = int(rng.uniform(0.3, 0.8) * height) + 2
    ink = np.pad(ink, margin)
    rows, columns = ink.shape
    paper = np.array([0.93, 0.91, 0.85]) + rng.uniform(-0.08, 0.05, 3)
    pen = rng.uniform(0.0, 0.35) + np.array([0.0, 0.0, 0.1]) * rng.uniform(0, 2)     # black to grey, or blue
    strength = rng.uniform(0.75, 1.0)                                               # how dark the ink lies
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:rows, 0:columns]
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    light = 1 - rng.uniform(0, 0.3) * (ramp - ramp.min()) / max(np.ptp(ramp), 1)
    alpha = (ink * strength)[..., None]
    page = (paper * (1 - alpha) + pen * alpha) * light[..., None] + rng.normal(0, rng.uniform(0.01, 0.04),
                                                                                (rows, columns, 3))
    buffer = io.BytesIO()
    Image.fromarray((np.clip(page, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "JPEG",
                                                                                quality=int(rng.integers(60, 96)))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- lines of digits

MAX_LINE_DIGITS = 10
CLOSE = (-0.2, 0.1)  # gaps between neighbours' ink, in writing heights, for half the lines: overlapping by a third of
WIDE = (0.1, 0.8)    # a digit (about 0.6 of a height wide) to a little apart; for the other half, well apart
DIGIT_HEIGHT = (0.7, 1.0)  # each digit's own height, in the tallest possible one's
BASELINE = 0.35      # each digit's bottom moves up or down by up to a share of the height, drawn per line up to this
SLANT = 0.3          # the line's slant, horizontal pixels per vertical one either way
TURN = 6.0           # each digit's own rotation, degrees either way
ASPECT = (0.85, 1.15)  # each digit's width as written, against MNIST's
FLAT = 0.04          # the share of digits (not 1s) written flat: FLAT_HEIGHT of their height, FLAT_WIDTH of it wide,
FLAT_HEIGHT, FLAT_WIDTH = (0.45, 0.7), (1.4, 2.2)   # in the middle of the line (a wide 5 or 2)


def ink_boxes(images):
    """int64 [N, 4]: each digit's ink (top, bottom, left, right), the ends exclusive, of uint8 images [N, 28, 28]."""
    rows, columns = images.amax(2) > 0, images.amax(1) > 0                  # [N, 28] each
    first = lambda mask: mask.float().argmax(1)                             # noqa: E731
    last = lambda mask: mask.shape[1] - mask.flip(1).float().argmax(1)       # noqa: E731
    return torch.stack([first(rows), last(rows), first(columns), last(columns)], 1)


def digit_lines(images, labels, count, generator):
    """`count` synthetic lines of handwritten digits, as the line reader reads a photo's line (photos.line_of):
    (ink float [count, 1, LINE_HEIGHT, W] in 0..1, the lines' digits int64 [sum of lengths] one after another,
    lengths int64 [count], widths int64 [count] of each line's own ink before the padding to W).

    Each line: 1 to MAX_LINE_DIGITS digits drawn from `images` (uint8 [N, 28, 28], MNIST-like, `labels` [N]), each
    at its own height and baseline, turned a little and written narrower or wider (a few flat), spaced from
    overlapping to wide apart, the line slanted, then the pen (finer or broader), focus or resolution, faint ink,
    noise, specks and a stray piece of ruled line. Every random number comes from `generator` (a CPU torch.Generator).
    """
    rand = lambda *shape: torch.rand(shape, generator=generator)             # noqa: E731
    boxes = ink_boxes(images)
    lengths = torch.randint(1, MAX_LINE_DIGITS + 1, (count,), generator=generator)
    picks = torch.randint(0, len(images), (count, MAX_LINE_DIGITS), generator=generator)
    present = torch.arange(MAX_LINE_DIGITS) < lengths[:, None]              # [count, D]
    box = boxes[picks].float()                                              # [count, D, 4]
    height = DIGIT_HEIGHT[0] + (DIGIT_HEIGHT[1] - DIGIT_HEIGHT[0]) * rand(count, MAX_LINE_DIGITS)
    aspect = (box[..., 3] - box[..., 2]) / (box[..., 1] - box[..., 0])
    width = height * aspect * (ASPECT[0] + (ASPECT[1] - ASPECT[0]) * rand(count, MAX_LINE_DIGITS))
    flat = (rand(count, MAX_LINE_DIGITS) < FLAT) & (labels[picks] != 1)
    squash = torch.where(flat, FLAT_HEIGHT[0] + (FLAT_HEIGHT[1] - FLAT_HEIGHT[0]) * rand(count, MAX_LINE_DIGITS), 1)
    width = torch.where(flat, height * (FLAT_WIDTH[0] + (FLAT_WIDTH[1] - FLAT_WIDTH[0]) * rand(count, MAX_LINE_DIGITS)),
                        width)
    close = rand(count, 1) < 0.5
    gap = torch.where(close, CLOSE[0] + (CLOSE[1] - CLOSE[0]) * rand(count, MAX_LINE_DIGITS),
                      WIDE[0] + (WIDE[1] - WIDE[0]) * rand(count, MAX_LINE_DIGITS))
    gap[:, 0] = 0
    left = torch.cumsum(gap, 1) + torch.cumsum(width, 1) - width           # each digit's left edge
    bottom = 1 + BASELINE * rand(count, 1) * (2 * rand(count, MAX_LINE_DIGITS) - 1) - height * (1 - squash) / 2
    height = height * squash
    top = bottom - height
    slant = SLANT * (2 * rand(count) - 1)
    turn = torch.deg2rad(TURN * (2 * rand(count, MAX_LINE_DIGITS) - 1))
    # the line's writing, from its highest top to its lowest bottom, fills LINE_HEIGHT less the margins
    big = torch.finfo(torch.float32).max
    line_top = torch.where(present, top, big).amin(1)
    line_bottom = torch.where(present, bottom, -big).amax(1)
    scale = (LINE_HEIGHT - 2 * LINE_MARGIN) / (line_bottom - line_top)     # px per height, [count]
    line_left = torch.where(present, left, big).amin(1)
    line_right = torch.where(present, left + width, -big).amax(1)
    lean = slant.abs() * (LINE_HEIGHT - 2 * LINE_MARGIN) / 2               # px the slant moves the top or bottom
    widths = (((line_right - line_left) * scale + 2 * lean).ceil() + 2 * LINE_MARGIN).long()
    canvas = torch.zeros(count, 1, LINE_HEIGHT, int(widths.max()) + LINE_MARGIN)
    lines, slots = torch.nonzero(present, as_tuple=True)                    # every digit written: its line and place
    # each digit into a patch as tall as the line and wide enough for the widest, slanted and turned
    s = scale[lines]
    digit_left = (left[lines, slots] - line_left[lines]) * s + LINE_MARGIN + lean[lines]
    digit_top = (top[lines, slots] - line_top[lines]) * s + LINE_MARGIN
    digit_width, digit_height = width[lines, slots] * s, height[lines, slots] * s
    patch_width = int((digit_width.max() + 2 * lean.max() + digit_height.max() * 0.2).ceil()) + 4
    origin = (digit_left - (patch_width - digit_width) / 2).floor().clamp(min=0)
    origin = torch.minimum(origin, torch.tensor(canvas.shape[-1] - patch_width, dtype=origin.dtype)).long()
    ys, xs = torch.meshgrid(torch.arange(LINE_HEIGHT) + 0.5, torch.arange(patch_width) + 0.5, indexing="ij")
    xs = xs[None] + origin[:, None, None]                                  # [M, H, P] canvas pixel centres
    ys = ys[None].expand_as(xs)
    middle_y = LINE_HEIGHT / 2
    centre_x, centre_y = digit_left + digit_width / 2, digit_top + digit_height / 2
    # undo the slant (about the line's middle), then the digit's turn about its centre
    x = xs + slant[lines, None, None] * (ys - middle_y) - centre_x[:, None, None]
    y = ys - centre_y[:, None, None]
    cos, sin = torch.cos(turn[lines, slots])[:, None, None], torch.sin(turn[lines, slots])[:, None, None]
    x, y = cos * x + sin * y, -sin * x + cos * y
    b = box[lines, slots]                                                   # [M, 4] in the 28x28 image
    u = (b[:, 2] + b[:, 3])[:, None, None] / 2 + x * ((b[:, 3] - b[:, 2]) / digit_width)[:, None, None]
    v = (b[:, 0] + b[:, 1])[:, None, None] / 2 + y * ((b[:, 1] - b[:, 0]) / digit_height)[:, None, None]
    size = images.shape[-1]
    grid = torch.stack([2 * u / size - 1, 2 * v / size - 1], -1)            # align_corners=False: edges at -1, 1
    digits = images[picks[lines, slots]].float()[:, None] / 255             # [M, 1, 28, 28]
    patches = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for k in range(len(lines)):                                             # the ink of overlapping digits is one
        window = canvas[lines[k], :, :, origin[k]:origin[k] + patch_width]
        torch.maximum(window, patches[k], out=window)
    canvas = pen_and_paper(canvas, widths, generator)
    return canvas, labels[picks[lines, slots]], lengths, widths


def pen_and_paper(lines, widths, generator):
    """What a pen, a camera and photos.line_image's threshold do to lines of ink (float [B, 1, H, W] in 0..1), each
    line its own: a finer or broader pen, blur or a coarse resolution, fainter ink, noise cut at a threshold, specks
    and a stray piece of ruled line; each line stretched to its darkest ink again, nothing beyond its width."""
    count, _, height, width = lines.shape
    rand = lambda *shape: torch.rand(shape, generator=generator)             # noqa: E731
    each = lambda values: values.view(count, 1, 1, 1)                       # noqa: E731
    pen = rand(count)
    broader, finer = F.max_pool2d(lines, 3, 1, 1), -F.max_pool2d(-lines, 3, 1, 1)
    lines = torch.where(each(pen < 0.25), broader, torch.where(each(pen > 0.8), (lines + finer) / 2, lines))
    for k in torch.nonzero(rand(count) < 0.3).flatten().tolist():           # a coarse photo, enlarged
        factor = 0.35 + 0.45 * float(rand(1))
        small = F.interpolate(lines[k:k + 1], scale_factor=factor, mode="area")
        lines[k:k + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    blurred = F.avg_pool2d(lines, 3, 1, 1, count_include_pad=False)
    lines = torch.lerp(lines, blurred, each(rand(count) * (rand(count) < 0.4)))
    lines = lines.clamp(0, 1) ** each(0.6 + rand(count))                  # fainter or bolder ink
    lines = lines + torch.randn(lines.shape, generator=generator) * each(0.08 * rand(count) * (rand(count) < 0.4))
    columns = torch.arange(width)
    for k in torch.nonzero(rand(count) < 0.2).flatten().tolist():           # specks of dirt
        for _ in range(int(1 + 3 * rand(1))):
            y, x = int(rand(1) * (height - 2)), int(rand(1) * max(int(widths[k]) - 2, 1))
            lines[k, 0, y:y + 1 + int(2 * rand(1)), x:x + 1 + int(2 * rand(1))] = 0.5 + 0.5 * float(rand(1))
    for k in torch.nonzero(rand(count) < 0.1).flatten().tolist():           # what is left of a ruled line
        y = int(height * (0.55 + 0.4 * float(rand(1))))
        start, stop = sorted((rand(2) * int(widths[k])).long().tolist())
        lines[k, 0, y:y + 1 + int(2 * rand(1)), start:stop] = 0.5 + 0.5 * float(rand(1))
    threshold = each(0.25 * rand(count))
    lines = ((lines - threshold) / (1 - threshold)).clamp(0, 1) * (columns < widths[:, None, None, None])
    return lines / lines.amax((2, 3), keepdim=True).clamp(min=1e-3)
