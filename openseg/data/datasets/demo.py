"""The embedded demo dataset: synthetic 128x128 scenes of shapes on textured backgrounds.

It exists so every method trains and evaluates end to end on CPU in minutes with the real
file formats: COCO panoptic JSON + PNGs (panopticapi's RGB id encoding), COCO instance JSON
with RLE masks, semantic PNGs of contiguous ids. 4 thing classes (shapes) and 4 stuff classes
(textures) share one vocabulary; "cross" and "sand" never occur in training images, so the
val split measures seen/unseen generalisation as open-vocabulary benchmarks do (FC-CLIP,
Yu et al. NeurIPS 2023, Sec. 4).

Files are generated deterministically (seeded numpy per image) on first use under
`dataset_root()/openseg_demo` and regenerated only when the version stamp changes.

`openseg_demo_ov_shapes_{train,val}` (`OV_SHAPES`) is the panoptic open-vocabulary split in
the regime of "What holds back open-vocabulary segmentation?" (Sec. 4.4): the 12 shapes
(THING_CLASSES + SHAPE_CLASSES) each flat in its own random colour, so only the outline tells
the class, on the 4 stuff textures; the unseen classes (OV_SHAPES_UNSEEN) are drawn in
training images too but left unlabelled (void), as COCO leaves ADE20K-only classes
unlabelled (the labelling-policy shift), and val labels every class. Same files and writer as
the demo (`DemoScenes` describes both), its own seed and directory.

`generate_shape_scenes` renders a second family for open-world probes (used by
`openseg_demo_ow_shapes_*`, see lvis_ow.py): 1-4 shapes of up to 12 geometries (THING_CLASSES
and SHAPE_CLASSES), each flat in its own random colour, so the outline alone tells the class,
on the same stuff textures; COCO instance JSON only, its own seed and directory. It shares the
geometry, placement and texture code, and leaves what the demo splits render unchanged (pinned
by tests/test_demo_dataset.py).
"""

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image
from pycocotools import mask as mask_util

from .common import coco_instance_dicts, coco_panoptic_dicts, register_lazy

DEMO_DIRNAME = "openseg_demo"
DEMO_VERSION = "openseg-demo-v1"
SEED = 20240607
IMAGE_SIZE = 128
LABEL_DIVISOR = 1000
IGNORE_LABEL = 255
NUM_IMAGES = {"train": 160, "val": 32}
# image ids are globally unique: val ids start after this offset
IMAGE_ID_OFFSET = {"train": 1, "val": 1_000_001}
# image `index` of a stream is rendered from the seed [DemoScenes.seed, stream, index]: the
# dataset splits, then the demo CLIP's pre-training images (its "web data",
# openseg.modeling.demo_clip) and its held-out images, so no pre-training image is a train /
# val image
SEED_STREAMS = {"train": 0, "val": 1, "clip_pretrain": 2, "clip_held_out": 3}

