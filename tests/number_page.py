"""Photo-like pages of whole numbers written with MNIST digits: the tests read them, and tools/number_pages.py
measures --number on them.

Each page: digits 28-84 px tall (on the ink's longer side, as MNIST fits its box); gaps of 4-16 px between
neighbours' ink at 28 px tall, scaled with the height; slant up to 15 degrees either way; strokes up to one pixel
thinner or thicker at 28 px; each digit moved up or down by up to a third of the height; dark ink on light, tinted
paper under a lighting gradient of up to 30% with noise; saved as JPEG of quality 60-95. Conditions: "gaps" (that
alone); "touching" (one neighbouring pair's inks meet and overlap by 0-3 px at 28 px); "ruled" (a ruled line 1-3 px
wide across the page, under the digits or through their lower third); "two lines" (the number written on two lines,
read as two groups: "12 40").
"""
import io

import numpy as np
from PIL import Image
from scipy import ndimage

CONDITIONS = ("gaps", "touching", "ruled", "two lines")
INK_LEVEL = 0.3  # a digit's pixel is ink from here up (MNIST's 0..1), for measuring gaps between neighbours


def number_page(digits, labels, rng, condition="gaps", height=None):
    """(JPEG bytes of the page, the number's text, [JPEG bytes of each digit alone on a page like it], each digit's
    box on the page as (left, top, right, bottom), the ends exclusive).

    digits: uint8 MNIST digits [k, 28, 28], labels their k labels; the text is what read_number should return.
    """
    height = rng.uniform(28, 84) if height is None else height
    unit = height / 28                                           # one pixel at 28 px tall
    pieces = [written_digit(digit, height, rng) for digit in digits]
    breaks = [int(rng.integers(1, len(digits)))] if condition == "two lines" else []
    touching = int(rng.integers(0, len(digits) - 1)) if condition == "touching" else -1
    lines, texts, corners = [], [], []                             # corners: each piece's (top, left) in its line
    for line in np.split(np.arange(len(digits)), breaks):
        row = centre = None
        placed = []
        for i in line:
            gap = -rng.uniform(0, 3) * unit if i - 1 == touching else rng.uniform(4, 16) * unit
            row, centre, above, corner = place(row, centre, pieces[i], gap, rng.uniform(-height / 3, height / 3))
            placed = [(top + above, left) for top, left in placed] + [corner]
        lines.append((row, centre))
        corners.append(placed)
        texts.append("".join(str(int(labels[i])) for i in line))
    ink, centres, offsets = stack_lines(lines, height, rng)
    ruled = ruled_line(centres[0], height, rng) if condition == "ruled" else None
    style = page_style(rng)
    margin = int(round(rng.uniform(0.3, 1.0) * height))
    page = photo(ink, margin, rng, ruled, style)
    boxes = [(left + dx + margin, top + dy + margin, left + dx + margin + pieces[i].shape[1],
              top + dy + margin + pieces[i].shape[0])
             for line, placed, (dy, dx) in zip(np.split(np.arange(len(digits)), breaks), corners, offsets, strict=True)
             for i, (top, left) in zip(line, placed, strict=True)]
    alone = [photo(piece, int(round(height / 2)), rng, None, style) for piece in pieces]
    return jpeg(page, style), " ".join(texts), [jpeg(p, style) for p in alone], boxes


def written_digit(digit, height, rng):
    """One MNIST digit as written on the page: float ink [h, w] in 0..1, `height` px on its longer side (most digits
    are taller than wide), slanted, with its strokes made thinner or thicker."""
    ink = digit.astype(np.float32) / 255
    rows, columns = np.flatnonzero(ink.max(1) > 0), np.flatnonzero(ink.max(0) > 0)
    ink = np.pad(ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1], 2)
    scale = height / max(rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1)   # as MNIST fits its 20x20 box
    ink = ndimage.zoom(ink, scale, order=1)
    ink = restroke(ink, rng.uniform(-1, 1) * height / 28)
    slant = np.tan(np.radians(rng.uniform(-15, 15)))
    h, w = ink.shape
    width = w + int(np.ceil(abs(slant) * h))
    # output (y, x) reads input (y, x + slant * (y - h) + shift): the top leans right for slant > 0
    matrix, shift = np.array([[1, 0], [slant, 1]]), np.array([0, -slant * h - max(0, -slant) * h])
    ink = ndimage.affine_transform(ink, matrix, shift, output_shape=(h, width), order=1)
    return trim(np.clip(ink, 0, 1))


def restroke(ink, change):
    """Strokes `change` px wider (thinner when negative): half on each side, by whole 3x3 steps and a blend."""
    steps, fraction = divmod(abs(change) / 2, 1)
    grow = ndimage.grey_dilation if change > 0 else ndimage.grey_erosion
    for _ in range(int(steps)):
        ink = grow(ink, size=(3, 3))
    return (1 - fraction) * ink + fraction * grow(ink, size=(3, 3))


