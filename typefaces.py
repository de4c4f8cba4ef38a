"""Handwriting typefaces: digits written by other hands than MNIST's writers, for the dev set and for training.

56 families of npm's @fontsource packages (Google Fonts' handwriting faces), split once by family, before anything was
tuned, into two halves (a seeded shuffle of the sorted names, random.Random(48)): DEV_FAMILIES choose (tools/dev_set.py
reads them, nothing ever trains on them) and TRAIN_FAMILIES may be trained on (train_cnn.py --typefaces). Comic Neue,
Dancing Script, Kaushan Script and Kristi are in neither: an independent check uses them. The packages are fetched with
`npm pack` into a cache folder the first time (about 1 MB each) and read from there after; Pillow reads their .woff2
files directly. In this file: the families, fetching them, then drawing digits in them.
"""
import os
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import photos
from cli import UserError

DEV_FAMILIES = (
    "annie-use-your-telescope", "calligraffitti", "caveat", "caveat-brush", "coming-soon", "delicious-handrawn",
    "edu-sa-beginner", "edu-tas-beginner", "edu-vic-wa-nt-beginner", "fuzzy-bubbles", "gloria-hallelujah",
    "gochi-hand", "grape-nuts", "handlee", "homemade-apple", "indie-flower", "just-me-again-down-here", "kalam",
    "patrick-hand", "permanent-marker", "playpen-sans", "schoolbell", "shadows-into-light", "short-stack",
    "swanky-and-moo-moo", "the-girl-next-door", "walter-turncoat", "yomogi")
TRAIN_FAMILIES = (
    "architects-daughter", "bad-script", "cedarville-cursive", "covered-by-your-grace", "crafty-girls",
    "dawning-of-a-new-day", "delius", "edu-nsw-act-foundation", "edu-qld-beginner", "gaegu", "give-you-glory",
    "just-another-hand", "klee-one", "la-belle-aurore", "loved-by-the-king", "mansalva", "nanum-brush-script",
    "nanum-pen-script", "neucha", "nothing-you-could-do", "over-the-rainbow", "reenie-beanie", "rock-salt",
    "sedgwick-ave", "sue-ellen-francisco", "unkempt", "waiting-for-the-sunrise", "zeyada")

DEFAULT_CACHE = Path(os.environ.get("TYPEFACES_DIR") or Path.home() / ".cache" / "digit-typefaces")
RENDER_SIZE = 160   # px: the font size a photo's digit is drawn at
TRAINING_SIZE = 80  # px: the font size of training digits, drawn a little larger than photos.WORK_HEIGHT


# ----------------------------------------------------------------------------- fetching

def fetch(families, cache=None):
    """{family: path of its regular-weight latin .woff2} in `cache` (default DEFAULT_CACHE), packed with npm the first
    time; one line (a UserError) naming the family when npm is missing or cannot fetch it."""
    cache = Path(cache or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(families, pool.map(lambda family: fetch_one(family, cache), families), strict=True))


def fetch_one(family, cache):
    font = cache / f"{family}.woff2"
    if font.is_file():
        return font
    try:
        packed = subprocess.run(["npm", "pack", f"@fontsource/{family}", "--pack-destination", str(cache), "--silent"],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"cannot fetch the typeface {family} with npm ({error}); install Node.js's npm, or put "
                        f"{family}.woff2 in {cache}") from None
    if packed.returncode != 0:
        reason = (packed.stderr.strip().splitlines() or ["npm failed"])[-1]
        raise UserError(f"cannot fetch the typeface {family} with npm ({reason}); offline, put {family}.woff2 in "
                        f"{cache}")
    archive = cache / packed.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as packed_files:
        member = regular_latin(family, packed_files.getnames())
        data = packed_files.extractfile(member).read()
    archive.unlink()
    partial = font.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(font)  # whole or not at all: a killed fetch leaves no half font behind
    return font


def regular_latin(family, names):
    """The package's latin, upright .woff2 closest to weight 400."""
    fonts = [name for name in names if name.startswith(f"package/files/{family}-latin-") and
             name.endswith("-normal.woff2")]
    if not fonts:
        raise UserError(f"@fontsource/{family} has no latin .woff2 file")
    return min(fonts, key=lambda name: abs(int(name.rsplit("-", 2)[-2]) - 400))


# ----------------------------------------------------------------------------- drawing a digit

def training_digits(count, seed, cache=None):
    """(uint8 [10 * count * families, 28, 28], int64 labels) for train_cnn.py --typefaces: `count` drawings of each
    digit in each of TRAIN_FAMILIES, each with its own pen (2% of the height finer to 4% broader), made MNIST-like as a
    photo's digit is (photos.at_mnist_stroke, photos.mnist_digit). Seeded: the same count and seed draw the same
    digits."""
    fonts = load_fonts(fetch(TRAIN_FAMILIES, cache), TRAINING_SIZE)
    rng = np.random.default_rng([seed, 48])
    images, labels = [], []
    for family in TRAIN_FAMILIES:
        for digit in range(10):
            for _ in range(count):
                ink = digit_ink(fonts[family], digit, pen=rng.uniform(-0.02, 0.04))
                images.append(photos.mnist_digit(photos.at_mnist_stroke(ink)))
                labels.append(digit)
    return torch.stack(images), torch.tensor(labels)


def load_fonts(paths, size=RENDER_SIZE):
    """{name: PIL font of `size` px} for font files (any that Pillow reads: .woff2, .ttf, .otf)."""
    from PIL import ImageFont
    return {name: ImageFont.truetype(str(path), size) for name, path in paths.items()}


def digit_ink(font, digit, pen=0.0):
    """float [h, w] in 0..1: `digit` (or a number, "4096", in the typeface's own spacing) drawn in `font` (white on
    black), cropped to its ink. pen > 0 thickens the strokes by that share of the ink's height, pen < 0 thins them (a
    broad or a fine pen)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage
    size, text = round(font.size), str(digit)
    canvas = Image.new("L", ((len(text) + 1) * size, 2 * size), 0)
    ImageDraw.Draw(canvas).text((size // 2, size // 2), text, font=font, fill=255)
    ink = np.asarray(canvas, dtype=np.float32) / 255
    ink = photos.cropped(ink)
    if pen:
        inside = ink > 0.5
        reach = abs(pen) * ink.shape[0]
        if pen > 0:   # everything within `reach` of the stroke becomes stroke
            ink = np.maximum(ink, np.clip(reach + 0.5 - ndimage.distance_transform_edt(~inside), 0, 1))
        else:         # only what lies deeper than `reach` inside the stroke stays, down to a stroke 2 px wide
            depth = ndimage.distance_transform_edt(inside)
            ink = np.minimum(ink, np.clip(depth - min(reach, depth.max() - 1) + 0.5, 0, 1))
        ink = photos.cropped(np.pad(ink, 1))
    return ink.astype(np.float32)
