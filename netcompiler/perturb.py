"""`netc eval --perturb`: seeded perturbations of test images, to compare clean and
perturbed accuracy.  They apply to pixels on the 0..1 scale, before normalisation, in the
order of the list; each image draws its own amounts from one seeded generator.

    shift=N     move the image by (dy, dx), each uniform in -N..N pixels; black comes in
    flip=K      invert K random pixels (p -> 1 - p), every channel of each
    noise=S     add Gaussian noise of standard deviation S, clipped to [0, 1]
    rotate=D    rotate by an angle uniform in [-D, D] degrees about the centre (nearest pixel,
                black outside)
    contrast=C  scale the deviation from the image's mean by a factor uniform in [1 - C, 1 + C],
                clipped to [0, 1]
"""
from __future__ import annotations

import math

import numpy as np

PERTURBATIONS = {"shift": int, "flip": int, "noise": float, "rotate": float, "contrast": float}
PERTURB_HELP = ("comma-separated NAME=VALUE: shift=N pixels, flip=K pixels inverted, noise=S (Gaussian std), "
                "rotate=D degrees, contrast=C (factor in [1-C, 1+C]); e.g. shift=2,flip=5")


def parse_perturb(text: str) -> list[tuple[str, float]]:
    """'shift=2,flip=5' -> [('shift', 2), ('flip', 5)]; ValueError with the reason."""
    out = []
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if name not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation '{name}' (expected {', '.join(PERTURBATIONS)})")
        kind = PERTURBATIONS[name]
        try:
            v = kind(value)
        except ValueError:
            raise ValueError(f"'{name}' needs a{'n integer' if kind is int else ' number'} value: "
                             f"{name}=...") from None
        if not (math.isfinite(v) and v >= 0) or (name == "contrast" and v > 1):
            raise ValueError(f"{name} must be {'in [0, 1]' if name == 'contrast' else 'a number >= 0'}, got {value}")
        out.append((name, v))
    return out


def _shift(x: np.ndarray, n: int, rng) -> np.ndarray:
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(rng.integers(-n, n + 1, (len(x), 2))):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def _flip(x: np.ndarray, k: int, rng) -> np.ndarray:
    out = x.copy()
    h, w = x.shape[-2:]
    k = min(k, h * w)
    for i in range(len(x)):
        where = rng.choice(h * w, k, replace=False)
        r, c = np.divmod(where, w)
        out[i, :, r, c] = 1 - out[i, :, r, c]
    return out


def _rotate(x: np.ndarray, degrees: float, rng) -> np.ndarray:
    n, _, h, w = x.shape
    out = np.zeros_like(x)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[0:h, 0:w]
    for i, a in enumerate(np.deg2rad(rng.uniform(-degrees, degrees, n))):
        # the source of each output pixel: rotate back by -a
        sy = cy + (yy - cy) * math.cos(a) - (xx - cx) * math.sin(a)
        sx = cx + (yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
        sy, sx = np.rint(sy).astype(int), np.rint(sx).astype(int)
        inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        out[i][:, inside] = x[i][:, sy[inside], sx[inside]]
    return out


def _noise(x: np.ndarray, std: float, rng) -> np.ndarray:
    return np.clip(x + rng.normal(0, std, x.shape), 0, 1)


def _contrast(x: np.ndarray, c: float, rng) -> np.ndarray:
    f = rng.uniform(1 - c, 1 + c, (len(x), 1, 1, 1))
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(m + f * (x - m), 0, 1)


_APPLY = {"shift": lambda x, v, rng: _shift(x, int(v), rng), "flip": lambda x, v, rng: _flip(x, int(v), rng),
          "noise": _noise, "rotate": _rotate, "contrast": _contrast}


def perturb(images: np.ndarray, spec: list[tuple[str, float]], seed: int = 0) -> np.ndarray:
    """Perturbed float copies of `images` ((N, H, W) or (N, C, H, W), uint8 or 0..1 floats)."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255 if x.dtype == np.uint8 else x.astype(np.float64)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[:, None]
    rng = np.random.default_rng(seed)
    for name, v in spec:
        if v:
            x = _APPLY[name](x, v, rng)
    return x[:, 0] if squeeze else x
