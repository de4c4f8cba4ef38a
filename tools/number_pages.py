"""Measure how `--number` reads photo-like pages of whole numbers (tests/number_page.py).

It writes COUNT numbers per condition (seeded, in memory, nothing kept) and reads each twice with the same reader:
as a whole number (DigitReader.read_number, what --number prints), and digit by digit, each digit alone on its own
page as `--images` reads a photo (the ceiling that classification alone sets). Tune on numbers made of MNIST's
training digits that the models did not train on (--split train), report on its test digits:

    python tools/number_pages.py --data-dir ../shared/data --split test --count 1000 --digits 4 --tta 1
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
from augmentation import TTA_VARIANTS  # noqa: E402
from number_page import CONDITIONS, number_page  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", help="default: as --images (the released model unless CNN_best_model.pth)")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="folder holding MNIST/raw (env MNIST_DATA_DIR)")
    p.add_argument("--line-reader", help="as --number's --line-reader (default: the models' own, else the released "
                                         "model's)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="whose digits: tune on train, report on test")
    p.add_argument("--count", type=int, default=200, help="numbers per condition")
    p.add_argument("--digits", type=int, default=4, help="digits per number")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--tta", type=int, default=len(TTA_VARIANTS), help="as --images (predict_tta.py's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print the first SHOW misread numbers per condition")
    args = p.parse_args()
    from predict_tta import DigitReader

    images, labels = data.load_mnist(args.data_dir, args.split)
    reader = DigitReader(args.weights, tta=args.tta, line_reader=args.line_reader)
    if args.split == "train":
        images, labels = unseen_digits(reader, images, labels)
    print(f"{args.count} numbers of {args.digits} MNIST {args.split} digits per condition; {reader.paths[0]} "
          f"x{len(reader.paths)}, TTA {args.tta}, device {reader.device}, precision {reader.precision}")
    print("| condition | whole number (--number) | digit by digit (--images) | cost |")
    print("|---|---|---|---|")
    for condition in args.conditions:
        rng = np.random.default_rng([args.seed, CONDITIONS.index(condition)])
        whole = alone = 0
        shown, start = 0, time.perf_counter()
        for _ in range(args.count):
            picks = rng.choice(len(images), args.digits, replace=False)
            page, text, singles, _ = number_page(images[picks].numpy(), labels[picks].numpy(), rng, condition)
            try:
                read = reader.read_number(Image.open(io.BytesIO(page))).text
            except cli.UserError as error:          # no digit found: a misread, said as the user would see it
                read = str(error)
            whole += read == text
            one_by_one = [reader.predict(Image.open(io.BytesIO(s)))[0].item() for s in singles]
            alone += "".join(map(str, one_by_one)) == text.replace(" ", "")
            if read != text and shown < args.show:
                shown += 1
                print(f"  {condition}: {text!r} read {read!r}")
        n = args.count
        print(f"| {condition} | {whole / n:.1%} ({whole} of {n}) | {alone / n:.1%} ({alone} of {n}) | "
              f"{(alone - whole) / n:+.1%} | {time.perf_counter() - start:.0f}s", flush=True)


def unseen_digits(reader, images, labels):
    """The training digits none of the reader's models trained on (for the released model, the 6,000 it held out
    for validation): a model is surer of digits it trained on, and of their halves, than of anyone's new writing, so
    tuning on those would tune for the wrong model."""
    unseen = ~trained_on(reader, images)
    print(f"{int(unseen.sum())} of {len(labels)} training digits that no model trained on")
    return images[unseen], labels[unseen]


def trained_on(reader, images):
    """bool [N]: which of these training digits any of the reader's models trained on."""
    if None in reader.records:
        raise SystemExit("--split train needs models that record the digits they trained on")
    return checkpoints.trained_on_mask(checkpoints.image_hashes(images), reader.records).any(0)


if __name__ == "__main__":
    cli.run_cli(main)
