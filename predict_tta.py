"""Pipeline B, prediction: average an ensemble's softmax over test-time augmentations, write submission.csv.

    python predict_tta.py --test-csv data/digit-recognizer/test.csv               # every complete model in models/
    python predict_tta.py --weights CNN_best_model.pth --data mnist --no-tta      # one model on MNIST's test set
    python predict_tta.py --weights CNN_best_model.pth --images photo.jpg my_digits/   # people's own images

Each checkpoint brings its own architecture and normalization. The same inputs, seed and batch size give
the same submission: each TTA variant draws its random shifts from its own seeded generator.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data import (
    DEFAULT_DATA_DIR,
    TTA_VARIANTS,
    UserError,
    add_device_arguments,
    atomic_path,
    autocast,
    batch_indices,
    default_kaggle_csv,
    find_images,
    load_checkpoint,
    load_csv,
    load_mnist,
    load_submission_csv,
    model_from_checkpoint,
    normalize,
    pick_device,
    pick_precision,
    preprocess_image,
    progress_bar,
    run_cli,
    to_unit_float,
)
from train_cnn import EVAL_BATCH_SIZE, positive_int


def find_checkpoints(paths):
    """[(path, checkpoint dict)] from files and folders; a folder contributes every complete *.pth in it."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            candidates = [(p, load_checkpoint(p)) for p in sorted(path.glob("*.pth")) if not p.name.endswith(".resume.pth")]
            complete = [(p, checkpoint) for p, checkpoint in candidates if checkpoint.get("complete", False)]
            for skipped, checkpoint in candidates:
                if not checkpoint.get("complete", False):
                    print(f"skipping {skipped}: training did not finish (rerun its training command to resume)")
            if not complete:
                raise UserError(f"{path}: no complete checkpoint (*.pth) in this folder; train first or pass --weights FILE")
            found += complete
        elif path.is_file():
            found.append((path, load_checkpoint(path)))
        else:
            raise UserError(f"{path}: no such checkpoint file or folder")
    return found


def load_ensemble(paths, device):
    """[(model, normalization, path)] for every checkpoint found in paths."""
    ensemble = []
    for path, checkpoint in find_checkpoints(paths):
        model, _ = model_from_checkpoint(path, device, checkpoint)
        ensemble.append((model, checkpoint["normalization"], path))
    return ensemble


@torch.inference_mode()
def ensemble_probabilities(ensemble, images, variants, precision, seed, batch_size=EVAL_BATCH_SIZE):
    """Mean softmax [N, 10] over every model and every TTA variant, for uint8 images [N, 28, 28] on the device.

    Each batch is augmented once per variant and shared by all models; variant i draws from a generator
    seeded with seed + i, so the result depends only on the inputs, the seed and the batch size.
    """
    device = images.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(variants))]
    total = torch.zeros(len(images), 10, device=device)
    batches = batch_indices(len(images), batch_size)
    progress = progress_bar(len(batches), "predict")
    for index in batches:
        for variant, generator in zip(variants, generators):
            x = to_unit_float(images[index], variant, generator)          # [B, 1, 28, 28] in 0..1
            for model, normalization, _ in ensemble:
                with autocast(device, precision):
                    logits = model(normalize(x, normalization))           # [B, 10]
                total[index] += torch.softmax(logits.float(), 1)
        progress.update()
    progress.close()
    return total / (len(ensemble) * len(variants))


def tta_variants(count):
    """The first `count` variants: 1 is plain prediction (identity only)."""
    if not 1 <= count <= len(TTA_VARIANTS):
        raise UserError(f"--tta must be between 1 and {len(TTA_VARIANTS)}, got {count}")
    return TTA_VARIANTS[:count]


