"""ADE20K: the 150-class SceneParsing benchmark (semantic, panoptic, instance) and ADE20K-Full
(847 classes, semantic), in the layouts Mask2Former / FC-CLIP use (see datasets/README.md).

ADE-150 names are the official `objectInfo150` entries: the first WordNet lemma is the class
name; its synonyms are the other lemmas that name no other class and are in everyday use.
ADE-847 names come from the prepared dataset (`ADE20K_2021_17_01/classes_847.json`, written by
prepare_ade20k_full.py).
"""

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from .common import (
    coco_instance_dicts,
    load_panoptic_json,
    register_lazy,
    register_semantic,
    register_subset,
    require,
)

# training-set sizes of the in-domain FC-CLIP models of Figure 4 ("What holds back
# open-vocabulary segmentation?" Sec. 4.4; the text names 300, the other points are ours)
IN_DOMAIN_SUBSETS = (100, 300, 1000, 3000)

# objectInfo150.csv "Name" column, in label order (label k+1 in the PNGs = contiguous id k)
ADE20K_150_WORDNET_NAMES = [
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route",
    "bed", "windowpane, window", "grass", "cabinet", "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul", "earth, ground", "door, double door",
    "table", "mountain, mount", "plant, flora, plant life", "curtain, drape, drapery, mantle, pall",
    "chair", "car, auto, automobile, machine, motorcar", "water", "painting, picture",
    "sofa, couch, lounge", "shelf", "house", "sea", "mirror", "rug, carpet, carpeting", "field",
    "armchair", "seat", "fence, fencing", "desk", "rock, stone", "wardrobe, closet, press", "lamp",
    "bathtub, bathing tub, bath, tub", "railing, rail", "cushion", "base, pedestal, stand", "box",
    "column, pillar", "signboard, sign", "chest of drawers, chest, bureau, dresser", "counter",
    "sand", "sink", "skyscraper", "fireplace, hearth, open fireplace", "refrigerator, icebox",
    "grandstand, covered stand", "path", "stairs, steps", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table",
    "pillow", "screen door, screen", "stairway, staircase", "river", "bridge, span", "bookcase",
    "blind, screen", "coffee table, cocktail table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench",
    "countertop", "stove, kitchen stove, range, kitchen range, cooking stove", "palm, palm tree",
    "kitchen island", "computer, computing machine, computing device, data processor, "
    "electronic computer, information processing system", "swivel chair", "boat", "bar",
    "arcade machine", "hovel, hut, hutch, shack, shanty", "bus, autobus, coach, charabanc, "
    "double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle", "towel",
    "light, light source", "truck, motortruck", "tower", "chandelier, pendant, pendent",
    "awning, sunshade, sunblind", "streetlight, street lamp", "booth, cubicle, stall, kiosk",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, "
    "goggle box", "airplane, aeroplane, plane", "dirt track",
    "apparel, wearing apparel, dress, clothes", "pole", "land, ground, soil",
    "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock",
    "bottle", "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card",
    "stage", "van", "ship", "fountain",
    "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy",
    "swimming pool, swimming bath, natatorium", "stool", "barrel, cask", "basket, handbasket",
    "waterfall, falls", "tent, collapsible shelter", "bag", "minibike, motorbike", "cradle",
    "oven", "ball", "food, solid food", "step, stair", "tank, storage tank",
    "trade name, brand name, brand, marque", "microwave, microwave oven", "pot, flowerpot",
    "animal, animate being, beast, brute, creature, fauna", "bicycle, bike, wheel, cycle", "lake",
    "dishwasher, dish washer, dishwashing machine", "screen, silver screen, projection screen",
    "blanket, cover", "sculpture", "hood, exhaust hood", "sconce", "vase",
    "traffic light, traffic signal, stoplight", "tray", "ashcan, trash can, garbage can, "
    "wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin", "fan",
    "pier, wharf, wharfage, dock", "crt screen", "plate", "monitor, monitoring device",
    "bulletin board, notice board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
]  # fmt: skip

# contiguous ids of the 100 ADE-150 classes that have instance annotations (the "things" of
# the Places Challenge 2017 instance track, mapped through ade20k_instance_catid_mapping.txt)
ADE20K_150_THING_IDS = [
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41,
    42, 43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74,
    75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107,
    108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132,
    133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
]  # fmt: skip


# WordNet lemmas of objectInfo150 that are another sense, a hypernym or slang in everyday use
# ("car, ..., machine", "person, ..., soul"): kept out of the synonyms
_UNNATURAL_LEMMAS = {
    "route", "individual", "someone", "somebody", "mortal", "soul", "double door", "mount",
    "flora", "plant life", "mantle", "pall", "machine", "lounge", "press", "stand", "chest",
    "span", "can", "crapper", "potty", "throne", "range", "data processor",
    "information processing system", "hutch", "charabanc", "double-decker", "jitney",
    "passenger vehicle", "pendant", "pendent", "idiot box", "boob tube", "goggle box", "dress",
    "puff", "posting", "bill", "card", "transporter", "animate being", "brute", "fauna", "wheel",
    "cover", "wharfage", "monitoring device",
}  # fmt: skip


