"""LVIS-OW and COCO -> LVIS preparation on a generated 8-class LVIS-format file with
hand-computed statistics, the shipped class lists against the release's, the real files when
present (Table 1), the registrations, and the demo open-world split."""

import json
import os
from pathlib import Path

import pytest
from script_utils import load_script
from detectron2.data import DatasetCatalog, MetadataCatalog

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.common import DatasetNotFoundError, dataset_root
from openseg.data.datasets.lvis_ow import lvis_ow_class_lists, register_all_lvis_ow

REPO = Path(__file__).resolve().parents[1]

# id, synset, frequency: 1 and 2 are COCO classes (person, cow); 6 and 7 are rare
CATEGORIES = [
    (1, "person.n.01", "f"),
    (2, "beef.n.01", "f"),
    (3, "banner.n.01", "f"),
    (4, "knob.n.02", "f"),
    (5, "lamp.n.02", "c"),
    (6, "gargoyle.n.01", "r"),
    (7, "kazoo.n.01", "r"),
    (8, "mug.n.04", "c"),
]
# image id -> LVIS's federated labels (not exhaustive, verified absent), LVIS ids
FEDERATED = {101: ([4], [2, 8]), 103: ([], [5])}
# image id -> LVIS categories of its annotations
LVIS_TRAIN = {101: [1, 4, 4, 3], 102: [4, 4, 5, 6], 103: [4, 1, 1, 8], 104: [3, 3, 5], 105: [1, 7]}
LVIS_VAL = {201: [6, 5], 202: [1, 8]}
# (image id, COCO category id, iscrowd): 1 person, 21 cow, 58 hot dog (no LVIS v1 synset);
# 999 is in no LVIS split, 201 is a COCO train2017 image that LVIS puts in val
COCO_TRAIN = [
    (101, 1, 0), (101, 21, 0), (103, 1, 1), (102, 21, 0), (999, 1, 0), (104, 58, 0), (201, 1, 0)
]


def square(index: int):
    x = 4 * (index % 10)
    return {"segmentation": [[x, 0, x + 4, 0, x + 4, 4, x, 4]], "bbox": [x, 0, 4, 4], "area": 16}


def lvis_file(images, split, first_id):
    annotations, ann_id = [], first_id
    for image_id, classes in images.items():
        for category in classes:
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": category, **square(ann_id)}
            )
            ann_id += 1
    return {
        "images": [
            {
                "id": i,
                "height": 40,
                "width": 40,
                "neg_category_ids": FEDERATED.get(i, ([], []))[1],
                "not_exhaustive_category_ids": FEDERATED.get(i, ([], []))[0],
                "coco_url": f"http://images.cocodataset.org/{split}2017/{i:012d}.jpg",
            }
            for i in images
        ],
        "annotations": annotations,
        "categories": [
            {"id": i, "name": s.split(".")[0], "synset": s, "frequency": f, "synonyms": []}
            for i, s, f in CATEGORIES
        ],
    }


@pytest.fixture()
def lvis_root(tmp_path):
    (tmp_path / "lvis").mkdir()
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with open(tmp_path / "lvis" / "lvis_v1_train.json", "w") as f:
        json.dump(lvis_file(LVIS_TRAIN, "train", 1), f)
    with open(tmp_path / "lvis" / "lvis_v1_val.json", "w") as f:
        json.dump(lvis_file(LVIS_VAL, "val", 1), f)  # ids collide with train on purpose
    coco = {
        "images": [
            {"id": i, "height": 40, "width": 40, "file_name": f"{i:012d}.jpg"}
            for i in (101, 102, 103, 104, 105, 201, 999)
        ],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "iscrowd": crowd, **square(n)}
            for n, (i, c, crowd) in enumerate(COCO_TRAIN, start=1)
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 21, "name": "cow"},
            {"id": 58, "name": "hot dog"},
        ],
    }
    with open(tmp_path / "coco" / "annotations" / "instances_train2017.json", "w") as f:
        json.dump(coco, f)
    yield tmp_path
    register_all_lvis_ow(dataset_root())


def load_prepare_lvis_ow():
    return load_script("datasets/prepare_lvis_ow.py")


LISTS = {"frequent_64": [1, 4], "unseen": [6, 7]}  # the release's lists on this toy vocabulary


def test_derived_class_lists_by_hand(lvis_root):
    script = load_prepare_lvis_ow()
    lvis_train = json.loads((lvis_root / "lvis" / "lvis_v1_train.json").read_text())
    # top-2 by LVIS train instances: knob (5), person (4); rare: gargoyle, kazoo
    assert script.derive_class_lists(lvis_train, num_frequent=2) == LISTS


