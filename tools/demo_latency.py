"""Latency of the draw-a-number page: median milliseconds per prediction of one drawn digit, measured in-process.

A prediction is what the page does with a finished stroke: preprocess the canvas (a 280x280 RGBA image, like
the page's) and run the ensemble with its TTA variants. Two configurations: one vgg (--weights, or random
weights) with 1 and 4 TTA variants, and the 10-model ensemble (5 resnet + 5 widecnn) with 4 TTA variants. The
ensemble's checkpoints are random-init ones in the project's format, written to a temporary folder: the time
does not depend on the weights. Not collected by pytest (its name does not start with test_).

    OMP_NUM_THREADS=2 python tools/demo_latency.py --repeats 50
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import photos  # noqa: E402
from browser import STROKES  # noqa: E402
from demo import CANVAS_SIZE, page_answer  # noqa: E402
from models import build_model  # noqa: E402
from predict_tta import DigitReader  # noqa: E402


def drawing(strokes, size=CANVAS_SIZE):
    """The strokes drawn in the middle of the page's canvas as it gives them: black, a tenth of the canvas's height
    wide, on white, RGBA."""
    width, height = size
    image = Image.new("RGBA", size, "white")
    pen = ImageDraw.Draw(image)
    for stroke in strokes:
        pen.line([((width - height) / 2 + x * height, y * height) for x, y in stroke], fill="black",
                 width=height // 10, joint="curve")
    return image


def random_checkpoints(folder, archs):
    """One random-init checkpoint per arch in `folder`, complete, in the project's format."""
    paths = []
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        path = Path(folder) / f"{arch}_{i}.pth"
        checkpoints.save(path, {"model_state": build_model(arch).state_dict(), "arch": arch,
                                "normalization": data.NORMALIZATION, "epoch": 1, "complete": True})
        paths.append(path)
    return paths


def median_ms(image, reader, repeats):
    """Median wall time of the page's answer to `image`, in ms, after 3 warm-up predictions."""
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        page_answer(reader, image, "the drawing")
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="the single model's checkpoint (default: a random-init vgg)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = data.pick_device(args.device)
    precision = data.pick_precision("auto", device)
    image = drawing(STROKES["7"])
    print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads, {args.repeats} predictions each")
    with tempfile.TemporaryDirectory() as folder:
        single = [args.weights] if args.weights else random_checkpoints(folder, ["vgg"])
        ensemble_paths = random_checkpoints(folder, ["resnet"] * 5 + ["widecnn"] * 5)
        for name, paths, tta in (("1 vgg, no TTA", single, 1), ("1 vgg x 4 TTA", single, 4),
                                 ("10 models x 4 TTA", ensemble_paths, 4)):
            reader = DigitReader(paths, device, precision, tta=tta)
            ms = median_ms(image, reader, args.repeats)
            number = reader.read_number(image, name="the drawing")
            print(f"{name:<20} {ms:7.1f} ms median per answer (read {number.text}, "
                  f"{number.probabilities.max():.2f})")
        start = time.perf_counter()
        for _ in range(args.repeats):
            photos.preprocess_image(image, name="the drawing")
        print(f"{'preprocessing alone':<20} {1000 * (time.perf_counter() - start) / args.repeats:7.1f} ms mean")


if __name__ == "__main__":
    main()
