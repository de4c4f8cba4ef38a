"""Data from files on disk to a normalized batch on the device, and what every script reads and writes.

In two parts. The data, in data-flow order: MNIST, Kaggle CSV, the data source, splits and batches, augmentation
and TTA. Then, below one banner, the machinery: the download and the CSV's cell checks, photos, device and
precision, the checkpoint format as read (with the record of training images and the released model's check),
atomic files, command-line plumbing, and the export-kaggle command.
"""
import argparse
import contextlib
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models import MODELS, PairDetector, build_model

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

NORMALIZATION = {"mean": MNIST_MEAN, "std": MNIST_STD}

IMAGE_SIZE = 28

NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

PIXEL_COLUMNS = [f"pixel{i}" for i in range(NUM_PIXELS)]

KAGGLE_INPUT = Path("/kaggle/input/digit-recognizer")

DEFAULT_DATA_DIR = os.environ.get("MNIST_DATA_DIR") or "data"  # folder holding MNIST/raw; an empty variable is unset

# Batch size for inference (validation, prediction): on a CPU, larger batches of resnet's first stage fall out of
# the cache and its element-wise passes wait on memory (README, Speed); a GPU is kept busy by 256 too.
EVAL_BATCH_SIZE = 256


# ----------------------------------------------------------------------------- MNIST (IDX files)

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

def find_idx_file(raw_dir, stem):
    """The .gz file if present, else the extracted one, else None."""
    for candidate in (raw_dir / f"{stem}.gz", raw_dir / stem):
        if candidate.is_file():
            return candidate
    return None

def read_idx(path, expected_magic):
    """Read one IDX file into a uint8 tensor, checking the magic number and that the size matches the header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a corrupt deflate stream inside the .gz
        raise UserError(f"{path}: cannot read ({error})") from None
    ndim = expected_magic - 2048  # 1 for labels, 3 for images
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header_size])
    if magic != expected_magic:
        raise UserError(f"{path}: not an IDX {'image' if ndim == 3 else 'label'} file (magic {magic}, expected "
                        f"{expected_magic})")
    if ndim == 3 and tuple(dims[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if dims[0] == 0:
        raise UserError(f"{path}: its header announces 0 items; the file holds no data")
    expected_bytes = header_size + math.prod(dims)
    if len(raw) != expected_bytes:
        raise UserError(f"{path}: {len(raw)} bytes, but its header announces {dims[0]} items ({expected_bytes} "
                        "bytes): truncated or corrupt")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_size).view(*dims)


def load_mnist(data_dir, split="train"):
    """MNIST's "train" or "test" split as (images uint8 [N, 28, 28], labels int64 [N]), read from data_dir/MNIST/raw."""
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    stems = MNIST_FILES[split]
    if any(find_idx_file(raw_dir, stem) is None for stem in stems):
        download_mnist(data_dir, split)
    images = read_idx(find_idx_file(raw_dir, stems[0]), IDX_IMAGES_MAGIC)
    labels = read_idx(find_idx_file(raw_dir, stems[1]), IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise UserError(f"{raw_dir}: {len(images)} images but {len(labels)} labels")
    if labels.numel() and labels.max() > 9:
        raise UserError(f"{raw_dir}: label {labels.max().item()} is not a digit 0..9")
    return images, labels.long()


# ----------------------------------------------------------------------------- Kaggle CSV files


def default_kaggle_csv(name):
    """Inside a Kaggle kernel the competition data is mounted read-only under /kaggle/input."""
    folder = KAGGLE_INPUT if KAGGLE_INPUT.is_dir() else Path("data/digit-recognizer")
    return folder / name


def load_csv(path, labelled):
    """A Kaggle Digit Recognizer CSV as (images uint8 [N, 28, 28], labels int64 [N] or None), validated.

    labelled: True (label, pixel0..pixel783), False (pixel0..pixel783), or None (either; by the first column).
    """
    frame = read_csv_frame(path)
    columns = [str(c) for c in frame.columns]
    if labelled is None:
        labelled = bool(columns) and columns[0] == "label"
    expected = (["label"] if labelled else []) + PIXEL_COLUMNS
    if columns != expected:
        missing = [c for c in expected if c not in columns]
        extra = [c for c in columns if c not in expected]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            detail = f"missing column {quoted(missing[0])[1:-1]}{more}"
        elif extra:
            detail = f"unexpected column {quoted(extra[0])[1:-1]}"
        else:
            detail = "columns are out of order"
        kind = "label, pixel0..pixel783" if labelled else "pixel0..pixel783"
        raise UserError(f"{path}: {detail}; expected the columns {kind} ({len(expected)} in all)")
    if len(frame) == 0:
        raise UserError(f"{path}: has a header but no rows")
    check_integers_in_range(path, frame[PIXEL_COLUMNS], 0, 255)
    images = torch.from_numpy(frame[PIXEL_COLUMNS].to_numpy(dtype=np.uint8)).view(-1, IMAGE_SIZE, IMAGE_SIZE)
    if not labelled:
        return images, None
    check_integers_in_range(path, frame[["label"]], 0, 9)
    return images, torch.from_numpy(frame["label"].to_numpy(dtype=np.int64, copy=True))

def load_submission_csv(path, n_rows=None):
    """Labels int64 [N] from an ImageId,Label file (a submission or its answer key), its format checked.

    n_rows: the number of test images it must cover; None accepts any non-empty file with ImageId 1..N.
    """
    frame = read_csv_frame(path)
    if [str(c) for c in frame.columns] != ["ImageId", "Label"]:
        found = quoted(",".join(map(str, frame.columns)))[1:-1]
        raise UserError(f"{path}: the header must be ImageId,Label, found {found}")
    if len(frame) == 0:
        raise UserError(f"{path}: has a header but no rows")
    n_rows = len(frame) if n_rows is None else n_rows
    if len(frame) != n_rows:
        raise UserError(f"{path}: {len(frame)} rows, expected one per test image ({n_rows})")
    check_integers_in_range(path, frame[["ImageId"]], 1, n_rows)
    check_integers_in_range(path, frame[["Label"]], 0, 9)
    out_of_order = np.flatnonzero(frame["ImageId"].to_numpy() != np.arange(1, n_rows + 1))
    if len(out_of_order):
        row = int(out_of_order[0])
        raise UserError(f"{path}: line {row + 2}: ImageId {frame['ImageId'].iloc[row]}, expected {row + 1} (ImageId "
                        "must run 1..N in order)")
    return torch.from_numpy(frame["Label"].to_numpy(dtype=np.int64, copy=True))


def write_images_csv(path, images, labels=None):
    """Images uint8 [N, 28, 28] (and labels) in Kaggle's train.csv / test.csv format."""
    frame = pd.DataFrame(images.reshape(len(images), NUM_PIXELS).numpy(), columns=PIXEL_COLUMNS)
    if labels is not None:
        frame.insert(0, "label", labels.numpy())
    write_frame(path, frame)

def write_submission(path, labels):
    """Kaggle's submission format (also that of test_labels.csv): header ImageId,Label; ImageId 1..N in input order."""
    write_frame(path, pd.DataFrame({"ImageId": np.arange(1, len(labels) + 1), "Label": labels.numpy()}))


# ----------------------------------------------------------------------------- the data source

def add_data_arguments(parser, default, split):
    """--data and the files it reads, spelled and explained the same in every script.

    split: "train" (a labelled --train-csv) or "test" (--test-csv, labelled or with --labels).
    A CSV file named on the command line without --data selects csv, so `--train-csv FILE` alone works.
    """
    default_text = f"mnist, or csv when --{split}-csv is given" if default == "mnist" else "csv"
    parser.add_argument("--data", choices=["mnist", "csv"],
                        help=f"mnist: the IDX files in --data-dir; csv: Kaggle-format --{split}-csv "
                             f"(default: {default_text})")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="folder holding MNIST/raw/*.gz (env MNIST_DATA_DIR)")
    if split == "train":
        parser.add_argument("--train-csv",
                            help="Kaggle train.csv: label, pixel0..pixel783 "
                                 f"(default: {default_kaggle_csv('train.csv')})")
    else:
        parser.add_argument("--test-csv", help="Kaggle test.csv: pixel0..pixel783, or with a label column first "
                                               f"(default: {default_kaggle_csv('test.csv')})")
        parser.add_argument("--labels", help="ImageId,Label CSV of the true labels of --test-csv, to report accuracy")
    if split == "train":
        parser.add_argument("--limit", type=positive_int, help="use only the first N images of the training data "
                                                               "(and of MNIST's test set in train_cnn.py): smoke runs")
    parser.set_defaults(data_default=default, data_split=split)