def test_prepare_statistics_by_hand(lvis_root):
    script = load_prepare_lvis_ow()
    stats = script.prepare(lvis_root, class_lists=LISTS)
    # known = COCO {person 1, cow 2} + frequent {person 1, knob 4}; unseen = {6, 7};
    # seen = {3, 5, 8}. Images 102 and 105 hold unseen classes -> test; 101, 103, 104 train.
    # Training labels: LVIS's known on 101 (1, 4, 4) and 103 (4, 1, 1) AND COCO's on 101
    # (person, cow) and 103 (person, crowd); COCO's on 102 (moved), 999 (not LVIS) and the
    # hot dog on 104 (no LVIS synset) are not
    assert stats["train_known"] == {"classes": 3, "instances": 9, "images": 2}
    # seen classes in training images, unlabelled: banner on 101, mug on 103, 3 + 3 + 5 on 104
    assert stats["train_seen"] == {"classes": 3, "instances": 5, "images": 3}
    # test = val 201 (6, 5), 202 (1, 8) + moved 102 (4, 4, 5, 6), 105 (1, 7)
    assert stats["test_known"] == {"classes": 2, "instances": 4, "images": 3}
    assert stats["test_seen"] == {"classes": 2, "instances": 3, "images": 3}
    assert stats["test_unseen"] == {"classes": 2, "instances": 3, "images": 3}
    assert stats["images"] == {
        "train": 3,
        "test": 4,
        "test_from_lvis_val": 2,
        "test_moved_from_train": 2,
    }
    assert stats["train_labels"] == {"lvis": 6, "coco": 3, "crowd": 1}
    # Table 4's set: COCO's labels on all LVIS train images (101-105), COCO ids and classes;
    # not on 201 (LVIS val) nor 999
    assert stats["coco_lvis_train"] == {
        "images": 5, "instances": 5, "lvis_train_images_not_in_coco_train": 0
    }
    text = script.format_statistics(stats)
    assert "1511257" in text and "training labels: 6 LVIS + 3 COCO (1 crowd)" in text

    splits = json.loads((lvis_root / "lvis" / "lvis_ow_splits.json").read_text())
    assert splits == {"known": [0, 1, 3], "seen": [2, 4, 7], "unseen": [5, 6]}
    train = json.loads((lvis_root / "lvis" / "lvis_ow_train.json").read_text())
    labels = sorted((a["image_id"], a["category_id"], a["iscrowd"]) for a in train["annotations"])
    assert labels == sorted(
        [(101, 1, 0), (101, 4, 0), (101, 4, 0), (103, 4, 0), (103, 1, 0), (103, 1, 0)]
        + [(101, 1, 0), (101, 2, 0), (103, 1, 1)]
    )
    assert sorted(a["id"] for a in train["annotations"]) == list(range(1, 10))
    assert sorted(im["file_name"] for im in train["images"]) == [
        f"train2017/{i:012d}.jpg" for i in (101, 103, 104)
    ]
    test = json.loads((lvis_root / "lvis" / "lvis_ow_test.json").read_text())
    assert len({a["id"] for a in test["annotations"]}) == len(test["annotations"]) == 10
    assert {im["id"] for im in test["images"]} == {201, 202, 102, 105}
    coco_lvis = json.loads((lvis_root / "lvis" / "coco_lvis_train.json").read_text())
    assert sorted(im["id"] for im in coco_lvis["images"]) == [101, 102, 103, 104, 105]
    assert sorted((a["image_id"], a["category_id"]) for a in coco_lvis["annotations"]) == [
        (101, 1), (101, 21), (102, 21), (103, 1), (104, 58)
    ]


def test_known_and_unseen_must_be_disjoint(lvis_root):
    with pytest.raises(ValueError, match="both known and unseen"):
        load_prepare_lvis_ow().prepare(lvis_root, class_lists={"frequent_64": [4, 6], "unseen": [6, 7]})


