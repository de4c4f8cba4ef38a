"""Measure how `--number` reads photo-like pages of whole numbers (tests/number_page.py), and fit its weights.

It writes COUNT numbers per condition (seeded, in memory, nothing kept) and reads each twice with the same reader:
as a whole number (DigitReader.read_number, what --number prints), and digit by digit, each digit alone on its own
page as `--images` reads a photo (the ceiling that classification alone sets). Tune on numbers made of MNIST's
training digits that the models did not train on (--split train), report on its test digits:

    python tools/number_pages.py --data-dir ../shared/data --split test --count 1000 --digits 4 --tta 1

--fit-split fits photos.CUT_WEIGHTS and photos.SPLIT_WEIGHTS (their _PAIR versions with a pair detector); --fit-pairs
trains the pair detector (models.PairDetector) that tools/release.py --pair-detector adds to the released model.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import photos  # noqa: E402
from augmentation import TTA_VARIANTS  # noqa: E402
from models import PairDetector  # noqa: E402
from number_page import CONDITIONS, number_page  # noqa: E402

PAIR_EPOCHS = 10


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
    p.add_argument("--fit-split", action="store_true",
                   help="instead, fit photos.CUT_WEIGHTS and photos.SPLIT_WEIGHTS on numbers of training digits "
                        "(COUNT per condition, and COUNT more to place the threshold); with a pair detector, "
                        "photos.CUT_WEIGHTS_PAIR and photos.SPLIT_WEIGHTS_PAIR")
    p.add_argument("--fit-pairs", metavar="OUT",
                   help="instead, train a pair detector (models.PairDetector) on the marks of numbers of the training "
                        "digits the first model trained on, and save it to OUT (for tools/release.py)")
    p.add_argument("--pairs", type=int, default=0,
                   help="with --fit-pairs: this many numbers of two touching digits besides (the pairs to learn from)")
    args = p.parse_args()
    from predict_tta import DigitReader

    images, labels = data.load_mnist(args.data_dir, args.split)
    reader = DigitReader(args.weights, tta=args.tta, line_reader=args.line_reader)
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


def fit_pairs(args, reader, images, labels):
    """Train a models.PairDetector on marks wide enough to be cut (found_marks) and save it to OUT.

    Its marks come from COUNT numbers per condition and PAIRS numbers of two touching digits, made of the training
    digits the reader's first model trained on (the numbers measured are made of others). A mark's answer: does it
    hold two digits (or one), and which two when it does. Every fifth mark is held out to report the detector's
    accuracy on.
    """
    if args.split != "train" or reader.records[0] is None:
        raise SystemExit("--fit-pairs trains on the training digits a model recorded: --split train, a recording model")
    cli.check_outputs({"--fit-pairs": [args.fit_pairs]}, {"--weights": reader.paths})   # before 25 minutes of work
    seen = trained_on(reader, images)
    images, labels = images[seen], labels[seen]
    fields, answers, pair_digits = [], [], []
    draws = [(condition, args.count, args.digits) for condition in args.conditions] + [("touching", args.pairs, 2)]
    for k, (condition, count, digits) in enumerate(draws):
        rng = np.random.default_rng([args.seed, 3, k])
        for mark, ink, _, truth in found_marks(images, labels, rng, condition, count, digits):
            fields.append(photos.pair_field(mark.ink(ink)))
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
    checkpoints.save(args.fit_pairs, {"pair_detector": {k: v.cpu() for k, v in detector.state_dict().items()},
                                      "for": str(reader.paths[0]), "marks": len(y), "held_out_misjudged": wrong,
                                      "held_out": int(held_out.sum()), "held_out_pairs_misread": misread,
                                      "held_out_pairs": int(pairs.sum())})
    print(f"wrote {args.fit_pairs}")


def fit_split(args, reader, images, labels):
    """Fit photos.CUT_WEIGHTS (which cut of a mark is right: its parts read as the two digits inside) and
    photos.SPLIT_WEIGHTS (does the mark hold two digits, at the cut CUT_WEIGHTS ranks first) on the marks wide enough
    to be cut of COUNT numbers of training digits per condition, then shift SPLIT_WEIGHTS' bias to misread the
    fewest marks of COUNT other numbers per condition (of shifts that misread equally few, the middle one). A mark's
    truth: the digits whose boxes lie mostly (half their area) inside its box; marks holding none or more than two are
    left out. With a pair detector, the features weigh its reading of the mark too: photos.CUT_WEIGHTS_PAIR and
    photos.SPLIT_WEIGHTS_PAIR."""
    from sklearn.linear_model import LogisticRegression
    if args.split != "train":
        raise SystemExit("--fit-split fits on training digits: --split train")
    fit, tune = (wide_marks(args, reader, images, labels, draw) for draw in (1, 2))
    pairs = [(cuts, truth) for cuts, truth, _, _ in fit if len(truth) == 2]
    x = np.vstack([cuts.features for cuts, _ in pairs])
    y = np.concatenate([[read == truth for read in part_readings(cuts)] for cuts, truth in pairs])
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
    """[(photos.cut_candidates' Cuts, the text of the digits inside, mark, line height)] for the marks wide enough
    to be cut of COUNT numbers per condition, drawn with seed (SEED, condition, draw)."""
    marks = []
    detector = reader.read_pairs if reader.pair_detectors else None
    for condition in args.conditions:
        rng = np.random.default_rng([args.seed, CONDITIONS.index(condition), draw])
        for mark, ink, height, truth in found_marks(images, labels, rng, condition, args.count, args.digits):
            cuts = photos.cut_candidates(mark, ink, reader.probabilities, height, detector)
            if cuts is not None:
                marks.append((cuts, truth, mark, height))
    return marks


def found_marks(images, labels, rng, condition, count, digits):
    """Yield (mark, the page's ink, its line's height, the text of the digits inside) for each mark that
    photos.find_marks finds on `count` numbers of `digits` digits and that is wide enough to be cut
    (photos.SPLIT_ASPECT) and holds one or two digits (those whose boxes lie half inside its box, left to right):
    where the truth can be scored."""
    for _ in range(count):
        picks = rng.choice(len(images), digits, replace=False)
        page, text, _, boxes = number_page(images[picks].numpy(), labels[picks].numpy(), rng, condition)
        text = text.replace(" ", "")
        try:
            _, ink, _, marks = photos.find_marks(Image.open(io.BytesIO(page)))
        except cli.UserError:
            continue
        for line in photos.reading_lines(marks):
            heights = np.array([mark.height for mark in line])
            for k, mark in enumerate(line):
                inner = sorted((box[0], text[i]) for i, box in enumerate(boxes) if inside(box, mark) >= 0.5)
                if len(inner) in (1, 2) and mark.width >= photos.SPLIT_ASPECT * mark.height:
                    height = np.median(np.delete(heights, k)) if len(line) > 1 else mark.height
                    yield mark, ink, height, "".join(digit for _, digit in inner)


def part_readings(cuts):
    """What the model reads in each cut's two parts: ["47", ...]."""
    return ["".join(map(str, labels)) for labels in cuts.part_probs.argmax(-1)]


def at_best_cut(marks, cut_weights):
    """(photos.split_features [M, F] at each mark's best cut as `cut_weights` rank them, whether it holds two digits
    [M], whether it reads right {"cut": at that cut, "whole": uncut} [M] each)."""
    x, y, right = [], [], {"cut": [], "whole": []}
    for cuts, truth, mark, height in marks:
        best = int(np.argmax(cuts.features @ np.asarray(cut_weights)))
        x.append(photos.split_features(mark, height, cuts, best))
        y.append(len(truth) == 2)
        right["cut"].append(part_readings(cuts)[best] == truth)
        right["whole"].append(str(int(cuts.whole.argmax())) == truth)
    return np.array(x), np.array(y), {k: np.array(v) for k, v in right.items()}


def inside(box, mark):
    """The share of a digit's box (left, top, right, bottom) that lies inside a mark's box."""
    left, top, right, bottom = box
    across = max(0, min(right, mark.right) - max(left, mark.left))
    shared = across * max(0, min(bottom, mark.bottom) - max(top, mark.top))
    return shared / max(1, (right - left) * (bottom - top))


if __name__ == "__main__":
    cli.run_cli(main)
