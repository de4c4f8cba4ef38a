"""Pipeline B, prediction: average an ensemble's softmax over test-time augmentations, write submission.csv.

    python predict_tta.py --test-csv data/digit-recognizer/test.csv               # every complete model in models/
    python predict_tta.py --weights CNN_best_model.pth --data mnist --no-tta      # one model on MNIST's test set
    python predict_tta.py --images photo.jpg my_digits/       # people's own images, with the released model
    python predict_tta.py --demo                              # draw a number in the browser (requirements-demo.txt)
    python predict_tta.py --weights models --export digits.onnx  # one ONNX graph (requirements-export.txt)

Each checkpoint brings its own architecture and normalization. The same inputs, seed and batch size give the same
submission: each TTA variant draws its random shifts from its own seeded generator. In this file: TTA over the
ensemble, `DigitReader` (the Python entry point everything predicts through), the submission, then main and own
images; below one banner, finding the checkpoints, checking paths and the ONNX export. --demo serves demo.py's page.
"""
import contextlib
import copy
import functools
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import checkpoints
import cli
import data
from augmentation import TTA_VARIANTS
from models import LINE_READER, LineReader
from photos import boxed_photo, find_digits, find_images, preprocess_image


# ----------------------------------------------------------------------------- test-time augmentation over the ensemble

@torch.inference_mode()
def ensemble_probabilities(ensemble, images, variants, precision, seed, batch_size=data.EVAL_BATCH_SIZE):
    """Mean softmax [N, 10] over every model and every TTA variant, for uint8 images [N, 28, 28] on the device.

    Each batch is augmented once per variant and shared by all models; variant i draws from a generator
    seeded with seed + i, so the result depends only on the inputs, the seed and the batch size. A model
    whose outputs are not finite is named in a UserError: its NaNs would otherwise label every image 0.
    """
    device = images.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(variants))]
    total = torch.zeros(len(images), 10, device=device)
    finite = torch.ones(len(ensemble), dtype=torch.bool, device=device)  # per model, read once at the end
    batches = data.batch_indices(len(images), batch_size)
    progress = data.progress_bar(len(batches), "predict")
    for index in batches:
        for variant, generator in zip(variants, generators, strict=True):
            x = data.to_unit_float(images[index], variant, generator)          # [B, 1, 28, 28] in 0..1
            for m, (model, normalization, _) in enumerate(ensemble):
                with data.autocast(device, precision):
                    logits = model(data.model_input(x, normalization)).float()   # [B, 10]
                finite[m] &= torch.isfinite(logits).all()
                total[index] += torch.softmax(logits, 1)
        progress.update()
    progress.close()
    for ok, (_, _, path) in zip(finite.tolist(), ensemble, strict=True):
        if not ok:
            raise cli.UserError(f"{path}: the model's outputs are NaN or Inf on these images; nothing was written")
    return total / (len(ensemble) * len(variants))


def tta_variants(count):
    """The first `count` variants: 1 is plain prediction (identity only)."""
    if not 1 <= count <= len(TTA_VARIANTS):
        raise cli.UserError(f"--tta must be between 1 and {len(TTA_VARIANTS)}, got {count}")
    return TTA_VARIANTS[:count]


# ----------------------------------------------------------------------------- the Python entry point

