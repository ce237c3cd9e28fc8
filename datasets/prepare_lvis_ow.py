"""LVIS-OW, the open-world split of LVIS v1 (SegPrompt, Zhu et al. ICCV 2023, Sec. 4.2), as the
authors' release builds it, plus the COCO -> LVIS training set of Table 4.

Classes are split three ways by the release's lists (openseg/data/lvis_ow_classes.json, taken
from the release's mask2former/data/lvis_info/; `derive_class_lists` applies the paper's rule
to an LVIS file and gives the same lists on LVIS v1):
  known  = COCO's 80 classes (mapped to LVIS through LVIS's coco_to_synset table; "hot dog"
           has no LVIS v1 synset, so 79) + the 64 LVIS classes with the most training
           instances; the union has 123 classes;
  unseen = the 337 LVIS "rare" classes: training images holding any of them move to the test
           set, so they never appear in training images;
  seen   = all other classes: they appear in training images, unlabelled.

Reads  $OPENSEG_DATASETS/lvis/lvis_v1_{train,val}.json
       $OPENSEG_DATASETS/coco/annotations/instances_train2017.json
Writes $OPENSEG_DATASETS/lvis/lvis_ow_train.json  the remaining LVIS train images (with or
           without labels, as the release) and what the release trains on (its
           tools/merge_json.py, prepare_owlvis.py, filter_json.py): LVIS's annotations of the
           123 known classes AND COCO's annotations of COCO's classes (mapped to LVIS ids, crowd
           regions kept as crowd); both label the COCO classes, so those objects are mostly
           labelled twice (Table 1 counts both: 1,511,257 known training instances)
       $OPENSEG_DATASETS/lvis/lvis_ow_test.json   LVIS val + moved train images, all LVIS
           annotations (LVIS format: frequencies and negative / not-exhaustive ids kept)
       $OPENSEG_DATASETS/lvis/lvis_ow_splits.json {"known", "seen", "unseen"} contiguous ids
           (LVIS category id - 1, as openseg's LVIS metadata)
       $OPENSEG_DATASETS/lvis/coco_lvis_train.json  Table 4 (COCO -> LVIS): the LVIS v1 train
           images with COCO's annotations and COCO's 80 categories. LVIS re-splits COCO 2017,
           so about 15k COCO train2017 images are LVIS val images; training on all of COCO
           train2017 would train on test images.
The LVIS-OW files are COCO-format too: every image gets `file_name` (<split>2017/<file>,
relative to $OPENSEG_DATASETS/coco) and every annotation `iscrowd`; annotation ids are
renumbered 1..N because LVIS and COCO ids collide. It then prints the rows of Table 1 (train
known = training labels; train seen = LVIS instances of seen classes in the training images,
which carry no label; test = LVIS labels of the test images; classes = those with instances).
"""

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from openseg.data.datasets.common import prepare_parser
from openseg.data.datasets.lvis_ow import (
    COCO_LVIS_TRAIN,
    LVIS_OW_FILES,
    LVIS_OW_SPLITS,
    lvis_ow_class_lists,
)

NUM_FREQUENT = 64
GROUPS = ("known", "seen", "unseen")

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


