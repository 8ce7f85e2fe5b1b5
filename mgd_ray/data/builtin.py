"""A generated segmentation dataset that needs no download: textured shapes on cluttered backgrounds.

Classes differ by shape, texture and a characteristic hue that one object in five breaks (drawn in
a random colour), so colour is a strong cue that networks trained from scratch pick up within a
hundred CPU steps, but only shape and texture settle every pixel; distractor shapes (squares, bars,
some textured, any colour) are background, objects occlude each other, backgrounds have gradients,
smooth noise and blobs, and pixel noise is added. Small students stay well behind larger models
here; the README's Results section measures how much of that gap labels explain at a CPU budget.

Layout written under root (read with `folder_samples`): images/<id>.png (RGB), labels/<id>.png
(P mode, pixel = class id), classes.txt, train.txt, val.txt, test.txt (when a test split is asked
for), builtin.json (the parameters).
"""

from __future__ import annotations

import colorsys
import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mgd_ray.data.datasets import DatasetError, voc_palette

GENERATOR_VERSION = 3
SPLITS = ("train", "val", "test")  # each split's images come from their own seeded streams
OFF_HUE = 0.2  # share of objects drawn in a random colour instead of their class's hue
HUE_JITTER = 0.07  # ± around the class hue; class hues are ≥ 0.146 apart (golden-ratio spacing)
BUILTIN_CLASSES = (
    "background",
    "striped_disc",
    "checkered_triangle",
    "dotted_ring",
    "noisy_cross",
    "shaded_ellipse",
)
FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
# kind of each foreground class id; "item" = a Fashion-MNIST crop (class ids from len(BUILTIN_CLASSES) on)
CLASS_KINDS = {1: "disc", 2: "triangle", 3: "ring", 4: "cross", 5: "ellipse"}
SHAPE_TEXTURES = {"disc": "stripes", "triangle": "checker", "ring": "dots", "cross": "noise", "ellipse": "gradient"}
DISTRACTOR_KINDS = ("square", "bar")
DISTRACTOR_TEXTURES = ("flat", "flat", "stripes", "checker", "dots")
ITEM_THRESHOLD = 50  # Fashion-MNIST grey level above which a pixel belongs to the item


@dataclass(frozen=True)
class SceneObject:
    """One shape to paint; `label` is its class id (0 for a background distractor).

    `aspect` is the shape's second size as a fraction of `radius` (ring hole, cross arm, ellipse
    minor axis, bar width); `seed` drives the noise texture; `item` is a 28×28 Fashion-MNIST crop.
    """

    kind: str
    label: int
    center: tuple[float, float]
    radius: float
    angle: float
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    texture: str
    period: float
    aspect: float = 1.0
    seed: int = 0
    item: np.ndarray | None = field(default=None, compare=False, repr=False)


