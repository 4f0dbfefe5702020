"""The procedural "shapes world": scenes, rendering, domain shifts and captions.

Everything is numpy and fully determined by a seed, so the pretraining corpus, the model
card's evaluation set and every peer's local data can be regenerated bit-for-bit anywhere.
A scene is one coloured shape with a size, a position and a greyscale background; colour is
the only chromatic thing in an image, so the "colour" task is well posed. Some shape x colour
pairs are held out of pretraining to measure zero-shot generalisation to unseen compositions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOUR_RGB = np.array(
    [
        [0.86, 0.13, 0.13],
        [0.96, 0.55, 0.10],
        [0.95, 0.88, 0.15],
        [0.15, 0.70, 0.20],
        [0.10, 0.80, 0.85],
        [0.15, 0.30, 0.90],
        [0.55, 0.20, 0.75],
        [0.98, 0.50, 0.75],
    ],
    dtype=np.float32,
)
PAIR_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # index shape * len(COLOURS) + colour
SIZES = ("small", "medium", "large")
SIZE_RADIUS = ((4.0, 5.5), (7.0, 8.5), (10.0, 12.0))  # pixels at 32x32
POSITIONS = ("in the center", "on the left", "on the right", "at the top", "at the bottom")
POSITION_DIR = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float32)
BACKGROUNDS = ("black", "white", "gray", "striped", "checkered", "dotted")
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
VALUES: dict[str, tuple[str, ...]] = dict(
    zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS), strict=True)
)
# One held-out colour per shape (a permutation, so each colour is held out once too).
HELD_OUT_PAIRS = frozenset((s, (3 * s + 2) % len(COLOURS)) for s in range(len(SHAPES)))
IMAGE_SIZE = 32
DOMAINS = ("clean", "noise", "rotation", "contrast", "clutter", "blur")


@dataclass(frozen=True)
class Scenes:
    """A batch of scene parameters; ``attrs[:, k]`` indexes ``VALUES[ATTRIBUTES[k]]``."""

    attrs: np.ndarray  # (n, 5) int64
    center: np.ndarray  # (n, 2) pixels (x, y), y down
    radius: np.ndarray  # (n,) pixels
    angle: np.ndarray  # (n,) radians
    rgb: np.ndarray  # (n, 3) shape colour after jitter
    bg_levels: np.ndarray  # (n, 2) grey levels of the background pattern
    bg_period: np.ndarray  # (n,) pixels
    bg_phase: np.ndarray  # (n, 2) pixels
    bg_angle: np.ndarray  # (n,) radians (stripes)

    def __len__(self) -> int:
        return len(self.attrs)

    def subset(self, idx: np.ndarray) -> Scenes:
        """The scenes at ``idx`` (so a peer renders only its own share of a global pool)."""
        return Scenes(**{k: v[idx] for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class Domain:
    """A named shift away from the pretraining distribution, e.g. ``"noise+rotation"``."""

    name: str = "clean"
    noise: float = 0.0  # std of additive Gaussian pixel noise
    full_rotation: bool = False  # any angle instead of a slight tilt
    contrast: float = 1.0  # scale of deviations from mid-grey
    clutter: int = 0  # number of grey distractor strokes
    blur: bool = False


def parse_domain(name: str) -> Domain:
    """``"clean"`` or a ``+``-joined combination of the shifts in ``DOMAINS``."""
    parts = [p.strip() for p in name.split("+") if p.strip()] or ["clean"]
    unknown = [p for p in parts if p not in DOMAINS]
    if unknown:
        raise ValueError(f"domain: unknown shift {unknown[0]!r}; choose from {DOMAINS}")
    return Domain(
        name="+".join(parts),
        noise=0.12 if "noise" in parts else 0.0,
        full_rotation="rotation" in parts,
        contrast=0.3 if "contrast" in parts else 1.0,
        clutter=6 if "clutter" in parts else 0,
        blur="blur" in parts,
    )


def sample_attributes(rng: np.random.Generator, n: int, pairs: str = "all") -> np.ndarray:
    """Uniform attributes; ``pairs`` is "all", "seen" (no held-out pair) or "unseen" (only those)."""
    if pairs not in ("all", "seen", "unseen"):
        raise ValueError(f"pairs: {pairs!r} is not one of all/seen/unseen")
    cards = [len(v) for v in VALUES.values()]
    attrs = np.stack([rng.integers(0, c, size=n) for c in cards], axis=1)
    held = np.array(sorted(HELD_OUT_PAIRS))
    if pairs == "unseen":
        attrs[:, :2] = held[rng.integers(0, len(held), size=n)]
    elif pairs == "seen":
        bad = np.array([(s, c) in HELD_OUT_PAIRS for s, c in attrs[:, :2]], dtype=bool)
        while bad.any():
            attrs[bad, 1] = rng.integers(0, len(COLOURS), size=int(bad.sum()))
            bad = np.array([(s, c) in HELD_OUT_PAIRS for s, c in attrs[:, :2]], dtype=bool)
    return attrs.astype(np.int64)


def sample_scenes(
    rng: np.random.Generator, n: int, pairs: str = "all", domain: Domain | None = None
) -> Scenes:
    """Draw attributes and the continuous nuisances (jitter, tilt, textures) of ``n`` scenes."""
    domain = domain or Domain()
    attrs = sample_attributes(rng, n, pairs)
    lo = np.array([r[0] for r in SIZE_RADIUS], dtype=np.float32)[attrs[:, 2]]
    hi = np.array([r[1] for r in SIZE_RADIUS], dtype=np.float32)[attrs[:, 2]]
    radius = lo + (hi - lo) * rng.random(n, dtype=np.float32)
    offset = np.minimum(9.0, 15.0 - radius)
    center = 16.0 + POSITION_DIR[attrs[:, 3]] * offset[:, None] + rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n) if domain.full_rotation else rng.uniform(-0.3, 0.3, n)
    rgb = COLOUR_RGB[attrs[:, 1]] * rng.uniform(0.85, 1.1, (n, 1)) + rng.uniform(-0.06, 0.06, (n, 3))
    kind = attrs[:, 4]
    levels = rng.random((n, 2))
    levels[:, 1] = (levels[:, 0] + 0.3 + 0.4 * rng.random(n)) % 1.0
    plain = {0: (0.0, 0.12), 1: (0.88, 1.0), 2: (0.4, 0.6)}
    for k, (a, b) in plain.items():
        m = kind == k
        levels[m] = rng.uniform(a, b, (int(m.sum()), 1))
    return Scenes(
        attrs=attrs,
        center=center.astype(np.float32),
        radius=radius.astype(np.float32),
        angle=angle.astype(np.float32),
        rgb=np.clip(rgb, 0, 1).astype(np.float32),
        bg_levels=levels.astype(np.float32),
        bg_period=rng.uniform(4, 8, n).astype(np.float32),
        bg_phase=rng.uniform(0, 8, (n, 2)).astype(np.float32),
        bg_angle=rng.uniform(0, np.pi, n).astype(np.float32),
    )


def _shape_mask(shape: int, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Inside test in the shape's own frame (u right, w up, unit = radius)."""
    rho2 = u * u + w * w
    name = SHAPES[shape]
    if name == "circle":
        return rho2 <= 0.85**2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(w)) <= 0.72
    if name == "triangle":
        inside = w >= -0.5
        for a in (np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(a) + w * np.sin(a) <= 0.5
        return inside
    if name == "star":
        theta = np.mod(np.arctan2(u, w), 2 * np.pi / 5)  # 0 at the top point
        theta = np.minimum(theta, 2 * np.pi / 5 - theta)
        rho = np.sqrt(rho2)
        x, y = rho * np.cos(theta), rho * np.sin(theta)  # folded into one half spike
        ox, oy, ix, iy = 1.0, 0.0, 0.42 * np.cos(np.pi / 5), 0.42 * np.sin(np.pi / 5)
        return (ix - ox) * (y - oy) - (iy - oy) * (x - ox) >= 0
    if name == "cross":
        au, aw = np.abs(u), np.abs(w)
        return ((au <= 0.28) & (aw <= 0.9)) | ((aw <= 0.28) & (au <= 0.9))
    if name == "ring":
        return (rho2 <= 0.9**2) & (rho2 >= 0.5**2)
    if name == "heart":
        x, y = u * 1.25, w * 1.25 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if name == "crescent":
        return (rho2 <= 0.9**2) & ((u - 0.38) ** 2 + (w - 0.12) ** 2 >= 0.7**2)
    raise ValueError(f"shape: unknown index {shape}")


def _background(s: Scenes, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Greyscale background (n, g, g) from each scene's kind, levels and pattern."""
    n = len(s)
    kind = s.attrs[:, 4][:, None, None]
    p = s.bg_period[:, None, None]
    xs, ys = x[None] + s.bg_phase[:, 0, None, None], y[None] + s.bg_phase[:, 1, None, None]
    ca, sa = np.cos(s.bg_angle)[:, None, None], np.sin(s.bg_angle)[:, None, None]
    stripe = np.mod((xs * ca + ys * sa) / p, 1.0) < 0.5
    checker = (np.floor(xs / p) + np.floor(ys / p)) % 2 == 0
    dots = (np.mod(xs, p) - p / 2) ** 2 + (np.mod(ys, p) - p / 2) ** 2 < (p / 4) ** 2
    pattern = np.where(kind == 3, stripe, np.where(kind == 4, checker, np.where(kind == 5, dots, False)))
    a, b = s.bg_levels[:, 0, None, None], s.bg_levels[:, 1, None, None]
    return np.broadcast_to(np.where(pattern, b, a), (n, *x.shape)).astype(np.float32)


def render(s: Scenes, domain: Domain | None = None, seed: int = 0, supersample: int = 2) -> np.ndarray:
    """Render scenes to float32 images (n, 3, 32, 32) in [0, 1], anti-aliased by supersampling.

    ``seed`` drives only the domain's pixel-level randomness (noise, clutter).
    """
    domain = domain or Domain()
    n, g = len(s), IMAGE_SIZE * supersample
    coords = (np.arange(g, dtype=np.float32) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)  # (g, g), y down
    dx = x[None] - s.center[:, 0, None, None]
    dy = y[None] - s.center[:, 1, None, None]
    ca, sa = np.cos(s.angle)[:, None, None], np.sin(s.angle)[:, None, None]
    u = (dx * ca + dy * sa) / s.radius[:, None, None]
    w = -(-dx * sa + dy * ca) / s.radius[:, None, None]
    mask = np.zeros((n, g, g), dtype=bool)
    for k in range(len(SHAPES)):
        idx = np.flatnonzero(s.attrs[:, 0] == k)
        if len(idx):
            mask[idx] = _shape_mask(k, u[idx], w[idx])
    bg = _background(s, x, y)
    rng = np.random.default_rng(seed)
    if domain.clutter:
        for _ in range(domain.clutter):  # thin grey strokes: texture that is neither shape nor colour
            p0 = rng.uniform(0, IMAGE_SIZE, (n, 2)).astype(np.float32)
            d = rng.normal(size=(n, 2)).astype(np.float32)
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-6
            rel_x, rel_y = x[None] - p0[:, 0, None, None], y[None] - p0[:, 1, None, None]
            along = rel_x * d[:, 0, None, None] + rel_y * d[:, 1, None, None]
            across = np.abs(rel_x * d[:, 1, None, None] - rel_y * d[:, 0, None, None])
            seg = (across < 0.7) & (np.abs(along) < rng.uniform(3, 8, (n, 1, 1)))
            bg = np.where(seg, rng.uniform(0, 1, (n, 1, 1)).astype(np.float32), bg)
    m = mask[:, None].astype(np.float32)
    img = bg[:, None] * (1 - m) + s.rgb[:, :, None, None] * m
    img = img.reshape(n, 3, IMAGE_SIZE, supersample, IMAGE_SIZE, supersample).mean(axis=(3, 5))
    return pixel_shift(img, domain, rng)


def pixel_shift(img: np.ndarray, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """The image-level part of a domain (blur, contrast, noise) on float images (n, 3, h, w)."""
    h, w = img.shape[-2:]
    if domain.blur:
        pad = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        k = np.array([1.0, 2.0, 1.0], dtype=np.float32) / 4
        img = sum(k[i] * pad[:, :, i : i + h, :] for i in range(3))
        img = sum(k[j] * img[:, :, :, j : j + w] for j in range(3))
    if domain.contrast != 1.0:
        img = 0.5 + (img - 0.5) * domain.contrast
    if domain.noise:
        img = img + rng.normal(0, domain.noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- captions

PREFIXES = ("a", "a photo of a", "a picture of a", "an image of a", "a drawing of a")
NOUNS = ("shape", "object", "thing")
# Zero-shot prompt templates per attribute; each is a caption form the grammar below produces.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a {}.", "a photo of a {}.", "a picture of a {}.", "a drawing of a {}."),
    "colour": ("a {} shape.", "a photo of a {} object.", "a {} thing.", "something {}."),
    "size": ("a {} shape.", "a photo of a {} object.", "a picture of a {} thing."),
    "position": ("a shape {}.", "a photo of an object {}.", "a thing {}."),
    "background": ("a shape on a {} background.", "a photo of an object on a {} background."),
}
MENTION_P = np.array([0.9, 0.6, 0.4, 0.6, 0.3])  # shape and position are the hard ones: name them most


def fix_articles(text: str) -> str:
    """English "a" -> "an" before a vowel sound (good enough for our vocabulary)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() == "a" and words[i + 1][:1].lower() in "aeiou":
            words[i] = "an" if words[i] == "a" else "An"
    return " ".join(words)


def caption(values: list[int | None], prefix: int = 0, noun: int = 0, period: bool = True) -> str:
    """Caption naming the attributes in ``values`` (None = not mentioned), ATTRIBUTES order."""
    shape, colour, size, position, background = values
    words: list[str] = []
    if shape is None and size is None and colour is not None and noun == len(NOUNS):
        words += ["something", COLOURS[colour]]
    else:
        words += PREFIXES[prefix].split(" ")
        words += [SIZES[size]] if size is not None else []
        words += [COLOURS[colour]] if colour is not None else []
        words += [SHAPES[shape] if shape is not None else NOUNS[noun % len(NOUNS)]]
    words += POSITIONS[position].split(" ") if position is not None else []
    words += ["on", "a", BACKGROUNDS[background], "background"] if background is not None else []
    return fix_articles(" ".join(words)) + ("." if period else "")


def sample_captions(
    rng: np.random.Generator, attrs: np.ndarray, hard_negatives: bool = False, mention_p: np.ndarray = MENTION_P
) -> tuple[list[str], np.ndarray]:
    """One random caption per scene and its mention matrix (n, 5), -1 where not mentioned.

    ``attrs`` of -1 (e.g. an achromatic shape's colour) are never mentioned. With
    ``hard_negatives`` n more captions follow, each the same caption with one mentioned attribute
    swapped: contrasting them forces the model to bind every attribute, not only the easiest one.
    """
    n = len(attrs)
    mention = (rng.random((n, len(ATTRIBUTES))) < mention_p) & (attrs >= 0)
    none = np.flatnonzero(~mention.any(axis=1))  # always say something: shape or (known) colour
    pick = rng.integers(0, 2, len(none))
    mention[none, np.where(attrs[none, 1] >= 0, pick, 0)] = True
    prefix = rng.integers(0, len(PREFIXES), n)
    noun = rng.integers(0, len(NOUNS) + 1, n)
    period = rng.random(n) < 0.5
    mentions = np.where(mention, attrs, -1)
    if hard_negatives:
        neg = mentions.copy()
        for i in range(n):
            k = rng.choice(np.flatnonzero(neg[i] >= 0))
            card = len(VALUES[ATTRIBUTES[k]])
            neg[i, k] = (neg[i, k] + rng.integers(1, card)) % card
        mentions = np.concatenate([mentions, neg])
        prefix, noun, period = np.tile(prefix, 2), np.tile(noun, 2), np.tile(period, 2)
    texts = [
        caption([int(v) if v >= 0 else None for v in m], int(p), int(o), bool(d))
        for m, p, o, d in zip(mentions, prefix, noun, period, strict=True)
    ]
    return texts, mentions


def compatibility(attrs: np.ndarray, mentions: np.ndarray) -> np.ndarray:
    """``c[i, j]`` is True when caption j is a true description of scene i."""
    ok = (mentions[None, :, :] < 0) | (mentions[None, :, :] == attrs[:, None, :])
    return ok.all(axis=2)


def vocabulary() -> list[str]:
    """Every word the caption grammar can emit (to build a compact token table)."""
    words = {"something", "on", "a", "an", "background", "."}
    for p in PREFIXES:
        words.update(p.split(" "))
    for group in (NOUNS, SHAPES, COLOURS, SIZES, BACKGROUNDS, POSITIONS):
        for v in group:
            words.update(v.split(" "))
    return sorted(words)
