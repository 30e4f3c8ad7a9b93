"""Image augmentations that imitate another drawing style (flat colours, blur, thicker lines,
small crops and rotations). Used to cache extra feature views of training images so the
retrieval map does not learn one style's quirks. Deterministic given the `random.Random`."""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageFilter


def restyle(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = image.size
    scale = rng.uniform(0.75, 1.0)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    image = image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    pick = rng.random()
    if pick < 0.35:  # flat colours, like a vector emoji set
        colors = rng.choice([4, 6, 8, 12])
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).convert("RGB")
    elif pick < 0.55:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    elif pick < 0.7:  # thicker dark outlines
        image = image.filter(ImageFilter.MinFilter(3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.4))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