def derive_class_lists(lvis_train: Dict, num_frequent: int = NUM_FREQUENT) -> Dict[str, List[int]]:
    """The paper's rule (Sec. 4.2): the `num_frequent` classes with the most training instances
    and the rare classes. On LVIS v1 these are the release's lists (`lvis_ow_class_lists`)."""
    return {
        "frequent_64": sorted(most_frequent(lvis_train["annotations"], num_frequent)),
        "unseen": sorted(c["id"] for c in lvis_train["categories"] if c["frequency"] == "r"),
    }


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
    lvis_train: Dict,
    lvis_val: Dict,
    coco_train: Dict,
    frequent: Sequence[int],
    unseen: Sequence[int],
) -> Dict:
    """The LVIS-OW train / test files and class split from the loaded JSON dicts.

    `frequent`: LVIS ids of the frequent classes joining COCO's as known; `unseen`: LVIS ids
    whose training images move to the test set. Returns {"train", "test": dicts, "splits":
    {"known", "seen", "unseen"} of LVIS category ids, "moved_images": ids of train images moved
    to test, "seen_in_train": LVIS annotations of seen classes in the training images,
    "label_sources": training labels from LVIS / from COCO}.
    """
    categories = sorted(lvis_train["categories"], key=lambda c: c["id"])
    all_ids = {c["id"] for c in categories}
    coco_map = coco_to_lvis_ids(coco_train["categories"], categories)
    known = set(coco_map.values()) | set(frequent)
    unseen = set(unseen)
    for name, ids in (("frequent", set(frequent)), ("unseen", unseen)):
        if not ids <= all_ids:
            raise ValueError(f"{name} class ids {sorted(ids - all_ids)[:5]} are not LVIS ids.")
    if known & unseen:
        raise ValueError(f"Classes {sorted(known & unseen)[:5]} are both known and unseen.")
    seen = all_ids - known - unseen

    moved = {a["image_id"] for a in lvis_train["annotations"] if a["category_id"] in unseen}
    kept_images = [im for im in lvis_train["images"] if im["id"] not in moved]
    kept_ids = {im["id"] for im in kept_images}
    lvis_labels = [
        dict(a, iscrowd=0)
        for a in lvis_train["annotations"]
        if a["image_id"] in kept_ids and a["category_id"] in known
    ]
    coco_labels = [
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
            "annotations": renumbered(lvis_labels + coco_labels),
        },
        "test": {
            **info,
            "categories": categories,
            "images": with_file_names(list(lvis_val["images"]) + moved_images),
            "annotations": renumbered(test_annotations),
        },
        "splits": {"known": sorted(known), "seen": sorted(seen), "unseen": sorted(unseen)},
        "moved_images": sorted(moved),
        "seen_in_train": [
            a
            for a in lvis_train["annotations"]
            if a["image_id"] in kept_ids and a["category_id"] in seen
        ],
        "label_sources": {"lvis": len(lvis_labels), "coco": len(coco_labels)},
    }


def build_coco_lvis_train(lvis_train: Dict, coco_train: Dict) -> Dict:
    """Table 4's training set: COCO's labels (80 categories, COCO ids) of the LVIS v1 train
    images (all of which are COCO train2017 images), so no LVIS val image is trained on."""
    lvis_ids = {im["id"] for im in lvis_train["images"]}
    info = {key: coco_train[key] for key in ("info", "licenses") if key in coco_train}
    return {
        **info,
        "categories": coco_train["categories"],
        "images": [im for im in coco_train["images"] if im["id"] in lvis_ids],
        "annotations": [a for a in coco_train["annotations"] if a["image_id"] in lvis_ids],
    }


def count_row(annotations: Iterable[Dict], classes: Iterable[int]) -> Dict[str, int]:
    """Classes with instances, instances and images holding them, among `classes`."""
    classes = set(classes)
    chosen = [a for a in annotations if a["category_id"] in classes]
    return {
        "classes": len({a["category_id"] for a in chosen}),
        "instances": len(chosen),
        "images": len({a["image_id"] for a in chosen}),
    }


def table1_statistics(result: Dict, num_val_images: int) -> Dict[str, Dict[str, int]]:
    """Table 1's columns: train known counts the training labels; train seen the LVIS
    instances of seen classes in the training images (present, unlabelled); test columns the
    test set's LVIS labels per group. Also image counts and where the training labels come from."""
    splits = result["splits"]
    test = result["test"]["annotations"]
    stats = {
        "train_known": count_row(result["train"]["annotations"], splits["known"]),
        "train_seen": count_row(result["seen_in_train"], splits["seen"]),
    }
    for group in GROUPS:
        stats[f"test_{group}"] = count_row(test, splits[group])
    train_labels = result["train"]["annotations"]
    stats["images"] = {
        "train": len(result["train"]["images"]),
        "test": len(result["test"]["images"]),
        "test_from_lvis_val": num_val_images,
        "test_moved_from_train": len(result["moved_images"]),
    }
    stats["train_labels"] = {
        **result["label_sources"],
        "crowd": sum(a["iscrowd"] for a in train_labels),
    }
    return stats


# Table 1 of the paper, for comparison with the printed statistics
PAPER_TABLE1 = {
    "train_known": (123, 1511257),
    "train_seen": (743, 452524),
    "test_known": (123, 168798),
    "test_seen": (738, 99230),
    "test_unseen": (337, 6457),
}
PAPER_IMAGES = {"train": 98708, "test": 21271}