def resolve_data_arguments(args):
    """Fill in --data and the CSV path after parsing (see add_data_arguments)."""
    csv_attribute = f"{args.data_split}_csv"
    if args.data is None:
        args.data = "csv" if getattr(args, csv_attribute) is not None else args.data_default
    if getattr(args, csv_attribute) is None:
        setattr(args, csv_attribute, str(default_kaggle_csv(f"{args.data_split}.csv")))
    return args


def load_data(args, split):
    """(images uint8 [N, 28, 28], labels int64 [N] or None) from the source --data names (see add_data_arguments).

    split "train": MNIST's training set or --train-csv. split "test": MNIST's test set, or --test-csv with the
    labels of its label column or of --labels (None when it has neither). --limit, where a script has it, keeps
    the first N.
    """
    if args.data == "mnist":
        images, labels = load_mnist(args.data_dir, split)
    elif split == "train":
        images, labels = load_csv(args.train_csv, labelled=True)
    else:
        images, labels = load_csv(args.test_csv, labelled=None)
        if args.labels:
            labels = load_submission_csv(args.labels, len(images))
    limit = getattr(args, "limit", None)
    return images[:limit], None if labels is None else labels[:limit]


# ----------------------------------------------------------------------------- splits and batches

def stratified_split(labels, held_out_share, seed):
    """Seeded stratified split of range(len(labels)) into (kept, held_out) index tensors."""
    from sklearn.model_selection import train_test_split
    indices = np.arange(len(labels))
    try:
        kept, held_out = train_test_split(indices, test_size=held_out_share, stratify=labels.numpy(), random_state=seed)
    except ValueError as error:  # e.g. a class with a single image
        raise UserError(f"cannot split {len(labels)} images into stratified parts ({error})") from None
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held_out))

def subset_on_device(images, labels, indices, device):
    """The selected images and labels, copied to the device, where they stay for the whole run.

    A blocking copy: the indexed tensors are temporaries, and a non-blocking copy from pageable memory may read
    them after they are freed (on MPS); it would gain nothing for a copy made once per run.
    """
    return images[indices].to(device), labels[indices].to(device)

def batch_indices(n, batch_size, generator=None):
    """Batches in order as slices, or shuffled as index tensors on the generator's device.

    Neither needs a copy from the host: a CPU index tensor on GPU data would cost a blocking copy per batch.
    """
    if generator is None:
        return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return torch.randperm(n, generator=generator, device=generator.device).split(batch_size)

def to_unit_float(images, augmentation=None, generator=None):
    """uint8 [B, H, W] on the device (MNIST's 28x28) -> float [B, 1, H, W] in 0..1 (background 0), augmented if
    asked."""
    x = images.unsqueeze(1).float().div_(255)
    return x if augmentation is None else augment(x, augmentation, generator)

def model_input(x, normalization):
    """Unit-range float [B, 1, 28, 28] -> the model's input: standardized, channels_last where that is faster."""
    x = (x - normalization["mean"]) / normalization["std"]
    return x.contiguous(memory_format=torch.channels_last) if uses_channels_last(x.device) else x

def prepare_batch(images, normalization, augmentation=None, generator=None):
    """uint8 [B, 28, 28] on the device -> normalized float [B, 1, 28, 28], augmented if asked."""
    return model_input(to_unit_float(images, augmentation, generator), normalization)

