"""How well a model reads MNIST's test digits rendered as photos (tests/photo_render.py), through
`predict_tta.py --images`, against the same digits given directly and against photos only resized to 28x28:

    python tools/photo_accuracy.py --weights CNN_best_model.pth --data-dir ../shared/data --count 200
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import data  # noqa: E402
from augmentation import TTA_VARIANTS  # noqa: E402
from photo_render import render_as_photo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["CNN_best_model.pth"])
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="folder holding MNIST/raw (env MNIST_DATA_DIR)")
    p.add_argument("--count", type=int, default=200, help="the first COUNT MNIST test digits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import pandas as pd
    import torch

    from predict_tta import DigitReader

    images, labels = data.load_mnist(args.data_dir, "test")
    images, labels = images[:args.count], labels[:args.count]
    rng = np.random.default_rng(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="photos-"))
    paths = [folder / f"{i:04d}.jpg" for i in range(args.count)]
    for digit, path in zip(images, paths, strict=True):   # 2.5-4.5x larger, so 70-126 pixels tall in a 200x150 JPEG
        render_as_photo(digit.numpy(), rng, scale=rng.uniform(2.5, 4.5)).save(path, quality=90)

    subprocess.run([sys.executable, str(ROOT / "predict_tta.py"), "--weights", *args.weights, "--images", str(folder),
                    "--out", str(folder / "predictions.csv")], check=True, stdout=subprocess.DEVNULL)
    through_images = pd.read_csv(folder / "predictions.csv")["label"].to_numpy() == labels.numpy()

    reader = DigitReader(args.weights, "cpu", tta=len(TTA_VARIANTS))

    def correct(batch):  # uint8 [N, 28, 28] -> how many the ensemble reads right, with predict_tta.py's TTA
        return int((reader.probabilities(batch).argmax(1) == labels).sum())

    resized = torch.from_numpy(np.stack([np.asarray(Image.open(path).convert("L").resize((28, 28), Image.BILINEAR))
                                         for path in paths]))
    n = args.count
    print(f"photos in {folder}")
    print(f"predict_tta.py --images: {through_images.sum()} of {n}; the same digits given directly: {correct(images)} "
          f"of {n}; "
          f"photos only resized to 28x28: {correct(resized)} of {n}, and inverted: {correct(255 - resized)} of {n}")


if __name__ == "__main__":
    main()
