"""The embedded demo dataset: synthetic 128x128 scenes of shapes on textured backgrounds.

It exists so every method trains and evaluates end to end on CPU in minutes with the real
file formats: COCO panoptic JSON + PNGs (panopticapi's RGB id encoding), COCO instance JSON
with RLE masks, semantic PNGs of contiguous ids. 4 thing classes (shapes) and 4 stuff classes
(textures) share one vocabulary; "cross" and "sand" never occur in training images, so the
val split measures seen/unseen generalisation as open-vocabulary benchmarks do (FC-CLIP,
Yu et al. NeurIPS 2023, Sec. 4).

Files are generated deterministically (seeded numpy per image) on first use under
`dataset_root()/openseg_demo` and regenerated only when the version stamp changes.
"""

import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

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
# image `index` of a stream is rendered from the seed [SEED, stream, index]: the dataset splits,
# then the demo CLIP's pre-training images (its "web data", openseg.modeling.demo_clip) and its
# held-out images, so no pre-training image is a train / val image
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
}
# original (dataset) category ids: 1..8, things first, so contiguous id = dataset id - 1
CATEGORY_IDS = {name: index + 1 for index, name in enumerate(ALL_CLASSES)}
MIN_VISIBLE_PIXELS = 40
MIN_VISIBLE_FRACTION = 0.5


def demo_metadata() -> dict:
    """Metadata shared by both demo splits (file paths come from `split_paths`)."""
    seen = [i for i, name in enumerate(ALL_CLASSES) if name not in UNSEEN_CLASSES]
    unseen = [i for i, name in enumerate(ALL_CLASSES) if name in UNSEEN_CLASSES]
    return {
        "thing_classes": list(THING_CLASSES),
        "stuff_classes": list(ALL_CLASSES),
        "thing_colors": [list(COLORS[name]) for name in THING_CLASSES],
        "stuff_colors": [list(COLORS[name]) for name in ALL_CLASSES],
        "thing_dataset_id_to_contiguous_id": {
            CATEGORY_IDS[name]: i for i, name in enumerate(THING_CLASSES)
        },
        "stuff_dataset_id_to_contiguous_id": {
            CATEGORY_IDS[name]: i for i, name in enumerate(ALL_CLASSES)
        },
        "ignore_label": IGNORE_LABEL,
        "label_divisor": LABEL_DIVISOR,
        "class_splits": {"seen": seen, "unseen": unseen},
        "synonyms": [list(SYNONYMS[name]) for name in ALL_CLASSES],
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


def _version_stamp(num_images: Dict[str, int]) -> str:
    counts = " ".join(f"{split}={count}" for split, count in sorted(num_images.items()))
    return f"{DEMO_VERSION} {counts}\n"


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
    raise ValueError(f"{name!r} is not a demo thing class {THING_CLASSES}.")


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


def render_image(stream: str, index: int) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray]]]:
    """Image `index` of a `SEED_STREAMS` stream ([H, W, 3] uint8 RGB) and its non-overlapping
    (class name, bool mask) segments; only the "train" stream leaves out the unseen classes."""
    return _render(np.random.default_rng([SEED, SEED_STREAMS[stream], index]), stream)


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


def _mask_record(mask: np.ndarray) -> dict:
    """COCO RLE (string counts), area and XYWH bbox of a binary mask, computed by pycocotools."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "segmentation": rle,
        "area": int(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
    }


def _write_split(out_dir: Path, split: str, num_images: int) -> None:
    paths = {key: Path(value) for key, value in split_paths(out_dir, split).items()}
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        paths[key].mkdir(parents=True, exist_ok=True)
    paths["json_file"].parent.mkdir(parents=True, exist_ok=True)

    images, pan_annotations, instance_annotations = [], [], []
    for index in range(num_images):
        image, segments = render_image(split, index)
        image_id = IMAGE_ID_OFFSET[split] + index
        stem = f"{image_id:07d}"
        Image.fromarray(image).save(paths["image_root"] / f"{stem}.jpg", quality=95)

        pan_ids = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
        semantic = np.full((IMAGE_SIZE, IMAGE_SIZE), IGNORE_LABEL, np.uint8)
        segments_info = []
        for instance_index, (name, mask) in enumerate(segments):
            category_id = CATEGORY_IDS[name]
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
            if name in THING_CLASSES:
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
            "id": CATEGORY_IDS[name],
            "name": name,
            "supercategory": "shape" if name in THING_CLASSES else "texture",
            "isthing": int(name in THING_CLASSES),
            "color": list(COLORS[name]),
        }
        for name in ALL_CLASSES
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


def generate_demo(
    root: os.PathLike, num_train: int = NUM_IMAGES["train"], num_val: int = NUM_IMAGES["val"]
) -> Path:
    """Make `root/openseg_demo` hold the demo dataset with these split sizes; return its path.

    Files are written to a temporary sibling directory and moved into place with
    `os.replace`, so concurrent processes (DDP ranks) never see a half-written dataset; an
    existing copy with the same version stamp is kept as it is.
    """
    root = Path(root)
    demo_dir = root / DEMO_DIRNAME
    stamp = _version_stamp({"train": num_train, "val": num_val})
    if _is_current(demo_dir, stamp):
        return demo_dir
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIRNAME}-", dir=root))
    try:
        _write_split(staging, "train", num_train)
        _write_split(staging, "val", num_val)
        (staging / "VERSION").write_text(stamp)
        try:
            os.replace(staging, demo_dir)
        except OSError:  # demo_dir exists and is not empty
            if _is_current(demo_dir, stamp):  # another process finished first
                return demo_dir
            stale = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIRNAME}-stale-", dir=root))
            os.replace(demo_dir, stale)
            os.replace(staging, demo_dir)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return demo_dir


def load_demo(demo_dir: os.PathLike, split: str) -> List[dict]:
    """Dataset dicts of one split from its standard files, with panoptic segments, semantic
    map and instance annotations (category ids contiguous, as detectron2's loaders give)."""
    demo_dir = Path(demo_dir)
    paths = split_paths(demo_dir, split)
    meta = demo_metadata()
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


def _load_generated(root: Path, split: str) -> List[dict]:
    return load_demo(generate_demo(root), split)


def register_all_demo(root: Path) -> None:
    """Register `openseg_demo_{train,val}`; files are generated on the first load."""
    demo_dir = Path(root) / DEMO_DIRNAME
    for split in NUM_IMAGES:
        register_lazy(
            f"openseg_demo_{split}",
            partial(_load_generated, Path(root), split),
            **demo_metadata(),
            **split_paths(demo_dir, split),
        )
