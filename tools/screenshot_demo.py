"""The README's screenshot: start the draw-a-number page, draw a digit in headless Chromium, save the answered page.

Not collected by pytest (its name does not start with test_). Needs requirements-demo.txt, chromium and
chromium-driver. The server and the browser keep their files in a temporary folder; only --out is written.

    python tools/screenshot_demo.py --weights CNN_best_model.pth --out demo.png
"""
import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import cli  # noqa: E402
from browser import STROKES, chromium, demo_server, draw, missing, open_page, wait_for_answer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="CNN_best_model.pth")
    p.add_argument("--digit", choices=sorted(STROKES), default="7")
    p.add_argument("--out", default="demo.png")
    p.add_argument("--width", type=int, default=900, help="width of the saved PNG in pixels")
    args = p.parse_args()
    if problem := missing():
        raise cli.UserError(problem)
    with tempfile.TemporaryDirectory() as folder:
        with demo_server(args.weights, Path(folder) / "server") as url, \
                chromium(Path(folder) / "browser", width=1200, height=860) as driver:
            open_page(driver, url)
            draw(driver, STROKES[args.digit])
            predicted, _, _ = wait_for_answer(driver)
            page = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    height = round(page.height * args.width / page.width)
    page = page.resize((args.width, height), Image.LANCZOS).quantize(colors=128)  # a palette PNG: a few tens of kB
    page.save(args.out, optimize=True)
    print(f"drew a {args.digit}, the page answered {predicted}; wrote {args.out} ({args.width}x{height})")


if __name__ == "__main__":
    cli.run_cli(main)