THING_CLASSES = ["circle", "square", "triangle", "cross"]
STUFF_ONLY_CLASSES = ["sky", "grass", "water", "sand"]
ALL_CLASSES = THING_CLASSES + STUFF_ONLY_CLASSES
UNSEEN_CLASSES = ("cross", "sand")
SYNONYMS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape"],
    "cross": ["cross", "plus sign"],
    "sky": ["sky", "clear sky"],
    "grass": ["grass", "lawn", "meadow"],
    "water": ["water", "lake", "sea"],
    "sand": ["sand", "beach", "desert"],
    "ellipse": ["ellipse", "oval"],
    "diamond": ["diamond", "rhombus"],
    "ring": ["ring", "annulus", "donut"],
    "semicircle": ["semicircle", "half circle"],
    "hexagon": ["hexagon", "hexagonal shape"],
    "ell": ["ell", "L shape"],
    "crescent": ["crescent", "crescent moon"],
    "star": ["star", "five-pointed star"],
}
COLORS = {
    "circle": (220, 40, 40),
    "square": (240, 220, 40),
    "triangle": (150, 60, 200),
    "cross": (250, 250, 250),
    "sky": (130, 180, 240),
    "grass": (60, 150, 50),
    "water": (20, 60, 140),
    "sand": (210, 180, 120),
    # display colours only: shape scenes draw every shape in a random colour
    "ellipse": (240, 130, 40),
    "diamond": (40, 200, 200),
    "ring": (200, 40, 140),
    "semicircle": (120, 200, 60),
    "hexagon": (90, 90, 230),
    "ell": (160, 110, 60),
    "crescent": (250, 200, 200),
    "star": (250, 160, 0),
}
# further geometries for shape-only scenes (`generate_shape_scenes`): drawn in random colours,
# so only the outline tells the class
SHAPE_CLASSES = ["ellipse", "diamond", "ring", "semicircle", "hexagon", "ell", "crescent", "star"]
SHAPES_VERSION = "openseg-demo-shapes-v1"
SHAPES_SEED = 20261201
MIN_VISIBLE_PIXELS = 40
MIN_VISIBLE_FRACTION = 0.5

Segments = List[Tuple[str, np.ndarray]]


@dataclass(frozen=True)
class DemoScenes:
    """A demo panoptic dataset: its classes (things first; dataset id = index + 1), the
    unseen ones, and how image `index` of a `SEED_STREAMS` stream is rendered, from the rng
    seeded [seed, stream, index]: `render(rng, stream)` -> ([H, W, 3] uint8 RGB, non-overlapping
    (class name, bool mask) segments of everything drawn). Training labels never name an
    unseen class: a renderer that draws them in "train" images leaves them void."""

    dirname: str
    version: str
    seed: int
    thing_classes: Tuple[str, ...]
    classes: Tuple[str, ...]
    unseen_classes: Tuple[str, ...]
    render: Callable[[np.random.Generator, str], Tuple[np.ndarray, Segments]]
    num_images: Tuple[Tuple[str, int], ...]

    @property
    def seen_classes(self) -> Tuple[str, ...]:
        return tuple(name for name in self.classes if name not in self.unseen_classes)

    @property
    def synonyms(self) -> List[List[str]]:
        """The synonyms of every class, in class order (the datasets' vocabulary)."""
        return [list(SYNONYMS[name]) for name in self.classes]

    def category_id(self, name: str) -> int:
        """Dataset category id: things first, so contiguous id = dataset id - 1."""
        return self.classes.index(name) + 1


def demo_metadata(scenes: Optional[DemoScenes] = None) -> dict:
    """Metadata shared by both splits of `scenes` (the demo by default; file paths come from
    `split_paths`)."""
    scenes = scenes or DEMO
    classes, things = list(scenes.classes), list(scenes.thing_classes)
    return {
        "thing_classes": things,
        "stuff_classes": classes,
        "thing_colors": [list(COLORS[name]) for name in things],
        "stuff_colors": [list(COLORS[name]) for name in classes],
        "thing_dataset_id_to_contiguous_id": {
            scenes.category_id(name): i for i, name in enumerate(things)
        },
        "stuff_dataset_id_to_contiguous_id": {
            scenes.category_id(name): i for i, name in enumerate(classes)
        },
        "ignore_label": IGNORE_LABEL,
        "label_divisor": LABEL_DIVISOR,
        "class_splits": {
            "seen": [classes.index(name) for name in scenes.seen_classes],
            "unseen": [classes.index(name) for name in classes if name in scenes.unseen_classes],
        },
        "synonyms": scenes.synonyms,
        "evaluators": ["panoptic", "semantic", "instance"],
    }


