"""Open-world instance segmentation splits with known / seen / unseen classes.

`openseg_lvis_ow_{train,test}`: LVIS-OW (SegPrompt, Zhu et al. ICCV 2023, Sec. 4.2), made by
datasets/prepare_lvis_ow.py from LVIS v1 + COCO as the authors' release: training labels are
LVIS's and COCO's of the known classes only; the test set is scored with class-wise AR per
group (evaluator "open_world_ar").

`openseg_coco_lvis_train`: COCO -> LVIS (SegPrompt Table 4): COCO's labels (80 classes) of the
LVIS v1 train images, also made by datasets/prepare_lvis_ow.py; tested on `openseg_lvis_v1_val`.
LVIS re-splits COCO 2017, so about 15k COCO train2017 images are LVIS val images and
`openseg_coco_2017_train_instance` would train on test images.

`openseg_demo_ow_{train,val}`: the same protocol on the embedded demo shapes (thing classes
only): circle and square are known, triangle is seen (in training images, labels dropped),
cross is unseen (never in training images), so open-world methods train on CPU in minutes.
`openseg_demo_ow_val_large`: the same val protocol on DEMO_OW_LARGE_VAL images (the first 32 are
`openseg_demo_ow_val`'s), generated in their own directory, so the unseen AR of the demo
benchmark rests on 232 crosses rather than 21.

`openseg_demo_ow_shapes_{train,val}`: a richer demo open-world split, made so SegPrompt's claim
can show (its category prompts need several known classes; LVIS-OW's unseen classes are objects
like the known ones): 12 shapes (`DEMO_OW_SHAPES_CLASSES`), each instance flat in a random
colour, so only the outline tells the class and the unseen shapes look like objects as much
as the known ones. 7 known (labelled in training), 2 seen (drawn in training images,
unlabelled), 3 unseen (never drawn in training images); 800 training and 400 val images
(`DEMO_OW_SHAPES_IMAGES`), val drawing all 12, in their own directory
(`openseg_demo_ow_shapes`, renderer `demo.generate_shape_scenes`).
"""

import json
from functools import partial
from pathlib import Path
from typing import Dict, List

from detectron2.data import DatasetCatalog

from .coco import coco_instance_metadata
from .common import coco_instance_dicts, load_json, register_lazy, require
from .demo import (
    DEMO_DIRNAME,
    THING_CLASSES,
    generate_demo,
    generate_shape_scenes,
    load_demo,
    split_paths,
)
from .lvis import add_federated_classes, lvis_v1_metadata

PREPARE = (
    "python datasets/prepare_lvis_ow.py (needs lvis/lvis_v1_{train,val}.json and "
    "coco/annotations/instances_train2017.json)"
)
LVIS_OW_FILES = {"train": "lvis_ow_train.json", "test": "lvis_ow_test.json"}
LVIS_OW_SPLITS = "lvis_ow_splits.json"
COCO_LVIS_TRAIN = "coco_lvis_train.json"
# the release's class lists (LVIS ids): the 64 frequent classes joining COCO's as known, and
# the unseen (rare) classes whose training images move to the test set
LVIS_OW_CLASS_LISTS = Path(__file__).resolve().parents[1] / "lvis_ow_classes.json"

DEMO_OW_SPLITS = {"known": [0, 1], "seen": [2], "unseen": [3]}  # circle, square | triangle | cross
DEMO_OW_LARGE_DIRNAME = "openseg_demo_ow_large"
DEMO_OW_LARGE_VAL = 320

DEMO_OW_SHAPES_CLASSES = [
    *("circle", "square", "triangle", "ellipse", "diamond", "ring", "semicircle"),  # known
    *("hexagon", "ell"),  # seen
    *("cross", "crescent", "star"),  # unseen
]
DEMO_OW_SHAPES_SPLITS = {"known": list(range(7)), "seen": [7, 8], "unseen": [9, 10, 11]}
DEMO_OW_SHAPES_DIRNAME = "openseg_demo_ow_shapes"
DEMO_OW_SHAPES_IMAGES = {"train": 800, "val": 400}


def load_lvis_ow(root: Path, split: str) -> List[dict]:
    """Instance dicts of one LVIS-OW split; contiguous category id = LVIS id - 1. Each record
    also carries its image's LVIS federated lists (`lvis.add_federated_classes`; the
    release's LVIS-OW loader keeps them for SegPrompt's class selection), read from the json's
    image entries, which detectron2's COCO loader drops."""
    json_file = require(root / "lvis" / LVIS_OW_FILES[split], PREPARE)
    image_root = require(root / "coco", "download COCO 2017 images into $OPENSEG_DATASETS/coco")
    dicts = coco_instance_dicts(json_file, image_root, None)
    images = {image["id"]: image for image in load_json(json_file)["images"]}
    id_map = lvis_v1_metadata()["thing_dataset_id_to_contiguous_id"]
    for record in dicts:
        for annotation in record["annotations"]:
            annotation["category_id"] -= 1
        add_federated_classes(record, images[record["image_id"]], id_map)
    return dicts


def lvis_ow_class_lists() -> Dict[str, List[int]]:
    """{"frequent_64", "unseen"}: LVIS v1 ids of the SegPrompt release's class lists
    (mask2former/data/lvis_info/), which fix LVIS-OW's classes and image split."""
    with open(LVIS_OW_CLASS_LISTS) as f:
        lists = json.load(f)
    return {key: list(lists[key]) for key in ("frequent_64", "unseen")}


