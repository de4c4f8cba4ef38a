"""The dev set of other writers' digits: how a model reads handwriting that is not MNIST's, as phone photos.

    python tools/dev_set.py                                   # the released model (CNN_best_model.pth when here)
    python tools/dev_set.py --weights CNN_best_model.pth --tta 1

Two sources, made at run time into --scratch (nothing is committed but code), each digit a JPEG read as
`predict_tta.py --images` reads it:
  uci        scikit-learn's UCI digits (1,797 digits by writers other than MNIST's, 8x8), the even indices only (the
             odd ones are kept for an independent check), upscaled to 64 px photos
  typefaces  the 28 dev typefaces (typefaces.DEV_FAMILIES, fetched with npm the first time; nothing trains on them),
             PER_DIGIT photos of each digit in each: 28-150 px tall, turned up to 8 degrees, a pen up to 2% of the
             height finer or 4% broader, blur, dark ink of any shade on light tinted paper under a lighting gradient
             of up to 30%, noise, JPEG quality 60-95
It prints a table: accuracy per source, each dev typeface (worst first) and the digits most often misread. The dev
set chooses recipes and settings; it never trains. Each photo is drawn from a generator seeded by --seed and its
source (and typeface), so the same command makes the same photos.
"""
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import typefaces  # noqa: E402
import writing  # noqa: E402
from augmentation import TTA_VARIANTS  # noqa: E402


UCI_HEIGHT = 64  # px: a UCI digit's photo


def uci_photos(seed):
    """[(JPEG bytes, label, "uci")] for UCI's even-indexed digits, each upscaled to a UCI_HEIGHT px photo."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng([seed, 0])
    return [(uci_photo(image / 16, rng), int(label), "uci")
            for image, label in zip(digits.images[::2], digits.target[::2], strict=True)]


def uci_photo(ink, rng):
    """JPEG bytes: a UCI digit's ink (float [h, w] 0..1) as a photo UCI_HEIGHT px tall, upright."""
    return writing.phone_photo(ink, rng, height=UCI_HEIGHT, turn=0)


def typeface_photos(families, fonts, per_digit, seed):
    """[(JPEG bytes, label, family)]: `per_digit` photos of each digit in each family's typeface."""
    photos = []
    for family in families:
        rng = np.random.default_rng([seed, 1, zlib.crc32(family.encode())])    # a family's photos, whatever the others
        for digit in range(10):
            for _ in range(per_digit):
                ink = typefaces.digit_ink(fonts[family], digit, pen=rng.uniform(-0.02, 0.04))
                photos.append((writing.phone_photo(ink, rng), digit, family))
    return photos


def read_photos(reader, photos, folder):
    """The reader's labels [N] for the photos, each written to `folder` and read back as --images reads a file."""
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    digits = []
    for k, (jpeg, label, source) in enumerate(photos):
        path = folder / f"{source}_{k:05d}_{label}.jpg"
        path.write_bytes(jpeg)
        digits.append(reader.digits(path)[0])
    return reader.probabilities(torch.stack(digits)).argmax(1).numpy()


def table(photos, read):
    """The printed table: per source, per dev typeface (worst first), and the most frequent misreadings."""
    labels = np.array([label for _, label, _ in photos])
    sources = np.array([source for _, _, source in photos])
    right = read == labels
    lines = ["| source | photos | accuracy |", "|---|---|---|"]
    is_uci = sources == "uci"
    if is_uci.any():
        lines.append(f"| UCI digits, even half | {is_uci.sum()} | {right[is_uci].mean():.2%} |")
    faces = sorted(set(sources[~is_uci]), key=lambda family: right[sources == family].mean())
    if faces:
        per_face = [right[sources == family].mean() for family in faces]
        lines.append(f"| dev typefaces ({len(faces)}) | {(~is_uci).sum()} | {right[~is_uci].mean():.2%} (worst "
                     f"{min(per_face):.1%}) |")
        lines += ["", "| dev typeface | accuracy |", "|---|---|"]
        lines += [f"| {family} | {accuracy:.1%} |" for family, accuracy in zip(faces, per_face, strict=True)]
    misread = Counter(f"{label}->{digit}" for label, digit in zip(labels[~right], read[~right], strict=True))
    lines += ["", "most often misread (true->read): " + (", ".join(f"{pair} {count}" for pair, count in
                                                                  misread.most_common(12)) or "none")]
    return "\n".join(lines)


def parser(description, scratch):
    """The flags the dev-set tools share (this one and tools/dev_numbers.py): which models, which sources, TTA, seed,
    the typefaces' cache, and the scratch folder (default /tmp/`scratch`)."""
    p = cli.Parser(description)
    p.add_argument("--weights", nargs="+", help="default: as --images (CNN_best_model.pth when here, else the released "
                                                "model)")
    p.add_argument("--sources", nargs="+", choices=["uci", "typefaces"], default=["uci", "typefaces"])
    p.add_argument("--tta", type=cli.positive_int, default=len(TTA_VARIANTS), help="as --images (its default)")
    p.add_argument("--seed", type=cli.seed_int, default=0)
    p.add_argument("--typefaces-dir", default=typefaces.DEFAULT_CACHE,
                   help="where the typefaces are cached (env TYPEFACES_DIR)")
    p.add_argument("--scratch", default=Path("/tmp") / scratch, help="folder the photos are written to")
    return p


def main():
    p = parser(__doc__, "digit-dev-set")
    p.add_argument("--per-digit", type=cli.positive_int, default=6, help="photos of each digit in each typeface")
    p.add_argument("--limit", type=cli.positive_int, help="read only the first N photos of each source: a quick look")
    args = p.parse_args()
    from predict_tta import DigitReader

    cli.check_output_folder("--scratch", args.scratch)
    photos = uci_photos(args.seed)[:args.limit] if "uci" in args.sources else []
    if "typefaces" in args.sources:
        fonts = typefaces.load_fonts(typefaces.fetch(typefaces.DEV_FAMILIES, args.typefaces_dir))
        photos += typeface_photos(typefaces.DEV_FAMILIES, fonts, args.per_digit, args.seed)[:args.limit]
    reader = DigitReader(args.weights, tta=args.tta)
    start = time.perf_counter()
    read = read_photos(reader, photos, Path(args.scratch))
    print(f"{len(photos)} photos in {args.scratch}; {', '.join(map(str, reader.paths))}, TTA {args.tta}, device "
          f"{reader.device}, precision {reader.precision}; read in {time.perf_counter() - start:.0f}s")
    print(table(photos, read))


if __name__ == "__main__":
    cli.run_cli(main)