def progress_bar(total, description):
    """A tqdm bar on stderr when it is a terminal; silent in logs (scripts print one line per epoch instead)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=description, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


# ----------------------------------------------------------------------------- augmentation and TTA

# Geometry follows torchvision: pixel coordinates centred on the image, x to the right, y down,
# rotation angle and shear in degrees, translation in pixels; v2.functional.affine with the same
# parameters gives the same image (tests/test_data.py checks it). Each sample gets its own parameters,
# and affine and perspective are folded into one 3x3 matrix per sample, so a batch costs one grid_sample.

@dataclass(frozen=True)
class Augmentation:
    rotation: tuple = (0.0, 0.0)   # degrees, uniform in [low, high]
    translate: float = 0.0         # fraction of the image size, uniform in [-t, t] along each axis
    scale: tuple = (1.0, 1.0)      # uniform in [low, high]
    shear: float = 0.0             # degrees along x, uniform in [-s, s]
    perspective: float = 0.0       # distortion scale, as torchvision's RandomPerspective
    perspective_p: float = 0.0     # probability that a sample gets the perspective distortion

light_augmentation = Augmentation(rotation=(-10, 10), translate=0.1, scale=(0.9, 1.1))

strong_augmentation = Augmentation(rotation=(-15, 15), translate=0.1, scale=(0.9, 1.1), shear=10,
                                   perspective=0.2, perspective_p=0.5)

AUGMENTATIONS = {"none": None, "light": light_augmentation, "strong": strong_augmentation}

# Test-time augmentation: the identity first, then small fixed-direction variants whose predictions are averaged.
TTA_VARIANTS = [
    None,
    Augmentation(rotation=(5, 5), translate=0.05),
    Augmentation(rotation=(-5, -5), translate=0.05),
    Augmentation(scale=(0.95, 1.05)),
]

def affine_matrices(angle, translate_x, translate_y, scale, shear):
    """Forward affine maps [B, 3, 3] (input -> output pixel, centred coordinates) from per-sample parameters [B].

    As torchvision composes it: translation * rotation * scale * shear-along-x, with the angle negated
    because y points down in a tensor image (a positive angle turns the digit counter-clockwise on screen).
    """
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    cos, sin, zero, one = torch.cos(a), torch.sin(a), torch.zeros_like(a), torch.ones_like(a)
    rotation = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).view(-1, 3, 3)
    shear_x = torch.stack([one, -torch.tan(s), zero, zero, one, zero, zero, zero, one], -1).view(-1, 3, 3)
    scaling = torch.diag_embed(torch.stack([scale, scale, one], -1))
    translation = torch.stack([one, zero, translate_x, zero, one, translate_y, zero, zero, one], -1).view(-1, 3, 3)
    return translation @ rotation @ scaling @ shear_x

def perspective_matrices(offsets, size=IMAGE_SIZE):
    """Homographies [B, 3, 3] mapping each output pixel to its input pixel (centred coordinates).

    offsets [B, 4, 2] in 0..1 move the four corners inward by that fraction of half the image,
    the corners' destinations in torchvision's RandomPerspective; all zeros gives the identity.
    """
    half = (size - 1) / 2
    # the corners (-h, -h), (h, -h), (h, h), (-h, h) [4, 2], made on the device: torch.tensor would copy from the host
    corner = torch.arange(4, device=offsets.device)
    corners = torch.stack([(corner == 1) | (corner == 2), corner >= 2], 1).float() * (2 * half) - half
    moved = corners - torch.sign(corners) * offsets * (size // 2)   # [B, 4, 2]
    # Solve for the 8 coefficients mapping moved (output) -> corners (input): two linear equations per corner.
    x, y = moved.unbind(-1)                                         # [B, 4]
    u, v = corners.expand_as(moved).unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    system = torch.cat([rows_u, rows_v], 1)                         # [B, 8, 8]
    # solve_ex, not solve: solve checks for a singular system on the host, which waits for a GPU
    coefficients = torch.linalg.solve_ex(system, torch.cat([u, v], 1)).result  # [B, 8]
    return torch.cat([coefficients, one[:, :1]], 1).view(-1, 3, 3)

def warp(images, inverse_maps):
    """Sample images [B, C, H, W] through per-sample maps [B, 3, 3] (output -> input pixel, centred); fill 0."""
    batch, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype) - (height - 1) / 2,
                            torch.arange(width, device=images.device, dtype=images.dtype) - (width - 1) / 2,
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # [1, H*W, 3]
    source = points @ inverse_maps.transpose(1, 2).to(images.dtype)         # [B, H*W, 3]
    source = source[..., :2] / source[..., 2:]
    # grid_sample with align_corners=False puts pixel edges at -1 and 1: divide centred pixels by half the size
    grid = torch.stack([source[..., 0] / (width / 2), source[..., 1] / (height / 2)], -1).view(batch, height, width, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

def uniform_draws(n, low, high, generator):
    """n numbers drawn uniformly from [low, high] with the generator, on its device."""
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low

def augment(images, augmentation, generator):
    """Random affine (+ perspective) per sample, on the device: float [B, 1, 28, 28] -> same shape."""
    n, size = len(images), images.shape[-1]
    aug = augmentation
    forward = affine_matrices(
        angle=uniform_draws(n, *aug.rotation, generator),
        translate_x=uniform_draws(n, -aug.translate, aug.translate, generator) * size,
        translate_y=uniform_draws(n, -aug.translate, aug.translate, generator) * size,
        scale=uniform_draws(n, *aug.scale, generator),
        shear=uniform_draws(n, -aug.shear, aug.shear, generator),
    )
    inverse = torch.linalg.inv_ex(forward).inverse  # inv_ex: no check on the host (an affine map is invertible)
    if aug.perspective > 0:
        offsets = torch.rand(n, 4, 2, generator=generator, device=generator.device) * aug.perspective
        chosen = torch.rand(n, 1, 1, generator=generator, device=generator.device) < aug.perspective_p
        # perspective is applied after the affine, so its inverse comes first when mapping output -> input
        inverse = inverse @ perspective_matrices(offsets * chosen)
    return warp(images, inverse)


# ============================================================================= machinery
# Below: what keeps the data honest and the files whole, which the part above calls: the download and the CSV
# cell checks, photos, device and precision, the checkpoint format, atomic files, command-line plumbing, and
# the export-kaggle command.


# ----------------------------------------------------------------------------- the download, and the CSV's cell checks

# What keeps a bad file from becoming data: a download lands whole or not at all; every CSV cell is checked
# and an offending one quoted, briefly, in one line.

def download_mnist(data_dir, split):
    """Fetch MNIST with torchvision into data_dir/MNIST/raw (only called when the files are missing).

    torchvision downloads into a scratch folder beside; only the verified .gz files move into place, so a
    failed or interrupted download leaves data_dir as it was.
    """
    data_dir = Path(data_dir)
    created = next((p for p in [data_dir, *data_dir.parents][::-1] if not p.exists()), None)  # the first missing folder
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=data_dir, prefix=".mnist-download-"))
    except OSError as error:
        raise UserError(f"MNIST files not found in {data_dir}/MNIST/raw, and {data_dir} is not writable "
                        f"({error.strerror or error}); pass --data-dir") from None
    try:
        from torchvision.datasets import MNIST  # torchvision, scikit-learn, PIL and tqdm load when first needed
        MNIST(str(scratch), train=split == "train", download=True)
        raw = data_dir / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for stem in MNIST_FILES[split]:
            os.replace(scratch / "MNIST" / "raw" / f"{stem}.gz", raw / f"{stem}.gz")
    except Exception as error:  # network errors come in many types; all mean the same to the user
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        # torchvision lists every mirror it tried over several lines; the last one says what went wrong
        reason = brief(error, lambda lines: lines[-1])
        raise UserError(f"MNIST files not found in {data_dir}/MNIST/raw and the download failed ({reason}); "
                        "offline, put the four MNIST .gz files there or pass --data-dir") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


MAX_QUOTED = 100  # characters of an offending cell quoted in an error message


def quoted(value):
    """repr(value), cut to MAX_QUOTED characters: a 5 MB cell must not become a 5 MB error line."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + f"... ({len(text)} characters)"