def split_paths(demo_dir: Path, split: str) -> Dict[str, str]:
    """Where the files of `split` live (metadata keys of detectron2's evaluators)."""
    return {
        "image_root": str(demo_dir / "images" / split),
        "panoptic_root": str(demo_dir / "panoptic" / split),
        "panoptic_json": str(demo_dir / "annotations" / f"panoptic_{split}.json"),
        "json_file": str(demo_dir / "annotations" / f"instances_{split}.json"),
        "sem_seg_root": str(demo_dir / "semantic" / split),
    }


def _version_stamp(num_images: Dict[str, int], version: str = DEMO_VERSION) -> str:
    counts = " ".join(f"{split}={count}" for split, count in sorted(num_images.items()))
    return f"{version} {counts}\n"


def _texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-image float RGB layer of class `name`: base colour plus a class-specific
    pattern, so colour and texture both identify the class."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.array(COLORS[name], dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if name == "sky":
        pattern = (ys / size - 0.5) * -40.0  # lighter towards the top
    elif name == "grass":
        pattern = 25.0 * np.sin(xs * 1.3 + phase)  # fine vertical blades
    elif name == "water":
        pattern = 30.0 * np.sin(ys * 0.6 + 3.0 * np.sin(xs * 0.15 + phase))  # ripples
    elif name == "sand":
        pattern = rng.normal(0.0, 22.0, size=(size, size)).astype(np.float32)  # grain
    else:  # things: flat colour with a slight per-instance tint
        pattern = np.zeros((size, size), np.float32)
        base = base + rng.uniform(-15, 15, size=3)
    return base[None, None, :] + pattern[:, :, None]


def _shape_mask(name: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Pixels of shape `name` (THING_CLASSES or SHAPE_CLASSES) centred at (cx, cy) with
    half-size `radius`."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = np.abs(xs - cx), np.abs(ys - cy)
    if name == "circle":
        return dx**2 + dy**2 <= radius**2
    if name == "square":
        return (dx <= radius) & (dy <= radius)
    if name == "triangle":
        depth = ys - (cy - radius)  # 0 at the apex, 2 * radius at the base
        return (depth >= 0) & (depth <= 2 * radius) & (dx <= depth / 2)
    if name == "cross":
        arm = radius / 3
        return ((dx <= arm) & (dy <= radius)) | ((dy <= arm) & (dx <= radius))
    ox, oy = xs - cx, ys - cy
    if name == "ellipse":
        return (dx / radius) ** 2 + (dy / (0.55 * radius)) ** 2 <= 1
    if name == "diamond":
        return dx + dy <= radius
    if name == "ring":
        return (0.25 * radius**2 <= dx**2 + dy**2) & (dx**2 + dy**2 <= radius**2)
    if name == "semicircle":
        return (dx**2 + dy**2 <= radius**2) & (oy <= 0)
    if name == "hexagon":
        return (dy <= 0.5 * np.sqrt(3) * radius) & (np.sqrt(3) * dx + dy <= np.sqrt(3) * radius)
    if name == "ell":
        vertical = (ox <= -radius / 3) & (ox >= -radius) & (dy <= radius)
        return vertical | ((oy >= radius / 3) & (oy <= radius) & (dx <= radius))
    if name == "crescent":
        bite = (ox - 0.45 * radius) ** 2 + oy**2 > (0.8 * radius) ** 2
        return (dx**2 + dy**2 <= radius**2) & bite
    if name == "star":
        return _star_mask(ox, oy, radius)
    raise ValueError(f"{name!r} is not a demo shape {THING_CLASSES + SHAPE_CLASSES}.")


def _star_mask(ox: np.ndarray, oy: np.ndarray, radius: float) -> np.ndarray:
    """A five-pointed star, one tip up, inner radius 0.45 * radius: each pixel is folded into
    the half-sector of its nearest tip and tested against the tip-to-inner-vertex edge."""
    half = np.pi / 5
    angle = np.arctan2(oy, ox) + np.pi / 2  # 0 on the upward tip
    folded = np.abs(np.mod(angle + half, 2 * half) - half)
    distance = np.hypot(ox, oy)
    u, v = distance * np.cos(folded), distance * np.sin(folded)
    a, b = 0.45 * radius * np.cos(half), 0.45 * radius * np.sin(half)
    return (a - radius) * v - b * (u - radius) >= 0


def _stuff_layout(
    rng: np.random.Generator, stuff_names: Sequence[str], size: int
) -> List[Tuple[str, np.ndarray]]:
    """1-3 slanted horizontal bands of distinct stuff classes covering the image."""
    num_bands = int(rng.integers(1, min(3, len(stuff_names)) + 1))
    names = [str(n) for n in rng.choice(stuff_names, size=num_bands, replace=False)]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    band_index = np.zeros((size, size), np.int64)
    if num_bands > 1:
        offsets = np.sort(rng.uniform(0.2, 0.8, size=num_bands - 1)) * size
        for offset in offsets:
            slope = rng.uniform(-0.3, 0.3)
            band_index += ys > offset + slope * (xs - size / 2)
    return [(name, band_index == i) for i, name in enumerate(names) if (band_index == i).any()]


def _place_things(
    rng: np.random.Generator, thing_names: Sequence[str], size: int
) -> List[Tuple[str, np.ndarray]]:
    """1-4 shapes, later ones on top; a shape is kept only if every shape keeps at least
    MIN_VISIBLE_FRACTION of its area visible, so overlaps stay partial."""
    target = int(rng.integers(1, 5))
    placed: List[Tuple[str, np.ndarray, np.ndarray]] = []  # name, full mask, visible mask
    for _ in range(20):
        if len(placed) == target:
            break
        name = str(rng.choice(thing_names))
        radius = rng.uniform(9, 20)
        cx, cy = rng.uniform(radius, size - radius, size=2)
        full = _shape_mask(name, cx, cy, radius, size)
        candidate = [(n, f, v & ~full) for n, f, v in placed] + [(name, full, full)]
        if all(
            v.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * f.sum())
            for _, f, v in candidate
        ):
            placed = candidate
    return [(name, visible) for name, _, visible in placed]


