"""LVIS-OW, the open-world split of LVIS v1 (SegPrompt, Zhu et al. ICCV 2023, Sec. 4.1).

Classes are split three ways:
  known  = COCO's 80 classes (mapped to LVIS through LVIS's coco_to_synset table; "hot dog"
           has no LVIS v1 synset, so 79) + the 64 LVIS classes with the most training
           instances; the union has 123 classes with the real files;
  unseen = LVIS "rare" classes: training images containing any of them move to the test set,
           so they never appear in training images;
  seen   = all other classes: they appear in training images, unlabelled.

Reads  $OPENSEG_DATASETS/lvis/lvis_v1_{train,val}.json
       $OPENSEG_DATASETS/coco/annotations/instances_train2017.json
Writes $OPENSEG_DATASETS/lvis/lvis_ow_train.json  remaining LVIS train images; annotations of
           known classes only: LVIS's for the 64 frequent non-COCO classes, COCO's (exhaustive,
           crowd regions kept as crowd) for the COCO classes, which replace LVIS's duplicates
       $OPENSEG_DATASETS/lvis/lvis_ow_test.json   LVIS val + moved train images, all LVIS
           annotations (LVIS format: frequencies and negative / not-exhaustive ids kept)
       $OPENSEG_DATASETS/lvis/lvis_ow_splits.json {"known", "seen", "unseen"} contiguous ids
           (LVIS category id - 1, as openseg's LVIS metadata)
Both annotation files are COCO-format too: every image gets `file_name` (<split>2017/<file>,
relative to $OPENSEG_DATASETS/coco) and every annotation `iscrowd`; annotation ids are
renumbered 1..N because LVIS and COCO ids collide. It then prints the split statistics
(paper Table 1).
"""

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Set

from openseg.data.datasets.common import prepare_parser

NUM_FREQUENT = 64
TRAIN_JSON = "lvis_ow_train.json"
TEST_JSON = "lvis_ow_test.json"
SPLITS_JSON = "lvis_ow_splits.json"

# LVIS's coco_to_synset table (lvis-api data/coco_to_synset.json), keyed by COCO class name
COCO_NAME_TO_LVIS_SYNSET = {
    "person": "person.n.01",
    "bicycle": "bicycle.n.01",
    "car": "car.n.01",
    "motorcycle": "motorcycle.n.01",
    "airplane": "airplane.n.01",
    "bus": "bus.n.01",
    "train": "train.n.01",
    "truck": "truck.n.01",
    "boat": "boat.n.01",
    "traffic light": "traffic_light.n.01",
    "fire hydrant": "fireplug.n.01",
    "stop sign": "stop_sign.n.01",
    "parking meter": "parking_meter.n.01",
    "bench": "bench.n.01",
    "bird": "bird.n.01",
    "cat": "cat.n.01",
    "dog": "dog.n.01",
    "horse": "horse.n.01",
    "sheep": "sheep.n.01",
    "cow": "beef.n.01",
    "elephant": "elephant.n.01",
    "bear": "bear.n.01",
    "zebra": "zebra.n.01",
    "giraffe": "giraffe.n.01",
    "backpack": "backpack.n.01",
    "umbrella": "umbrella.n.01",
    "handbag": "bag.n.04",
    "tie": "necktie.n.01",
    "suitcase": "bag.n.06",
    "frisbee": "frisbee.n.01",
    "skis": "ski.n.01",
    "snowboard": "snowboard.n.01",
    "sports ball": "ball.n.06",
    "kite": "kite.n.03",
    "baseball bat": "baseball_bat.n.01",
    "baseball glove": "baseball_glove.n.01",
    "skateboard": "skateboard.n.01",
    "surfboard": "surfboard.n.01",
    "tennis racket": "tennis_racket.n.01",
    "bottle": "bottle.n.01",
    "wine glass": "wineglass.n.01",
    "cup": "cup.n.01",
    "fork": "fork.n.01",
    "knife": "knife.n.01",
    "spoon": "spoon.n.01",
    "bowl": "bowl.n.03",
    "banana": "banana.n.02",
    "apple": "apple.n.01",
    "sandwich": "sandwich.n.01",
    "orange": "orange.n.01",
    "broccoli": "broccoli.n.01",
    "carrot": "carrot.n.01",
    "hot dog": "frank.n.02",
    "pizza": "pizza.n.01",
    "donut": "doughnut.n.02",
    "cake": "cake.n.03",
    "chair": "chair.n.01",
    "couch": "sofa.n.01",
    "potted plant": "pot.n.04",
    "bed": "bed.n.01",
    "dining table": "dining_table.n.01",
    "toilet": "toilet.n.02",
    "tv": "television_receiver.n.01",
    "laptop": "laptop.n.01",
    "mouse": "mouse.n.04",
    "remote": "remote_control.n.01",
    "keyboard": "computer_keyboard.n.01",
    "cell phone": "cellular_telephone.n.01",
    "microwave": "microwave.n.02",
    "oven": "oven.n.01",
    "toaster": "toaster.n.02",
    "sink": "sink.n.01",
    "refrigerator": "electric_refrigerator.n.01",
    "book": "book.n.01",
    "clock": "clock.n.01",
    "vase": "vase.n.01",
    "scissors": "scissors.n.01",
    "teddy bear": "teddy.n.01",
    "hair drier": "hand_blower.n.01",
    "toothbrush": "toothbrush.n.01",
}