def brief(error, choose=lambda lines: lines[0]):
    """One line of an exception's message for a one-line error: the line `choose` picks, cut to 2 * MAX_QUOTED."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip(" )")] or [type(error).__name__]
    return choose(lines)[:2 * MAX_QUOTED]


def check_integers_in_range(path, frame, low, high):
    """Raise a UserError naming the first cell that is missing, not an integer, or outside low..high."""
    for column in frame.columns:
        values = frame[column]
        if values.dtype.kind in "iu":  # the common case: pandas parsed the whole column as integers
            bad = (values < low) | (values > high)
        elif values.dtype.kind == "b":  # True/False is not a pixel value, though pandas would cast it to 1/0
            bad = pd.Series(True, index=values.index)
        else:
            numeric = pd.to_numeric(values.mask(values.map(lambda v: isinstance(v, bool))), errors="coerce")
            bad = numeric.isna() | (numeric % 1 != 0) | (numeric < low) | (numeric > high)
        if not bad.any():
            continue
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = values.iloc[row]
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain Python for the message
        if isinstance(value, float) and math.isnan(value):
            problem = "missing value"
        else:
            problem = f"value {quoted(value)} is not an integer in {low}..{high}"
        raise UserError(f"{path}: line {row + 2}, column {column}: {problem}")


def read_csv_frame(path):
    """A CSV file (plain, gzip or zip) as a DataFrame; a missing, empty or unparsable file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        start = f.read(4)
    # compressed by its content, whatever its name: a gzip or zip file named .csv is read as the CSV inside it
    compression = "gzip" if start[:2] == b"\x1f\x8b" else "zip" if start == b"PK\x03\x04" else None
    try:
        return pd.read_csv(path, engine="c", low_memory=False, compression=compression)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: not a readable CSV ({brief(error)})") from None


def write_frame(path, frame):
    """Write a DataFrame as CSV, atomically (the old file or the new one, never half of one)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# ----------------------------------------------------------------------------- people's own photos and drawings

# MNIST's recipe: white ink on black, the digit's bounding box scaled to fit 20x20 keeping its aspect
# ratio, then placed in a 28x28 field with its centre of mass at the centre. A photo or a drawing goes
# through the same steps before the model sees it.

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

MAX_IMAGE_PIXELS = 50 * 10**6  # above this, refused before decoding: 50 megapixels is already 200 MB as float

DECODE_SIZE = 2048             # a JPEG larger than this on both sides is decoded at a reduced scale

INK_THRESHOLD = 0.25  # after the contrast stretch, fainter pixels are paper texture or noise

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

def remove_background(image):
    """Stretch contrast from the paper's level to the darkest ink, then drop what is fainter than the threshold."""
    paper = np.median(border_pixels(image))
    return above_threshold(np.clip((image - paper) / max(image.max() - paper, 1e-6), 0, 1))

def crop_to_ink(image, name):
    """The bounding box of the ink; an image without enough ink is an error named after the image."""
    top, bottom, left, right = ink_box(image, name)
    return image[top:bottom, left:right]


def ink_box(image, name):
    """(top, bottom, left, right) of the ink, the ends exclusive; too little ink is an error named after the image."""
    ink = image > 0
    if ink.sum() < MIN_INK_PIXELS:
        raise UserError(f"{name}: {NO_DIGIT}")
    rows, columns = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return rows[0], rows[-1] + 1, columns[0], columns[-1] + 1

def fit_in_box(image, box=20):
    """Resize so the longer side is `box` pixels, keeping the aspect ratio (antialiased when shrinking)."""
    height, width = image.shape
    scale = box / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]  # [1, 1, H, W]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0, 0].clamp_(0, 1).numpy()

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

def preprocess_image(source, invert="auto", name=None):
    """An image file or a PIL image of a digit -> uint8 [28, 28] as an MNIST sample looks (normalization comes later).

    Messages call the image `name` (default: the path, or "the image"), e.g. "the drawing" for the page's
    canvas.
    """
    name = image_name(source, name)
    return mnist_digit(crop_to_ink(remove_background(ink_on_black(read_greyscale(source, name), invert)), name))


def mnist_digit(ink):
    """The ink of one digit, cropped to it (float [h, w] 0..1) -> uint8 [28, 28] fitted in 20x20 and centred by mass."""
    field = centre_by_mass(fit_in_box(ink))
    return torch.from_numpy(np.round(field * 255).astype(np.uint8))


# ----------------------------------------------------------------------------- the digits of a number in a photo

# The usual recipe: threshold the page once, label the ink's connected components, join the pieces of one digit,
# drop specks and ruled lines, split digits that touch, order them left to right and line by line, then give each
# digit MNIST's preprocessing on its own, its contrast stretched to its own darkest ink. Lengths are in units of the
# writing's height, measured from the page.

MAX_DIGITS = 64            # more digit-sized marks than this is not a number
FAINT_INK = 0.12           # smoothed ink above this joins the pieces of a digit (below INK_THRESHOLD)
SPECK = 0.15               # components smaller than this many heights squared are specks of dirt or noise
RULED_LINE = 2.0           # a horizontal run of ink this many heights long is a ruled line (no digit stroke is)
JOIN_GAP = 0.15            # pieces of one digit: over each other, at most this far apart, together a digit tall
JOIN_HEIGHT = 1.3
SMALL, NEAR, JOIN_WIDTH = 0.5, 0.3, 1.2   # fragments: under half a height tall, joined within 0.3 heights
JOIN_SHARE = 0.25          # two fragments over each other share this much of the narrower's columns (a 5's bar leans)
FLAT = 0.8                 # a fragment this many heights wide that joins nothing is a digit written flat
SPLIT_ASPECT = 0.6         # marks this wide for their height may hold touching digits
CUT_CANDIDATES = 16        # cuts tried across the middle 60% of a mark's width,
CUT_SLANTS = (-0.27, 0, 0.27)  # each upright and slanted 15 degrees either way
# Two logistic models fitted on numbers of MNIST training digits (python tests/number_photos.py --fit-split
# --data-dir ../shared/data): which cut of a mark is right, from cut_candidates' features, and whether the mark holds
# two digits, from split_features at that cut (bias first; its threshold chosen on other training numbers). With a
# pair detector (models.PairDetector: the released model has one), they are CUT_WEIGHTS_PAIR and SPLIT_WEIGHTS_PAIR,
# which weigh its reading of the mark too (first_cut).
CUT_WEIGHTS = (0.252, 0.393, 0.350, 0.292, -7.236, -0.309, 0.023, 0.616, -1.265, 1.470)
SPLIT_WEIGHTS = (-8.078, 7.221, -0.266, 0.550, -1.983, -0.951, -0.140, 4.299, 0.247, 1.128)
CUT_WEIGHTS_PAIR = (-3.037, -3.217, 1.375, 1.462, 0.742, -0.102, 0.412, -0.232, -0.255, -0.470, 7.123)
SPLIT_WEIGHTS_PAIR = (-2.021, 0.089, -0.182, -0.348, -0.398, -0.171, -0.359, 0.250, -0.299, 0.398, 1.330, -0.046)


@dataclass
class FoundDigits:
    """The digits of a photo in reading order: images uint8 [N, 28, 28], MNIST-like; for each its box
    (left, top, right, bottom; the ends exclusive, in the photo's pixels) and its line (0 first)."""
    images: torch.Tensor
    boxes: list
    lines: list


