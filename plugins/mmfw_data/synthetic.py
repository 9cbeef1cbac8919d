"""The built-in synthetic dataset: shapes with colours, sizes and spatial relations.

Deterministic from ``seed``; images are drawn with Pillow once per split and kept in memory as
uint8 arrays. Every caption describes the whole scene (shape, colour, size, position or
relations) in varied wording, so a model must bind attributes to objects and read relations
("left of", "above") to retrieve well: a bag-of-words or collapsed model scores visibly worse.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Literal

import attrs
import numpy as np
import torch
from PIL import Image, ImageDraw

from mmfw.spi import Item, option

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SIZES = {"small": 0.10, "large": 0.16}  # radius as a fraction of the image side
# where a lone shape sits: 3x3 grid cells named in captions
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_029, "zeroshot": 3_000_017}
#: prompt templates of the zeroshot split, in the captions' own wording (the quickstart's
#: tokenizer learns its vocabulary from the captions, so "a photo of" would be unknown words)
ZEROSHOT_TEMPLATES = {
    "shape": ("a {c}", "a single {c}", "there is a {c}", "one {c} on a dark background"),
    "colour": ("a {c} shape", "something {c}", "one {c} thing on a dark background"),
}
DIFFICULTY = {  # (probability of 1, 2, 3, 4 shapes; distractors)
    "easy": ((0.5, 0.5, 0.0, 0.0), False),
    "medium": ((0.2, 0.4, 0.4, 0.0), False),  # lone shapes repeat descriptions: keep them rarer
    "hard": ((0.0, 0.3, 0.4, 0.3), True),
}


@attrs.frozen
class SyntheticOptions:
    train_images: int = option(10_000, doc="images in the train split",
                               validator=attrs.validators.ge(1))
    val_images: int = option(500, doc="images in the val split", validator=attrs.validators.ge(0))
    test_images: int = option(1_000, doc="images in the test split",
                              validator=attrs.validators.ge(0))
    captions_per_image: int = option(5, doc="captions per image",
                                     validator=attrs.validators.in_(range(1, 11)))
    image_size: int = option(48, doc="side of the square images in pixels",
                             validator=attrs.validators.ge(16))
    difficulty: Literal["easy", "medium", "hard"] = option(
        "medium", doc="easy: 1-2 shapes; medium: 1-3 (mostly 2-3); hard: 2-4 shapes, clutter, "
        "colour jitter"
    )
    seed: int = option(0, doc="data seed (independent of run.seed, so runs share data)")
    zeroshot_images: int = option(0, doc="images in the labelled 'zeroshot' split (0: no such "
                                  "split): one shape each, labelled by zeroshot_label, for "
                                  "[eval.zeroshot]", validator=attrs.validators.ge(0))
    zeroshot_label: Literal["shape", "colour"] = option(
        "shape", doc="what the class of a 'zeroshot' image is: its shape or its colour")


@attrs.frozen
class Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the side
    y: float


def _scene(rng: random.Random, n: int) -> list[Shape]:
    """Place n shapes so that every pair has one clear relation (left/right or above/below)."""
    for _ in range(100):
        shapes: list[Shape] = []
        for _ in range(n):
            size = rng.choice(tuple(SIZES))
            r = SIZES[size]
            kind, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
            for _ in range(60):
                s = Shape(kind, colour, size,
                          rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r))
                if all(_clear(s, o) for o in shapes):
                    shapes.append(s)
                    break
        if len(shapes) == n:
            return shapes
    raise RuntimeError(f"could not place {n} shapes")  # pragma: no cover


def _clear(a: Shape, b: Shape) -> bool:
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    apart = (a.x - b.x) ** 2 + (a.y - b.y) ** 2 >= (SIZES[a.size] + SIZES[b.size] + 0.02) ** 2
    return apart and max(dx, dy) >= 1.6 * min(dx, dy) and max(dx, dy) > 0.2


def _relation(a: Shape, b: Shape) -> str:
    """Where a is relative to b."""
    if abs(a.x - b.x) >= abs(a.y - b.y):
        return "left of" if a.x < b.x else "right of"
    return "above" if a.y < b.y else "below"


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _np(s: Shape, rng: random.Random, article: bool = True, size: bool = True) -> str:
    words = [w for w in (s.size if size else "", s.colour, s.kind) if w]
    phrase = " ".join(words)
    if not article:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(s: Shape) -> str:
    row = ROWS[min(2, int(s.y * 3))]
    col = COLS[min(2, int(s.x * 3))]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col}"


def _captions(shapes: Sequence[Shape], k: int, rng: random.Random) -> list[str]:
    if len(shapes) == 1:
        s = shapes[0]
        w = _where(s)
        templates = [
            f"{_np(s, rng)} {w}",
            f"there is {_np(s, rng)} {w}",
            f"{w}, {_np(s, rng)}",
            f"{_np(s, rng, article=False)} {w} on a dark background",
            f"a single {s.colour} {s.kind}, {s.size}, {w}",
            f"one {s.size} {s.kind} coloured {s.colour} {w}",
            f"{_np(s, rng)} sits {w}",
        ]
    elif len(shapes) == 2:
        a, b = shapes
        rel = _relation(a, b)
        inv = _INVERSE[rel]
        side = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
        templates = [
            f"{_np(a, rng)} {rel} {_np(b, rng)}",
            f"{_np(b, rng)} {inv} {_np(a, rng)}",
            f"{_np(b, rng, article=False)}, {_np(a, rng, article=False)} {rel} it",
            f"{_np(b, rng)} with {_np(a, rng)} {rel} it",
            f"{rel} {_np(b, rng)} there is {_np(a, rng)}",
            f"two shapes: {_np(a, rng)} and {_np(b, rng)}, the {a.kind} on the {side[rel]}"
            if a.kind != b.kind else f"two {a.kind}s: {a.colour} on the {side[rel]}, "
            f"{b.colour} on the {side[inv]}",
            f"{_np(a, rng)} is {rel} {_np(b, rng)}",
        ]
    else:
        order = sorted(shapes, key=lambda s: s.x)
        pairs = [f"{_np(x, rng)} {_relation(x, y)} {_np(y, rng)}"
                 for x, y in itertools.pairwise(shapes)]
        names = [_np(s, rng) for s in order]
        listing = ", ".join(names[:-1]) + f" and {names[-1]}"
        top = min(shapes, key=lambda s: s.y)
        templates = [
            " and ".join(pairs),
            f"from left to right: {listing}",
            "; ".join(reversed(pairs)),
            f"{len(shapes)} shapes, {listing} from left to right",
            f"{listing}, left to right, with the {top.colour} {top.kind} highest",
            ", ".join(pairs),
            f"{_np(top, rng)} at the top among " + ", ".join(
                _np(s, rng) for s in shapes if s is not top),
        ]
    rng.shuffle(templates)
    return [templates[i % len(templates)] for i in range(k)]


def _draw(shapes: Sequence[Shape], side: int, rng: random.Random, distract: bool) -> np.ndarray:
    bg = tuple(int(v) for v in np.array((30, 30, 36)) + (rng.randint(-12, 12) if distract else 0))
    img = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    if distract:  # unmentioned clutter: faint dots and a slight tint
        for _ in range(rng.randint(3, 8)):
            x, y = rng.uniform(0, side), rng.uniform(0, side)
            c = tuple(rng.randint(50, 110) for _ in range(3))
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=c)
    for s in shapes:
        cx, cy, r = s.x * side, s.y * side, SIZES[s.size] * side
        fill = COLOURS[s.colour]
        if distract:
            fill = tuple(int(np.clip(v + rng.randint(-25, 25), 0, 255)) for v in fill)
        if s.kind == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            q = r * 0.85
            d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif s.kind == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif s.kind == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif s.kind == "cross":
            t = r * 0.35
            d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
        else:  # star
            pts = []
            for i in range(10):
                ang = -np.pi / 2 + i * np.pi / 5
                rr = r if i % 2 == 0 else r * 0.45
                pts.append((cx + rr * np.cos(ang), cy + rr * np.sin(ang)))
            d.polygon(pts, fill=fill)
    return np.asarray(img, dtype=np.uint8)


class SyntheticSplit:
    """One split, generated at construction: uint8 images ``[N, 3, S, S]`` and their captions."""

    def __init__(self, options: SyntheticOptions, name: str) -> None:
        n = {"train": options.train_images, "val": options.val_images,
             "test": options.test_images}[name]
        weights, distract = DIFFICULTY[options.difficulty]
        rng = random.Random(options.seed * 7_919 + SPLIT_OFFSETS[name])
        side = options.image_size
        images = np.empty((n, side, side, 3), dtype=np.uint8)
        self._captions: list[list[str]] = []
        self.scenes: list[list[Shape]] = []
        for i in range(n):
            shapes = _scene(rng, rng.choices((1, 2, 3, 4), weights)[0])
            images[i] = _draw(shapes, side, rng, distract)
            self._captions.append(_captions(shapes, options.captions_per_image, rng))
            self.scenes.append(shapes)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.id_offset = SPLIT_OFFSETS[name]

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> Item:
        return Item(self.images[index], self._captions[index], self.id_offset + index)

    def captions(self, index: int) -> Sequence[str]:
        return self._captions[index]


class ZeroShotSplit(SyntheticSplit):
    """The labelled ``zeroshot`` split: one shape per image, its class the shape (or colour),
    classes in turn so each has the same number of images; also a caption split."""

    def __init__(self, options: SyntheticOptions) -> None:
        n, side = options.zeroshot_images, options.image_size
        by_shape = options.zeroshot_label == "shape"
        self.classnames = SHAPES if by_shape else tuple(COLOURS)
        self.templates = ZEROSHOT_TEMPLATES[options.zeroshot_label]
        distract = DIFFICULTY[options.difficulty][1]
        rng = random.Random(options.seed * 7_919 + SPLIT_OFFSETS["zeroshot"])
        images = np.empty((n, side, side, 3), dtype=np.uint8)
        self._captions, self.scenes, self._labels = [], [], []
        for i in range(n):
            label = i % len(self.classnames)
            shape = _scene(rng, 1)[0]
            shape = attrs.evolve(shape, **{"kind" if by_shape else "colour":
                                           self.classnames[label]})
            images[i] = _draw([shape], side, rng, distract)
            self._captions.append(_captions([shape], options.captions_per_image, rng))
            self.scenes.append([shape])
            self._labels.append(label)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.id_offset = SPLIT_OFFSETS["zeroshot"]

    def label(self, index: int) -> int:
        return self._labels[index]


class SyntheticDataset:
    """Factory product of ``synthetic``: splits are made on first use and kept."""

    Options = SyntheticOptions

    def __init__(self, options: SyntheticOptions | None = None) -> None:
        self.options = options or SyntheticOptions()
        self.splits = ("train", "val", "test", *(("zeroshot",) if self.options.zeroshot_images
                                                 else ()))
        self._made: dict[str, SyntheticSplit] = {}

    def split(self, name: str) -> SyntheticSplit:
        if name not in self.splits:
            raise KeyError(f"synthetic has splits {self.splits}, not '{name}'")
        if name not in self._made:
            self._made[name] = ZeroShotSplit(self.options) if name == "zeroshot" else \
                SyntheticSplit(self.options, name)
        return self._made[name]

    def sample_image(self, index: int = 0, split: str = "train") -> Image.Image:
        """A split image as PIL (handy in notebooks and docs)."""
        return Image.fromarray(self.split(split).images[index].permute(1, 2, 0).numpy())