def _shape_and_texture(obj: SceneObject, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside-mask and texture weight t∈[0,1] (0 = first colour) on offsets from the object centre."""
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    r = obj.radius
    dist2 = u * u + v * v
    if obj.kind == "disc":
        inside = dist2 <= r * r
    elif obj.kind == "triangle":  # equilateral, circumradius r: three half-planes at the apothem r/2
        normals = [np.pi / 2 + 2 * np.pi * k / 3 for k in range(3)]
        inside = np.logical_and.reduce([u * np.cos(a) + v * np.sin(a) <= r / 2 for a in normals])
    elif obj.kind == "ring":
        inside = (dist2 <= r * r) & (dist2 >= (obj.aspect * r) ** 2)
    elif obj.kind == "cross":
        w = obj.aspect * r
        inside = ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    elif obj.kind == "ellipse":
        inside = (u / r) ** 2 + (v / (obj.aspect * r)) ** 2 <= 1
    elif obj.kind == "square":
        inside = (np.abs(u) <= 0.7 * r) & (np.abs(v) <= 0.7 * r)
    elif obj.kind == "bar":
        inside = (np.abs(u) <= r) & (np.abs(v) <= obj.aspect * r)
    elif obj.kind == "item":
        rows = np.clip(((v / r + 1) * 14).astype(int), -1, 28)
        cols = np.clip(((u / r + 1) * 14).astype(int), -1, 28)
        valid = (rows >= 0) & (rows < 28) & (cols >= 0) & (cols < 28)
        grey = np.where(valid, obj.item[rows.clip(0, 27), cols.clip(0, 27)], 0).astype(np.float64)
        return grey > ITEM_THRESHOLD, grey / 255.0
    else:
        raise ValueError(f"unknown shape kind {obj.kind!r}")

    p = obj.period
    if obj.texture == "flat":
        t = np.zeros_like(u)
    elif obj.texture == "stripes":
        t = (np.sin(2 * np.pi * u / p) > 0).astype(np.float64)
    elif obj.texture == "checker":
        t = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float64)
    elif obj.texture == "dots":
        t = (((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 <= (0.3 * p) ** 2).astype(np.float64)
    elif obj.texture == "noise":
        t = np.random.default_rng(obj.seed).random(u.shape)
    elif obj.texture == "gradient":
        t = np.clip((u + r) / (2 * r), 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture {obj.texture!r}")
    return inside, t


def render_scene(background: np.ndarray, objects: list[SceneObject]) -> tuple[np.ndarray, np.ndarray]:
    """Paint objects in order over a float H×W×3 background; each pixel's label is its top object's."""
    image = background.astype(np.float64).copy()
    height, width = image.shape[:2]
    label = np.zeros((height, width), np.uint8)
    for obj in objects:
        cy, cx = obj.center
        reach = obj.radius + 1
        y0, y1 = max(0, int(np.floor(cy - reach))), min(height, int(np.ceil(cy + reach)) + 1)
        x0, x1 = max(0, int(np.floor(cx - reach))), min(width, int(np.ceil(cx + reach)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        inside, t = _shape_and_texture(obj, dy - cy, dx - cx)
        c0, c1 = np.asarray(obj.colours[0]), np.asarray(obj.colours[1])
        colour = (1 - t)[..., None] * c0 + t[..., None] * c1
        image[y0:y1, x0:x1][inside] = colour[inside]
        label[y0:y1, x0:x1][inside] = obj.label
    return image, label


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two-colour linear gradient + smooth sinusoidal noise + translucent blobs, all label 0."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    start, end = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)
    image = (1 - ramp)[..., None] * start + ramp[..., None] * end
    for _ in range(4):
        freq, phase = rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi)
        image += rng.uniform(-20, 20, 3) * np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy) + phase)[..., None]
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2) * size
        blob = ((yy * size - cy) / ry) ** 2 + ((xx * size - cx) / rx) ** 2 <= 1
        alpha = rng.uniform(0.2, 0.5)
        image[blob] = (1 - alpha) * image[blob] + alpha * rng.uniform(30, 225, 3)
    return image


def _contrasting(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A second texture colour pushed towards the complement, so textures stay visible."""
    return colour + (255 - 2 * colour) * rng.uniform(0.45, 0.9)


def class_hue(label: int) -> float:
    """Hue in [0, 1) of foreground class ``label``: golden-ratio steps keep any number of them apart."""
    return ((label - 1) * 0.6180339887) % 1.0


def _object_colours(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """An object's two texture colours: its class hue (or, with p = OFF_HUE, any hue) and a darker shade."""
    off = rng.random() < OFF_HUE
    hue = rng.random() if off else (class_hue(label) + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
    return colour, colour * rng.uniform(0.2, 0.5)


def _sample_scene(
    rng: np.random.Generator, size: int, num_classes: int, items: dict[int, np.ndarray]
) -> list[SceneObject]:
    """1–4 objects of random foreground classes and 1–4 distractors, in random paint order.

    Sizes and texture periods are fractions of the image size, so a class keeps the same look at
    any resolution (at 32 px an object is still 9–19 px wide, its texture 2–4 periods across).
    """
    objects = []
    for _ in range(rng.integers(1, 5)):
        label = int(rng.integers(1, num_classes))
        kind = CLASS_KINDS.get(label, "item")
        colour, shade = _object_colours(rng, label)
        radius = rng.uniform(0.14, 0.30) * size * (1.25 if kind == "item" else 1.0)
        aspect = {"ring": (0.45, 0.65), "cross": (0.22, 0.35), "ellipse": (0.3, 0.45)}.get(kind, (1.0, 1.0))
        item = None
        if kind == "item":
            pool = items[label - len(BUILTIN_CLASSES)]
            item = pool[rng.integers(len(pool))]
        objects.append(
            SceneObject(
                kind=kind,
                label=label,
                center=tuple(rng.uniform(0.1, 0.9, 2) * size),
                radius=radius,
                angle=rng.uniform(0, 2 * np.pi),
                colours=(tuple(colour), tuple(shade)),
                texture=SHAPE_TEXTURES.get(kind, "item"),
                period=max(3.0, rng.uniform(0.07, 0.14) * size),
                aspect=rng.uniform(*aspect),
                seed=int(rng.integers(2**31)),
                item=item,
            )
        )
    for _ in range(rng.integers(1, 5)):
        colour = rng.uniform(0, 255, 3)
        objects.append(
            SceneObject(
                kind=DISTRACTOR_KINDS[rng.integers(len(DISTRACTOR_KINDS))],
                label=0,
                center=tuple(rng.uniform(0, 1, 2) * size),
                radius=rng.uniform(0.06, 0.16) * size,
                angle=rng.uniform(0, 2 * np.pi),
                colours=(tuple(colour), tuple(_contrasting(rng, colour))),
                texture=DISTRACTOR_TEXTURES[rng.integers(len(DISTRACTOR_TEXTURES))],
                period=max(3.0, rng.uniform(0.07, 0.14) * size),
                aspect=rng.uniform(0.12, 0.3),
            )
        )
    order = rng.permutation(len(objects))
    return [objects[i] for i in order]


def builtin_image(
    seed: int, split: str, index: int, size: int, num_classes: int, items: dict[int, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 H×W×3) and label (uint8 H×W); its own RNG, seeded by (seed, split, index)."""
    return scene_image(np.random.default_rng([seed, SPLITS.index(split), index]), size, num_classes, items)


def scene_image(
    rng: np.random.Generator, size: int, num_classes: int, items: dict[int, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A scene drawn from ``rng``: background, objects and distractors, pixel noise; (image, label)."""
    background = _background(rng, size)
    image, label = render_scene(background, _sample_scene(rng, size, num_classes, items or {}))
    image += rng.normal(0, rng.uniform(3, 12), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read Fashion-MNIST file ({err}); re-download it") from err
    dims = data[3] if len(data) >= 4 else 0
    if len(data) < 4 + 4 * dims or int.from_bytes(data[:4], "big") != magic:
        raise DatasetError(f"{path}: not a gzip idx file with magic {magic}; re-download it")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but holds {body.size} values; re-download it")
    return body.reshape(shape)


def load_fashion_mnist(directory: Path, num_item_classes: int) -> dict[int, np.ndarray]:
    """Fashion-MNIST training items grouped by class: {class: N×28×28 uint8} for the first classes."""
    missing = [name for name in FASHION_MNIST_FILES if not (directory / name).is_file()]
    if missing:
        raise DatasetError(
            f"{directory}: Fashion-MNIST files missing ({', '.join(missing)}); put the gzip idx files "
            "there or generate without fashion_mnist"
        )
    images = _read_idx(directory / FASHION_MNIST_FILES[0], 2051)
    labels = _read_idx(directory / FASHION_MNIST_FILES[1], 2049)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DatasetError(f"{directory}: expected N×28×28 images and N labels, got {images.shape} and {labels.shape}")
    groups = {c: images[labels == c] for c in range(num_item_classes)}
    empty = [FASHION_MNIST_CLASSES[c] for c, g in groups.items() if len(g) == 0]
    if empty:
        raise DatasetError(f"{directory}: no items of class {', '.join(empty)}; use fewer classes")
    return groups


def _params(
    seed: int, num_train: int, num_val: int, size: int, num_classes: int, fashion_mnist: bool, num_test: int = 0
) -> dict:
    max_classes = len(BUILTIN_CLASSES) + (len(FASHION_MNIST_CLASSES) if fashion_mnist else 0)
    min_classes = len(BUILTIN_CLASSES) + 1 if fashion_mnist else 2
    if not min_classes <= num_classes <= max_classes:
        hint = "Fashion-MNIST classes follow the 6 shapes" if fashion_mnist else "fashion_mnist=True allows up to 16"
        raise DatasetError(
            f"built-in dataset: num_classes={num_classes} must be in {min_classes}..{max_classes} ({hint})"
        )
    if num_train < 1 or num_val < 1 or size < 32:
        raise DatasetError(
            f"built-in dataset: need num_train >= 1, num_val >= 1, size >= 32; got {num_train}, {num_val}, {size}"
        )
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "num_classes": num_classes,
        "fashion_mnist": fashion_mnist,
    }
    # A test split is new: data generated without one keeps its builtin.json and is not rewritten.
    return params | ({"num_test": num_test} if num_test else {})


def _ids(params: dict) -> dict[str, list[str]]:
    return {split: [f"{split}_{i:05d}" for i in range(params.get(f"num_{split}", 0))] for split in SPLITS}


def _is_complete(root: Path, params: dict) -> bool:
    try:
        if json.loads((root / "builtin.json").read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    names = ["classes.txt", "train.txt", "val.txt"] + (["test.txt"] if params.get("num_test") else [])
    for ids in _ids(params).values():
        names += [f"{folder}/{sample_id}.png" for sample_id in ids for folder in ("images", "labels")]
    return all((root / name).is_file() for name in names)


def class_names(num_classes: int) -> list[str]:
    """Class names of a built-in dataset with `num_classes` classes."""
    return list((BUILTIN_CLASSES + FASHION_MNIST_CLASSES)[:num_classes])


def _write(directory: Path, params: dict, items: dict[int, np.ndarray]) -> None:
    (directory / "images").mkdir()
    (directory / "labels").mkdir()
    palette = [c for rgb in voc_palette(256) for c in rgb]
    for split, ids in _ids(params).items():
        if not ids:  # no test split asked for: no test.txt
            continue
        for index, sample_id in enumerate(ids):
            image, label = builtin_image(params["seed"], split, index, params["size"], params["num_classes"], items)
            Image.fromarray(image).save(directory / "images" / f"{sample_id}.png")
            mask = Image.fromarray(label)
            mask.putpalette(palette)  # a full 256-entry palette: a short one makes PIL write fewer bits
            mask.save(directory / "labels" / f"{sample_id}.png")
        (directory / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (directory / "classes.txt").write_text("".join(f"{n}\n" for n in class_names(params["num_classes"])))
    (directory / "builtin.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def generate_builtin(
    root: Path,
    seed: int = 0,
    num_train: int = 256,
    num_val: int = 64,
    size: int = 96,
    num_classes: int = 6,
    fashion_mnist: bool = False,
    fashion_mnist_dir: Path = FASHION_MNIST_DIR,
    num_test: int = 0,
) -> Path:
    """Write the built-in dataset to root (same parameters → byte-identical files) and return root.

    A complete generation with the same parameters (root/builtin.json) is left as is. Otherwise the
    data is written to a sibling temporary folder and renamed into place, replacing root and all it
    held (manifests of the old data included), so root is never half written; a non-empty root
    that is not a built-in dataset is refused rather than replaced.
    """
    root = Path(root).absolute()
    params = _params(seed, num_train, num_val, size, num_classes, fashion_mnist, num_test)
    if _is_complete(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "builtin.json").exists():
        raise DatasetError(
            f"{root}: not empty and not a built-in dataset (no builtin.json); refusing to replace it: "
            "choose an empty or new folder"
        )
    items = load_fashion_mnist(Path(fashion_mnist_dir), num_classes - len(BUILTIN_CLASSES)) if fashion_mnist else {}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(staging, params, items)
        try:
            os.rename(staging, root)  # succeeds when root is absent or an empty folder
        except OSError:
            if _is_complete(root, params):  # a concurrent call finished first
                return root
            retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, retired / root.name)
            os.rename(staging, root)
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