def find_digits(source, classify, invert="auto", name=None, pair=None):
    """A photo or drawing of a number (a path or PIL image) -> FoundDigits, left to right, line by line.

    `classify` (uint8 digits [M, 28, 28] -> probabilities [M, 10]) helps decide which marks hold touching digits
    and where to cut them, and `pair` (marks as pair_field gives them, uint8 [M, 32, 64] -> (log-odds [M] that each
    holds two touching digits, the probabilities [M, 2, 10] of its left and right digit if it does); None for models
    without a pair detector) too. A photo in which one mark
    is found, with no ruled line removed, gives exactly preprocess_image's digit: one digit alone reads as --images
    reads it. No digit, or more than MAX_DIGITS, is one line (UserError).
    """
    name = image_name(source, name)
    grey, ink, ruled, marks = find_marks(source, invert, name)
    if len(marks) == 1 and not ruled:
        alone = remove_background(grey)                                  # preprocess_image's path from here
        top, bottom, left, right = ink_box(alone, name)
        return FoundDigits(mnist_digit(alone[top:bottom, left:right])[None], [(left, top, right, bottom)], [0])
    rows = [split_touching(row, ink, classify, pair) for row in reading_lines(marks)]
    digits = [(k, mark) for k, row in enumerate(rows) for mark in row]
    images = torch.stack([mnist_digit(own_contrast(mark.ink(ink))) for _, mark in digits])
    return FoundDigits(images, [mark.box_ltrb for _, mark in digits], [k for k, _ in digits])


def own_contrast(ink):
    """A digit's ink on the page (float [h, w], above_threshold's 0..1) stretched to its own darkest pixel, as
    remove_background stretches a photo of one digit: a digit written fainter or thinner than the page's darkest
    reads as it would alone, not dimmed (thin strokes lose most to JPEG and blur)."""
    level = np.where(ink > 0, INK_THRESHOLD + (1 - INK_THRESHOLD) * ink, 0)   # the page's level before the threshold
    return above_threshold(level / level.max())


def find_marks(source, invert="auto", name=None):
    """(white-on-black grey [H, W], the ink 0..1 less ruled lines, whether a ruled line was removed, the marks: one
    per digit, or per group of touching digits) for a photo; no digit or more than MAX_DIGITS is a UserError."""
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
    lines = long_runs(mask, RULED_LINE * height)
    if lines.any():
        mask = remove_lines(mask, lines)
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
    return grey, ink, bool(lines.any()), marks


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


def above_threshold(stretched):
    """remove_background's threshold: what is fainter than INK_THRESHOLD is paper, the rest is stretched to 0..1."""
    return np.clip((stretched - INK_THRESHOLD) / (1 - INK_THRESHOLD), 0, 1)


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


def remove_lines(mask, lines):
    """The ink less its ruled lines, except where a digit's stroke crosses one (ink just above and just below)."""
    from scipy import ndimage
    thickness = max(1, int(np.ceil(lines.sum() / max(lines.any(0).sum(), 1))))  # pixels per column of line
    rest = mask & ~lines
    crossings = ndimage.binary_closing(rest, np.ones((thickness + 3, 1))) & lines
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

    def cut(self, column, slant):
        """(left part, right part) of this mark cut along a line through `column` at mid-height, leaning right by
        `slant` px per px upwards; None for a part without pixels."""
        ys, xs = np.mgrid[0:self.height, 0:self.width]
        left = xs < column + slant * (self.height / 2 - ys)
        return self.part(self.pixels & left), self.part(self.pixels & ~left)

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


def split_touching(marks, ink, classify, pair=None):
    """A line's marks, with those that hold touching digits cut into them (split_mark), each judged against the
    typical height of the line's other marks (its own when it is alone)."""
    heights = np.array([mark.height for mark in marks])
    return [digit for k, mark in enumerate(marks)
            for digit in split_mark(mark, ink, classify, np.median(np.delete(heights, k)) if len(marks) > 1
                                    else mark.height, pair)]


def split_mark(mark, ink, classify, height, pair=None):
    """[mark], or its digits when it holds touching ones: cut at its best cut (best_cut) when a logistic model of
    the cut's features says the mark holds two digits (SPLIT_WEIGHTS; with a pair detector SPLIT_WEIGHTS_PAIR, which
    weighs its reading of the mark too). Without a detector each part is tried again; with one the two parts are
    final: its cut leaves a part wider than a digit more often, and the parts tried again split more single digits
    than they found third digits (docs/measurements.md)."""
    features, parts = best_cut(mark, ink, classify, height, pair)
    if parts is None:
        return [mark]
    weights = SPLIT_WEIGHTS if pair is None else SPLIT_WEIGHTS_PAIR
    if np.dot(weights[1:], features) + weights[0] <= 0:
        return [mark]
    if pair is not None:
        return list(parts)
    return [digit for part in parts for digit in split_mark(part, ink, classify, height)]


def best_cut(mark, ink, classify, height, pair=None):
    """(the features of first_cut's cut among cut_candidates, (left part, right part)); (None, None) when there is
    none."""
    found = cut_candidates(mark, ink, classify, height, pair)
    if found is None:
        return None, None
    best, features = first_cut(mark, height, found)
    return features, found[0][best]


def first_cut(mark, height, found, cut_weights=None):
    """(the index of the cut the weights rank first among cut_candidates' `found` (CUT_WEIGHTS, or CUT_WEIGHTS_PAIR
    with the pair detector's reading), the features there: split_features, then with a pair detector its log-odds
    for the mark and how well the cut's parts agree with its reading)."""
    pairs, whole, parts, features, odds = found
    if cut_weights is None:
        cut_weights = CUT_WEIGHTS if odds is None else CUT_WEIGHTS_PAIR
    best = int(np.argmax(features @ np.asarray(cut_weights)))
    chosen = split_features(mark, height, whole, parts[best], pairs[best])
    return best, chosen if odds is None else np.append(chosen, [odds, features[best, -1]])


def mark_cuts(mark):
    """[(place, slant, (left part, right part))]: the mark cut at CUT_CANDIDATES places across its middle 60% (as a
    share of its width), each upright and slanted (CUT_SLANTS); cuts that leave a part empty are left out."""
    return [(place, slant, pair) for place in np.linspace(0.2, 0.8, CUT_CANDIDATES) for slant in CUT_SLANTS
            if None not in (pair := mark.cut(place * mark.width, slant))]