def _wordnet_vocabulary(wordnet_names: List[str]) -> Dict[str, List]:
    """Class names (first lemma) and synonyms (natural lemmas that name no other class)."""
    lemma_lists = [[lemma.strip() for lemma in names.split(",")] for names in wordnet_names]
    lemma_count = Counter(lemma for lemmas in lemma_lists for lemma in set(lemmas))
    synonyms = [
        [lemmas[0]]
        + [name for name in lemmas[1:] if lemma_count[name] == 1 and name not in _UNNATURAL_LEMMAS]
        for lemmas in lemma_lists
    ]
    return {"classes": [lemmas[0] for lemmas in lemma_lists], "synonyms": synonyms}


_ADE150 = _wordnet_vocabulary(ADE20K_150_WORDNET_NAMES)
ADE20K_150_CLASSES: List[str] = _ADE150["classes"]
ADE20K_150_SYNONYMS: List[List[str]] = _ADE150["synonyms"]

ADE_ROOT = "ADEChallengeData2016"
ADE_FULL_ROOT = "ADE20K_2021_17_01"
ADE_FULL_CLASSES_FILE = "classes_847.json"
ADE_FULL_IGNORE_LABEL = 65535  # 847 classes do not fit an 8-bit label image
_SPLIT_DIRS = {"train": "training", "val": "validation"}


def _panoptic_metadata() -> Dict:
    """Mask2Former convention: thing/stuff maps both send dataset ids into the 150-class
    contiguous space, `stuff_classes` lists all 150 classes, `thing_classes` the 100 things."""
    return {
        "thing_classes": [ADE20K_150_CLASSES[i] for i in ADE20K_150_THING_IDS],
        "stuff_classes": list(ADE20K_150_CLASSES),
        "thing_dataset_id_to_contiguous_id": {i: i for i in ADE20K_150_THING_IDS},
        "stuff_dataset_id_to_contiguous_id": {i: i for i in range(len(ADE20K_150_CLASSES))},
        "synonyms": [list(s) for s in ADE20K_150_SYNONYMS],
    }


