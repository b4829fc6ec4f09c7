"""`shapes`: the bundled, procedurally generated image dataset.

Every image is a pure function of (seed, split, index): a per-image random generator
draws the class, the object's geometry and colour, the background texture and the
clutter, so any index can be rendered on any worker without a file on disk and the
same seed always gives the same pixels.

Classes come in blocks of four: two near colours × two near shapes (red/orange ×
circle/hexagon, blue/purple × square/diamond, ...), so a model has to look at hue and
outline at once. Small objects, textured backgrounds, small clutter in the palette's
colours and pixel noise keep the bundled CLIP well short of perfect, leaving room for
steering to matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vs2ray.data.base import ImageDataset, ImageRecord

IMAGE_SIZE = 32
SUPERSAMPLE = 2  # render at 64×64 and average down, for anti-aliased edges
CANVAS = IMAGE_SIZE * SUPERSAMPLE
_GRID_Y, _GRID_X = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)  # supersampled pixel coordinates

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.18, 0.14),
    "orange": (0.93, 0.40, 0.12),
    "yellow": (0.95, 0.86, 0.18),
    "white": (0.94, 0.94, 0.92),
    "green": (0.22, 0.66, 0.24),
    "teal": (0.12, 0.62, 0.50),
    "blue": (0.20, 0.28, 0.86),
    "purple": (0.46, 0.24, 0.84),
    "pink": (0.96, 0.52, 0.76),
    "brown": (0.52, 0.31, 0.15),
}

# (near colours) × (near shapes): each block holds four mutually confusable classes.
CLASS_BLOCKS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("red", "orange"), ("circle", "hexagon")),
    (("blue", "purple"), ("square", "diamond")),
    (("green", "teal"), ("triangle", "pentagon")),
    (("yellow", "white"), ("star", "cross")),
    (("pink", "purple"), ("ring", "circle")),
    (("brown", "orange"), ("triangle", "star")),
]

CLASSES: list[tuple[str, str]] = [
    (colour, shape) for colours, shapes in CLASS_BLOCKS for colour in colours for shape in shapes
]
CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour, shape in CLASSES]

SPLIT_CODES: dict[str, int] = {"train": 1, "test": 2, "pretrain": 3, "val": 4}
SPURIOUS_CODE = 7  # keeps the spurious world's random streams apart from the shapes world's
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 20_000, "test": 5_000, "pretrain": 30_000, "val": 2_000}

BACKGROUNDS = ("plain", "striped", "checkered", "noisy")

# Orientation of the first vertex (radians, image y points down) and rotation jitter.
_POLYGON_SIDES = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6}
_BASE_ANGLE = {
    "triangle": -math.pi / 2,
    "pentagon": -math.pi / 2,
    "star": -math.pi / 2,
    "square": math.pi / 4,
    "diamond": 0.0,
    "hexagon": 0.0,
    "cross": 0.0,
}
_ANGLE_JITTER = {"square": 0.2, "diamond": 0.2, "cross": 0.25}  # < 45°/2: square never looks like diamond
_DEFAULT_JITTER = 0.35

CAPTION_TEMPLATES = (
    "a photo of a {name}.",
    "a {size} {name}.",
    "a {name} on a {background} background.",
    "a {size} {name} on a {background} background.",
    "{name}.",
    "a picture of a {size} {name}.",
)

# Prompt ensemble for the zero-shot classifier (the class name fills `{}`).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a {} on a striped background.",
    "a {} on a checkered background.",
    "a {} on a noisy background.",
)


# The words a steerability measurement scores the bundled worlds over: every colour, shape and class name,
# and the background kinds, all of which vs2ray-tiny's captions contain.
CONCEPT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*COLOURS, *(shape for _, shape in CLASSES), *CLASS_NAMES, *(f"{b} background" for b in BACKGROUNDS)])
)

# The spurious world (the Waterbirds analogue): the class is the shape, the nuisance the colour family.
SPURIOUS_CLASSES: tuple[str, ...] = ("circle", "square")
SPURIOUS_ATTRIBUTES: dict[str, tuple[str, ...]] = {"warm": ("red", "orange"), "cool": ("blue", "purple")}
SPURIOUS_SPLIT_SIZES: dict[str, int] = {"train": 10_000, "test": 4_000, "val": 1_000}
SPURIOUS_TEST_AGREEMENT = 0.5  # test and val are group-balanced in expectation: colour says nothing about shape


@dataclass(frozen=True)
class ShapeSample:
    """One rendered image with the attributes it was drawn from."""

    pixels: np.ndarray  # (32, 32, 3) uint8
    label: int
    radius: float
    background: str
    caption: str


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Coverage mask of `shape` centred at the origin.

    dx, dy: (H, W) pixel offsets from the centre; radius: circumradius in pixels;
    angle: rotation in radians. Returns a bool (H, W) array.
    """
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx) - angle
    if shape == "circle":
        return rho <= radius
    if shape == "ring":
        return (rho <= radius) & (rho >= 0.55 * radius)
    if shape in _POLYGON_SIDES:
        n = _POLYGON_SIDES[shape]
        sector = 2 * math.pi / n
        # distance to the nearest edge's normal direction decides inside/outside
        local = np.mod(phi, sector) - sector / 2
        return rho * np.cos(local) <= radius * math.cos(math.pi / n)
    if shape == "star":
        sector = 2 * math.pi / 5
        to_vertex = np.abs(np.mod(phi + sector / 2, sector) - sector / 2) / (sector / 2)  # 0 at a tip, 1 between
        return rho <= radius * (1.0 - 0.58 * to_vertex)
    if shape == "cross":
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        arm = 0.34 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A muted, textured (64, 64, 3) float background and its one-word kind."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    grey = rng.uniform(0.25, 0.7)
    base = np.clip(grey + rng.normal(0.0, 0.06, size=3), 0.0, 1.0)
    canvas = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    yy, xx = _GRID_Y, _GRID_X
    if kind == "striped":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 14) * SUPERSAMPLE
        wave = np.sign(np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period))
        canvas += 0.12 * wave[..., None] * rng.uniform(0.6, 1.0)
    elif kind == "checkered":
        cell = rng.integers(3, 8) * SUPERSAMPLE
        board = ((xx // cell + yy // cell) % 2) * 2 - 1
        canvas += 0.1 * board[..., None]
    elif kind == "noisy":
        coarse = rng.normal(0.0, 0.12, size=(8, 8, 3))
        canvas += np.kron(coarse, np.ones((CANVAS // 8, CANVAS // 8, 1)))
    return canvas, kind


def _add_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Paint 0-3 small dots or short strokes in palette colours onto `canvas` in place."""
    yy, xx = _GRID_Y, _GRID_X
    palette = list(COLOURS.values())
    for _ in range(rng.integers(0, 4)):
        colour = np.asarray(palette[rng.integers(len(palette))])
        cx, cy = rng.uniform(0, CANVAS, size=2)
        if rng.random() < 0.5:
            mask = np.hypot(xx - cx, yy - cy) <= rng.uniform(1.0, 2.2) * SUPERSAMPLE
        else:
            theta = rng.uniform(0, math.pi)
            along = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
            across = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
            mask = (np.abs(along) <= rng.uniform(3, 6) * SUPERSAMPLE) & (np.abs(across) <= 0.5 * SUPERSAMPLE)
        canvas[mask] = colour


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def shape_label(seed: int, split: str, index: int) -> int:
    """The class of image `index` without rendering it (the rng's first draw)."""
    return int(_image_rng(seed, split, index).integers(len(CLASSES)))


def render_shape(seed: int, split: str, index: int) -> ShapeSample:
    """Render image `index` of `split`, deterministically from `seed`.

    Returns a ShapeSample with (32, 32, 3) uint8 pixels, the class label, and the
    attributes that make up its training caption.
    """
    rng = _image_rng(seed, split, index)
    label = int(rng.integers(len(CLASSES)))  # must stay the first draw: see shape_label
    return render_object(rng, *CLASSES[label], label=label, name=CLASS_NAMES[label])


WORD_IMAGE_SIZE = 64  # a typographic image: a word of PIL's 6×11 px bitmap font covers whole 16 px patches
CORNERS = 4
TYPOGRAPHIC_CODE = 28  # keeps the typographic world's draws apart from the shapes world's
NO_WORD, OWN_WORD, OTHER_WORD = 0, 1, 2  # what is written on a typographic image
TYPOGRAPHIC_SPLIT_SIZES: dict[str, int] = {"train": 10_000, "test": 3_000, "val": 2_000}
NO_WORD_ATTRIBUTE = "no word"  # shapes_typographic's attribute value after the 24 class names


def write_word(pixels: np.ndarray, word: str | None, corner: int) -> np.ndarray:
    """A (32, 32, 3) shapes image at 64×64 (each pixel doubled) with `word` written on it, as a note stuck on
    a photo: black letters of PIL's bitmap font (no download, the same pixels everywhere) on a white label,
    one line per word of `word`, in corner 0-3 (top left, top right, bottom left, bottom right). None
    writes nothing. -> (64, 64, 3) uint8."""
    image = Image.fromarray(pixels).resize((WORD_IMAGE_SIZE, WORD_IMAGE_SIZE), Image.Resampling.NEAREST)
    if word is not None:
        font = ImageFont.load_default_imagefont()
        lines = word.split(" ")
        width = max(int(font.getbbox(line)[2]) for line in lines) + 2
        height = 11 * len(lines) + 2
        x = 0 if corner % 2 == 0 else WORD_IMAGE_SIZE - width
        y = 0 if corner < 2 else WORD_IMAGE_SIZE - height
        draw = ImageDraw.Draw(image)
        draw.rectangle([x, y, x + width - 1, y + height - 1], fill=(255, 255, 255))
        for i, line in enumerate(lines):
            draw.text((x + 1, y + 1 + 11 * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def word_draws(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """What shapes_typographic writes on image `index` of `split`, without rendering it: (condition: NO_WORD,
    OWN_WORD or OTHER_WORD with equal chance; the other class, never the image's own; the corner)."""
    label = shape_label(seed, split, index)
    rng = np.random.default_rng([seed, TYPOGRAPHIC_CODE, SPLIT_CODES[split], index])
    condition = int(rng.integers(3))
    other = int((label + 1 + rng.integers(len(CLASS_NAMES) - 1)) % len(CLASS_NAMES))
    return condition, other, int(rng.integers(CORNERS))


def written_class(label: int, other: int, condition: int) -> int:
    """The class whose name is written under `condition` on an image of class `label`, or -1 for NO_WORD."""
    return {NO_WORD: -1, OWN_WORD: label, OTHER_WORD: other}[condition]


def render_with_word(seed: int, split: str, index: int, condition: int) -> tuple[np.ndarray, ShapeSample, int]:
    """Image `index` of `split` at 64 px under `condition` (nothing, its own class's name or the other class's
    written in its corner, `word_draws`): (pixels (64, 64, 3) uint8, the 32 px sample, the written class or -1)."""
    sample = render_shape(seed, split, index)
    _, other, corner = word_draws(seed, split, index)
    written = written_class(sample.label, other, condition)
    return write_word(sample.pixels, CLASS_NAMES[written] if written >= 0 else None, corner), sample, written


def render_object(rng: np.random.Generator, colour_name: str, shape: str, label: int, name: str) -> ShapeSample:
    """Paint one `colour_name` `shape` on a textured, cluttered background, drawing every other choice from `rng`.

    `label` and `name` (the caption's object name) are passed through to the ShapeSample.
    """
    canvas, background = _background(rng)
    _add_clutter(rng, canvas)

    radius = rng.uniform(5.0, 13.0)
    margin = radius + 1.0
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    angle = _BASE_ANGLE.get(shape, 0.0) + rng.uniform(-1, 1) * _ANGLE_JITTER.get(shape, _DEFAULT_JITTER)
    if shape == "hexagon":
        angle = rng.uniform(0, math.pi / 3)  # a hexagon's orientation carries no class information
    colour = np.asarray(COLOURS[colour_name]) * rng.uniform(0.8, 1.1) + rng.normal(0.0, 0.05, size=3)

    offsets = ((_GRID_X + 0.5) / SUPERSAMPLE - cx, (_GRID_Y + 0.5) / SUPERSAMPLE - cy)
    canvas[shape_mask(shape, *offsets, radius=radius, angle=angle)] = np.clip(colour, 0.0, 1.0)

    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    small += rng.normal(0.0, 0.03, size=small.shape)
    pixels = (np.clip(small, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    size_word = "small" if radius < 8.5 else "large"
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = template.format(name=name, size=size_word, background=background)
    return ShapeSample(pixels=pixels, label=label, radius=float(radius), background=background, caption=caption)


class ShapesDataset(ImageDataset):
    """The bundled `shapes` dataset: 24 classes, images rendered on demand.

    Ids are the image's index within its split (0 … n-1), so they are stable for a
    given split size and seed.
    """

    name = "shapes"
    prompt_templates: tuple[str, ...] = PROMPT_TEMPLATES
    default_split_sizes: dict[str, int] = DEFAULT_SPLIT_SIZES  # also the splits it has

    @property
    def concept_words(self) -> list[str]:
        return list(CONCEPT_WORDS)

    def __init__(self, seed: int = 0, split_sizes: dict[str, int] | None = None) -> None:
        self.seed = seed
        self.split_sizes = {**self.default_split_sizes, **(split_sizes or {})}
        unknown = set(self.split_sizes) - set(self.default_split_sizes)
        if unknown:
            raise ValueError(
                f"{self.name} has no split(s) {sorted(unknown)}; splits: {sorted(self.default_split_sizes)}"
            )

    @property
    def classes(self) -> list[str]:
        return list(CLASS_NAMES)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_sizes)

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        return [
            ImageRecord(id=i, label=shape_label(self.seed, split, i), ref=str(i))
            for i in range(self.split_sizes[split])
        ]

    def num_images(self, split: str) -> int:
        self.check_split(split)
        return self.split_sizes[split]

    def load_image(self, split: str, ref: str) -> Image.Image:
        return Image.fromarray(render_shape(self.seed, split, int(ref)).pixels)

    def caption(self, split: str, index: int) -> str:
        """The training caption of image `index` (used to train `vs2ray-tiny`)."""
        return render_shape(self.seed, split, index).caption


class SpuriousShapesDataset(ShapesDataset):
    """`shapes_spurious`: the bundled spurious-correlation world, a Waterbirds analogue with 2 classes × 2 attributes.

    The class is the shape (circle, square); the nuisance attribute is the colour family (warm: red or
    orange; cool: blue or purple), drawn to agree with the class (circle-warm, square-cool) with
    probability `agreement` in `train` and 0.5 in `test` and `val`. vs2ray-tiny was pretrained on `shapes`,
    where circles are mostly warm and squares only blue or purple, so its zero-shot leans on colour, as
    CLIP leans on the background of a Waterbirds image. Everything else (background, clutter, size,
    noise) is drawn as in `shapes`.
    """

    name = "shapes_spurious"
    attribute_names = tuple(SPURIOUS_ATTRIBUTES)
    default_split_sizes = SPURIOUS_SPLIT_SIZES

    def __init__(self, seed: int = 0, split_sizes: dict[str, int] | None = None, agreement: float = 0.95) -> None:
        super().__init__(seed, split_sizes)
        self.agreement = agreement

    @property
    def classes(self) -> list[str]:
        return list(SPURIOUS_CLASSES)

    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPURIOUS_CODE, SPLIT_CODES[split], index])

    def _draw_group(self, rng: np.random.Generator, split: str) -> tuple[int, int]:
        """(label, attribute): the first two draws of an image's generator, so records never render."""
        label = int(rng.integers(len(SPURIOUS_CLASSES)))
        agreement = self.agreement if split == "train" else SPURIOUS_TEST_AGREEMENT
        attribute = label if rng.random() < agreement else 1 - label
        return label, attribute

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        records = []
        for i in range(self.split_sizes[split]):
            label, attribute = self._draw_group(self._rng(split, i), split)
            records.append(ImageRecord(id=i, label=label, ref=str(i), attribute=attribute))
        return records

    def render(self, split: str, index: int) -> ShapeSample:
        """Image `index` of `split`: a shape of its class in a colour of its attribute's family."""
        rng = self._rng(split, index)
        label, attribute = self._draw_group(rng, split)
        family = SPURIOUS_ATTRIBUTES[self.attribute_names[attribute]]
        colour = family[int(rng.integers(len(family)))]
        shape = SPURIOUS_CLASSES[label]
        return render_object(rng, colour, shape, label=label, name=f"{colour} {shape}")

    def load_image(self, split: str, ref: str) -> Image.Image:
        return Image.fromarray(self.render(split, int(ref)).pixels)

    def caption(self, split: str, index: int) -> str:
        return self.render(split, index).caption


class TypographicShapesDataset(ShapesDataset):
    """`shapes_typographic`: the bundled typographic-attack world (issue 28), for `vs2ray-tiny-reader`.

    The images are `shapes` images (same class, pixels and seed) at 64 px; on a third of them nothing is
    written, on a third their own class's name, on a third another class's name (`word_draws`), black on a
    white label in a corner (`write_word`). The class is the shape's; the attribute is the written word: the
    index of the class whose name is written, or `len(classes)` ("no word"), so that a prediction equal to
    the attribute is the attack's success and an image without a word never counts as one.
    """

    name = "shapes_typographic"
    attribute_names = (*CLASS_NAMES, NO_WORD_ATTRIBUTE)
    default_split_sizes = TYPOGRAPHIC_SPLIT_SIZES
    prompt_templates = ("a photo of a {}.",)  # RTA-100's and PAINT's single prompt

    @property
    def concept_words(self) -> list[str]:
        return list(CONCEPT_WORDS)

    def _record(self, split: str, index: int) -> ImageRecord:
        label = shape_label(self.seed, split, index)
        condition, other, _ = word_draws(self.seed, split, index)
        written = written_class(label, other, condition)
        return ImageRecord(
            id=index, label=label, ref=str(index), attribute=written if written >= 0 else len(CLASS_NAMES)
        )

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        return [self._record(split, i) for i in range(self.split_sizes[split])]

    def load_image(self, split: str, ref: str) -> Image.Image:
        index = int(ref)
        condition = word_draws(self.seed, split, index)[0]
        return Image.fromarray(render_with_word(self.seed, split, index, condition)[0])