def cut_candidates(mark, ink, classify, height, pair=None):
    """The ways to cut a mark at least SPLIT_ASPECT as wide as it is tall in two: at CUT_CANDIDATES places across its
    middle 60%, each upright and slanted (CUT_SLANTS). None for a narrower mark, else (the pairs of parts, the
    model's probabilities float64 [10] for the whole mark and [C, 2, 10] for each pair's parts, each cut's features
    float [C, 10] (or [C, 11]), the pair detector's log-odds for the mark or None): for each part how sure the model
    is (log-odds) and by how much over its second choice (log-ratio); how far the cut lies from the middle and
    whether it slants; the parts' heights and widths for the line's `height`; with a pair detector (`pair`, as
    find_digits takes it), the log-probability that the parts read as the detector reads the mark's two digits."""
    if mark.width < SPLIT_ASPECT * mark.height:
        return None
    cuts = mark_cuts(mark)
    if not cuts:
        return None
    pairs = [pair for _, _, pair in cuts]
    images = torch.stack([mnist_digit(mark.ink(ink))] + [mnist_digit(part.ink(ink)) for pair in pairs for part in pair])
    probs = np.asarray(classify(images), dtype=np.float64).clip(1e-6, 1 - 1e-6)   # [1 + 2C, 10]
    whole, parts = probs[0], probs[1:].reshape(len(pairs), 2, 10)
    second, first = np.moveaxis(np.sort(parts, -1)[..., -2:], -1, 0)                # [C, 2] each
    where = np.array([(abs(place - 0.5), slant != 0) for place, slant, _ in cuts], dtype=np.float64)
    sizes = np.array([(part.height, part.width) for pair in pairs for part in pair]).reshape(len(pairs), 4) / height
    features = np.column_stack([logit(first), np.log(first / second), where, sizes])
    if pair is None:
        return pairs, whole, parts, features, None
    odds, digits = pair(pair_field(mark.ink(ink))[None])                            # [1], [1, 2, 10]
    agree = np.log((parts * np.asarray(digits[0], dtype=np.float64)).sum(-1).clip(1e-12)).sum(-1)   # [C]
    return pairs, whole, parts, np.column_stack([features, agree]), float(odds[0])


def split_features(mark, height, whole, parts, pair):
    """float [9] for SPLIT_WEIGHTS: the mark's width for the line's `height` and for its own; how sure the model is of
    the whole (log-odds) and by how much over its second choice (log-ratio); of both parts together and of the less
    sure part (log-odds); the smaller part's height for the line's; the parts' smaller and summed log-ratios."""
    second, first = np.sort(whole)[-2:]
    part_second, part_first = np.sort(parts, -1)[:, -2:].T                          # [2] each
    margins = np.log(part_first / part_second)
    return np.array([np.log(mark.width / height), np.log(mark.width / mark.height), logit(first),
                     np.log(first / second), logit(part_first.prod()), logit(part_first.min()),
                     min(part.height for part in pair) / height, margins.min(), margins.sum()])


def pair_field(ink, height=32, width=64):
    """The ink of a mark, cropped to it (float [h, w] 0..1) -> uint8 [32, 64]: as large as fits 28 rows and 60
    columns, its aspect ratio kept (where mnist_digit squeezes a wide mark into a digit's box), centred."""
    scale = min((height - 4) / ink.shape[0], (width - 4) / ink.shape[1])
    fitted = fit_in_box(ink, round(max(ink.shape) * scale))
    top, left = (height - fitted.shape[0]) // 2, (width - fitted.shape[1]) // 2
    field = np.zeros((height, width), dtype=np.float32)
    field[top:top + fitted.shape[0], left:left + fitted.shape[1]] = fitted
    return torch.from_numpy(np.round(field * 255).astype(np.uint8))


def logit(p):
    return np.log(p / (1 - p))


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


# ----------------------------------------------------------------------------- device and precision

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def cpu_supports_bf16(cpuinfo=None):
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is fast."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no reliable signal, stay with fp32
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})

def pick_device(requested="auto", local_rank=None):
    """CUDA, else Apple MPS, else CPU; an explicit request is checked against what is there.

    A CUDA device is always indexed (cuda:LOCAL_RANK under torchrun, else cuda:0 unless one is named), made the
    current device, and checked against the GPU kernels this PyTorch build carries, before any work starts.
    local_rank: torchrun's LOCAL_RANK, or None outside torchrun.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return cuda_device(local_rank or 0, f"--device auto picked cuda:{local_rank or 0}", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested[:MAX_QUOTED]}: not a device name (try cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {requested}: not supported here (use cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {requested}: Apple MPS is not available here")
    if device.type != "cuda":
        return device
    if device.index is not None and local_rank is not None:
        raise UserError(f"--device {requested} under torchrun would put every rank on that one GPU; "
                        "pass --device cuda (each rank then takes cuda:LOCAL_RANK)")
    index = device.index if device.index is not None else local_rank or 0
    return cuda_device(index, f"--device {requested}", local_rank)

def cuda_device(index, request, local_rank):
    """torch.device("cuda", index), made current, after checking that it exists and that torch has kernels for it."""
    count = torch.cuda.device_count()
    if index >= count:
        where = (f"torchrun's LOCAL_RANK is {local_rank}" if local_rank is not None
                 else f"{request} asks for GPU {index}")
        raise UserError(f"{where}, but this machine shows {count} CUDA GPU(s) (0..{count - 1}); "
                        "start fewer processes, or check CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", index)
    capability = torch.cuda.get_device_capability(device)
    architectures = torch.cuda.get_arch_list()
    if architectures and not cuda_build_runs_on(capability, architectures):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"{request}: this PyTorch build has no GPU kernels for {name} (compute capability "
                        f"{capability[0]}.{capability[1]}; it carries {' '.join(architectures)}); "
                        "use --device cpu, or install a PyTorch build that supports this GPU")
    torch.cuda.set_device(device)  # later allocations, generators and kernels of this process go to this GPU
    return device

def cuda_build_runs_on(capability, architectures):
    """True when a torch build with these get_arch_list() entries runs on a GPU of this (major, minor) capability.

    Compiled code (sm_XY) runs on GPUs of the same major version and a minor at least Y ("a" variants such as
    sm_90a on that exact GPU only); PTX (compute_XY) is compiled by the driver for any GPU from X.Y on.
    """
    for entry in architectures:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", entry)
        if match is None:
            continue
        kind, major, minor, variant = match[1], int(match[2]), int(match[3]), match[4]
        if kind == "compute" and (major, minor) <= tuple(capability):
            return True
        same_major = kind == "sm" and major == capability[0]
        if same_major and (minor == capability[1] or (variant != "a" and minor <= capability[1])):
            return True
    return False

def add_device_arguments(parser, training=False):
    """--device and --precision (and for training, --use-deterministic-algorithms) in a "device" group, the same
    in every script."""
    parser = parser.add_argument_group("device")
    if training:
        parser.add_argument("--use-deterministic-algorithms", action="store_true",
                            help="repeat bit for bit on a GPU as well as on a CPU, somewhat slower "
                                 "(README, GPUs and Macs)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:1, mps; under torchrun a rank "
                             "takes cuda:LOCAL_RANK")
    parser.add_argument("--precision", choices=["auto", *PRECISION_DTYPES], default="auto",
                        help="auto: bf16 on a bf16-capable CPU or GPU, fp16 with a gradient scaler on older GPUs, "
                             "fp32 elsewhere")

def pick_precision(requested, device):
    """'auto' -> bf16 on a bf16-capable CPU or GPU, fp16 on older GPUs (with a gradient scaler), else fp32.

    A GPU counts as bf16-capable only with native bf16 (compute capability 8.0 and newer): below that, torch
    emulates bf16 and cuDNN has no bf16 convolutions, so every convolution would take a slow path.
    """
    native_bf16 = (torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda"
                   else device.type == "cpu" and cpu_supports_bf16())
    if requested != "auto":
        if device.type == "cpu" and requested != "fp32" and (requested == "fp16" or not native_bf16):
            print(f"note: --precision {requested} on this CPU runs many times slower than fp32 "
                  "(it has no native bf16 or fp16 arithmetic); --precision auto picks the fast one", file=sys.stderr)
        if device.type == "cuda" and requested == "bf16" and not native_bf16:
            print("note: --precision bf16 on this GPU is emulated (native bf16 needs compute capability 8.0) and runs "
                  "many times slower than fp16; --precision auto picks the fast one", file=sys.stderr)
        return requested
    if device.type == "cuda":
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if native_bf16 else "fp32"

def use_deterministic_algorithms():
    """Make a run repeat bit for bit on a GPU too, at some cost in speed (torchvision's references offer the same).

    cuBLAS needs a fixed workspace for deterministic matrix products (set before its first call), and cuDNN
    must not pick its convolution algorithms by timing them. An operation with no deterministic version raises.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)

