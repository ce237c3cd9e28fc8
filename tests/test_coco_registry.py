"""COCO registration: lazy, clear errors for missing files, and the semantic-from-panoptic
preparation on a miniature COCO built from the demo data."""

import json
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.coco import register_all_coco
from openseg.data.datasets.common import DatasetNotFoundError, dataset_root
from openseg.data.datasets.demo import generate_demo, split_paths
from openseg.data.vocab import validate_vocabulary
from script_utils import load_script

REPO = Path(__file__).resolve().parents[1]
# demo category id -> a COCO category of the same kind (things stay things)
COCO_NAMES = [
    "person",
    "car",
    "dog",
    "bottle",
    "sky-other-merged",
    "grass-merged",
    "water-other",
    "sand",
]


@pytest.fixture
def coco_root(tmp_path, monkeypatch):
    """$OPENSEG_DATASETS -> an empty tmp dir, COCO re-registered there (restored afterwards)."""
    default_root = dataset_root()
    monkeypatch.setenv("OPENSEG_DATASETS", str(tmp_path))
    register_all_coco(dataset_root())
    yield tmp_path
    register_all_coco(default_root)


def _mini_coco(root: Path) -> Tuple[dict, dict]:
    """COCO val2017 layout holding 3 demo images with COCO category ids; returns the map
    demo contiguous id -> COCO contiguous id, computed from detectron2's category list."""
    demo = split_paths(generate_demo(root / "demo_src", num_train=1, num_val=3), "val")
    coco_ids = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    contiguous = {c["id"]: i for i, c in enumerate(sorted(COCO_CATEGORIES, key=lambda c: c["id"]))}
    demo_to_coco = {i + 1: coco_ids[name] for i, name in enumerate(COCO_NAMES)}
    coco = root / "coco"
    shutil.copytree(demo["image_root"], coco / "val2017")
    shutil.copytree(demo["panoptic_root"], coco / "panoptic_val2017")
    (coco / "annotations").mkdir()
    for source, target in (
        (demo["panoptic_json"], "panoptic_val2017.json"),
        (demo["json_file"], "instances_val2017.json"),
    ):
        data = json.loads(Path(source).read_text())
        for category in data["categories"]:
            category["id"] = demo_to_coco[category["id"]]
        for annotation in data["annotations"]:
            for item in annotation.get("segments_info", [annotation]):
                item["category_id"] = demo_to_coco[item["category_id"]]
        (coco / "annotations" / target).write_text(json.dumps(data))
    return {demo_id - 1: contiguous[coco_id] for demo_id, coco_id in demo_to_coco.items()}, demo


def test_missing_coco_names_path_and_download(coco_root):
    with pytest.raises(DatasetNotFoundError) as error:
        DatasetCatalog.get("openseg_coco_2017_val_panoptic")
    assert str(coco_root / "coco" / "val2017") in str(error.value)
    assert "cocodataset.org" in str(error.value)
    with pytest.raises(DatasetNotFoundError, match="instances_val2017.json"):
        (coco_root / "coco" / "val2017").mkdir(parents=True)
        DatasetCatalog.get("openseg_coco_2017_val_instance")


def test_prepare_semantic_then_load(coco_root):
    demo_to_coco, demo = _mini_coco(coco_root)
    semseg_dir = coco_root / "coco" / "panoptic_semseg_val2017"
    with pytest.raises(DatasetNotFoundError) as error:
        DatasetCatalog.get("openseg_coco_2017_val_panoptic")
    assert str(semseg_dir) in str(error.value)
    assert "prepare_coco_semantic_from_panoptic.py" in str(error.value)

    script = load_script("datasets/prepare_coco_semantic_from_panoptic.py")
    script.prepare_split(coco_root, "val", workers=1)

    dicts = DatasetCatalog.get("openseg_coco_2017_val_panoptic")
    assert len(dicts) == 3
    lookup = np.full(256, 255, np.uint8)
    for demo_id, coco_id in demo_to_coco.items():
        lookup[demo_id] = coco_id
    for record in dicts:
        stem = Path(record["file_name"]).stem
        demo_semantic = np.asarray(Image.open(Path(demo["sem_seg_root"]) / f"{stem}.png"))
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert np.array_equal(semantic, lookup[demo_semantic])
        assert {s["category_id"] for s in record["segments_info"]} <= set(demo_to_coco.values())

    instances = DatasetCatalog.get("openseg_coco_2017_val_instance")
    thing_ids = {a["category_id"] for record in instances for a in record["annotations"]}
    assert thing_ids <= {demo_to_coco[i] for i in range(4)} and thing_ids


def test_coco_metadata_contract():
    meta = MetadataCatalog.get("openseg_coco_2017_train_panoptic")
    assert len(meta.stuff_classes) == 133 and meta.stuff_classes[:80] == meta.thing_classes
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(80))
    assert sorted(meta.stuff_dataset_id_to_contiguous_id.values()) == list(range(133))
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    assert meta.evaluators == ["panoptic", "semantic", "instance"]
    validate_vocabulary(meta.synonyms)
    instance_meta = MetadataCatalog.get("openseg_coco_2017_val_instance")
    assert instance_meta.thing_classes == meta.thing_classes and instance_meta.evaluators == [
        "instance"
    ]
