"""Make 'photos' of MNIST digits: dark ink on light coloured paper, rescaled, off-centre, noisy, as a camera gives.

The tests import render_as_photo; tools/photo_accuracy.py measures how well a model reads such photos.
"""
import numpy as np
from PIL import Image


def render_as_photo(digit, rng, size=(200, 150), scale=4.0, noise=0.04):
    """uint8 [28, 28] MNIST digit -> an RGB PIL image of it drawn dark on light paper somewhere in a larger canvas."""
    width, height = size
    side = int(28 * scale)
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
    paper = np.array([0.93, 0.90, 0.80]) + rng.uniform(-0.05, 0.05, 3)        # off-white, slightly tinted
    pen = np.array([0.10, 0.12, 0.35]) + rng.uniform(-0.05, 0.05, 3)          # dark blue ink
    canvas = np.ones((height, width, 3)) * paper
    canvas += rng.normal(0, noise, canvas.shape)                              # sensor noise and paper texture
    margin = 10
    top = rng.integers(margin, height - side - margin + 1)
    left = rng.integers(margin, width - side - margin + 1)
    region = canvas[top:top + side, left:left + side]
    canvas[top:top + side, left:left + side] = region * (1 - ink[..., None]) + pen * ink[..., None]
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8), mode="RGB")