def share_cpu_threads(processes):
    """Give each of `processes` processes on this machine its share of the cores instead of all of them."""
    torch.set_num_threads(max(1, torch.get_num_threads() // processes))

def autocast(device, precision):
    """The mixed-precision context for a forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])

def uses_channels_last(device):
    """channels_last speeds up convolutions with oneDNN on CPU and cuDNN on GPU; MPS gains nothing from it."""
    return device.type in ("cpu", "cuda")

def place_model(model, device):
    """The model on the device, in channels_last where the device's convolutions gain from it."""
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


# ----------------------------------------------------------------------------- the checkpoint format

# The one checkpoint format, read by every script: a dict of plain types and tensors, so that
# torch.load(weights_only=True) reads it and a downloaded file cannot run code.
#   model_state    the model's plain state_dict (the EMA weights when the EMA is on)
#   arch           a name in models.MODELS
#   normalization  {"mean": float, "std": float}: what the model's inputs were standardized with
#   epoch          the epoch these weights are from
#   precision, metrics {"val_loss", "val_accuracy"}, settings (what defines the run), versions
#   complete       True once the run that writes it has finished
#   trained_on     optional: the record of the images the model trained on (see image_hashes); older files lack it
#   pair_detector  optional: the state_dict of a models.PairDetector, for --number (the released model has one)
# Beside NAME.pth: NAME.history.json (one record per epoch) and, while training runs, NAME.resume.pth.
# What only training writes (the lock, run settings, the resume state) is train_cnn.py's "run files".

CHECKPOINT_KEYS = ("model_state", "arch", "normalization", "epoch")
PIPELINE_A_CHECKPOINT = "CNN_best_model.pth"  # train_cnn.py's checkpoint, and what prediction uses when it is here
# The released model and its manifest (SHA-256, command, commit, machine, accuracy), beside the scripts (not in the
# working directory), so a copy of the repository reads with it from anywhere.
RELEASED_MODEL = Path(__file__).resolve().parent / "weights" / "vgg_mnist.pth"
RELEASE_MANIFEST = RELEASED_MODEL.with_name("manifest.json")

def history_path(checkpoint_path):
    return Path(checkpoint_path).with_suffix(".history.json")

RESUME_SUFFIX = ".resume.pth"

def resume_path(checkpoint_path):
    """Per-epoch training state beside the best checkpoint; removed once training completes."""
    return Path(checkpoint_path).with_suffix(RESUME_SUFFIX)

def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (plain types and tensors only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)

def read_checkpoint_file(path, required):
    """torch.load(weights_only=True) of a dict that must hold the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    if same_file(path, RELEASED_MODEL):
        check_release_digest(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, pickle with code in it, truncated file, ...
        # weights_only refusals bury the reason (the blocked global it would import) in a long message
        reason = brief(error, lambda lines: next((line for line in lines if "global" in line.lower()), lines[0]))
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not set(required) <= set(checkpoint):
        raise UserError(f"{path}: not a checkpoint of this project (it needs {', '.join(required)})")
    return checkpoint

def check_release_digest(path):
    """The released model is byte for byte the file its manifest names: a changed or truncated copy is one line."""
    manifest = read_json(RELEASE_MANIFEST)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != manifest.get("sha256"):
        raise UserError(f"{path}: its SHA-256 is not the one in {RELEASE_MANIFEST.name} (the file was changed or cut "
                        "short); restore it with `git checkout -- weights/`, or copy weights/ again from the "
                        "repository")

def load_checkpoint(path):
    """A model checkpoint, read safely and checked field by field."""
    checkpoint = read_checkpoint_file(path, CHECKPOINT_KEYS)
    check_checkpoint_fields(path, checkpoint)
    return checkpoint

def check_checkpoint_fields(path, checkpoint):
    """Each field of the format has the type and range it must have; the weights are finite."""
    arch, normalization, epoch = checkpoint["arch"], checkpoint["normalization"], checkpoint["epoch"]
    if not isinstance(arch, str) or arch not in MODELS:
        raise UserError(f"{path}: unknown architecture {quoted(arch)} (known: {', '.join(MODELS)})")
    if not (isinstance(normalization, dict) and set(normalization) == {"mean", "std"}
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalization.values())
            and normalization["std"] > 0):
        raise UserError(f"{path}: normalization must be {{'mean': number, 'std': positive number}}, "
                        f"found {quoted(normalization)}")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise UserError(f"{path}: epoch must be a whole number, found {quoted(epoch)}")
    check_state_dict(path, checkpoint["model_state"])
    if "pair_detector" in checkpoint:
        check_state_dict(path, checkpoint["pair_detector"])
    record = checkpoint.get("trained_on")
    if record is not None and not (torch.is_tensor(record) and record.dtype == torch.int64 and record.dim() == 1
                                   and bool((record[1:] > record[:-1]).all())):
        raise UserError(f"{path}: trained_on must be a sorted int64 tensor of image hashes, found {quoted(record)}")

def check_state_dict(path, state):
    """A state dict: names -> tensors, every floating-point value finite (a NaN model labels every image 0)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path}: model_state is not a dict of named tensors (found {type(state).__name__})")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: the weights are not finite ({name} holds NaN or Inf); train it again")

def is_complete(checkpoint):
    """True when the run that wrote this checkpoint dict finished (its weights are the run's best)."""
    return checkpoint.get("complete", False) is True