def load_coco_lvis_train(root: Path) -> List[dict]:
    """Instance dicts of COCO's labels on the LVIS v1 train images (80 contiguous classes)."""
    json_file = require(root / "lvis" / COCO_LVIS_TRAIN, PREPARE)
    image_root = require(root / "coco" / "train2017", "download COCO 2017 train images")
    return coco_instance_dicts(
        json_file, image_root, coco_instance_metadata()["thing_dataset_id_to_contiguous_id"]
    )


def lvis_ow_class_splits(root: Path) -> Dict:
    """Metadata `class_splits` written by the prepare script (depends on the real files)."""
    with open(require(root / "lvis" / LVIS_OW_SPLITS, PREPARE)) as f:
        return {"class_splits": json.load(f)}


def load_demo_ow(root: Path, split: str) -> List[dict]:
    """Instance dicts of the demo split, training labels restricted to the known classes."""
    dicts = DatasetCatalog.get(f"openseg_demo_{split}")
    keep = set(DEMO_OW_SPLITS["known"]) if split == "train" else set(range(len(THING_CLASSES)))
    return [
        {
            "file_name": d["file_name"],
            "image_id": d["image_id"],
            "height": d["height"],
            "width": d["width"],
            "annotations": [a for a in d["annotations"] if a["category_id"] in keep],
        }
        for d in dicts
    ]


def load_demo_ow_val_large(root: Path) -> List[dict]:
    """Instance dicts of the large demo val split (all thing labels, as openseg_demo_ow_val)."""
    demo_dir = generate_demo(root / DEMO_OW_LARGE_DIRNAME, num_train=0, num_val=DEMO_OW_LARGE_VAL)
    return [
        {key: d[key] for key in ("file_name", "image_id", "height", "width", "annotations")}
        for d in load_demo(demo_dir, "val")
    ]


def load_demo_ow_shapes(root: Path, split: str) -> List[dict]:
    """Instance dicts of the shapes split (contiguous ids = index in DEMO_OW_SHAPES_CLASSES);
    training labels restricted to the known classes, the seen shapes stay in the images."""
    train_classes = [
        DEMO_OW_SHAPES_CLASSES[i]
        for i in DEMO_OW_SHAPES_SPLITS["known"] + DEMO_OW_SHAPES_SPLITS["seen"]
    ]
    demo_dir = generate_shape_scenes(
        root / DEMO_OW_SHAPES_DIRNAME, DEMO_OW_SHAPES_CLASSES, train_classes, DEMO_OW_SHAPES_IMAGES
    )
    paths = split_paths(demo_dir, split)
    id_map = {i + 1: i for i in range(len(DEMO_OW_SHAPES_CLASSES))}
    dicts = coco_instance_dicts(paths["json_file"], paths["image_root"], id_map)
    if split == "train":
        known = set(DEMO_OW_SHAPES_SPLITS["known"])
        for record in dicts:
            record["annotations"] = [a for a in record["annotations"] if a["category_id"] in known]
    return dicts


def register_all_lvis_ow(root: Path) -> None:
    """Register openseg_lvis_ow_{train,test}, openseg_coco_lvis_train,
    openseg_demo_ow_{train,val,val_large} and openseg_demo_ow_shapes_{train,val}."""
    root = Path(root)
    register_lazy(
        "openseg_coco_lvis_train",
        partial(load_coco_lvis_train, root),
        json_file=str(root / "lvis" / COCO_LVIS_TRAIN),
        image_root=str(root / "coco" / "train2017"),
        evaluators=["instance"],
        **coco_instance_metadata(),
    )
    for split, file_name in LVIS_OW_FILES.items():
        metadata = lvis_v1_metadata()
        metadata["evaluators"] = ["open_world_ar"]
        register_lazy(
            f"openseg_lvis_ow_{split}",
            partial(load_lvis_ow, root, split),
            lazy_metadata=partial(lvis_ow_class_splits, root),
            lazy_keys=("class_splits",),
            json_file=str(root / "lvis" / file_name),
            image_root=str(root / "coco"),
            **metadata,
        )
    demo_dir = root / DEMO_DIRNAME
    for split in ("train", "val"):
        register_lazy(
            f"openseg_demo_ow_{split}",
            partial(load_demo_ow, root, split),
            thing_classes=list(THING_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(THING_CLASSES))},
            class_splits={k: list(v) for k, v in DEMO_OW_SPLITS.items()},
            evaluators=["open_world_ar"],
            json_file=split_paths(demo_dir, split)["json_file"],
            image_root=split_paths(demo_dir, split)["image_root"],
        )
    large_dir = root / DEMO_OW_LARGE_DIRNAME / DEMO_DIRNAME
    register_lazy(
        "openseg_demo_ow_val_large",
        partial(load_demo_ow_val_large, root),
        thing_classes=list(THING_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(THING_CLASSES))},
        class_splits={k: list(v) for k, v in DEMO_OW_SPLITS.items()},
        evaluators=["open_world_ar"],
        json_file=split_paths(large_dir, "val")["json_file"],
        image_root=split_paths(large_dir, "val")["image_root"],
    )
    for split in DEMO_OW_SHAPES_IMAGES:
        paths = split_paths(root / DEMO_OW_SHAPES_DIRNAME, split)
        register_lazy(
            f"openseg_demo_ow_shapes_{split}",
            partial(load_demo_ow_shapes, root, split),
            thing_classes=list(DEMO_OW_SHAPES_CLASSES),
            thing_dataset_id_to_contiguous_id={
                i + 1: i for i in range(len(DEMO_OW_SHAPES_CLASSES))
            },
            class_splits={k: list(v) for k, v in DEMO_OW_SHAPES_SPLITS.items()},
            evaluators=["open_world_ar"],
            json_file=paths["json_file"],
            image_root=paths["image_root"],
        )