def read_json(path: Path, instruction: str) -> Dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {instruction}")
    with open(path) as f:
        return json.load(f)


def check_lvis_categories(path: Path, categories: List[Dict]) -> None:
    """Ids 1..N, each with the `synset` and `frequency` LVIS files define."""
    ids = sorted(c["id"] for c in categories)
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"{path}: LVIS category ids must be 1..{len(ids)}, got {ids[:5]}...")
    lacking = [c["id"] for c in categories if "synset" not in c or "frequency" not in c]
    if lacking:
        raise ValueError(f"{path}: categories {lacking[:5]} lack 'synset' / 'frequency'.")


def coco_to_lvis_ids(coco_categories: List[Dict], lvis_categories: List[Dict]) -> Dict[int, int]:
    """COCO category id -> LVIS category id for the COCO classes whose synset LVIS has."""
    lvis_by_synset = {c["synset"]: c["id"] for c in lvis_categories}
    unknown = [c["name"] for c in coco_categories if c["name"] not in COCO_NAME_TO_LVIS_SYNSET]
    if unknown:
        raise ValueError(f"COCO categories {unknown} are not COCO 2017 instance classes.")
    return {
        c["id"]: lvis_by_synset[COCO_NAME_TO_LVIS_SYNSET[c["name"]]]
        for c in coco_categories
        if COCO_NAME_TO_LVIS_SYNSET[c["name"]] in lvis_by_synset
    }


def most_frequent(annotations: Iterable[Dict], count: int) -> List[int]:
    """The `count` category ids with the most annotations (ties: smaller id first)."""
    counts = Counter(a["category_id"] for a in annotations)
    return sorted(counts, key=lambda c: (-counts[c], c))[:count]


def image_file_name(image: Dict) -> str:
    """`<split>2017/<file>` from an LVIS image's coco_url."""
    return "/".join(image["coco_url"].split("/")[-2:])


def with_file_names(images: Iterable[Dict]) -> List[Dict]:
    return [dict(image, file_name=image_file_name(image)) for image in images]


def renumbered(annotations: Iterable[Dict]) -> List[Dict]:
    """Annotations with ids 1..N and an explicit `iscrowd` (0 unless given)."""
    return [
        dict(a, id=index, iscrowd=int(a.get("iscrowd", 0)))
        for index, a in enumerate(annotations, start=1)
    ]