def test_shipped_lists_are_the_release_lists():
    """openseg's data file against the release's lists (fixture written from the release by
    tools/reference_fixtures/lvis_ow_lists.py) and against LVIS v1's own metadata."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    lists = lvis_ow_class_lists()
    release = json.loads((REPO / "tests/fixtures/reference/lvis_ow_lists/lists.json").read_text())
    assert lists["frequent_64"] == release["frequent_64"]
    assert lists["unseen"] == release["unseen"]
    by_synset = {c["synset"]: c["id"] for c in LVIS_CATEGORIES}
    coco = {by_synset[s] for s in load_prepare_lvis_ow().COCO_NAME_TO_LVIS_SYNSET.values() if s in by_synset}
    assert sorted(coco) == release["coco"] and len(coco) == 79
    assert sorted(coco | set(lists["frequent_64"])) == release["known"]
    assert len(release["known"]) == 123  # Table 1
    assert lists["unseen"] == sorted(c["id"] for c in LVIS_CATEGORIES if c["frequency"] == "r")
    frequency = {c["id"]: c["frequency"] for c in LVIS_CATEGORIES}
    assert {frequency[i] for i in lists["frequent_64"]} == {"f"}


# conftest points $OPENSEG_DATASETS at a throw-away folder, so the real files are looked up in
# $OPENSEG_REAL_DATASETS, else the checkout's datasets/ (detectron2's default root)
REAL = Path(os.environ.get("OPENSEG_REAL_DATASETS", REPO / "datasets"))
REAL_FILES = [
    REAL / "lvis" / "lvis_v1_train.json",
    REAL / "lvis" / "lvis_v1_val.json",
    REAL / "coco" / "annotations" / "instances_train2017.json",
]


@pytest.mark.skipif(
    not all(p.exists() for p in REAL_FILES),
    reason=f"real LVIS v1 / COCO 2017 annotations not under {REAL} (set OPENSEG_REAL_DATASETS "
    "to the folder holding lvis/lvis_v1_{train,val}.json, coco/annotations/instances_train2017.json)",
)
def test_real_files_give_table1(tmp_path):
    """On the real files: the paper's rule gives the release's lists, and the statistics
    are Table 1's (98,708 / 21,271 images)."""
    script = load_prepare_lvis_ow()
    for path in REAL_FILES:
        target = tmp_path / path.relative_to(REAL)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    lvis_train = json.loads(REAL_FILES[0].read_text())
    assert script.derive_class_lists(lvis_train) == lvis_ow_class_lists()
    stats = script.prepare(tmp_path)
    for column, (classes, instances) in script.PAPER_TABLE1.items():
        assert (stats[column]["classes"], stats[column]["instances"]) == (classes, instances)
    assert stats["images"]["train"] == script.PAPER_IMAGES["train"]
    assert stats["images"]["test"] == script.PAPER_IMAGES["test"]
    assert stats["coco_lvis_train"]["lvis_train_images_not_in_coco_train"] == 0


def test_registered_splits_load(lvis_root):
    register_all_lvis_ow(lvis_root)
    with pytest.raises(DatasetNotFoundError, match="prepare_lvis_ow.py"):
        DatasetCatalog.get("openseg_lvis_ow_train")
    load_prepare_lvis_ow().prepare(lvis_root, class_lists=LISTS)
    train = DatasetCatalog.get("openseg_lvis_ow_train")
    assert len(train) == 3
    classes = sorted(a["category_id"] for d in train for a in d["annotations"] if not a["iscrowd"])
    assert classes == [0, 0, 0, 0, 1, 3, 3, 3]  # contiguous = LVIS id - 1
    # LVIS's federated labels of each image, LVIS ids and contiguous ids (SegPrompt's classes)
    federated = {
        d["image_id"]: (
            d["not_exhaustive_category_ids"], d["neg_category_ids"],
            d["not_exhaustive_classes"], d["neg_classes"],
        )
        for d in train
    }
    assert federated == {
        101: ([4], [2, 8], [3], [1, 7]), 103: ([], [5], [], [4]), 104: ([], [], [], []),
    }
    meta = MetadataCatalog.get("openseg_lvis_ow_test")
    assert meta.class_splits == {"known": [0, 1, 3], "seen": [2, 4, 7], "unseen": [5, 6]}
    assert meta.evaluators == ["open_world_ar"] and len(meta.thing_classes) == 1203
    assert len(DatasetCatalog.get("openseg_lvis_ow_test")) == 4
    (lvis_root / "coco" / "train2017").mkdir()
    coco_lvis = DatasetCatalog.get("openseg_coco_lvis_train")
    assert sorted(d["image_id"] for d in coco_lvis) == [101, 102, 103, 104, 105]
    # COCO contiguous ids: person 0, cow 19, hot dog 52
    labels = sorted(a["category_id"] for d in coco_lvis for a in d["annotations"])
    assert labels == [0, 0, 19, 19, 52]
    assert len(MetadataCatalog.get("openseg_coco_lvis_train").thing_classes) == 80


