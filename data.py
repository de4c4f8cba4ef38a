"""The data: from files on disk to a normalized batch on the device, and the device it runs on.

In data-flow order: MNIST (its IDX files, downloaded when missing), Kaggle's CSV files (every cell checked), the
data-source flags that choose between them, splits and batches, then the device and precision every script runs
at, and the export-kaggle command. Augmentation and the TTA variants are augmentation.py's; people's own images are
photos.py's.

    python data.py export-kaggle --data-dir ../shared/data --out data/digit-recognizer
"""
import contextlib
import gzip
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from augmentation import augment
from cli import MAX_QUOTED, Parser, UserError, brief, positive_int, quoted, run_cli, write_frame

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


# What keeps a bad file from becoming data: every cell is checked, and an offending one quoted, briefly, in one line.

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