def model_from_checkpoint(path, device, checkpoint=None):
    """Build the checkpoint's architecture and load its weights: (model in eval mode, checkpoint dict)."""
    checkpoint = checkpoint or load_checkpoint(path)
    arch = checkpoint["arch"]
    model = build_model(arch)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as error:
        reason = brief(error, lambda lines: lines[1 if len(lines) > 1 else 0])  # the first says which class failed
        raise UserError(f"{path}: weights do not fit the {arch} architecture ({reason})") from None
    return place_model(model, device).eval(), checkpoint


def pair_detector_from_checkpoint(path, device, checkpoint):
    """The checkpoint's models.PairDetector in eval mode, or None when it has none."""
    if "pair_detector" not in checkpoint:
        return None
    detector = PairDetector()
    try:
        detector.load_state_dict(checkpoint["pair_detector"])
    except RuntimeError as error:
        raise UserError(f"{path}: its pair detector does not fit models.PairDetector "
                        f"({brief(error, lambda lines: lines[1 if len(lines) > 1 else 0])})") from None
    return detector.to(device).eval()


def image_hashes(images):
    """A 64-bit content hash of each image's 784 bytes (blake2b), as int64 [N]: the same image hashes the same
    wherever it comes from (MNIST's IDX files, a Kaggle CSV, a photo's 28x28 input), in any order."""
    rows = images.reshape(len(images), NUM_PIXELS).to("cpu", torch.uint8).numpy()
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rows)
    return torch.from_numpy(np.frombuffer(digests, dtype="<i8").copy())

def trained_on_mask(hashes, records):
    """For image hashes [N] and one record per model (None: a checkpoint without one): bool [models, N]."""
    rows = [torch.zeros(len(hashes), dtype=torch.bool) if r is None else torch.isin(hashes, r) for r in records]
    return torch.stack(rows) if rows else torch.zeros(0, len(hashes), dtype=torch.bool)


def checkpoint_files(paths):
    """The checkpoint files that paths name: files as given, folders expanded to their *.pth (resume files left out)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p in sorted(path.glob("*.pth")) if not p.name.endswith(RESUME_SUFFIX)]
        else:
            files.append(path)
    return files


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    Readers see the old file or the new one, never half of one, even if the process is killed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def remove_orphaned_temporaries(path):
    """Remove the temporary files of `path` left by writers that were killed (their process no longer exists)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)

def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True

def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

def check_writable(path):
    """Fail at start-up, not after an hour of training, when an output file cannot be written; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    check_folder_writable(path.parent, path)

def check_output_folder(flag, path):
    """Fail at start-up when an output folder cannot be made or written to (or a file is in its place)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: a file is in the way of this output folder")
    check_folder_writable(path, path)

def check_folder_writable(folder, target):
    """A file can be created in `folder`, or, where it does not exist yet, in the nearest part of it that does."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {target}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror or error}") from None

def same_file(a, b):
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()

def check_outputs(outputs, inputs):
    """Before any work: every output file is writable, not a folder, and none is one of the run's inputs.

    outputs, inputs: {flag: [paths]}, the flag naming where each path came from in the error message.
    """
    named_inputs = [(flag, Path(p)) for flag, paths in inputs.items() for p in paths if p is not None]
    for flag, paths in outputs.items():
        for path in map(Path, paths):
            for input_flag, input_path in named_inputs:
                if same_file(path, input_path):
                    raise UserError(f"{flag} would overwrite an input ({path} is {input_flag} {input_path}); "
                                    "choose another output path")
            check_writable(path)

def write_numpy(path, value):
    """An array as .npy, or a dict of arrays as .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(value, dict):
            np.savez(f, **value)
        else:
            np.save(f, value)

def read_json(path, what="readable JSON", remedy="remove it to start again"):
    """A JSON file the project wrote; when it cannot be read, a UserError naming it, `what` it is not, and `remedy`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not {what} ({brief(error)}); {remedy}") from None


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")

def library_versions():
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}


# ----------------------------------------------------------------------------- command line

class UserError(Exception):
    """A problem the user can fix (bad file, bad flag); scripts print it as one line and exit with code 2."""

def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    if hasattr(sys.stdout, "reconfigure"):  # each epoch's line reaches a log file or a notebook cell as it is printed
        sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help and a bad flag told in two lines: a short usage, then the error."""

    def __init__(self, description=None, **options):
        super().__init__(description=description, formatter_class=HelpFormatter, **options)

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]; see --help\n{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where there is one to show), and the module docstring's command examples kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def checked(convert, accepts, expected, name):
    """An argparse type: `convert` the text, then refuse what `accepts` does not, saying it `expected`."""
    def parse(text):
        value = convert(text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    parse.__name__ = name  # argparse names the type in "invalid positive_int value: 'x'"
    return parse


MAX_SEED = 2**32 - 1000  # numpy and scikit-learn take seeds below 2**32; runs derive a few seeds above --seed
positive_int = checked(int, lambda v: v > 0, "a positive integer", "positive_int")
seed_int = checked(int, lambda v: 0 <= v < MAX_SEED, f"an integer in 0..{MAX_SEED - 1}", "seed_int")
port_number = checked(int, lambda v: 1 <= v <= 65535, "a port number in 1..65535", "port_number")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number", "positive_float")
nonnegative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "nonnegative_float")
fraction = checked(float, lambda v: 0 < v < 1, "between 0 and 1", "fraction")
below_one = checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "below_one")  # label smoothing, EMA decay: 0 is off


def duration(text):
    """An argparse type: a duration such as 90s, 10m, 2h or 1h30m -> seconds (float)."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    seconds = match and sum(float(part or 0) * unit for part, unit in zip(match.groups(), (3600, 60, 1), strict=True))
    if not seconds or not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"must be a duration such as 90s, 10m, 2h or 1h30m, got {text}")
    return seconds


def format_duration(seconds):
    """Seconds as the shortest of '2h', '10m' or '90s' that is exact (rounded to whole seconds otherwise)."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


# ----------------------------------------------------------------------------- export-kaggle command

def export_kaggle(data_dir, out):
    """Kaggle-format train.csv / test.csv / test_labels.csv from MNIST, for an offline end-to-end run."""
    train_images, train_labels = load_mnist(data_dir, "train")
    test_images, test_labels = load_mnist(data_dir, "test")
    out = Path(out)
    write_images_csv(out / "train.csv", train_images, train_labels)
    write_images_csv(out / "test.csv", test_images)
    write_submission(out / "test_labels.csv", test_labels)
    print(f"wrote {out}/train.csv ({len(train_labels)} rows), test.csv and test_labels.csv ({len(test_labels)} rows)")

def main(argv=None):
    parser = Parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    export = commands.add_parser("export-kaggle", help="write Kaggle-format CSVs from MNIST",
                                 description="Kaggle-format train.csv, test.csv and test_labels.csv from MNIST")
    export.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding MNIST/raw (env MNIST_DATA_DIR)")
    export.add_argument("--out", default="data/digit-recognizer", help="output folder")
    args = parser.parse_args(argv)
    export_kaggle(args.data_dir, args.out)

if __name__ == "__main__":
    run_cli(main)