def build_lvis_ow(
    lvis_train: Dict, lvis_val: Dict, coco_train: Dict, num_frequent: int = NUM_FREQUENT
) -> Dict:
    """The LVIS-OW train / test files and class split from the loaded JSON dicts.

    Returns {"train": dict, "test": dict, "splits": {"known", "seen", "unseen"} of LVIS
    category ids, "moved_images": ids of train images moved to test}.
    """
    categories = sorted(lvis_train["categories"], key=lambda c: c["id"])
    coco_map = coco_to_lvis_ids(coco_train["categories"], categories)
    known = set(coco_map.values()) | set(most_frequent(lvis_train["annotations"], num_frequent))
    rare = {c["id"] for c in categories if c["frequency"] == "r"}
    unseen = rare - known
    seen = {c["id"] for c in categories} - known - unseen

    moved = {a["image_id"] for a in lvis_train["annotations"] if a["category_id"] in unseen}
    kept_images = [im for im in lvis_train["images"] if im["id"] not in moved]
    kept_ids = {im["id"] for im in kept_images}
    coco_lvis_ids = set(coco_map.values())
    train_annotations = [
        a
        for a in lvis_train["annotations"]
        if a["image_id"] in kept_ids
        and a["category_id"] in known
        and a["category_id"] not in coco_lvis_ids
    ]
    train_annotations += [
        dict(a, category_id=coco_map[a["category_id"]])
        for a in coco_train["annotations"]
        if a["image_id"] in kept_ids and a["category_id"] in coco_map
    ]
    moved_images = [im for im in lvis_train["images"] if im["id"] in moved]
    test_annotations = list(lvis_val["annotations"]) + [
        a for a in lvis_train["annotations"] if a["image_id"] in moved
    ]
    info = {key: lvis_train[key] for key in ("info", "licenses") if key in lvis_train}
    return {
        "train": {
            **info,
            "categories": categories,
            "images": with_file_names(kept_images),
            "annotations": renumbered(
                sorted(train_annotations, key=lambda a: (a["image_id"], a["id"]))
            ),
        },
        "test": {
            **info,
            "categories": categories,
            "images": with_file_names(list(lvis_val["images"]) + moved_images),
            "annotations": renumbered(test_annotations),
        },
        "splits": {"known": sorted(known), "seen": sorted(seen), "unseen": sorted(unseen)},
        "moved_images": sorted(moved),
        "train_image_contents": [a for a in lvis_train["annotations"] if a["image_id"] in kept_ids],
    }


def split_statistics(result: Dict, num_val_images: int) -> Dict[str, Dict[str, int]]:
    """Per group (known / seen / unseen): classes, and LVIS instances and images containing
    them in the train / test images (in train, what the images contain whether labelled or
    not: seen classes are there unlabelled, unseen ones must be absent)."""
    stats = {}
    contents = {"train": result["train_image_contents"], "test": result["test"]["annotations"]}
    for group, ids in result["splits"].items():
        ids: Set[int] = set(ids)
        row = {"classes": len(ids)}
        for split, annotations in contents.items():
            annotations = [a for a in annotations if a["category_id"] in ids]
            row[f"{split}_images"] = len({a["image_id"] for a in annotations})
            row[f"{split}_instances"] = len(annotations)
        stats[group] = row
    stats["total"] = {
        "train_labels": len(result["train"]["annotations"]),
        "train_images": len(result["train"]["images"]),
        "test_images": len(result["test"]["images"]),
        "test_images_from_val": num_val_images,
        "test_images_moved_from_train": len(result["moved_images"]),
    }
    return stats


def format_statistics(stats: Dict[str, Dict[str, int]]) -> str:
    columns = ["classes", "train_images", "train_instances", "test_images", "test_instances"]
    lines = ["group    " + "".join(f"{c:>17}" for c in columns)]
    for group in ("known", "seen", "unseen"):
        lines.append(f"{group:<9}" + "".join(f"{stats[group][c]:>17}" for c in columns))
    lines.append(", ".join(f"{k}={v}" for k, v in stats["total"].items()))
    return "\n".join(lines)


def prepare(root: Path, num_frequent: int = NUM_FREQUENT) -> Dict[str, Dict[str, int]]:
    """Write the three LVIS-OW files under root/lvis and return the split statistics."""
    lvis_dir = root / "lvis"
    download = "download it from https://www.lvisdataset.org into {}"
    lvis_train = read_json(lvis_dir / "lvis_v1_train.json", download.format(lvis_dir))
    lvis_val = read_json(lvis_dir / "lvis_v1_val.json", download.format(lvis_dir))
    coco_json = root / "coco" / "annotations" / "instances_train2017.json"
    coco_train = read_json(coco_json, f"download COCO 2017 annotations into {coco_json.parent}")
    check_lvis_categories(lvis_dir / "lvis_v1_train.json", lvis_train["categories"])
    result = build_lvis_ow(lvis_train, lvis_val, coco_train, num_frequent)
    for name, key in ((TRAIN_JSON, "train"), (TEST_JSON, "test")):
        with open(lvis_dir / name, "w") as f:
            json.dump(result[key], f)
    contiguous = {group: [i - 1 for i in ids] for group, ids in result["splits"].items()}
    with open(lvis_dir / SPLITS_JSON, "w") as f:
        json.dump(contiguous, f)
    return split_statistics(result, len(lvis_val["images"]))


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument(
        "--num-frequent",
        type=int,
        default=NUM_FREQUENT,
        help="most frequent LVIS classes added to COCO's as known classes",
    )
    args = parser.parse_args()
    stats = prepare(args.root, args.num_frequent)
    print(format_statistics(stats))


if __name__ == "__main__":
    main()