class DigitReader:
    """Read handwritten digits from your own code; submission.csv, --images, the page and evaluate.py all use it.

        from predict_tta import DigitReader
        reader = DigitReader()                         # CNN_best_model.pth here, else the released model
        reader = DigitReader("models")                 # a checkpoint, a list of them, or a folder: an ensemble
        labels, probs = reader.predict("photo.jpg")    # labels int64 [1], probs float32 [1, 10]
        labels, probs = reader.predict(digits)         # MNIST-like uint8 digits [N, 28, 28] or [28, 28]

    A path or a PIL image is a photo or a drawing, of any size, dark ink on light paper or the reverse: it goes
    through preprocess_image (MNIST's recipe) first. A numpy array or torch tensor is taken as MNIST-like already:
    a white digit on black, 28x28, uint8 0..255, shaped [28, 28] or [N, 28, 28]; anything else is refused in one
    line (UserError). The answer is the mean softmax over the models and the first `tta` TTA variants (1: plain
    prediction), on the CPU; the same inputs, seed and batch size give the same answer. `trained_on` counts the
    digits that the models trained on, from the record each checkpoint keeps: no accuracy on those is a fair score.
    """

    def __init__(self, weights=None, device="auto", precision="auto", tta=1, seed=42, batch_size=data.EVAL_BATCH_SIZE,
                 line_reader=None):
        self.device = device if isinstance(device, torch.device) else data.pick_device(device)
        self.precision = data.pick_precision(precision, self.device)
        self.variants = tta_variants(tta)
        weights = default_weights() if weights is None else weights
        found = find_checkpoints([weights] if isinstance(weights, (str, Path)) else weights)
        self.ensemble = [(checkpoints.load_model(path, self.device, checkpoint)[0], checkpoint["normalization"], path)
                         for path, checkpoint in found]   # [(model, normalization, path)]
        self.records = [checkpoint.get("trained_on") for _, checkpoint in found]  # None: saved before records
        self.line_reader = self.find_line_reader(line_reader, found)
        self.seed, self.batch_size = seed, batch_size

    def find_line_reader(self, path, found):
        """The models.LineReader that reads whole numbers: from `path` (a checkpoint of train_reader.py, or one that
        carries a reader) when given, else the first checkpoint's that carries one, else the released model's; None
        when none has one (then read_number is refused in one line)."""
        if path is not None:
            return checkpoints.load_line_reader(path, self.device, checkpoints.load(path))
        released = checkpoints.RELEASED_MODEL
        if released.is_file() and not any(cli.same_file(source, released) for source, _ in found):
            found = [*found, (released, checkpoints.load(released))]
        readers = (checkpoints.load_line_reader(source, self.device, checkpoint) for source, checkpoint in found)
        return next((reader for reader in readers if reader is not None), None)

    @property
    def paths(self):
        """The checkpoint files of the ensemble, in order."""
        return [path for _, _, path in self.ensemble]

    def predict(self, source, invert="auto"):
        """(labels int64 [N], probabilities float32 [N, 10]) for a photo (path or PIL image) or MNIST-like digits."""
        probs = self.probabilities(self.digits(source, invert))
        return probs.argmax(1), probs

    def read_number(self, source, invert="auto", name=None):
        """A photo or drawing of a whole number (path or PIL image) -> Number: its lines of writing found and read by
        the line reader (find_digits), left to right and line by line, each digit's probabilities the mean of the
        reader's and the classifier's (and its TTA's) on the digit's image; one digit alone is read as predict reads
        it."""
        if self.line_reader is None:
            raise cli.UserError(f"reading a whole number needs a line reader, and neither the models nor "
                                f"{checkpoints.RELEASED_MODEL} carry one: copy weights/ from the repository, or give "
                                "--line-reader")
        found = find_digits(source, self.read_lines, invert, name)
        probs = self.probabilities(found.images)
        if found.probabilities is not None:     # the reader's and the classifier's readings, each digit's in the mean
            probs = (found.probabilities + probs) / 2
        labels = probs.argmax(1)
        words = ["".join(str(int(labels[i])) for i, line in enumerate(found.lines) if line == k)
                 for k in range(found.lines[-1] + 1)]
        return Number(" ".join(words), labels, probs, found.boxes, found.lines, found.images)

    def digits(self, source, invert="auto", name=None):
        """MNIST-like uint8 [N, 28, 28] on the CPU: a photo preprocessed (`name` in messages), or digits checked."""
        from PIL import Image
        if isinstance(source, (str, Path, Image.Image)):
            return preprocess_image(source, invert, name)[None]
        return mnist_like(source)

    def probabilities(self, digits):
        """The mean softmax float32 [N, 10] on the CPU for MNIST-like uint8 digits [N, 28, 28] (checked)."""
        digits = mnist_like(digits)
        return ensemble_probabilities(self.ensemble, digits.to(self.device), self.variants, self.precision, self.seed,
                                      self.batch_size).cpu()

    @torch.inference_mode()
    def read_lines(self, lines):
        """The line reader's probabilities per frame, [float [T, 11]] on the CPU, for lines of writing as
        photos.line_of makes them ([float [LINE_HEIGHT, W]], T = W // LineReader.STRIDE), read in one batch."""
        width = max(line.shape[1] for line in lines)
        x = torch.stack([F.pad(line, (0, width - line.shape[1])) for line in lines])[:, None]  # [B, 1, 32, W]
        with data.autocast(self.device, self.precision):
            frames = torch.softmax(self.line_reader(x.to(self.device)).float(), -1).cpu()     # [B, T, 11]
        return [read[:max(1, line.shape[1] // LineReader.STRIDE)] for read, line in zip(frames, lines, strict=True)]

    def trained_on(self, digits):
        """How many of these MNIST-like digits [N, 28, 28] the models trained on: {"images": of the N, any model,
        "of": N, "models": that trained on any of them, "unrecorded": models whose checkpoint keeps no record}."""
        hashes = checkpoints.image_hashes(mnist_like(digits))
        seen = checkpoints.trained_on_mask(hashes, self.records)                    # bool [models, N]
        return {"images": int(seen.any(0).sum()), "of": seen.shape[1], "models": int(seen.any(1).sum()),
                "unrecorded": sum(record is None for record in self.records)}


@dataclass
class Number:
    """What DigitReader.read_number found: the text ("4096"; lines apart by a space: "12 40"), and for each digit, in
    reading order, its label (int64 [N]), probabilities (float32 [N, 10]), box in the photo's pixels (left, top,
    right, bottom; the ends exclusive), line (0 first) and the uint8 [28, 28] image the model saw ([N, 28, 28])."""
    text: str
    labels: torch.Tensor
    probabilities: torch.Tensor
    boxes: list
    lines: list
    images: torch.Tensor


def mnist_like(digits):
    """Digits as uint8 [N, 28, 28] tensors, from a numpy array or tensor of [28, 28] or [N, 28, 28] uint8."""
    if isinstance(digits, np.ndarray):
        digits = torch.from_numpy(digits)
    if not torch.is_tensor(digits):
        raise cli.UserError(f"cannot read digits from a {type(digits).__name__}: give a path, a PIL image, "
                            "or a uint8 array or tensor of [28, 28] or [N, 28, 28]")
    if digits.dtype != torch.uint8:
        raise cli.UserError("digits must be uint8 0..255 (white on black, as MNIST), not "
                            f"{str(digits.dtype).replace('torch.', '')}")
    if digits.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE):
        digits = digits[None]
    if digits.dim() != 3 or tuple(digits.shape[1:]) != (data.IMAGE_SIZE, data.IMAGE_SIZE) or len(digits) == 0:
        raise cli.UserError(f"digits must be shaped [28, 28] or [N, 28, 28], not {list(digits.shape)}")
    return digits.cpu()


def say_trained_on(count, models):
    """Print what reader.trained_on counted, one line each; the mark for every accuracy on those images ("" if fair)."""
    if count["unrecorded"]:
        print(f"note: {count['unrecorded']} of {models} models were saved without a record of their training images, "
              "so they are not checked")
    if not count["images"]:
        return ""
    print(f"warning: {count['images']} of {count['of']} images are among the training images of {count['models']} of "
          f"{models} models: an accuracy on them is not a fair score")
    return f" (not a fair score: {count['images']} of {count['of']} images trained on)"


# ----------------------------------------------------------------------------- the submission

def predict_submission(args, reader):
    """submission.csv for the test CSV (or MNIST's test set), scored when it has labels; the probabilities too."""
    images, labels = data.load_data(args, "test")
    passes = len(reader.ensemble) * len(reader.variants)
    print(f"{len(reader.ensemble)} models x {len(reader.variants)} TTA variants = {passes} forward passes per image, "
          f"{len(images)} images; device {reader.device}, precision {reader.precision}")
    unfair = say_trained_on(reader.trained_on(images), len(reader.ensemble))

    start = time.perf_counter()
    probs = reader.probabilities(images)
    seconds = time.perf_counter() - start
    predicted = probs.argmax(1)
    print(f"predicted in {seconds:.1f}s ({len(images) / seconds:.0f} images/s, "
          f"{len(images) * passes / seconds:.0f} forward passes/s)")
    data.write_submission(args.out, predicted)
    print(f"wrote {args.out} ({len(predicted)} rows)")
    if args.save_probs:
        cli.write_numpy(args.save_probs, probs.numpy())
        print(f"wrote {args.save_probs}")
    if labels is not None:
        errors = int((predicted != labels).sum())
        print(f"accuracy {1 - errors / len(labels):.4f} ({errors} errors in {len(labels)} images){unfair}")


# ----------------------------------------------------------------------------- main, and own images (--images)

def main(argv=None):
    args = parse_args(argv)
    tta_variants(args.tta)  # a bad --tta is one line before anything is loaded
    if args.weights is None:
        args.weights = [default_weights()]
    check_paths(args)
    if args.demo:
        import demo  # only here: the page's packages are optional (requirements-demo.txt)
        return demo.serve(functools.partial(reader_for, args), args.host, args.port)
    if args.export:
        import_onnx()  # before the models load: without the packages, that is the one line
        return export_onnx(reader_for(args), args.export, args.data_dir)
    if args.images and args.number:
        return predict_numbers(args, reader_for(args))
    if args.images:
        return predict_images(args, reader_for(args))
    return predict_submission(args, reader_for(args))


def parse_args(argv=None):
    parser = cli.Parser(__doc__)
    inputs = parser.add_argument_group("data")
    data.add_data_arguments(inputs, default="csv", split="test")
    images = parser.add_argument_group("own images")
    images.add_argument("--images", nargs="+",
                        help="predict these image files and folders of them (PNG, JPEG, BMP, ...) instead")
    images.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                        help="with --images: make the ink white on black; auto inverts when the border is light")
    images.add_argument("--number", action="store_true",
                        help="with --images: read each image as a whole number, its digits left to right and line by "
                             "line (a second line after a space)")
    images.add_argument("--line-reader", help="with --number or --demo: read lines of writing with this line reader "
                                              "(train_reader.py's checkpoint; default: the models' own, else the "
                                              "released model's)")
    images.add_argument("--show-preprocessed", help="with --images: save the 28x28 images the model saw to this folder "
                                                    "(with --number, each digit and the photo with numbered boxes)")
    add_reader_arguments(parser, tta=len(TTA_VARIANTS), weights="models/ for a CSV or --export; for --images and "
                         f"--demo {checkpoints.PIPELINE_A_CHECKPOINT} when it is here, else the released model")
    files = parser.add_argument_group("files")
    files.add_argument("--out", help="CSV to write (default: submission.csv; with --images, only written when given)")
    files.add_argument("--save-probs", help="also save the averaged probabilities [N, 10] to this .npy file")
    files.add_argument("--export",
                       help="write the --weights ensemble as one ONNX graph to this file instead, checked in "
                            "onnxruntime first (needs pip install -r requirements-export.txt)")
    data.add_device_arguments(parser)
    page = parser.add_argument_group("draw-a-number page")
    page.add_argument("--demo", action="store_true",
                      help="serve a page to draw a number on (or upload a photo) and watch the model read it "
                           "(needs pip install -r requirements-demo.txt)")
    page.add_argument("--host", default="127.0.0.1",
                      help="with --demo: the address to serve on; 0.0.0.0 exposes the model to everyone on the network")
    page.add_argument("--port", type=cli.port_number, default=7860, help="with --demo: the port to serve on")
    args = parser.parse_args(argv)
    if args.demo and (extra := changed_options(parser, args, NOT_WITH_DEMO)):
        raise cli.UserError(f"--demo predicts what is drawn or uploaded on its page; it takes no {', '.join(extra)}")
    if args.export and (extra := changed_options(parser, args, NOT_WITH_EXPORT)):
        raise cli.UserError(f"--export writes the model as a graph; it takes no {', '.join(extra)}")
    if not args.demo and (extra := changed_options(parser, args, ("--host", "--port"))):
        raise cli.UserError(f"{' and '.join(extra)} go with --demo")
    args = data.resolve_data_arguments(args)
    if args.images is None and (args.invert != "auto" or args.show_preprocessed or args.number):
        parser.error("--invert, --number and --show-preprocessed go with --images")
    if args.images is None and args.out is None and not args.demo and not args.export:
        args.out = "submission.csv"
    if args.weights is None and args.images is None and not args.demo:
        args.weights = ["models"]
    return args


def add_reader_arguments(parser, tta, weights):
    """The flags that pick the models and how they read, shared with evaluate.py: each script gives its own default
    number of TTA variants and says what --weights defaults to."""
    group = parser.add_argument_group("prediction")
    group.add_argument("--weights", nargs="+", help=f"checkpoint files and/or folders of them (default: {weights})")
    group.add_argument("--tta", type=cli.positive_int, default=tta, help="number of TTA variants (1 = none)")
    group.add_argument("--no-tta", dest="tta", action="store_const", const=1, help="plain prediction, same as --tta 1")
    group.add_argument("--batch-size", type=cli.positive_int, default=data.EVAL_BATCH_SIZE)
    group.add_argument("--seed", type=cli.seed_int, default=42, help="seed of the TTA variants' random shifts")


def reader_for(args):
    """The DigitReader the command line asks for."""
    return DigitReader(args.weights, args.device, args.precision, args.tta, args.seed, args.batch_size,
                       getattr(args, "line_reader", None))


def predict_images(args, reader):
    """Predict each image file; a bad file is one line on stderr, and a UserError ends the run after the others."""
    files, problems = find_images(args.images)
    paths, digits = [], []
    for path in files:
        try:
            digits.append(reader.digits(path, args.invert)[0])
            paths.append(path)
        except cli.UserError as error:
            problems.append(str(error))
    if digits:
        images = torch.stack(digits)                                                  # uint8 [N, 28, 28]
        say_trained_on(reader.trained_on(images), len(reader.ensemble))
        probs = reader.probabilities(images)
        top = probs.topk(2, dim=1)
        for path, values, labels in zip(paths, top.values, top.indices, strict=True):
            print(f"{path}: {labels[0]} ({values[0]:.2f}), next {labels[1]} ({values[1]:.2f})")
        if args.out:
            frame = pd.DataFrame(probs.numpy().round(6), columns=[f"p{d}" for d in range(10)])
            frame.insert(0, "path", [str(path) for path in paths])
            frame.insert(1, "label", top.indices[:, 0].numpy())
            frame.insert(2, "probability", top.values[:, 0].numpy().round(6))
            cli.write_frame(args.out, frame)
            print(f"wrote {args.out} ({len(paths)} rows)")
        if args.show_preprocessed:
            save_preprocessed(Path(args.show_preprocessed), paths, images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise cli.UserError(f"{len(problems)} of the inputs could not be predicted (each named above)")


def predict_numbers(args, reader):
    """--images --number: read each image as a whole number, one line each; a bad file is one line on stderr."""
    files, problems = find_images(args.images)
    read = []                                                                     # [(path, Number)]
    for path in files:
        try:
            read.append((path, reader.read_number(path, args.invert)))
        except cli.UserError as error:
            problems.append(str(error))
    if read:
        say_trained_on(reader.trained_on(torch.cat([number.images for _, number in read])), len(reader.ensemble))
        for path, number in read:
            sure = " ".join(f"{p:.2f}" for p in number.probabilities.max(1).values.tolist())
            print(f"{path}: {number.text}  ({sure})")
        if args.out:
            frame = pd.concat([number_rows(path, number) for path, number in read], ignore_index=True)
            cli.write_frame(args.out, frame)
            print(f"wrote {args.out} ({len(frame)} rows, one per digit)")
        if args.show_preprocessed:
            save_number_images(Path(args.show_preprocessed), read)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise cli.UserError(f"{len(problems)} of the inputs could not be read (each named above)")


def number_rows(path, number):
    """One row per digit: file, line and position (from 1), box (left, top, right, bottom), label, probabilities."""
    positions = [number.lines[:k].count(line) + 1 for k, line in enumerate(number.lines)]
    frame = pd.DataFrame(number.probabilities.numpy().round(6), columns=[f"p{d}" for d in range(10)])
    boxes = np.array(number.boxes, dtype=np.int64).reshape(-1, 4)
    columns = {"path": str(path), "line": np.array(number.lines) + 1, "position": positions,
               "left": boxes[:, 0], "top": boxes[:, 1], "right": boxes[:, 2], "bottom": boxes[:, 3],
               "label": number.labels.numpy(), "probability": number.probabilities.max(1).values.numpy().round(6)}
    for k, (column, values) in enumerate(columns.items()):
        frame.insert(k, column, values)
    return frame


def save_number_images(folder, read):
    """For each image: its digits as the model saw them (NAME_digitK_28x28.png, K from 1 in reading order) and the
    photo with the numbered boxes drawn (NAME_boxes.png)."""
    from PIL import Image
    names = [name.removesuffix("_28x28.png") for name in preprocessed_names([path for path, _ in read])]
    for name, (path, number) in zip(names, read, strict=True):
        for k, image in enumerate(number.images, 1):
            with cli.atomic_path(folder / f"{name}_digit{k}_28x28.png") as tmp:
                Image.fromarray(image.numpy()).save(tmp, format="PNG")
        with cli.atomic_path(folder / f"{name}_boxes.png") as tmp:
            boxed_photo(path, number.boxes, number.labels).save(tmp, format="PNG")
    print(f"wrote the digits and boxes of {len(read)} images to {folder}/")


def preprocessed_names(paths):
    """A distinct PNG name per input: digit.png and digit.jpg become digit_28x28.png and digit.jpg_28x28.png."""
    stems = [path.stem for path in paths]
    return [f"{path.stem if stems.count(path.stem) == 1 else path.name}_28x28.png" for path in paths]


def save_preprocessed(folder, paths, images):
    """The 28x28 inputs exactly as the model saw them (before normalization), one PNG per file."""
    from PIL import Image
    names = preprocessed_names(paths)
    for name, image in zip(names, images, strict=True):
        with cli.atomic_path(folder / name) as tmp:
            Image.fromarray(image.numpy()).save(tmp, format="PNG")
    print(f"wrote {len(set(names))} preprocessed images to {folder}/")


# ============================================================================= machinery
# Below: finding the checkpoints (the released model when none is named), checking options and paths before any
# work, and the ONNX export. The draw-a-number page (--demo) is demo.py's; it reads through DigitReader too.


def find_checkpoints(paths):
    """[(path, checkpoint dict)] of the complete checkpoints that files and folders name (a folder: its *.pth).

    An unfinished checkpoint (its training was stopped, or still runs) is never used, whether named by its file or
    found in a folder: one line names it and says how to finish it, and the others are used.
    """
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise cli.UserError(f"{path}: no such checkpoint file or folder; make one with `make train` (pipeline A, "
                                "about 30 minutes on 2 cores) or, in 3 minutes, `python train_cnn.py --budget 3m`, "
                                "which writes CNN_budget_3m.pth")
        candidates = [(p, checkpoints.load(p)) for p in checkpoints.checkpoint_files([path])]
        if path.is_dir() and not candidates:
            raise cli.UserError(f"{path}: no complete checkpoint (*.pth) in this folder; train first or pass "
                                "--weights FILE")
        for candidate, checkpoint in candidates:
            if path.is_dir() and checkpoint["arch"] == LINE_READER:   # a folder's line reader reads no single digit
                continue
            if checkpoints.is_complete(checkpoint):
                found.append((candidate, checkpoint))
            else:
                print(f"skipping {candidate}: {UNFINISHED}")
    if not found:
        raise cli.UserError(f"no complete checkpoint in {' '.join(map(str, paths))}: {UNFINISHED}, or pass another "
                            "--weights")
    return found


UNFINISHED = "training did not finish (rerun its training command to finish it)"


def default_weights():
    """What a prediction uses when no model is named, said in one line on stdout: pipeline A's model in the working
    directory when it is there and finished, else the released model beside the scripts."""
    if Path(checkpoints.PIPELINE_A_CHECKPOINT).is_file():
        if checkpoints.is_complete(checkpoints.load(checkpoints.PIPELINE_A_CHECKPOINT)):
            print(f"using {checkpoints.PIPELINE_A_CHECKPOINT} (pipeline A's model in this folder; --weights picks "
                  "another)")
            return Path(checkpoints.PIPELINE_A_CHECKPOINT)
        print(f"skipping {checkpoints.PIPELINE_A_CHECKPOINT}: {UNFINISHED}")
    if not checkpoints.RELEASED_MODEL.is_file():
        raise cli.UserError(f"no model to read with: {checkpoints.RELEASED_MODEL} is missing (the released model: copy "
                            f"the repository's weights/ folder beside {Path(__file__).name}), or train one with "
                            "`make train`")
    accuracy = cli.read_json(checkpoints.RELEASE_MANIFEST)["mnist_test_accuracy"]
    print(f"using the released model weights/{checkpoints.RELEASED_MODEL.name} (vgg, MNIST test accuracy {accuracy}; "
          "--weights picks another)")
    return checkpoints.RELEASED_MODEL


# --demo serves one drawing or photo at a time: options about files and batches have nothing to act on
NOT_WITH_DEMO = ("--images", "--number", "--invert", "--show-preprocessed", "--data", "--data-dir", "--test-csv",
                 "--labels", "--out", "--save-probs", "--batch-size")
# --export writes a graph of the models alone: prediction's options have nothing to act on
NOT_WITH_EXPORT = ("--images", "--number", "--line-reader", "--invert", "--show-preprocessed", "--test-csv",
                   "--labels", "--out", "--save-probs", "--demo", "--tta")


def changed_options(parser, args, flags):
    """The flags among `flags` whose value differs from their default, that is, that were given."""
    dests = [flag[2:].replace("-", "_") for flag in flags]
    return [flag for flag, dest in zip(flags, dests, strict=True) if getattr(args, dest) != parser.get_default(dest)]


def check_paths(args):
    """Before any work: outputs writable and distinct from every input (test CSV, labels, weights, images)."""
    inputs = {"--weights": checkpoints.checkpoint_files(args.weights), "--images": args.images or [],
              "--line-reader": [args.line_reader] if args.line_reader else []}
    if args.images is None and args.data == "csv":
        inputs.update({"--test-csv": [args.test_csv], "--labels": [args.labels]})
    cli.check_outputs({"--out": [args.out] if args.out else [],
                       "--save-probs": [args.save_probs] if args.save_probs else [],
                       "--export": [args.export] if args.export else []}, inputs)
    if args.show_preprocessed:
        cli.check_output_folder("--show-preprocessed", args.show_preprocessed)


# ----------------------------------------------------------------------------- ONNX export (--export)

# One fp32 graph: uint8 digits [N, 28, 28] in (N free), the ensemble's mean softmax [N, 10] out, normalization
# inside. TTA stays out: its variants draw seeded random shifts, which a graph would fix once.

PARITY_DIGITS = 1000     # digits the exported graph is checked on before it is written
PARITY_TOLERANCE = 1e-4  # largest difference allowed between onnxruntime's and PyTorch's probabilities


class EnsembleGraph(nn.Module):
    """What --export writes: uint8 digits [N, 28, 28] -> the models' mean softmax [N, 10], normalization inside."""

    def __init__(self, reader):
        super().__init__()
        self.models = nn.ModuleList(copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format).eval()
                                    for model, _, _ in reader.ensemble)
        self.normalizations = [(n["mean"], n["std"]) for _, n, _ in reader.ensemble]

    def forward(self, digits):
        x = digits.unsqueeze(1).float() / 255                                         # [N, 1, 28, 28] in 0..1
        pairs = zip(self.models, self.normalizations, strict=True)
        probs = [torch.softmax(model((x - mean) / std), 1) for model, (mean, std) in pairs]
        return torch.stack(probs).mean(0)                                             # [N, 10]


def import_onnx():
    """(torch.onnx's needs, onnxruntime); a UserError saying how to install them when they are missing."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs onnx and onnxscript)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise cli.UserError("--export needs onnx, onnxscript and onnxruntime, which are not installed: "
                            "pip install -r requirements-export.txt") from None
    return onnxruntime


def parity_digits(data_dir):
    """PARITY_DIGITS of MNIST's test digits when its files are in data_dir, else as many seeded random ones."""
    raw = Path(data_dir) / "MNIST" / "raw"
    if all(data.find_idx_file(raw, stem) for stem in data.MNIST_FILES["test"]):
        return data.load_mnist(data_dir, "test")[0][:PARITY_DIGITS], "MNIST test digits"
    generator = torch.Generator().manual_seed(0)
    size = data.IMAGE_SIZE
    digits = torch.randint(0, 256, (PARITY_DIGITS, size, size), dtype=torch.uint8, generator=generator)
    return digits, "random digits"


def export_onnx(reader, path, data_dir):
    """Write the reader's ensemble as one ONNX graph, after checking it in onnxruntime against PyTorch in fp32.

    Refused (UserError, nothing written) when a label differs or a probability is off by more than PARITY_TOLERANCE.
    """
    onnxruntime = import_onnx()
    graph = EnsembleGraph(reader).eval()
    digits, source = parity_digits(data_dir)
    fp32 = DigitReader(reader.paths, torch.device("cpu"), "fp32", tta=1, seed=reader.seed)
    expected = fp32.probabilities(digits)
    with cli.atomic_path(path) as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx reports its progress on stdout
            torch.onnx.export(graph, (digits[:2],), str(tmp), input_names=["digits"], output_names=["probabilities"],
                              dynamic_shapes={"digits": {0: torch.export.Dim("batch")}}, dynamo=True,
                              external_data=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        probs = torch.from_numpy(session.run(None, {"digits": digits.numpy()})[0])
        difference = (probs - expected).abs().max().item()
        labels_differ = int((probs.argmax(1) != expected.argmax(1)).sum())
        if labels_differ or difference > PARITY_TOLERANCE:
            raise cli.UserError(f"the exported graph disagrees with PyTorch on {len(digits)} {source} ({labels_differ} "
                                "labels "
                                f"differ, largest probability difference {difference:.2e}, allowed "
                                f"{PARITY_TOLERANCE:.0e}); "
                                f"{path} was not written")
    print(f"wrote {path}: {len(reader.ensemble)} model(s), uint8 digits [N, 28, 28] -> probabilities [N, 10]; "
          f"onnxruntime matches PyTorch fp32 on {len(digits)} {source} (all labels, largest probability difference "
          f"{difference:.1e})")


if __name__ == "__main__":
    cli.run_cli(main)
