"""Class vocabularies: names, synonyms and prompt templates.

Open-vocabulary classifiers (FC-CLIP, Yu et al. NeurIPS 2023; ViLD, Gu et al. ICLR 2022)
embed every class as the mean text embedding over its synonyms and prompt templates, so a
vocabulary here is a list of classes, each a list of names whose first entry is the class
name itself. Datasets store theirs in `MetadataCatalog.get(name).synonyms`.
"""

import os
import re
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import MetadataCatalog

Vocabulary = List[List[str]]

# ViLD's prompt ensemble (Gu et al. ICLR 2022, Sec. 3.2; after CLIP's ImageNet prompts),
# reduced to the templates that describe a single object or region.
PROMPT_TEMPLATES: List[str] = [
    "a photo of a {}.",
    "This is a photo of a {}.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "a photo of a {} in the scene.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a good photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "itap of a {}.",
    "a low resolution photo of a {}.",
]

# The ViLD prompt ensemble exactly as FC-CLIP's release spells it (`VILD_PROMPT` of
# bytedance/fc-clip, fcclip/fcclip.py): the first 14 templates above, four of them without the
# final full stop. FC-CLIP averages each class name over these (Yu et al. NeurIPS 2023, Sec. 4).
FCCLIP_PROMPT_TEMPLATES: List[str] = [
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
]

