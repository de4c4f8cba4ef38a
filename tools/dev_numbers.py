"""Whole numbers by other writers, photographed: how `--number` reads them, against the same digits read one by one.

    python tools/dev_numbers.py                                  # the released model, 4-digit numbers
    python tools/dev_numbers.py --line-reader line_reader.pth --digits 2 3 4 5 6 7 8

Two sources, the dev set's (tools/dev_set.py: nothing ever trains on them), made at run time into --scratch:
  typefaces  PER_FACE numbers in each of the 28 dev typefaces, each number drawn as the typeface sets it (its own
             spacing: neighbours close, sometimes touching), with a finer or broader pen, photographed as the dev
             set's digits are (28-150 px tall, turned up to 4 degrees)
  uci        the UCI digits' even half, DIGITS at a time side by side with gaps of 10-60% of their height, as 64 px
             photos (the dev set's UCI photos, written as a number)
Each number is read whole, as --number reads a photo, and each of its digits alone on a photo like it, as --images
reads one: the table gives the numbers read whole and right, those with the right count of digits, and those whose
every digit alone reads right (the ceiling that reading digits sets), and the time --number took per number. Seeded
by --seed: the same command makes the same photos.
"""
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import dev_set  # noqa: E402
import photos  # noqa: E402
import typefaces  # noqa: E402
import writing  # noqa: E402
from dev_set import UCI_HEIGHT  # noqa: E402

def typeface_numbers(families, fonts, per_face, digit_counts, seed):
    """[(JPEG of the number, its text, [JPEG of each digit alone], source)] for `per_face` numbers in each family."""
    numbers = []
    for family in families:
        rng = np.random.default_rng([seed, 2, zlib.crc32(family.encode())])
        for _ in range(per_face):
            text = "".join(map(str, rng.integers(0, 10, rng.choice(digit_counts))))
            pen, height = rng.uniform(-0.02, 0.04), rng.uniform(28, 150)
            number = writing.phone_photo(typefaces.digit_ink(fonts[family], text, pen), rng, height, turn=4.0)
            alone = [writing.phone_photo(typefaces.digit_ink(fonts[family], digit, pen), rng, height, turn=4.0)
                     for digit in text]
            numbers.append((number, text, alone, family))
    return numbers


def uci_numbers(count, digit_counts, seed):
    """[(JPEG of the number, its text, [JPEG of each digit alone], "uci")]: `count` numbers of UCI's even half."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images[::2] / 16, digits.target[::2]
    rng = np.random.default_rng([seed, 3])
    numbers = []
    for _ in range(count):
        chosen = rng.choice(len(labels), rng.choice(digit_counts), replace=False)
        inks = [photos.cropped(np.clip(ndimage.zoom(images[k], UCI_HEIGHT / 8, order=1), 0, 1)) for k in chosen]
        row = inks[0]
        for ink in inks[1:]:
            gap = np.zeros((UCI_HEIGHT, round(rng.uniform(0.1, 0.6) * UCI_HEIGHT)))
            row = np.hstack([pad_to(row, UCI_HEIGHT), gap, pad_to(ink, UCI_HEIGHT)])
        number = dev_set.uci_photo(pad_to(row, UCI_HEIGHT), rng)
        alone = [dev_set.uci_photo(images[k], rng) for k in chosen]
        numbers.append((number, "".join(str(labels[k]) for k in chosen), alone, "uci"))
    return numbers


def pad_to(ink, height):
    """ink [h, w] centred in `height` rows."""
    above = (height - ink.shape[0]) // 2
    return np.pad(ink, ((above, height - ink.shape[0] - above), (0, 0)))


def read_numbers(reader, numbers, folder):
    """([(text read whole, the digits read one by one)], the milliseconds each whole number took) for the numbers,
    each photo written to `folder` and read back as --number and --images read files."""
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    read, times = [], []
    for k, (number, text, alone, source) in enumerate(numbers):
        path = folder / f"{source}_{k:05d}_{text}.jpg"
        path.write_bytes(number)
        digits = []
        for j, photo in enumerate(alone):
            digit_path = folder / f"{source}_{k:05d}_{text}_digit{j}.jpg"
            digit_path.write_bytes(photo)
            digits.append(reader.digits(digit_path)[0])
        one_by_one = "".join(map(str, reader.probabilities(torch.stack(digits)).argmax(1).tolist()))
        start = time.perf_counter()
        whole = reader.read_number(path).text
        times.append(1000 * (time.perf_counter() - start))
        read.append((whole, one_by_one))
    return read, times


def table(numbers, read):
    """Per source: numbers, read whole and right, the right count of digits, every digit alone right."""
    lines = ["| numbers | count | read whole | right count of digits | one by one |", "|---|---|---|---|---|"]
    for name, kept in (("typefaces", lambda source: source != "uci"), ("UCI, even half", lambda s: s == "uci")):
        rows = [(text, whole, alone) for (_, text, _, source), (whole, alone) in zip(numbers, read, strict=True)
                if kept(source)]
        if rows:
            count = len(rows)
            lines.append(f"| {name} | {count} | {sum(t == w for t, w, _ in rows) / count:.1%} | "
                         f"{sum(len(t) == len(w) for t, w, _ in rows) / count:.1%} | "
                         f"{sum(t == a for t, _, a in rows) / count:.1%} |")
    wrong = [f"{text}->{whole}" for (_, text, _, _), (whole, _) in zip(numbers, read, strict=True) if text != whole]
    return "\n".join(lines + ["", "misread (true->read): " + (", ".join(wrong[:16]) or "none")])


def main():
    p = dev_set.parser(__doc__, "digit-dev-numbers")
    p.add_argument("--line-reader", help="as --number's --line-reader (default: the models' own, else the released "
                                         "model's)")
    p.add_argument("--digits", nargs="+", type=cli.positive_int, default=[4],
                   help="digits per number, drawn from these")
    p.add_argument("--per-face", type=cli.positive_int, default=10, help="numbers in each dev typeface")
    p.add_argument("--uci", type=cli.positive_int, default=280, help="numbers of UCI digits")
    args = p.parse_args()
    import torch

    from predict_tta import DigitReader
    cli.check_output_folder("--scratch", args.scratch)
    numbers = uci_numbers(args.uci, args.digits, args.seed) if "uci" in args.sources else []
    if "typefaces" in args.sources:
        fonts = typefaces.load_fonts(typefaces.fetch(typefaces.DEV_FAMILIES, args.typefaces_dir))
        numbers += typeface_numbers(typefaces.DEV_FAMILIES, fonts, args.per_face, args.digits, args.seed)
    reader = DigitReader(args.weights, tta=args.tta, line_reader=args.line_reader)
    start = time.perf_counter()
    read, times = read_numbers(reader, numbers, Path(args.scratch))
    print(f"{len(numbers)} numbers in {args.scratch}; {', '.join(map(str, reader.paths))}, TTA {args.tta}, device "
          f"{reader.device}, precision {reader.precision}, {torch.get_num_threads()} threads; read in "
          f"{time.perf_counter() - start:.0f}s; a whole number (--number) in {np.median(times):.0f} ms (median; "
          f"90th percentile {np.percentile(times, 90):.0f} ms)")
    print(table(numbers, read))


if __name__ == "__main__":
    cli.run_cli(main)