def test_federated_labels_pass_the_mapper(lvis_root):
    """The instance mapper keeps the dict's federated class ids for the model's targets."""
    import numpy as np
    from PIL import Image

    from openseg.config import load_config
    from openseg.data.mappers import build_mapper

    register_all_lvis_ow(lvis_root)
    load_prepare_lvis_ow().prepare(lvis_root, class_lists=LISTS)
    record = next(d for d in DatasetCatalog.get("openseg_lvis_ow_train") if d["image_id"] == 101)
    Path(record["file_name"]).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(record["file_name"])
    cfg = load_config(
        opts=["INPUT.DATASET_MAPPER_NAME", "instance", "INPUT.MIN_SIZE_TRAIN", "(40,)"]
    )
    mapped = build_mapper(cfg, is_train=True)(record)
    assert mapped["not_exhaustive_classes"] == [3] and mapped["neg_classes"] == [1, 7]
    assert len(mapped["instances"]) > 0


def test_unknown_federated_category_is_reported():
    from openseg.data.datasets.lvis import add_federated_classes

    record = {}
    add_federated_classes(record, {"id": 7, "neg_category_ids": [2]}, {1: 0, 2: 1})
    assert record == {
        "not_exhaustive_category_ids": [], "not_exhaustive_classes": [],
        "neg_category_ids": [2], "neg_classes": [1],
    }
    with pytest.raises(ValueError, match="image 7: neg_category_ids \\[9\\]"):
        add_federated_classes({}, {"id": 7, "neg_category_ids": [9]}, {1: 0, 2: 1})


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lvis_v1_train.json"):
        load_prepare_lvis_ow().prepare(tmp_path)


def test_demo_open_world_split():
    full = DatasetCatalog.get("openseg_demo_train")
    train = DatasetCatalog.get("openseg_demo_ow_train")
    assert len(train) == len(full)
    assert {a["category_id"] for d in train for a in d["annotations"]} == {0, 1}
    present = {a["category_id"] for d in full for a in d["annotations"]}
    assert 2 in present and 3 not in present  # triangle seen (unlabelled), cross unseen
    val = DatasetCatalog.get("openseg_demo_ow_val")
    assert 3 in {a["category_id"] for d in val for a in d["annotations"]}
    meta = MetadataCatalog.get("openseg_demo_ow_val")
    assert meta.class_splits == {"known": [0, 1], "seen": [2], "unseen": [3]}
    assert Path(meta.json_file).exists()


def test_demo_open_world_large_val_extends_val(tmp_path, monkeypatch):
    """openseg_demo_ow_val_large (the SegPrompt demo benchmark's test set) starts with the very
    images and labels of openseg_demo_ow_val, crosses included, in its own directory; a 40-image
    version keeps the test fast."""
    from openseg.data.datasets import lvis_ow

    monkeypatch.setattr(lvis_ow, "DEMO_OW_LARGE_VAL", 40)
    large = lvis_ow.load_demo_ow_val_large(tmp_path)
    val = DatasetCatalog.get("openseg_demo_ow_val")
    assert len(large) == 40 and len(val) == 32
    assert all(Path(d["file_name"]).is_relative_to(tmp_path) for d in large)
    for small, big in zip(val, large):
        assert Path(small["file_name"]).name == Path(big["file_name"]).name
        assert small["image_id"] == big["image_id"]
        assert [(a["category_id"], a["segmentation"]) for a in small["annotations"]] == [
            (a["category_id"], a["segmentation"]) for a in big["annotations"]
        ]
    assert 3 in {a["category_id"] for d in large[32:] for a in d["annotations"]}
    meta = MetadataCatalog.get("openseg_demo_ow_val_large")
    assert meta.class_splits == {"known": [0, 1], "seen": [2], "unseen": [3]}
    assert meta.evaluators == ["open_world_ar"]