def render_image(
    stream: str, index: int, scenes: Optional[DemoScenes] = None
) -> Tuple[np.ndarray, Segments]:
    """Image `index` of a `SEED_STREAMS` stream of `scenes` (the demo by default): [H, W, 3]
    uint8 RGB and the non-overlapping (class name, bool mask) segments of everything drawn.
    The demo leaves the unseen classes out of "train" images; the open-vocabulary shapes draw
    them in every stream (their training labels leave them void, `labelled_segments`)."""
    scenes = scenes or DEMO
    return scenes.render(np.random.default_rng([scenes.seed, SEED_STREAMS[stream], index]), stream)


def labelled_segments(scenes: DemoScenes, split: str, segments: Segments) -> Segments:
    """The segments a `split` image is labelled with: all, except that training labels leave
    the unseen classes void (Sec. 4.4's labelling-policy shift when the image draws them)."""
    if split != "train":
        return list(segments)
    return [(name, mask) for name, mask in segments if name not in scenes.unseen_classes]


def _render(
    rng: np.random.Generator, split: str
) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray]]]:
    """One image and its non-overlapping (class name, mask) segments, stuff first."""
    allowed = [n for n in ALL_CLASSES if split != "train" or n not in UNSEEN_CLASSES]
    stuff = _stuff_layout(rng, [n for n in STUFF_ONLY_CLASSES if n in allowed], IMAGE_SIZE)
    things = _place_things(rng, [n for n in THING_CLASSES if n in allowed], IMAGE_SIZE)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    thing_union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for name, mask in things:
        image[mask] = _texture(name, rng, IMAGE_SIZE)[mask]
        thing_union |= mask
    segments = []
    for name, mask in stuff:
        mask = mask & ~thing_union
        image[mask] = _texture(name, rng, IMAGE_SIZE)[mask]
        if mask.any():
            segments.append((name, mask))
    image += rng.normal(0.0, 8.0, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), segments + things


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB colour of uniform hue (HSV s in [0.5, 1], v in [0.6, 1])."""
    hue, saturation, value = rng.uniform([0.0, 0.5, 0.6], [1.0, 1.0, 1.0])
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)


def _render_shapes(
    rng: np.random.Generator, thing_names: Sequence[str]
) -> Tuple[np.ndarray, Segments]:
    """One image of 1-4 shapes of `thing_names`, each flat in its own random colour, on the
    stuff textures; returns the image and its non-overlapping (class name, visible mask)
    segments, stuff first (the stuff bands minus the shapes)."""
    stuff = _stuff_layout(rng, STUFF_ONLY_CLASSES, IMAGE_SIZE)
    things = _place_things(rng, thing_names, IMAGE_SIZE)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for name, mask in stuff:
        image[mask] = _texture(name, rng, IMAGE_SIZE)[mask]
    thing_union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for _, mask in things:
        image[mask] = _random_colour(rng)
        thing_union |= mask
    image += rng.normal(0.0, 8.0, size=image.shape)
    visible_stuff = [(name, mask & ~thing_union) for name, mask in stuff]
    segments = [(name, mask) for name, mask in visible_stuff if mask.any()]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), segments + things


DEMO = DemoScenes(
    dirname=DEMO_DIRNAME,
    version=DEMO_VERSION,
    seed=SEED,
    thing_classes=tuple(THING_CLASSES),
    classes=tuple(ALL_CLASSES),
    unseen_classes=UNSEEN_CLASSES,
    render=_render,
    num_images=tuple(NUM_IMAGES.items()),
)

OV_SHAPES_THINGS = tuple(THING_CLASSES + SHAPE_CLASSES)
# unseen: drawn in training images but never labelled there; the demo's two and the other two
# unseen shapes of the open-world shapes split (lvis_ow.DEMO_OW_SHAPES_SPLITS)
OV_SHAPES_UNSEEN = ("cross", "crescent", "star", "sand")


def _render_ov_shapes(rng: np.random.Generator, stream: str) -> Tuple[np.ndarray, Segments]:
    """An open-vocabulary shapes image: every stream draws all 12 shapes."""
    return _render_shapes(rng, OV_SHAPES_THINGS)


OV_SHAPES = DemoScenes(
    dirname="openseg_demo_ov_shapes",
    version="openseg-demo-ov-shapes-v1",
    seed=20261202,
    thing_classes=OV_SHAPES_THINGS,
    classes=OV_SHAPES_THINGS + tuple(STUFF_ONLY_CLASSES),
    unseen_classes=OV_SHAPES_UNSEEN,
    render=_render_ov_shapes,
    num_images=(("train", 400), ("val", 100)),
)
# the scene families of demo CLIP pre-training (tools/pretrain_demo_clip.py --scenes)
SCENES = {"demo": DEMO, "shapes": OV_SHAPES}


def _mask_record(mask: np.ndarray) -> dict:
    """COCO RLE (string counts), area and XYWH bbox of a binary mask, computed by pycocotools."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "segmentation": rle,
        "area": int(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
    }