def format_statistics(stats: Dict[str, Dict[str, int]]) -> str:
    """Table 1's layout with the paper's numbers beside the computed ones."""
    columns = list(PAPER_TABLE1)
    lines = ["         " + "".join(f"{c:>14}" for c in columns)]
    for key, label, index in (("classes", "N_cls", 0), ("instances", "N_ins", 1)):
        lines.append(f"{label:<9}" + "".join(f"{stats[c][key]:>14}" for c in columns))
        lines.append(
            f"{'  paper':<9}" + "".join(f"{PAPER_TABLE1[c][index]:>14}" for c in columns)
        )
    lines.append(
        f"images: train {stats['images']['train']} (paper {PAPER_IMAGES['train']}), test "
        f"{stats['images']['test']} (paper {PAPER_IMAGES['test']}) = "
        f"{stats['images']['test_from_lvis_val']} LVIS val + "
        f"{stats['images']['test_moved_from_train']} moved from train"
    )
    labels = stats["train_labels"]
    lines.append(
        f"training labels: {labels['lvis']} LVIS + {labels['coco']} COCO ({labels['crowd']} crowd)"
    )
    if "coco_lvis_train" in stats:
        coco_lvis = stats["coco_lvis_train"]
        lines.append(
            f"COCO -> LVIS training set: {coco_lvis['images']} images, "
            f"{coco_lvis['instances']} COCO instances "
            f"({coco_lvis['lvis_train_images_not_in_coco_train']} LVIS train images are not "
            "COCO train2017 images)"
        )
    return "\n".join(lines)


def write_json(path: Path, content) -> None:
    with open(path, "w") as f:
        json.dump(content, f)


def prepare(
    root: Path,
    class_lists: Optional[Dict[str, Sequence[int]]] = None,
    derive_classes: bool = False,
) -> Dict[str, Dict[str, int]]:
    """Write the LVIS-OW and COCO -> LVIS files under root/lvis and return the statistics.

    `class_lists` ({"frequent_64", "unseen"} LVIS ids) defaults to the release's lists, or
    with `derive_classes` to the paper's rule applied to lvis_v1_train.json.
    """
    lvis_dir = root / "lvis"
    download = "download it from https://www.lvisdataset.org into {}"
    lvis_train = read_json(lvis_dir / "lvis_v1_train.json", download.format(lvis_dir))
    lvis_val = read_json(lvis_dir / "lvis_v1_val.json", download.format(lvis_dir))
    coco_json = root / "coco" / "annotations" / "instances_train2017.json"
    coco_train = read_json(coco_json, f"download COCO 2017 annotations into {coco_json.parent}")
    check_lvis_categories(lvis_dir / "lvis_v1_train.json", lvis_train["categories"])
    if derive_classes:
        class_lists = derive_class_lists(lvis_train)
    lists = class_lists if class_lists is not None else lvis_ow_class_lists()
    result = build_lvis_ow(
        lvis_train, lvis_val, coco_train, lists["frequent_64"], lists["unseen"]
    )
    for split, file_name in LVIS_OW_FILES.items():
        write_json(lvis_dir / file_name, result[split])
    contiguous = {group: [i - 1 for i in ids] for group, ids in result["splits"].items()}
    write_json(lvis_dir / LVIS_OW_SPLITS, contiguous)
    stats = table1_statistics(result, len(lvis_val["images"]))
    coco_lvis = build_coco_lvis_train(lvis_train, coco_train)
    write_json(lvis_dir / COCO_LVIS_TRAIN, coco_lvis)
    stats["coco_lvis_train"] = {
        "images": len(coco_lvis["images"]),
        "instances": len(coco_lvis["annotations"]),
        "lvis_train_images_not_in_coco_train": len(lvis_train["images"]) - len(coco_lvis["images"]),
    }
    return stats


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument(
        "--derive-classes",
        action="store_true",
        help="derive the class lists from lvis_v1_train.json by the paper's rule instead of "
        "using the release's lists (they agree on LVIS v1)",
    )
    args = parser.parse_args()
    print(format_statistics(prepare(args.root, derive_classes=args.derive_classes)))


if __name__ == "__main__":
    main()