# COCO panoptic (Kirillov et al. CVPR 2019): 80 things then 53 stuff classes, in the order of
# detectron2's COCO_CATEGORIES, keyed by the annotation name. The first synonym is a readable
# class name without the annotation suffixes ("-merged", "-other", "-stuff").
COCO_PANOPTIC_SYNONYMS: Dict[str, List[str]] = {
    "person": ["person", "people", "man", "woman", "child", "boy", "girl", "human"],
    "bicycle": ["bicycle", "bike", "cycle"],
    "car": ["car", "automobile", "sedan", "taxi"],
    "motorcycle": ["motorcycle", "motorbike", "scooter"],
    "airplane": ["airplane", "aeroplane", "plane", "aircraft", "jet"],
    "bus": ["bus", "coach", "minibus"],
    "train": ["train", "locomotive", "railway carriage"],
    "truck": ["truck", "lorry", "pickup truck"],
    "boat": ["boat", "ship", "sailboat", "canoe"],
    "traffic light": ["traffic light", "traffic signal", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench", "park bench"],
    "bird": ["bird", "pigeon", "seagull"],
    "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "pup"],
    "horse": ["horse", "pony", "foal"],
    "sheep": ["sheep", "lamb", "ram"],
    "cow": ["cow", "cattle", "calf", "bull"],
    "elephant": ["elephant"],
    "bear": ["bear", "polar bear", "grizzly"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "rucksack", "knapsack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse", "bag"],
    "tie": ["tie", "necktie", "bow tie"],
    "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee", "flying disc"],
    "skis": ["skis", "ski"],
    "snowboard": ["snowboard"],
    "sports ball": ["sports ball", "ball", "football", "soccer ball", "tennis ball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "baseball mitt"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard", "surf board"],
    "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass"],
    "cup": ["cup", "mug"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger"],
    "orange": ["orange", "mandarin"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"],
    "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "houseplant", "plant"],
    "bed": ["bed"],
    "dining table": ["dining table", "table"],
    "toilet": ["toilet"],
    "tv": ["tv", "television", "tv monitor", "monitor", "screen"],
    "laptop": ["laptop", "notebook computer"],
    "mouse": ["mouse", "computer mouse"],
    "remote": ["remote", "remote control"],
    "keyboard": ["keyboard", "computer keyboard"],
    "cell phone": ["cell phone", "mobile phone", "phone", "smartphone"],
    "microwave": ["microwave", "microwave oven"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster"],
    "sink": ["sink", "washbasin"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "stuffed animal", "plush toy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer"],
    "toothbrush": ["toothbrush"],
    "banner": ["banner", "flag"],
    "blanket": ["blanket", "quilt"],
    "bridge": ["bridge"],
    "cardboard": ["cardboard", "carton"],
    "counter": ["counter", "countertop"],
    "curtain": ["curtain", "drape"],
    "door-stuff": ["door", "doorway"],
    "floor-wood": ["wooden floor", "parquet"],
    "flower": ["flower", "blossom"],
    "fruit": ["fruit"],
    "gravel": ["gravel"],
    "house": ["house", "home"],
    "light": ["light", "lamp"],
    "mirror-stuff": ["mirror"],
    "net": ["net"],
    "pillow": ["pillow", "cushion"],
    "platform": ["platform"],
    "playingfield": ["playing field", "sports field", "court"],
    "railroad": ["railroad", "railway", "rail track"],
    "river": ["river", "stream"],
    "road": ["road", "street"],
    "roof": ["roof"],
    "sand": ["sand", "beach"],
    "sea": ["sea", "ocean"],
    "shelf": ["shelf", "bookshelf"],
    "snow": ["snow"],
    "stairs": ["stairs", "staircase", "steps"],
    "tent": ["tent"],
    "towel": ["towel"],
    "wall-brick": ["brick wall"],
    "wall-stone": ["stone wall"],
    "wall-tile": ["tile wall", "tiled wall"],
    "wall-wood": ["wooden wall", "wood panelling"],
    "water-other": ["water", "lake", "pond"],
    "window-blind": ["window blind", "blinds", "shutter"],
    "window-other": ["window"],
    "tree-merged": ["tree", "trees", "bush", "branch"],
    "fence-merged": ["fence", "railing"],
    "ceiling-merged": ["ceiling"],
    "sky-other-merged": ["sky", "clouds"],
    "cabinet-merged": ["cabinet", "cupboard", "drawer"],
    "table-merged": ["table", "desk"],
    "floor-other-merged": ["floor", "flooring"],
    "pavement-merged": ["pavement", "sidewalk"],
    "mountain-merged": ["mountain", "hill"],
    "grass-merged": ["grass", "lawn", "meadow"],
    "dirt-merged": ["dirt", "soil", "mud", "ground"],
    "paper-merged": ["paper"],
    "food-other-merged": ["food", "meal"],
    "building-other-merged": ["building", "skyscraper"],
    "rock-merged": ["rock", "stone", "boulder"],
    "wall-other-merged": ["wall"],
    "rug-merged": ["rug", "carpet", "mat"],
}


def normalize_name(name: str) -> str:
    """Lower-case `name`, turn `_`/`-` into spaces and collapse whitespace: "Traffic_Light" and
    "traffic  light" compare equal."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name)).strip().lower()


def split_synonyms(entry: str, separator: str = ",") -> List[str]:
    """Split a "name, synonym, ..." line (the format of FC-CLIP's vocabulary files) into
    stripped non-empty names; the first is the class name."""
    return [part.strip() for part in entry.split(separator) if part.strip()]


def join_synonyms(names: Sequence[str], separator: str = ", ") -> str:
    """Inverse of `split_synonyms`."""
    return separator.join(names)


def validate_vocabulary(names: Sequence[Union[str, Sequence[str]]]) -> None:
    """Raise ValueError for an empty vocabulary, an empty class name or a class name that
    repeats (after `normalize_name`), naming the entry and its index.

    `names` is a list of class names or of synonym lists; only the class names (first
    synonyms) must be unique, synonyms may be shared (e.g. "table" for two table classes).
    """
    if len(names) == 0:
        raise ValueError("The vocabulary is empty: give at least one class name.")
    first_index: Dict[str, int] = {}
    for index, entry in enumerate(names):
        synonyms = [entry] if isinstance(entry, str) else list(entry)
        if not synonyms:
            raise ValueError(f"Vocabulary entry {index} has no names: {entry!r}.")
        for synonym in synonyms:
            if not isinstance(synonym, str) or not normalize_name(synonym):
                raise ValueError(
                    f"Vocabulary entry {index} ({entry!r}) has an empty or non-string name "
                    f"{synonym!r}."
                )
        key = normalize_name(synonyms[0])
        if key in first_index:
            raise ValueError(
                f"Vocabulary entry {index} ({synonyms[0]!r}) duplicates entry "
                f"{first_index[key]} ({key!r}); class names must be unique."
            )
        first_index[key] = index


def coco_panoptic_vocabulary(annotation_names: Sequence[str]) -> Vocabulary:
    """Synonym lists for COCO panoptic classes given their annotation names, in that order."""
    missing = [name for name in annotation_names if name not in COCO_PANOPTIC_SYNONYMS]
    if missing:
        raise KeyError(
            f"No COCO panoptic synonyms for {missing}; add them to COCO_PANOPTIC_SYNONYMS."
        )
    return [list(COCO_PANOPTIC_SYNONYMS[name]) for name in annotation_names]


def get_vocabulary(dataset_name: str) -> Vocabulary:
    """The registered vocabulary of `dataset_name`: its metadata `synonyms`, else one name per
    class from `stuff_classes` (all classes, Mask2Former convention) or `thing_classes`."""
    meta = MetadataCatalog.get(dataset_name)
    if hasattr(meta, "synonyms"):
        return [list(names) for names in meta.synonyms]
    for key in ("stuff_classes", "thing_classes"):
        if hasattr(meta, key):
            return [[name] for name in getattr(meta, key)]
    raise KeyError(
        f"Dataset {dataset_name!r} has no 'synonyms', 'stuff_classes' or 'thing_classes' in its "
        f"metadata; register it (openseg.data.datasets) before asking for its vocabulary."
    )


def register_vocabulary(name: str, thing_classes: List[List[str]], stuff_classes: List[List[str]]) -> str:
    """Register metadata for a vocabulary given at run time (e.g. on the command line) and
    return its name. Each class is a list of names, the first its display name; things come
    first, so contiguous ids 0..T-1 are things (Mask2Former's convention: `stuff_classes`
    lists every class)."""
    classes = [list(synonyms) for synonyms in list(thing_classes) + list(stuff_classes)]
    validate_vocabulary(classes)
    names = [synonyms[0] for synonyms in classes]
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        thing_classes=names[: len(thing_classes)],
        stuff_classes=names,
        synonyms=classes,
        thing_dataset_id_to_contiguous_id={i: i for i in range(len(thing_classes))},
        stuff_dataset_id_to_contiguous_id={i: i for i in range(len(classes))},
        ignore_label=255,
        label_divisor=1000,
    )
    return name


VOCABULARY_DIR = os.path.join(os.path.dirname(__file__), "vocabularies")

# Which file of `vocabularies/<source>/` names the classes of a registered dataset, and the
# slice of its lines the dataset uses (Pascal VOC-20 is VOC-21 without "background", as in
# FC-CLIP's release). Keys are regular expressions over dataset names.
RELEASE_VOCABULARIES: Dict[str, Dict[str, tuple]] = {
    "fcclip": {
        r"openseg_coco_2017_(train|val)_panoptic(_filtrefgumdval)?": ("coco_panoptic", 0, None),
        r"openseg_ade20k_(train|val)_panoptic": ("ade20k_150", 0, None),
        r"openseg_ade20k_sem_seg_(train|val)": ("ade20k_150", 0, None),
        r"openseg_ade20k_full_sem_seg_(train|val)": ("ade20k_847", 0, None),
        r"openseg_cityscapes_fine_panoptic_(train|val)": ("cityscapes", 0, None),
        r"openseg_pascal_context59_sem_seg_val": ("pascal_context_59", 0, None),
        r"openseg_pascal_context459_sem_seg_val": ("pascal_context_459", 0, None),
        r"openseg_pascal_voc20_sem_seg_val": ("pascal_voc_21", 1, None),
    },
}


def read_vocabulary_file(path: str) -> Vocabulary:
    """A vocabulary file: one class per line ("name,synonym,..."), `#` lines are comments."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    return [split_synonyms(line) for line in lines]


def release_vocabulary(source: str, dataset_name: str) -> Optional[Vocabulary]:
    """The synonym lists a released method uses for `dataset_name` (e.g. source "fcclip":
    FC-CLIP's `*_with_prompt_eng.txt` lists, shipped in `vocabularies/fcclip/`), or None when
    the method has none for that dataset (then use `get_vocabulary`). Raises when the file's
    class count differs from the registered dataset's."""
    if source not in RELEASE_VOCABULARIES:
        raise KeyError(f"unknown vocabulary source {source!r}; known: {sorted(RELEASE_VOCABULARIES)}")
    for pattern, (file_name, start, end) in RELEASE_VOCABULARIES[source].items():
        if re.fullmatch(pattern, dataset_name):
            path = os.path.join(VOCABULARY_DIR, source, f"{file_name}.txt")
            vocabulary = read_vocabulary_file(path)[start:end]
            registered = len(get_vocabulary(dataset_name))
            if len(vocabulary) != registered:
                raise ValueError(
                    f"{path} names {len(vocabulary)} classes but dataset {dataset_name!r} has "
                    f"{registered}; the file does not describe this dataset."
                )
            return vocabulary
    return None
