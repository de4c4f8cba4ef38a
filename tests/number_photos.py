"""Make photo-like pages of whole numbers written with MNIST digits, and measure how `--number` reads them.

The tests import number_page. Run as a script, it writes COUNT numbers per condition (seeded, in memory, nothing
kept) and reads each twice with the same reader: as a whole number (DigitReader.read_number, what --number prints),
and digit by digit, each digit alone on its own page as `--images` reads a photo (the ceiling that classification
alone sets). Tune on numbers made of MNIST's training digits that the models did not train on (--split train),
report on its test digits:

    python tests/number_photos.py --data-dir ../shared/data --split test --count 1000 --digits 4 --tta 1

Each page: digits 28-84 px tall (on the ink's longer side, as MNIST fits its box); gaps of 4-16 px between
neighbours' ink at 28 px tall, scaled with the height; slant up to 15 degrees either way; strokes up to one pixel
thinner or thicker at 28 px; each digit moved up or down by up to a third of the height; dark ink on light, tinted
paper under a lighting gradient of up to 30% with noise; saved as JPEG of quality 60-95. Conditions: "gaps" (that
alone); "touching" (one neighbouring pair's inks meet and overlap by 0-3 px at 28 px); "ruled" (a ruled line 1-3 px
wide across the page, under the digits or through their lower third); "two lines" (the number written on two lines,
read as two groups: "12 40").
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from models import PairDetector  # noqa: E402

CONDITIONS = ("gaps", "touching", "ruled", "two lines")
INK_LEVEL = 0.3  # a digit's pixel is ink from here up (MNIST's 0..1), for measuring gaps between neighbours
PAIR_EPOCHS = 10


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", help="default: as --images (the released model unless CNN_best_model.pth)")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="folder holding MNIST/raw (env MNIST_DATA_DIR)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="whose digits: tune on train, report on test")
    p.add_argument("--count", type=int, default=200, help="numbers per condition")
    p.add_argument("--digits", type=int, default=4, help="digits per number")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--tta", type=int, default=len(data.TTA_VARIANTS), help="as --images (predict_tta.py's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print the first SHOW misread numbers per condition")
    p.add_argument("--fit-split", action="store_true",
                   help="instead, fit data.CUT_WEIGHTS and data.SPLIT_WEIGHTS on numbers of training digits "
                        "(COUNT per condition, and COUNT more to place the threshold); with a pair detector, "
                        "data.CUT_WEIGHTS_PAIR and data.SPLIT_WEIGHTS_PAIR")
    p.add_argument("--fit-pairs", metavar="OUT",
                   help="instead, train a pair detector (models.PairDetector) on the marks of numbers of the training "
                        "digits the first model trained on, and save it to OUT (for tests/release.py)")
    p.add_argument("--pairs", type=int, default=0,
                   help="with --fit-pairs: this many numbers of two touching digits besides (the pairs to learn from)")
    args = p.parse_args()
    from predict_tta import DigitReader

    images, labels = data.load_mnist(args.data_dir, args.split)
    reader = DigitReader(args.weights, tta=args.tta)
    if args.fit_pairs:
        return fit_pairs(args, reader, images, labels)
    if args.split == "train":
        images, labels = unseen_digits(reader, images, labels)
    if args.fit_split:
        return fit_split(args, reader, images, labels)
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
            except data.UserError as error:          # no digit found: a misread, said as the user would see it
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
    return data.trained_on_mask(data.image_hashes(images), reader.records).any(0)


def fit_pairs(args, reader, images, labels):
    """Train a models.PairDetector on marks wide enough to be cut (found_marks) and save it to OUT.

    Its marks come from COUNT numbers per condition and PAIRS numbers of two touching digits, made of the training
    digits the reader's first model trained on (the numbers measured are made of others). A mark's answer: does it
    hold two digits (or one), and which two when it does. Every fifth mark is held out to report the detector's
    accuracy on.
    """
    if args.split != "train" or reader.records[0] is None:
        raise SystemExit("--fit-pairs trains on the training digits a model recorded: --split train, a recording model")
    data.check_outputs({"--fit-pairs": [args.fit_pairs]}, {"--weights": reader.paths})   # before 25 minutes of work
    seen = trained_on(reader, images)
    images, labels = images[seen], labels[seen]
    fields, answers, pair_digits = [], [], []
    draws = [(condition, args.count, args.digits) for condition in args.conditions] + [("touching", args.pairs, 2)]
    for k, (condition, count, digits) in enumerate(draws):
        rng = np.random.default_rng([args.seed, 3, k])
        for mark, ink, _, truth in found_marks(images, labels, rng, condition, count, digits):
            fields.append(data.pair_field(mark.ink(ink)))
            answers.append(len(truth) == 2)
            pair_digits.append([int(d) for d in truth] if len(truth) == 2 else [-100, -100])   # -100: no pair to read
    x, y = torch.stack(fields), torch.tensor(answers, dtype=torch.float32)             # [N, 32, 64] uint8, [N]
    z = torch.tensor(pair_digits)                                                         # [N, 2]
    held_out = torch.arange(len(y)) % 5 == 0
    print(f"{len(y)} marks ({int(y.sum())} holding two digits); {int(held_out.sum())} of them held out", flush=True)
    torch.manual_seed(args.seed)
    detector = PairDetector().to(reader.device)
    train = torch.nonzero(~held_out).squeeze(1)
    steps = PAIR_EPOCHS * -(-len(train) // 128)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    for epoch in range(PAIR_EPOCHS):
        detector.train()
        for batch in train[torch.randperm(len(train))].split(128):
            shift = (int(torch.randint(-2, 3, ())), int(torch.randint(-3, 4, ())))  # the mark moved a little
            inputs = data.to_unit_float(torch.roll(x[batch], shift, (1, 2)).to(reader.device))
            with data.autocast(reader.device, reader.precision):
                odds, read = detector(inputs)
            loss = (F.binary_cross_entropy_with_logits(odds.float(), y[batch].to(reader.device))
                    + F.cross_entropy(read.float().flatten(0, 1), z[batch].flatten().to(reader.device)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        detector.eval()
        with torch.inference_mode(), data.autocast(reader.device, reader.precision):
            answers = [detector(data.to_unit_float(batch.to(reader.device))) for batch in x[held_out].split(1024)]
        odds = torch.cat([odds.float().cpu() for odds, _ in answers])
        read = torch.cat([read.argmax(-1).cpu() for _, read in answers])                # [M, 2]
        wrong = int(((odds > 0) != y[held_out].bool()).sum())
        pairs = y[held_out].bool()
        misread = int((read[pairs] != z[held_out][pairs]).any(1).sum())
        print(f"epoch {epoch + 1}: held out, {wrong} of {int(held_out.sum())} marks misjudged, {misread} of "
              f"{int(pairs.sum())} pairs misread", flush=True)
    data.save_checkpoint(args.fit_pairs, {"pair_detector": {k: v.cpu() for k, v in detector.state_dict().items()},
                                          "for": str(reader.paths[0]), "marks": len(y), "held_out_misjudged": wrong,
                                          "held_out": int(held_out.sum()), "held_out_pairs_misread": misread,
                                          "held_out_pairs": int(pairs.sum())})
    print(f"wrote {args.fit_pairs}")


def fit_split(args, reader, images, labels):
    """Fit data.CUT_WEIGHTS (which cut of a mark is right: its parts read as the two digits inside) and
    data.SPLIT_WEIGHTS (does the mark hold two digits, at the cut CUT_WEIGHTS ranks first) on the marks wide enough
    to be cut of COUNT numbers of training digits per condition, then shift SPLIT_WEIGHTS' bias to misread the
    fewest marks of COUNT other numbers per condition (of shifts that misread equally few, the middle one). A mark's
    truth: the digits whose boxes lie mostly (half their area) inside its box; marks holding none or more than two are
    left out. With a pair detector, the features weigh its reading of the mark too: data.CUT_WEIGHTS_PAIR and
    data.SPLIT_WEIGHTS_PAIR."""
    from sklearn.linear_model import LogisticRegression
    if args.split != "train":
        raise SystemExit("--fit-split fits on training digits: --split train")
    fit, tune = (wide_marks(args, reader, images, labels, draw) for draw in (1, 2))
    pairs = [(found, truth) for found, truth, _, _ in fit if len(truth) == 2]
    x = np.vstack([found[3] for found, _ in pairs])
    y = np.concatenate([[read == truth for read in part_readings(found)] for found, truth in pairs])
    cut_weights = LogisticRegression(C=1.0, max_iter=5000).fit(x, y).coef_[0]
    x, y, _ = at_best_cut(fit, cut_weights)
    model = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    x, y, right = at_best_cut(tune, cut_weights)
    score = model.decision_function(x)
    shifts = np.arange(-6, 6.01, 0.25)
    misread = np.array([int((~np.where(score + shift > 0, right["cut"], right["whole"])).sum()) for shift in shifts])
    best = shifts[misread == np.min(misread)]
    shift = best[len(best) // 2]   # of equals, the middle: as far as they allow from single digits and from pairs
    unshifted = int((~np.where(score > 0, right["cut"], right["whole"])).sum())
    print(f"fitted on {len(fit)} marks ({len(pairs)} holding two digits); of {len(tune)} other marks ({int(y.sum())} "
          f"holding two), {min(misread)} misread with the bias shifted by {shift:+.2f} (as few from {best[0]:+.2f} to "
          f"{best[-1]:+.2f}; {unshifted} unshifted); "
          f"at the best cut, {int(right['cut'][y].sum())} of the {int(y.sum())} pairs read right")
    suffix = "_PAIR" if reader.pair_detectors else ""
    print(f"CUT_WEIGHTS{suffix} = (" + ", ".join(f"{w:.3f}" for w in cut_weights) + ")")
    print(f"SPLIT_WEIGHTS{suffix} = (" + ", ".join(f"{w:.3f}" for w in [model.intercept_[0] + shift, *model.coef_[0]])
          + ")")


def wide_marks(args, reader, images, labels, draw):
    """[(data.cut_candidates' result, the text of the digits inside, mark, line height)] for the marks wide enough
    to be cut of COUNT numbers per condition, drawn with seed (SEED, condition, draw)."""
    marks = []
    pair = reader.read_pairs if reader.pair_detectors else None
    for condition in args.conditions:
        rng = np.random.default_rng([args.seed, CONDITIONS.index(condition), draw])
        for mark, ink, height, truth in found_marks(images, labels, rng, condition, args.count, args.digits):
            found = data.cut_candidates(mark, ink, reader.probabilities, height, pair)
            if found is not None:
                marks.append((found, truth, mark, height))
    return marks


def found_marks(images, labels, rng, condition, count, digits):
    """Yield (mark, the page's ink, its line's height, the text of the digits inside) for each mark that
    data.find_marks finds on `count` numbers of `digits` digits and that is wide enough to be cut (data.SPLIT_ASPECT)
    and holds one or two digits (those whose boxes lie half inside its box, left to right): where the truth can be
    scored."""
    for _ in range(count):
        picks = rng.choice(len(images), digits, replace=False)
        page, text, _, boxes = number_page(images[picks].numpy(), labels[picks].numpy(), rng, condition)
        text = text.replace(" ", "")
        try:
            _, ink, _, marks = data.find_marks(Image.open(io.BytesIO(page)))
        except data.UserError:
            continue
        for line in data.reading_lines(marks):
            heights = np.array([mark.height for mark in line])
            for k, mark in enumerate(line):
                inner = sorted((box[0], text[i]) for i, box in enumerate(boxes) if inside(box, mark) >= 0.5)
                if len(inner) in (1, 2) and mark.width >= data.SPLIT_ASPECT * mark.height:
                    height = np.median(np.delete(heights, k)) if len(line) > 1 else mark.height
                    yield mark, ink, height, "".join(digit for _, digit in inner)


def part_readings(found):
    """What the model reads in each cut's two parts: ["47", ...]."""
    return ["".join(map(str, labels)) for labels in found[2].argmax(-1)]


def at_best_cut(marks, cut_weights):
    """(data.first_cut's features [M, F] at each mark's best cut, whether it holds two digits [M], whether it reads
    right {"cut": at that cut, "whole": uncut} [M] each)."""
    x, y, right = [], [], {"cut": [], "whole": []}
    for found, truth, mark, height in marks:
        best, features = data.first_cut(mark, height, found, cut_weights)
        x.append(features)
        y.append(len(truth) == 2)
        right["cut"].append(part_readings(found)[best] == truth)
        right["whole"].append(str(int(found[1].argmax())) == truth)
    return np.array(x), np.array(y), {k: np.array(v) for k, v in right.items()}


def inside(box, mark):
    """The share of a digit's box (left, top, right, bottom) that lies inside a mark's box."""
    left, top, right, bottom = box
    across = max(0, min(right, mark.right) - max(left, mark.left))
    shared = across * max(0, min(bottom, mark.bottom) - max(top, mark.top))
    return shared / max(1, (right - left) * (bottom - top))


if __name__ == "__main__":
    data.run_cli(main)