def _write_split(out_dir: Path, split: str, num_images: int, scenes: DemoScenes) -> None:
    """Images, panoptic PNGs + JSON, semantic PNGs and instance JSON of `num_images` images of
    `split`; segments left out of the labels (`labelled_segments`) are void everywhere."""
    paths = {key: Path(value) for key, value in split_paths(out_dir, split).items()}
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        paths[key].mkdir(parents=True, exist_ok=True)
    paths["json_file"].parent.mkdir(parents=True, exist_ok=True)

    images, pan_annotations, instance_annotations = [], [], []
    for index in range(num_images):
        image, segments = render_image(split, index, scenes)
        segments = labelled_segments(scenes, split, segments)
        image_id = IMAGE_ID_OFFSET[split] + index
        stem = f"{image_id:07d}"
        Image.fromarray(image).save(paths["image_root"] / f"{stem}.jpg", quality=95)

        pan_ids = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
        semantic = np.full((IMAGE_SIZE, IMAGE_SIZE), IGNORE_LABEL, np.uint8)
        segments_info = []
        for instance_index, (name, mask) in enumerate(segments):
            category_id = scenes.category_id(name)
            segment_id = category_id * LABEL_DIVISOR + instance_index + 1
            pan_ids[mask] = segment_id
            semantic[mask] = category_id - 1
            record = _mask_record(mask)
            segments_info.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "area": record["area"],
                    "bbox": record["bbox"],
                }
            )
            if name in scenes.thing_classes:
                instance_annotations.append(
                    {
                        "id": len(instance_annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "iscrowd": 0,
                        **record,
                    }
                )
        Image.fromarray(id2rgb(pan_ids)).save(paths["panoptic_root"] / f"{stem}.png")
        Image.fromarray(semantic, mode="L").save(paths["sem_seg_root"] / f"{stem}.png")
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        pan_annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}
        )

    categories = [
        {
            "id": scenes.category_id(name),
            "name": name,
            "supercategory": "shape" if name in scenes.thing_classes else "texture",
            "isthing": int(name in scenes.thing_classes),
            "color": list(COLORS[name]),
        }
        for name in scenes.classes
    ]
    panoptic = {"images": images, "annotations": pan_annotations, "categories": categories}
    instances = {
        "images": images,
        "annotations": instance_annotations,
        "categories": [c for c in categories if c["isthing"]],
    }
    paths["panoptic_json"].write_text(json.dumps(panoptic, sort_keys=True))
    paths["json_file"].write_text(json.dumps(instances, sort_keys=True))