def test_demo_open_world_shapes_split(tmp_path, monkeypatch):
    """openseg_demo_ow_shapes (60 / 30 images here): training labels are the 7 known shapes;
    the 2 seen shapes are drawn in training images (in the file, without labels), the 3 unseen
    never; val draws and labels all 12; each image holds 1-4 shapes."""
    from openseg.data.datasets import lvis_ow
    from openseg.data.datasets.demo import split_paths

    monkeypatch.setattr(lvis_ow, "DEMO_OW_SHAPES_IMAGES", {"train": 60, "val": 30})
    train = lvis_ow.load_demo_ow_shapes(tmp_path, "train")
    val = lvis_ow.load_demo_ow_shapes(tmp_path, "val")
    assert len(train) == 60 and len(val) == 30
    assert len({d["image_id"] for d in train + val}) == 90
    labels = [a["category_id"] for d in train for a in d["annotations"]]
    assert set(labels) == set(range(7))
    drawn = json.loads(
        Path(split_paths(tmp_path / "openseg_demo_ow_shapes", "train")["json_file"]).read_text()
    )["annotations"]
    drawn_ids = [a["category_id"] - 1 for a in drawn]
    assert set(drawn_ids) == set(range(9))  # known and seen drawn, unseen (9, 10, 11) never
    assert len(labels) == sum(i < 7 for i in drawn_ids)  # exactly the seen labels dropped
    assert {a["category_id"] for d in val for a in d["annotations"]} == set(range(12))
    assert all(1 <= len(d["annotations"]) <= 4 for d in val)
    meta = MetadataCatalog.get("openseg_demo_ow_shapes_val")
    assert meta.class_splits == {"known": list(range(7)), "seen": [7, 8], "unseen": [9, 10, 11]}
    assert [meta.thing_classes[i] for i in (7, 8, 9, 10, 11)] == [
        "hexagon", "ell", "cross", "crescent", "star"
    ]
    assert meta.evaluators == ["open_world_ar"]


def test_demo_open_world_shapes_configs():
    """The three shapes configs train on the shapes split and test on its val; SegPrompt's
    C_max covers every known class."""
    from openseg.config import load_config

    for name in ("segprompt_R18_shapes", "segprompt_R18_shapes_baseline",
                 "segprompt_R18_shapes_class_aware"):
        cfg = load_config(str(REPO / "configs" / "demo" / f"{name}.yaml"))
        assert cfg.DATASETS.TRAIN == ("openseg_demo_ow_shapes_train",)
        assert cfg.DATASETS.TEST == ("openseg_demo_ow_shapes_val",)
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 12
    assert cfg.MODEL.META_ARCHITECTURE == "OpenSegMaskFormer"  # the class-aware one
    segprompt = load_config(str(REPO / "configs" / "demo" / "segprompt_R18_shapes.yaml"))
    assert segprompt.MODEL.SEGPROMPT.AUXILIARY == "segprompt"
    assert segprompt.MODEL.SEGPROMPT.MAX_PROMPT_CLASSES == 7


@pytest.mark.parametrize(
    "config, train, num_classes, agnostic, segprompt",
    [
        ("lvis/maskformer_R50_class_aware", "openseg_lvis_v1_train", 1203, False, False),
        ("lvis/maskformer_R50_class_agnostic", "openseg_lvis_v1_train", 1203, True, False),
        ("lvis/segprompt_R50", "openseg_lvis_v1_train", 1203, True, True),
        ("coco_lvis/maskformer_R50_class_aware", "openseg_coco_lvis_train", 80, False, False),
        ("coco_lvis/maskformer_R50_class_agnostic", "openseg_coco_lvis_train", 80, True, False),
        ("coco_lvis/segprompt_R50", "openseg_coco_lvis_train", 80, True, True),
    ],
)
def test_table3_table4_configs(config, train, num_classes, agnostic, segprompt):
    """Table 3 (full LVIS) and Table 4 (COCO -> LVIS): training set, LVIS v1 val as test set,
    LVIS's class-agnostic AR_s/m/l, and the release's schedule for Table 3."""
    from openseg.config import load_config

    cfg = load_config(str(REPO / "configs" / f"{config}.yaml"))
    assert cfg.DATASETS.TRAIN == (train,) and cfg.DATASETS.TEST == ("openseg_lvis_v1_val",)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes
    assert cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC == agnostic
    assert (cfg.MODEL.META_ARCHITECTURE == "SegPromptMaskFormer") == segprompt
    assert cfg.TEST.EVALUATORS == ["open_world_ar"]
    assert cfg.TEST.OPEN_WORLD.MAX_DETS == 100
    assert cfg.TEST.OPEN_WORLD.AREA_RECALL == "class_agnostic"
    assert len(MetadataCatalog.get(train).thing_classes) == num_classes
    if config.startswith("lvis/"):  # as the release's configs/lvis/*.yaml
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (368750, (327778, 355092))
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
        sampler = "TrainingSampler" if segprompt else "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.SAMPLER_TRAIN == sampler