def write_submission(path, labels):
    """Kaggle's format: header ImageId,Label; ImageId 1..N in input order."""
    frame = pd.DataFrame({"ImageId": np.arange(1, len(labels) + 1), "Label": labels.numpy()})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def predict_images(args, ensemble, variants, device, precision):
    """Predict each image file; a bad file is one line on stderr and exit code 2, after the others are done."""
    files, problems = find_images(args.images)
    paths, digits = [], []
    for path in files:
        try:
            digits.append(preprocess_image(path, args.invert))
            paths.append(path)
        except UserError as error:
            problems.append(str(error))
    if digits:
        images = torch.stack(digits)                                                  # uint8 [N, 28, 28]
        probs = ensemble_probabilities(ensemble, images.to(device), variants, precision, args.seed, args.batch_size).cpu()
        top = probs.topk(2, dim=1)
        for path, values, labels in zip(paths, top.values, top.indices):
            print(f"{path}: {labels[0]} ({values[0]:.2f}), next {labels[1]} ({values[1]:.2f})")
        if args.out:
            frame = pd.DataFrame(probs.numpy().round(6), columns=[f"p{d}" for d in range(10)])
            frame.insert(0, "path", [str(path) for path in paths])
            frame.insert(1, "label", top.indices[:, 0].numpy())
            frame.insert(2, "probability", top.values[:, 0].numpy().round(6))
            with atomic_path(args.out) as tmp:
                frame.to_csv(tmp, index=False)
            print(f"wrote {args.out} ({len(paths)} rows)")
        if args.show_preprocessed:
            save_preprocessed(Path(args.show_preprocessed), paths, images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(2)


def save_preprocessed(folder, paths, images):
    """The 28x28 inputs exactly as the model saw them (before normalization), one PNG per file."""
    from PIL import Image
    for path, image in zip(paths, images):
        with atomic_path(folder / f"{path.stem}_28x28.png") as tmp:
            Image.fromarray(image.numpy()).save(tmp, format="PNG")
    print(f"wrote {len(paths)} preprocessed images to {folder}/")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["models"], help="checkpoint files and/or folders of them")
    p.add_argument("--data", choices=["csv", "mnist"], default="csv", help="Kaggle test.csv, or MNIST's test set (prints accuracy)")
    p.add_argument("--test-csv", default=str(default_kaggle_csv("test.csv")), help="Kaggle test.csv (with --data csv)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding MNIST/raw (with --data mnist; env MNIST_DATA_DIR)")
    p.add_argument("--labels", help="ImageId,Label CSV of the true labels, to report the submission's accuracy")
    p.add_argument("--images", nargs="+", help="predict these image files and folders of them (PNG, JPEG, BMP, ...) instead")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="with --images: make the ink white on black; auto inverts when the border is light")
    p.add_argument("--show-preprocessed", help="with --images: save the 28x28 images the model saw to this folder")
    p.add_argument("--tta", type=positive_int, default=len(TTA_VARIANTS), help="number of TTA variants (1 = none)")
    p.add_argument("--no-tta", dest="tta", action="store_const", const=1, help="plain prediction, same as --tta 1")
    p.add_argument("--out", help="CSV to write (default: submission.csv; with --images, only written when given)")
    p.add_argument("--save-probs", help="also save the averaged probabilities [N, 10] to this .npy file")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=42, help="seed of the TTA variants' random shifts")
    add_device_arguments(p)
    args = p.parse_args(argv)
    if args.images is None and (args.invert != "auto" or args.show_preprocessed):
        p.error("--invert and --show-preprocessed go with --images")
    if args.images is None and args.out is None:
        args.out = "submission.csv"
    return args


def main(argv=None):
    args = parse_args(argv)
    variants = tta_variants(args.tta)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    ensemble = load_ensemble(args.weights, device)
    if args.images:
        return predict_images(args, ensemble, variants, device, precision)
    if args.data == "mnist":
        images, labels = load_mnist(args.data_dir, train=False)
    else:
        images, _ = load_csv(args.test_csv, labelled=False)
        labels = load_submission_csv(args.labels, len(images)) if args.labels else None
    passes = len(ensemble) * len(variants)
    print(f"{len(ensemble)} models x {len(variants)} TTA variants = {passes} forward passes per image, "
          f"{len(images)} images; device {device}, precision {precision}")

    start = time.perf_counter()
    probs = ensemble_probabilities(ensemble, images.to(device), variants, precision, args.seed, args.batch_size).cpu()
    seconds = time.perf_counter() - start
    predicted = probs.argmax(1)
    print(f"predicted in {seconds:.1f}s ({len(images) / seconds:.0f} images/s, {len(images) * passes / seconds:.0f} forward passes/s)")
    write_submission(args.out, predicted)
    print(f"wrote {args.out} ({len(predicted)} rows)")
    if args.save_probs:
        with atomic_path(args.save_probs) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, probs.numpy())
        print(f"wrote {args.save_probs}")
    if labels is not None:
        errors = int((predicted != labels).sum())
        print(f"accuracy {1 - errors / len(labels):.4f} ({errors} errors in {len(labels)} images)")


if __name__ == "__main__":
    run_cli(main)