def _is_current(demo_dir: Path, stamp: str) -> bool:
    version_file = demo_dir / "VERSION"
    return version_file.is_file() and version_file.read_text() == stamp


def _generate_atomically(demo_dir: Path, stamp: str, write: Callable[[Path], None]) -> Path:
    """Make `demo_dir` hold what `write(directory)` writes, unless its VERSION is `stamp`.

    Files are written to a temporary sibling directory and moved into place with
    `os.replace`, so concurrent processes (DDP ranks) never see a half-written dataset; an
    existing copy with the same version stamp is kept as it is.
    """
    if _is_current(demo_dir, stamp):
        return demo_dir
    demo_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{demo_dir.name}-", dir=demo_dir.parent))
    try:
        write(staging)
        (staging / "VERSION").write_text(stamp)
        try:
            os.replace(staging, demo_dir)
        except OSError:  # demo_dir exists and is not empty
            if _is_current(demo_dir, stamp):  # another process finished first
                return demo_dir
            stale = Path(tempfile.mkdtemp(prefix=f".{demo_dir.name}-stale-", dir=demo_dir.parent))
            os.replace(demo_dir, stale)
            os.replace(staging, demo_dir)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return demo_dir


def generate_demo(
    root: os.PathLike,
    num_train: int = NUM_IMAGES["train"],
    num_val: int = NUM_IMAGES["val"],
    scenes: Optional[DemoScenes] = None,
) -> Path:
    """Make `root/<scenes.dirname>` hold the dataset `scenes` (the demo by default) with these
    split sizes; return its path (written atomically, see `_generate_atomically`)."""
    scenes = scenes or DEMO

    def write(directory: Path) -> None:
        _write_split(directory, "train", num_train, scenes)
        _write_split(directory, "val", num_val, scenes)

    stamp = _version_stamp({"train": num_train, "val": num_val}, scenes.version)
    return _generate_atomically(Path(root) / scenes.dirname, stamp, write)


