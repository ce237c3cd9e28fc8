"""LVIS-OW preparation on a generated 8-class LVIS-format file with hand-computed statistics,
its registration, and the demo open-world split."""

import importlib.util
import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.common import DatasetNotFoundError, dataset_root
from openseg.data.datasets.lvis_ow import register_all_lvis_ow

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
# image id -> LVIS categories of its annotations
LVIS_TRAIN = {101: [1, 4, 4, 3], 102: [4, 4, 5, 6], 103: [4, 1, 1, 8], 104: [3, 3, 5], 105: [1, 7]}
LVIS_VAL = {201: [6, 5], 202: [1, 8]}
# (image id, COCO category id, iscrowd): 1 person, 21 cow, 58 hot dog (no LVIS v1 synset)
COCO_TRAIN = [(101, 1, 0), (101, 21, 0), (103, 1, 1), (102, 21, 0), (999, 1, 0), (104, 58, 0)]


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
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
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
            for i in (101, 102, 103, 104, 999)
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


def load_script():
    spec = importlib.util.spec_from_file_location(
        "prepare_lvis_ow", REPO / "datasets" / "prepare_lvis_ow.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_prepare_statistics_by_hand(lvis_root):
    script = load_script()
    stats = script.prepare(lvis_root, num_frequent=2)
    # top-2 by LVIS train instances: knob (5), person (4); known = COCO {person, cow} + them;
    # unseen = rare {gargoyle, kazoo}; images 102 and 105 hold unseen classes -> test
    assert stats["known"] == {
        "classes": 3,
        "train_images": 2,
        "train_instances": 6,
        "test_images": 3,
        "test_instances": 4,
    }
    assert stats["seen"] == {
        "classes": 3,
        "train_images": 3,
        "train_instances": 5,
        "test_images": 3,
        "test_instances": 3,
    }
    assert stats["unseen"] == {
        "classes": 2,
        "train_images": 0,
        "train_instances": 0,
        "test_images": 3,
        "test_instances": 3,
    }
    assert stats["total"] == {
        "train_labels": 6,
        "train_images": 3,
        "test_images": 4,
        "test_images_from_val": 2,
        "test_images_moved_from_train": 2,
    }
    assert "known" in script.format_statistics(stats)

    splits = json.loads((lvis_root / "lvis" / "lvis_ow_splits.json").read_text())
    assert splits == {"known": [0, 1, 3], "seen": [2, 4, 7], "unseen": [5, 6]}
    train = json.loads((lvis_root / "lvis" / "lvis_ow_train.json").read_text())
    # LVIS knob x3 on kept images; COCO person, cow, person (crowd) replace LVIS's person
    labels = sorted((a["image_id"], a["category_id"], a["iscrowd"]) for a in train["annotations"])
    assert labels == [(101, 1, 0), (101, 2, 0), (101, 4, 0), (101, 4, 0), (103, 1, 1), (103, 4, 0)]
    assert sorted(im["file_name"] for im in train["images"]) == [
        f"train2017/{i:012d}.jpg" for i in (101, 103, 104)
    ]
    test = json.loads((lvis_root / "lvis" / "lvis_ow_test.json").read_text())
    assert len({a["id"] for a in test["annotations"]}) == len(test["annotations"]) == 10
    assert {im["id"] for im in test["images"]} == {201, 202, 102, 105}


def test_registered_splits_load(lvis_root):
    register_all_lvis_ow(lvis_root)
    with pytest.raises(DatasetNotFoundError, match="prepare_lvis_ow.py"):
        DatasetCatalog.get("openseg_lvis_ow_train")
    load_script().prepare(lvis_root, num_frequent=2)
    train = DatasetCatalog.get("openseg_lvis_ow_train")
    assert len(train) == 3
    classes = sorted(a["category_id"] for d in train for a in d["annotations"])
    assert classes == [0, 0, 1, 3, 3, 3]  # contiguous = LVIS id - 1
    meta = MetadataCatalog.get("openseg_lvis_ow_test")
    assert meta.class_splits == {"known": [0, 1, 3], "seen": [2, 4, 7], "unseen": [5, 6]}
    assert meta.evaluators == ["open_world_ar"] and len(meta.thing_classes) == 1203
    assert len(DatasetCatalog.get("openseg_lvis_ow_test")) == 4


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lvis_v1_train.json"):
        load_script().prepare(tmp_path)


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