def trim(ink):
    rows, columns = np.flatnonzero(ink.max(1) > 0.05), np.flatnonzero(ink.max(0) > 0.05)
    return ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]


def place(row, centre, piece, gap, dy):
    """(the line with `piece` added on the right, the line's centre row, rows added above the line, the piece's (top,
    left) in it): the piece's centre is `dy` px below the
    line's centre, and the closest approach of the two inks, row by row (their boxes where no row is shared), is `gap`
    px; a negative gap overlaps them. The first piece starts the line (row None)."""
    h, w = piece.shape
    if row is None:
        return piece.copy(), h / 2 - dy, 0, (0, 0)
    top = int(round(centre + dy - h / 2))
    above, below = max(0, -top), max(0, top + h - row.shape[0])
    row, centre, top = np.pad(row, ((above, below), (0, 0))), centre + above, top + above
    right = np.full(row.shape[0], -np.inf)                         # the line's rightmost ink, per row
    hits = row > INK_LEVEL
    has = hits.any(1)
    right[has] = row.shape[1] - 1 - np.argmax(hits[has, ::-1], 1)
    first = np.full(h, np.inf)                                     # the piece's leftmost ink, per row
    mine = piece > INK_LEVEL
    first[mine.any(1)] = np.argmax(mine[mine.any(1)], 1)
    shared = np.isfinite(right[top:top + h]) & np.isfinite(first)
    reach = np.max(right[top:top + h][shared] - first[shared]) if shared.any() else np.max(right[has])
    left = max(0, int(round(reach + 1 + gap)))
    out = np.zeros((row.shape[0], max(row.shape[1], left + w)), dtype=np.float32)
    out[:, :row.shape[1]] = row
    out[top:top + h, left:left + w] = np.maximum(out[top:top + h, left:left + w], piece)
    return out, centre, above, (top, left)


def stack_lines(lines, height, rng):
    """(ink [H, W], each line's centre row, each line's (top, left) on the page): the lines of writing one under the
    other, each shifted sideways a
    little, their centres 1.9-2.4 heights apart."""
    pitch = rng.uniform(1.9, 2.4) * height
    reach = max(max(centre, row.shape[0] - centre) for row, centre in lines)   # rows above or below a centre
    width = max(row.shape[1] for row, _ in lines) + int(height)
    total = int(np.ceil(2 * reach + (len(lines) - 1) * pitch)) + 1
    ink = np.zeros((total, width), dtype=np.float32)
    centres, offsets = [], []
    for k, (row, centre) in enumerate(lines):
        top = int(round(reach + k * pitch - centre))
        left = int(rng.integers(0, width - row.shape[1] + 1))
        region = ink[top:top + row.shape[0], left:left + row.shape[1]]
        region[:] = np.maximum(region, row)
        centres.append(top + centre)
        offsets.append((top, left))
    return ink, centres, offsets


def ruled_line(centre, height, rng):
    """(row, width) of a ruled line 1-3 px wide: under the writing, or through its lower third."""
    if rng.random() < 0.5:
        return centre + height / 2 + rng.uniform(0, 0.25) * height, rng.uniform(1, 3)
    return centre + rng.uniform(1 / 6, 1 / 2) * height, rng.uniform(1, 3)


def page_style(rng):
    """The page's paper, pen, lighting, noise and JPEG quality, shared by a number's page and its digits' pages."""
    return {"paper": np.array([0.93, 0.90, 0.82]) + rng.uniform(-0.06, 0.05, 3),
            "pen": np.array([0.10, 0.12, 0.30]) + rng.uniform(-0.08, 0.1, 3),
            "gradient": rng.uniform(0, 0.3), "angle": rng.uniform(0, 2 * np.pi), "noise": rng.uniform(0.01, 0.04),
            "quality": int(rng.integers(60, 96)), "line": rng.uniform(0.5, 1.0)}


def photo(ink, margin, rng, ruled, style):
    """RGB float page [H, W, 3]: the ink in a margin of paper, lit unevenly, with a ruled line and noise."""
    ink = np.pad(ink, margin)
    h, w = ink.shape
    if ruled is not None:
        y, width = ruled
        y += margin
        rows = np.arange(h)[:, None]
        line = np.clip(width / 2 + 0.5 - np.abs(rows - y), 0, 1) * style["line"]    # antialiased, across the page
        ink = np.maximum(ink, np.broadcast_to(line, ink.shape))
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (np.cos(style["angle"]) * xx + np.sin(style["angle"]) * yy)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1)
    light = 1 - style["gradient"] * ramp                                         # up to 30% darker on one side
    page = style["paper"] * (1 - ink[..., None]) + style["pen"] * ink[..., None]
    page = page * light[..., None] + rng.normal(0, style["noise"], (h, w, 3))
    return np.clip(page, 0, 1)


def jpeg(page, style):
    buffer = io.BytesIO()
    Image.fromarray((page * 255).round().astype(np.uint8), mode="RGB").save(buffer, "JPEG", quality=style["quality"])
    return buffer.getvalue()