def _write_shape_split(
    out_dir: Path, split: str, num_images: int, classes: Sequence[str], drawn: Sequence[str]
) -> None:
    """Images and COCO instance JSON (category id = index in `classes` + 1) of `num_images`
    shape scenes drawing only the classes `drawn`."""
    paths = {key: Path(value) for key, value in split_paths(out_dir, split).items()}
    paths["image_root"].mkdir(parents=True, exist_ok=True)
    paths["json_file"].parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    split_index = sorted(NUM_IMAGES).index(split)
    for index in range(num_images):
        rng = np.random.default_rng([SHAPES_SEED, split_index, index])
        image, segments = _render_shapes(rng, drawn)
        things = [(name, mask) for name, mask in segments if name in classes]
        image_id = IMAGE_ID_OFFSET[split] + index
        file_name = f"{image_id:07d}.jpg"
        Image.fromarray(image).save(paths["image_root"] / file_name, quality=95)
        images.append(
            {"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        for name, mask in things:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": classes.index(name) + 1,
                    "iscrowd": 0,
                    **_mask_record(mask),
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape", "isthing": 1}
        for i, name in enumerate(classes)
    ]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    paths["json_file"].write_text(json.dumps(instances, sort_keys=True))


def generate_shape_scenes(
    demo_dir: os.PathLike,
    classes: Sequence[str],
    train_classes: Sequence[str],
    num_images: Dict[str, int],
) -> Path:
    """Make `demo_dir` hold shape-only scenes (`_render_shapes`) of `classes`, training images
    drawing only `train_classes`, `num_images` per split ("train", "val"); COCO instance files
    at `split_paths`. Written atomically and only when the stamp (version, classes, counts)
    changes."""
    classes, train_classes = list(classes), list(train_classes)

    def write(directory: Path) -> None:
        for split, count in num_images.items():
            drawn = train_classes if split == "train" else classes
            _write_shape_split(directory, split, count, classes, drawn)

    version = f"{SHAPES_VERSION} classes={','.join(classes)} train={','.join(train_classes)}"
    stamp = _version_stamp(num_images, version)
    return _generate_atomically(Path(demo_dir), stamp, write)


def load_demo(demo_dir: os.PathLike, split: str, scenes: Optional[DemoScenes] = None) -> List[dict]:
    """Dataset dicts of one split of `scenes` (the demo by default) from its standard files,
    with panoptic segments, semantic map and instance annotations (category ids contiguous,
    as detectron2's loaders give)."""
    demo_dir = Path(demo_dir)
    paths = split_paths(demo_dir, split)
    meta = demo_metadata(scenes)
    panoptic = coco_panoptic_dicts(
        paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], meta
    )
    instance_dicts = coco_instance_dicts(
        paths["json_file"], paths["image_root"], meta["thing_dataset_id_to_contiguous_id"]
    )
    instances = {d["image_id"]: d for d in instance_dicts}
    dicts = []
    for record in panoptic:
        instance_record = instances[record["image_id"]]
        annotations = instance_record["annotations"]
        stem = Path(record["pan_seg_file_name"]).stem
        dicts.append(
            {
                **record,
                "height": instance_record["height"],
                "width": instance_record["width"],
                "sem_seg_file_name": os.path.join(paths["sem_seg_root"], f"{stem}.png"),
                "annotations": annotations,
            }
        )
    return dicts


def _load_generated(root: Path, split: str, scenes: DemoScenes) -> List[dict]:
    counts = dict(scenes.num_images)
    demo_dir = generate_demo(root, counts["train"], counts["val"], scenes)
    return load_demo(demo_dir, split, scenes)


def register_all_demo(root: Path) -> None:
    """Register `openseg_demo_{train,val}` and `openseg_demo_ov_shapes_{train,val}`; files are
    generated on the first load."""
    for scenes in (DEMO, OV_SHAPES):
        for split, _ in scenes.num_images:
            register_lazy(
                f"{scenes.dirname}_{split}",
                partial(_load_generated, Path(root), split, scenes),
                **demo_metadata(scenes),
                **split_paths(Path(root) / scenes.dirname, split),
            )