def read_instance_category_mapping(path: Path) -> Dict[int, int]:
    """Instance-track category (R channel of annotations_instance PNGs, 1-based) -> ADE-150
    contiguous id, from ade20k_instance_catid_mapping.txt (header line, then
    `<instance id> <150-class id, 1-based> <full ADE id>` per line)."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path} not found: get utils/ade20k_instance_catid_mapping.txt from "
            "github.com/CSAILVision/ADE20K (or pass --catid-mapping to the prepare script)"
        )
    mapping = {}
    with open(path) as f:
        for line_number, line in enumerate(f.readlines()[1:], start=2):
            fields = line.split()
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{line_number}: expected '<instance id> <150-class id> ...'"
                )
            mapping[int(fields[0])] = int(fields[1]) - 1
    not_things = sorted(set(mapping.values()) - set(ADE20K_150_THING_IDS))
    if not_things:
        raise ValueError(
            f"{path} maps instances onto ADE-150 ids {not_things}, which are not things"
        )
    return mapping


def iter_ade20k_instances(
    instance_png: np.ndarray, category_mapping: Dict[int, int]
) -> Iterator[Tuple[np.ndarray, int]]:
    """(mask, ADE-150 contiguous id) of every instance of an annotations_instance PNG, whose
    R channel holds the instance-track category and G channel the instance index (0 = none)."""
    categories, instance_ids = instance_png[..., 0], instance_png[..., 1]
    for instance_id in np.unique(instance_ids):
        if instance_id == 0:
            continue
        mask = instance_ids == instance_id
        category = np.unique(categories[mask])
        if len(category) != 1 or int(category[0]) not in category_mapping:
            raise ValueError(
                f"instance {instance_id} has categories {category.tolist()}, expected one mapped id"
            )
        yield mask, category_mapping[int(category[0])]


def load_ade20k_panoptic(root: Path, split: str) -> List[dict]:
    """ADE-150 panoptic dicts with `sem_seg_file_name` (prepare_ade20k_pan_seg.py and
    prepare_ade20k_sem_seg.py must have run)."""
    ade = root / ADE_ROOT
    require(ade / f"ade20k_panoptic_{split}.json", "python datasets/prepare_ade20k_pan_seg.py")
    image_root = require(ade / "images" / _SPLIT_DIRS[split], "download ADEChallengeData2016.zip")
    sem_seg_root = ade / "annotations_detectron2" / _SPLIT_DIRS[split]

    def locate(image: dict) -> Tuple[Path, Path]:
        stem = Path(image["file_name"]).stem
        return image_root / image["file_name"], sem_seg_root / f"{stem}.png"

    return load_panoptic_json(
        ade / f"ade20k_panoptic_{split}.json",
        ade / f"ade20k_panoptic_{split}",
        locate,
        _panoptic_metadata(),
        "python datasets/prepare_ade20k_pan_seg.py and prepare_ade20k_sem_seg.py",
    )


def load_ade20k_instance(root: Path, split: str) -> List[dict]:
    """ADE-150 instance dicts; category ids become contiguous over the 100 thing classes."""
    ade = root / ADE_ROOT
    json_file = require(
        ade / f"ade20k_instance_{split}.json", "python datasets/prepare_ade20k_ins_seg.py"
    )
    image_root = require(ade / "images" / _SPLIT_DIRS[split], "download ADEChallengeData2016.zip")
    contiguous = {dataset_id: i for i, dataset_id in enumerate(ADE20K_150_THING_IDS)}
    return coco_instance_dicts(json_file, image_root, contiguous)


def load_ade20k_full_classes(root: Path) -> Dict:
    """ADE-847 vocabulary from the prepared dataset (lazy metadata of the 847-class sets)."""
    path = require(
        root / ADE_FULL_ROOT / ADE_FULL_CLASSES_FILE, "python datasets/prepare_ade20k_full.py"
    )
    with open(path) as f:
        full_names = [entry["name"] for entry in json.load(f)]
    first_lemmas = [name.split(",")[0].strip() for name in full_names]
    repeated = {lemma for lemma, count in Counter(first_lemmas).items() if count > 1}
    names = [full if lemma in repeated else lemma for lemma, full in zip(first_lemmas, full_names)]
    # the full index's lemma lists are not curated, so each class keeps only its name
    return {"stuff_classes": names, "synonyms": [[name] for name in names]}


def register_all_ade20k(root: Path) -> None:
    """Register openseg_ade20k_{train,val}_panoptic (and openseg_ade20k_train_panoptic_subset<N>
    for N in IN_DOMAIN_SUBSETS), openseg_ade20k_sem_seg_{train,val},
    openseg_ade20k_instance_{train,val} and openseg_ade20k_full_sem_seg_{train,val}."""
    root = Path(root)
    ade = root / ADE_ROOT
    for split, split_dir in _SPLIT_DIRS.items():
        image_root = ade / "images" / split_dir
        sem_seg_root = ade / "annotations_detectron2" / split_dir
        register_lazy(
            f"openseg_ade20k_{split}_panoptic",
            partial(load_ade20k_panoptic, root, split),
            image_root=str(image_root),
            sem_seg_root=str(sem_seg_root),
            panoptic_root=str(ade / f"ade20k_panoptic_{split}"),
            panoptic_json=str(ade / f"ade20k_panoptic_{split}.json"),
            json_file=str(ade / f"ade20k_instance_{split}.json"),
            evaluators=["panoptic", "semantic", "instance"],
            ignore_label=255,
            label_divisor=1000,
            **_panoptic_metadata(),
        )
        register_semantic(
            f"openseg_ade20k_sem_seg_{split}",
            image_root,
            sem_seg_root,
            "python datasets/prepare_ade20k_sem_seg.py",
            stuff_classes=list(ADE20K_150_CLASSES),
            synonyms=[list(s) for s in ADE20K_150_SYNONYMS],
        )
        if split == "train":
            for num_images in IN_DOMAIN_SUBSETS:
                register_subset("openseg_ade20k_train_panoptic", num_images)
        thing_classes = [ADE20K_150_CLASSES[i] for i in ADE20K_150_THING_IDS]
        register_lazy(
            f"openseg_ade20k_instance_{split}",
            partial(load_ade20k_instance, root, split),
            image_root=str(image_root),
            json_file=str(ade / f"ade20k_instance_{split}.json"),
            thing_classes=thing_classes,
            stuff_classes=list(thing_classes),
            thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(ADE20K_150_THING_IDS)},
            synonyms=[list(ADE20K_150_SYNONYMS[i]) for i in ADE20K_150_THING_IDS],
            evaluators=["instance"],
            ignore_label=255,
        )
        register_semantic(
            f"openseg_ade20k_full_sem_seg_{split}",
            root / ADE_FULL_ROOT / "images_detectron2" / split_dir,
            root / ADE_FULL_ROOT / "annotations_detectron2" / split_dir,
            "python datasets/prepare_ade20k_full.py",
            ignore_label=ADE_FULL_IGNORE_LABEL,
            lazy_metadata=partial(load_ade20k_full_classes, root),
        )
