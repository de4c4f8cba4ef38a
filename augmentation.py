"""Augmentation on the device: the training presets and the test-time (TTA) variants, each a per-sample warp.

A batch of float images [B, 1, H, W] gets one affine (and perspective) map per sample, drawn from a seeded
torch.Generator on the batch's device, and costs one grid_sample. data.to_unit_float applies a preset to a batch;
train_cnn.py picks the preset by name (AUGMENTATIONS) and predict_tta.py averages over TTA_VARIANTS. In this file: the
presets and variants, then the maps and the warp.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Geometry follows torchvision: pixel coordinates centred on the image, x to the right, y down,
# rotation angle and shear in degrees, translation in pixels; v2.functional.affine with the same
# parameters gives the same image (tests/test_data.py checks it). Each sample gets its own parameters,
# and affine and perspective are folded into one 3x3 matrix per sample, so a batch costs one grid_sample.

@dataclass(frozen=True)
class Augmentation:
    rotation: tuple = (0.0, 0.0)   # degrees, uniform in [low, high]
    translate: float = 0.0         # fraction of the image size, uniform in [-t, t] along each axis
    scale: tuple = (1.0, 1.0)      # uniform in [low, high]
    shear: float = 0.0             # degrees along x, uniform in [-s, s]
    perspective: float = 0.0       # distortion scale, as torchvision's RandomPerspective
    perspective_p: float = 0.0     # probability that a sample gets the perspective distortion
    # Other writers' hands and cameras. At 0 (1 for contrast) each is off and draws no random numbers, so the presets
    # without them draw exactly what they always drew (a run resumes exactly across the change).
    stroke: float = 0.0            # stroke width change in pixels at 28x28, uniform in [-s, s], drawn at 2x the size
    elastic: float = 0.0           # elastic distortion (Simard et al. 2003): alpha, the strength in pixels...
    elastic_sigma: float = 4.0     # ...and sigma, the smoothness of its random field, in pixels
    blur: float = 0.0              # Gaussian blur, sigma in pixels uniform in [0, b]
    coarse: float = 0.0            # probability that a sample is seen at 2/3 of its resolution (a small, coarse photo)
    contrast: float = 1.0          # the ink's darkest level, uniform in [c, 1]

light_augmentation = Augmentation(rotation=(-10, 10), translate=0.1, scale=(0.9, 1.1))

strong_augmentation = Augmentation(rotation=(-15, 15), translate=0.1, scale=(0.9, 1.1), shear=10,
                                   perspective=0.2, perspective_p=0.5)

# For the released reader: strong's geometry, and other pens, hands and cameras (chosen on validation and the dev set
# of other writers' digits, docs/measurements.md).
writers_augmentation = Augmentation(rotation=(-15, 15), translate=0.1, scale=(0.9, 1.1), shear=10, perspective=0.2,
                                    perspective_p=0.5, stroke=0.7, elastic=16.0, elastic_sigma=4.0, blur=0.5,
                                    coarse=0.1, contrast=0.8)

AUGMENTATIONS = {"none": None, "light": light_augmentation, "strong": strong_augmentation,
                 "writers": writers_augmentation}

# Test-time augmentation: the identity first, then small fixed-direction variants whose predictions are averaged.
TTA_VARIANTS = [
    None,
    Augmentation(rotation=(5, 5), translate=0.05),
    Augmentation(rotation=(-5, -5), translate=0.05),
    Augmentation(scale=(0.95, 1.05)),
]

def affine_matrices(angle, translate_x, translate_y, scale, shear):
    """Forward affine maps [B, 3, 3] (input -> output pixel, centred coordinates) from per-sample parameters [B].

    As torchvision composes it: translation * rotation * scale * shear-along-x, with the angle negated
    because y points down in a tensor image (a positive angle turns the digit counter-clockwise on screen).
    """
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    cos, sin, zero, one = torch.cos(a), torch.sin(a), torch.zeros_like(a), torch.ones_like(a)
    rotation = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).view(-1, 3, 3)
    shear_x = torch.stack([one, -torch.tan(s), zero, zero, one, zero, zero, zero, one], -1).view(-1, 3, 3)
    scaling = torch.diag_embed(torch.stack([scale, scale, one], -1))
    translation = torch.stack([one, zero, translate_x, zero, one, translate_y, zero, zero, one], -1).view(-1, 3, 3)
    return translation @ rotation @ scaling @ shear_x

def perspective_matrices(offsets, size):
    """Homographies [B, 3, 3] mapping each output pixel of a size x size image to its input pixel (centred).

    offsets [B, 4, 2] in 0..1 move the four corners inward by that fraction of half the image,
    the corners' destinations in torchvision's RandomPerspective; all zeros gives the identity.
    """
    half = (size - 1) / 2
    # the corners (-h, -h), (h, -h), (h, h), (-h, h) [4, 2], made on the device: torch.tensor would copy from the host
    corner = torch.arange(4, device=offsets.device)
    corners = torch.stack([(corner == 1) | (corner == 2), corner >= 2], 1).float() * (2 * half) - half
    moved = corners - torch.sign(corners) * offsets * (size // 2)   # [B, 4, 2]
    # Solve for the 8 coefficients mapping moved (output) -> corners (input): two linear equations per corner.
    x, y = moved.unbind(-1)                                         # [B, 4]
    u, v = corners.expand_as(moved).unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    system = torch.cat([rows_u, rows_v], 1)                         # [B, 8, 8]
    # solve_ex, not solve: solve checks for a singular system on the host, which waits for a GPU
    coefficients = torch.linalg.solve_ex(system, torch.cat([u, v], 1)).result  # [B, 8]
    return torch.cat([coefficients, one[:, :1]], 1).view(-1, 3, 3)

def warp(images, inverse_maps, displacement=None):
    """Sample images [B, C, H, W] through per-sample maps [B, 3, 3] (output -> input pixel, centred); fill 0.
    displacement [B, H, W, 2] (x, y in pixels), where given, moves each output pixel's source further."""
    batch, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype) - (height - 1) / 2,
                            torch.arange(width, device=images.device, dtype=images.dtype) - (width - 1) / 2,
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # [1, H*W, 3]
    source = points @ inverse_maps.transpose(1, 2).to(images.dtype)         # [B, H*W, 3]
    source = source[..., :2] / source[..., 2:]
    if displacement is not None:
        source = source + displacement.reshape(batch, -1, 2)
    # grid_sample with align_corners=False puts pixel edges at -1 and 1: divide centred pixels by half the size
    grid = torch.stack([source[..., 0] / (width / 2), source[..., 1] / (height / 2)], -1).view(batch, height, width, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

def uniform_draws(n, low, high, generator):
    """n numbers drawn uniformly from [low, high] with the generator, on its device."""
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low

def augment(images, augmentation, generator):
    """Random affine (+ perspective, + the other writers' changes) per sample, on the device: float [B, 1, 28, 28]
    -> same shape. Every random number is drawn before any image is changed, the affine's first, in a fixed order."""
    n, size = len(images), images.shape[-1]
    aug = augmentation
    forward = affine_matrices(
        angle=uniform_draws(n, *aug.rotation, generator),
        translate_x=uniform_draws(n, -aug.translate, aug.translate, generator) * size,
        translate_y=uniform_draws(n, -aug.translate, aug.translate, generator) * size,
        scale=uniform_draws(n, *aug.scale, generator),
        shear=uniform_draws(n, -aug.shear, aug.shear, generator),
    )
    inverse = torch.linalg.inv_ex(forward).inverse  # inv_ex: no check on the host (an affine map is invertible)
    if aug.perspective > 0:
        offsets = torch.rand(n, 4, 2, generator=generator, device=generator.device) * aug.perspective
        chosen = torch.rand(n, 1, 1, generator=generator, device=generator.device) < aug.perspective_p
        # perspective is applied after the affine, so its inverse comes first when mapping output -> input
        inverse = inverse @ perspective_matrices(offsets * chosen, size)
    draw = functools.partial(uniform_draws, n, generator=generator)
    stroke = draw(-aug.stroke, aug.stroke) if aug.stroke > 0 else None
    displacement = elastic_field(n, size, aug, generator) if aug.elastic > 0 else None
    blur = draw(0, aug.blur) if aug.blur > 0 else None
    coarse = draw(0, 1) < aug.coarse if aug.coarse > 0 else None
    contrast = draw(aug.contrast, 1) if aug.contrast < 1 else None
    x = images if stroke is None else restroke(images, stroke, aug.stroke)
    x = warp(x, inverse, displacement)
    if blur is not None:   # each sample between itself and the most blurred, by its sigma
        x = torch.lerp(x, gaussian_blur(x, aug.blur), (blur / aug.blur).view(-1, 1, 1, 1))
    if coarse is not None:   # seen at two thirds of the resolution, then brought back
        small = F.interpolate(x, size=round(size * 2 / 3), mode="bilinear", antialias=True, align_corners=False)
        x = torch.where(coarse.view(-1, 1, 1, 1), F.interpolate(small, size=(size, size), mode="bilinear",
                                                                 align_corners=False), x)
    if contrast is not None:
        x = x * contrast.view(-1, 1, 1, 1)
    return x


def restroke(images, change, largest):
    """Strokes broader (change > 0) or finer by `change` [B] pixels (at most `largest`) at the images' size: at twice
    the size, grown or shrunk pixel by pixel (a 3x3 maximum or minimum widens or narrows a stroke by 2 px there, 1 px
    at the size), blended between whole steps, then brought back to the size."""
    most = max(1, math.ceil(largest))
    large = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
    grown, shrunk = [large], [large]
    for _ in range(most):
        grown.append(F.max_pool2d(grown[-1], 3, 1, 1))
        shrunk.append(-F.max_pool2d(-shrunk[-1], 3, 1, 1))
    levels = torch.stack(shrunk[:0:-1] + grown)                                 # [2 most + 1, B, C, 2H, 2W]
    position = (change.clamp(-most, most) + most).view(1, -1, 1, 1, 1)
    low = position.floor().clamp(max=2 * most - 1)
    pick = torch.gather(levels, 0, torch.cat([low, low + 1]).long().expand(2, *levels.shape[1:]))
    return F.avg_pool2d(torch.lerp(pick[0], pick[1], position[0] - low[0]), 2)


def elastic_field(n, size, aug, generator):
    """Displacements [n, size, size, 2] in pixels: uniform noise in [-1, 1] smoothed by a Gaussian of elastic_sigma,
    times elastic (Simard et al. 2003; torchvision's ElasticTransform draws the same kind of field)."""
    noise = torch.rand(n, 2, size, size, generator=generator, device=generator.device) * 2 - 1
    return (gaussian_blur(noise, aug.elastic_sigma) * aug.elastic).permute(0, 2, 3, 1)


def gaussian_blur(images, sigma):
    """Each channel of [B, C, H, W] convolved with a normalized Gaussian of `sigma` pixels (zeros beyond the edge)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    across = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    down = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(images, across, padding=(0, radius), groups=channels)
    return F.conv2d(images, down, padding=(radius, 0), groups=channels)

