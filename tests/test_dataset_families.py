"""Dataset families beyond COCO: vocabularies, prepare converters on tiny fake datasets in the
standard layouts, lazy registration and the errors for missing files."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from script_utils import load_script
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES, CITYSCAPES_CATEGORIES
from panopticapi.utils import rgb2id
from PIL import Image

from openseg.data.datasets import ade20k, cityscapes, lvis, pascal_context, pascal_voc, refcoco
from openseg.data.datasets import scannet, sun_rgbd
from openseg.data.datasets.common import ENV_ROOT, DatasetNotFoundError



def load_prepare(name: str):
    """datasets/<name>.py"""
    return load_script(f"datasets/{name}.py")


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def save_jpg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------ vocabularies
@pytest.mark.parametrize(
    "classes, synonyms, size",
    [
        (ade20k.ADE20K_150_CLASSES, ade20k.ADE20K_150_SYNONYMS, 150),
        (cityscapes.CITYSCAPES_19_CLASSES, cityscapes.CITYSCAPES_19_SYNONYMS, 19),
        (pascal_voc.PASCAL_VOC_20_CLASSES, pascal_voc.PASCAL_VOC_20_SYNONYMS, 20),
        (pascal_context.PASCAL_CONTEXT_59_CLASSES, pascal_context.PASCAL_CONTEXT_59_SYNONYMS, 59),
        (sun_rgbd.SUN_RGBD_37_CLASSES, sun_rgbd.SUN_RGBD_37_SYNONYMS, 37),
        (scannet.SCANNET_20_CLASSES, scannet.SCANNET_20_SYNONYMS, 20),
        (scannet.SCANNET_40_CLASSES, scannet.SCANNET_40_SYNONYMS, 40),
        (lvis.LVIS_V1_CLASSES, lvis.LVIS_V1_SYNONYMS, 1203),
    ],
)
def test_vocabulary_sizes_and_synonyms(classes, synonyms, size):
    assert len(classes) == size and len(set(classes)) == size
    assert len(synonyms) == size
    assert all(s[0] == c and len(set(s)) == len(s) for c, s in zip(classes, synonyms))
    other_names = [set(classes) - {c} for c in classes]
    assert all(not set(s[1:]) & others for s, others in zip(synonyms, other_names))


def test_ade150_matches_detectron2_order_and_things():
    # detectron2 ships abbreviated ADE-150 names: each must be among (or inside) our lemmas
    for short, lemmas in zip(ADE20K_SEM_SEG_CATEGORIES, ade20k.ADE20K_150_WORDNET_NAMES):
        assert any(part.strip() in lemmas for part in short.split(",")), (short, lemmas)
    things = ade20k.ADE20K_150_THING_IDS
    assert len(things) == 100 == len(set(things)) and things == sorted(things)
    assert {ade20k.ADE20K_150_CLASSES[i] for i in (12, 20, 149)} <= {
        ade20k.ADE20K_150_CLASSES[i] for i in things
    }  # person, car, flag are things
    assert not {0, 1, 2, 3} & set(things)  # wall, building, sky, floor are stuff


def test_cityscapes_classes_match_detectron2():
    evaluated = [c for c in CITYSCAPES_CATEGORIES if c["trainId"] != 255]
    assert [c["id"] for c in evaluated] == [c.label_id for c in cityscapes.CITYSCAPES_19]
    assert [bool(c["isthing"]) for c in evaluated] == [c.is_thing for c in cityscapes.CITYSCAPES_19]


def test_scannet20_is_subset_of_scannet40():
    assert scannet.SCANNET_40_CLASSES[23] == "refrigerator"  # nyu40id 24
    assert scannet.SCANNET_20_CLASSES[-1] == "other furniture"  # nyu40id 39


# ------------------------------------------------------------------ missing data
REGISTER_ALL = {
    "ade20k": ade20k.register_all_ade20k,
    "lvis": lvis.register_all_lvis,
    "cityscapes": cityscapes.register_all_cityscapes,
    "pascal_voc": pascal_voc.register_all_pascal_voc,
    "pascal_context": pascal_context.register_all_pascal_context,
    "sun_rgbd": sun_rgbd.register_all_sun_rgbd,
    "scannet": scannet.register_all_scannet,
    "refcoco": refcoco.register_all_refcoco,
}


@pytest.mark.parametrize(
    "family, name, missing, prepare",
    [
        (
            "ade20k",
            "openseg_ade20k_val_panoptic",
            "ade20k_panoptic_val.json",
            "prepare_ade20k_pan_seg.py",
        ),
        ("ade20k", "openseg_ade20k_sem_seg_val", "images/validation", "prepare_ade20k_sem_seg.py"),
        (
            "ade20k",
            "openseg_ade20k_instance_train",
            "ade20k_instance_train.json",
            "prepare_ade20k_ins_seg.py",
        ),
        (
            "ade20k",
            "openseg_ade20k_full_sem_seg_val",
            "images_detectron2/validation",
            "prepare_ade20k_full.py",
        ),
        ("lvis", "openseg_lvis_v1_val", "lvis_v1_val.json", "lvis_v1_val.json"),
        ("cityscapes", "openseg_cityscapes_fine_panoptic_val", "leftImg8bit/val", "leftImg8bit"),
        ("pascal_voc", "openseg_pascal_voc20_sem_seg_val", "JPEGImages", "prepare_pascal_voc.py"),
        (
            "pascal_context",
            "openseg_pascal_context459_sem_seg_val",
            "JPEGImages",
            "prepare_pascal_context.py",
        ),
        (
            "pascal_context",
            "openseg_pascal_context459_sem_seg_train",
            "JPEGImages",
            "prepare_pascal_context.py",
        ),
        (
            "sun_rgbd",
            "openseg_sun_rgbd37_sem_seg_val",
            "images_detectron2/val",
            "prepare_sun_rgbd.py",
        ),
        ("scannet", "openseg_scannet40_sem_seg_val", "images_detectron2/val", "prepare_scannet.py"),
        ("refcoco", "openseg_refcocog_umd_val", "refs(umd).p", "refer"),
    ],
)
def test_missing_dataset_names_path_and_prepare(root, family, name, missing, prepare):
    REGISTER_ALL[family](root / "absent")  # registration must not touch the disk
    with pytest.raises(DatasetNotFoundError) as error:
        DatasetCatalog.get(name)
    assert str(root / "absent") in str(error.value) and missing in str(error.value)
    assert prepare in str(error.value)


def test_lazy_vocabulary_errors_then_reads_prepared_file(root):
    ade20k.register_all_ade20k(root)
    meta = MetadataCatalog.get("openseg_ade20k_full_sem_seg_val")
    assert meta.ignore_label == ade20k.ADE_FULL_IGNORE_LABEL  # eager keys need no files
    with pytest.raises(DatasetNotFoundError, match="prepare_ade20k_full.py"):
        meta.stuff_classes
    (root / "ADE20K_2021_17_01").mkdir()
    entries = ["wall", "person, individual", "screen, crt screen", "screen, silver screen"]
    (root / "ADE20K_2021_17_01" / "classes_847.json").write_text(
        json.dumps([{"id": i, "name": n, "ade_index": 10 + i} for i, n in enumerate(entries)])
    )
    assert meta.stuff_classes == ["wall", "person", "screen, crt screen", "screen, silver screen"]
    assert meta.synonyms[1] == ["person"]


# ------------------------------------------------------------------ ADE20K
def make_ade(root: Path) -> dict:
    """Two validation images with official semantic + instance PNGs, and a catid mapping."""
    ade = root / "ADEChallengeData2016"
    semantic = np.zeros((4, 6), np.uint8)
    semantic[:, :3] = 1  # wall (stuff, id 0)
    semantic[:, 3:] = 3  # sky (stuff, id 2)
    semantic[0, 0] = 0  # unlabeled
    instance = np.zeros((4, 6, 3), np.uint8)
    instance[2:, 4:] = (5, 1, 0)  # instance-track category 5 -> ADE-150 label 13 (person, id 12)
    instance[:2, 1:3] = (2, 2, 0)  # category 2 -> label 21 (car, id 20), covers part of the wall
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        save_jpg(ade / "images" / "validation" / f"{stem}.jpg", 4, 6)
        save_png(ade / "annotations" / "validation" / f"{stem}.png", semantic)
        save_png(ade / "annotations_instance" / "validation" / f"{stem}.png", instance)
    (ade / "ade20k_instance_catid_mapping.txt").write_text(
        "Instance100 SceneParsing150 FullADE20K\n5 13 0\n2 21 0\n"
    )
    return {"semantic": semantic, "instance": instance}


def test_ade_semantic_round_trip(root):
    fake = make_ade(root)
    load_prepare("prepare_ade20k_sem_seg").convert(root / "ADEChallengeData2016", ["validation"])
    ade20k.register_all_ade20k(root)
    dicts = DatasetCatalog.get("openseg_ade20k_sem_seg_val")
    assert [Path(d["file_name"]).name for d in dicts] == [
        "ADE_val_00000001.jpg",
        "ADE_val_00000002.jpg",
    ]
    label = np.asarray(Image.open(dicts[0]["sem_seg_file_name"]))
    expected = np.where(fake["semantic"] == 1, 0, 2)
    expected[0, 0] = 255
    np.testing.assert_array_equal(label, expected)
    assert len(MetadataCatalog.get("openseg_ade20k_sem_seg_val").stuff_classes) == 150


def test_ade_panoptic_and_instance_round_trip(root):
    make_ade(root)
    ade = root / "ADEChallengeData2016"
    load_prepare("prepare_ade20k_sem_seg").convert(ade, ["validation"])
    mapping = ade20k.read_instance_category_mapping(ade / "ade20k_instance_catid_mapping.txt")
    assert mapping == {5: 12, 2: 20}
    load_prepare("prepare_ade20k_pan_seg").convert_split(ade, "val", mapping)
    load_prepare("prepare_ade20k_ins_seg").convert_split(ade, "val", mapping)
    ade20k.register_all_ade20k(root)

    dicts = DatasetCatalog.get("openseg_ade20k_val_panoptic")
    assert len(dicts) == 2 and Path(dicts[0]["sem_seg_file_name"]).exists()
    segment_ids = rgb2id(np.asarray(Image.open(dicts[0]["pan_seg_file_name"]).convert("RGB")))
    by_category = {s["category_id"]: s for s in dicts[0]["segments_info"]}
    # hand-computed: wall = left 3 columns minus the unlabeled pixel and the 4 car pixels
    expected = {
        0: dict(area=12 - 1 - 4, bbox=[0, 1, 3, 3], isthing=False),  # row 0 is void or car
        2: dict(area=12 - 4, bbox=[3, 0, 3, 4], isthing=False),
        12: dict(area=4, bbox=[4, 2, 2, 2], isthing=True),
        20: dict(area=4, bbox=[1, 0, 2, 2], isthing=True),
    }
    assert set(by_category) == set(expected)
    for category, values in expected.items():
        segment = by_category[category]
        assert {k: segment[k] for k in values} == values
        assert (segment_ids == segment["id"]).sum() == values["area"]
    assert segment_ids[0, 0] == 0
    meta = MetadataCatalog.get("openseg_ade20k_val_panoptic")
    assert len(meta.thing_classes) == 100 and len(meta.stuff_classes) == 150
    assert meta.label_divisor == 1000 and "panoptic" in meta.evaluators

    instances = DatasetCatalog.get("openseg_ade20k_instance_val")
    things = ade20k.ADE20K_150_THING_IDS
    annotations = instances[0]["annotations"]
    assert sorted(a["category_id"] for a in annotations) == sorted(
        [things.index(12), things.index(20)]
    )
    car = next(a for a in annotations if a["category_id"] == things.index(20))
    assert car["bbox"] == [1.0, 0.0, 2.0, 2.0]
    assert len(MetadataCatalog.get("openseg_ade20k_instance_val").thing_classes) == 100


# ------------------------------------------------------------------ Cityscapes
def test_cityscapes_converter_and_round_trip(root):
    prepare = load_prepare("prepare_cityscapes")
    city = root / "cityscapes"
    stem = "aachen_000000_000019"
    instance_ids = np.array(
        [
            [7, 7, 7, 23, 23, 23],
            [7, 7, 24001, 24001, 23, 4],
            [26, 26, 24002, 24001, 0, 4],
            [26, 26, 24002, 26001, 26001, 4],
        ],
        dtype=np.uint16,
    )
    label_ids = np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids).astype(np.uint8)
    gt = city / "gtFine" / "val" / "aachen"
    gt.mkdir(parents=True)
    Image.fromarray(instance_ids).save(gt / f"{stem}_gtFine_instanceIds.png")
    save_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
    save_png(
        city / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png",
        np.zeros((4, 6, 3), np.uint8),
    )

    assert prepare.convert_split(city, "val") == 1
    with open(city / "gtFine" / "cityscapes_panoptic_val.json") as f:
        panoptic = json.load(f)
    segments = sorted(panoptic["annotations"][0]["segments_info"], key=lambda s: s["id"])
    expected = [  # by hand: label 4 ("static") and 0 are void, 26 alone is a crowd of cars
        {"id": 7, "category_id": 7, "area": 5, "bbox": [0, 0, 3, 2], "iscrowd": 0},
        {"id": 23, "category_id": 23, "area": 4, "bbox": [3, 0, 3, 2], "iscrowd": 0},
        {"id": 26, "category_id": 26, "area": 4, "bbox": [0, 2, 2, 2], "iscrowd": 1},
        {"id": 24001, "category_id": 24, "area": 3, "bbox": [2, 1, 2, 2], "iscrowd": 0},
        {"id": 24002, "category_id": 24, "area": 2, "bbox": [2, 2, 1, 2], "iscrowd": 0},
        {"id": 26001, "category_id": 26, "area": 2, "bbox": [3, 3, 2, 1], "iscrowd": 0},
    ]
    assert segments == expected
    pan = rgb2id(
        np.asarray(
            Image.open(city / "gtFine" / "cityscapes_panoptic_val" / f"{stem}_gtFine_panoptic.png")
        )
    )
    np.testing.assert_array_equal(pan, np.where(np.isin(instance_ids, [0, 4]), 0, instance_ids))
    train_ids = np.asarray(Image.open(gt / f"{stem}_gtFine_labelTrainIds.png"))
    assert (
        train_ids[0, 0] == 0
        and train_ids[0, 3] == 10
        and train_ids[1, 2] == 11
        and train_ids[2, 0] == 13
    )
    assert train_ids[1, 5] == 255 and train_ids[2, 4] == 255

    cityscapes.register_all_cityscapes(root)
    (record,) = DatasetCatalog.get("openseg_cityscapes_fine_panoptic_val")
    assert Path(record["file_name"]).exists() and Path(record["sem_seg_file_name"]).exists()
    contiguous = {s["id"]: (s["category_id"], s["isthing"]) for s in record["segments_info"]}
    assert contiguous == {7: (0, False), 23: (10, False), 26: (13, True), 24001: (11, True),
                          24002: (11, True), 26001: (13, True)}  # fmt: skip
    meta = MetadataCatalog.get("openseg_cityscapes_fine_panoptic_val")
    assert len(meta.thing_classes) == 8 and len(meta.stuff_classes) == 19


# ------------------------------------------------------------------ LVIS
def make_lvis(root: Path, names) -> None:
    categories = [
        {"id": i + 1, "name": n, "synonyms": [n], "frequency": "r"} for i, n in enumerate(names)
    ]
    images = [
        {
            "id": 7,
            "height": 4,
            "width": 6,
            "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg",
        }
    ]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4,
         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
    ]  # fmt: skip
    (root / "lvis").mkdir(parents=True)
    (root / "lvis" / "lvis_v1_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    save_jpg(root / "coco" / "val2017" / "000000000007.jpg", 4, 6)


def test_lvis_round_trip(root):
    make_lvis(root, lvis.LVIS_V1_CLASSES[:3])
    lvis.register_all_lvis(root)
    (record,) = DatasetCatalog.get("openseg_lvis_v1_val")
    assert Path(record["file_name"]) == root / "coco" / "val2017" / "000000000007.jpg"
    assert record["annotations"][0]["category_id"] == 2
    meta = MetadataCatalog.get("openseg_lvis_v1_val")
    assert len(meta.thing_classes) == 1203 and meta.thing_classes[0] == "aerosol_can"
    assert meta.evaluators == ["instance"]


def test_lvis_rejects_foreign_vocabulary(root):
    make_lvis(root, ["cat", "dog", "bird"])
    lvis.register_all_lvis(root)
    with pytest.raises(ValueError, match="lvis_v1_val.json"):
        DatasetCatalog.get("openseg_lvis_v1_val")


# ------------------------------------------------------------------ Pascal
def test_pascal_voc_round_trip(root):
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    palette_label = Image.fromarray(np.array([[0, 1, 20], [255, 15, 0]], np.uint8))
    palette_label.putpalette(list(range(256)) * 3)  # official labels are palette PNGs
    (voc / "SegmentationClass").mkdir()
    palette_label.save(voc / "SegmentationClass" / "2007_000033.png")
    save_jpg(voc / "JPEGImages" / "2007_000033.jpg", 2, 3)
    load_prepare("prepare_pascal_voc").convert(voc)
    pascal_voc.register_all_pascal_voc(root)
    (record,) = DatasetCatalog.get("openseg_pascal_voc20_sem_seg_val")
    np.testing.assert_array_equal(
        np.asarray(Image.open(record["sem_seg_file_name"])), [[255, 0, 19], [255, 14, 255]]
    )


def test_pascal_context_59_and_459(root):
    voc2010 = root / "VOCdevkit" / "VOC2010"
    source_names = [
        pascal_context.PASCAL_CONTEXT_SOURCE_NAMES.get(n, n)
        for n in pascal_context.PASCAL_CONTEXT_59_CLASSES
    ]
    names = ["accordion"] + source_names[::-1] + ["zebra"]  # ids 1..61, not in PC-59 order
    (voc2010 / "trainval").mkdir(parents=True)
    (voc2010 / "labels.txt").write_text(
        "".join(f"{i}: {n}\n" for i, n in enumerate(names, start=1))
    )
    (voc2010 / "ImageSets" / "Main").mkdir(parents=True)
    (voc2010 / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n")
    label_map = np.array([[0, 1, 2], [60, 61, 30]], np.uint16)
    scipy.io.savemat(voc2010 / "trainval" / "2008_000002.mat", {"LabelMap": label_map})
    save_jpg(voc2010 / "JPEGImages" / "2008_000002.jpg", 2, 3)
    load_prepare("prepare_pascal_context").convert(
        voc2010, voc2010 / "ImageSets" / "Main" / "val.txt"
    )
    pascal_context.register_all_pascal_context(root)

    (pc59,) = DatasetCatalog.get("openseg_pascal_context59_sem_seg_val")
    pc59_classes = pascal_context.PASCAL_CONTEXT_59_CLASSES
    # label 2 = last PC-59 source name (wood), 60 = first (aeroplane), 30 = names[29]
    expected = [[255, 255, pc59_classes.index("wood")], [0, 255, source_names.index(names[29])]]
    np.testing.assert_array_equal(np.asarray(Image.open(pc59["sem_seg_file_name"])), expected)

    (pc459,) = DatasetCatalog.get("openseg_pascal_context459_sem_seg_val")
    np.testing.assert_array_equal(
        np.asarray(Image.open(pc459["sem_seg_file_name"])), [[65535, 0, 1], [59, 60, 29]]
    )
    meta = MetadataCatalog.get("openseg_pascal_context459_sem_seg_val")
    assert meta.stuff_classes == names and meta.ignore_label == 65535


def test_pascal_context_459_train_ignores_unknown_as_osm_release(root):
    """PC-459 train: label id - 1 as val, and "unknown" also ignored (OSM's release trains with
    ignore_value_list [65535, 430], 430 = "unknown" of the 459 names)."""
    voc2010 = root / "VOCdevkit" / "VOC2010"
    source_names = [
        pascal_context.PASCAL_CONTEXT_SOURCE_NAMES.get(n, n)
        for n in pascal_context.PASCAL_CONTEXT_59_CLASSES
    ]
    names = ["accordion", "unknown"] + [n for n in source_names if n != "aeroplane"] + ["aeroplane"]
    (voc2010 / "trainval").mkdir(parents=True)
    (voc2010 / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, start=1)))
    (voc2010 / "ImageSets" / "Main").mkdir(parents=True)
    (voc2010 / "ImageSets" / "Main" / "train.txt").write_text("2008_000008\n")
    (voc2010 / "ImageSets" / "Main" / "val.txt").write_text("2008_000008\n")
    scipy.io.savemat(
        voc2010 / "trainval" / "2008_000008.mat",
        {"LabelMap": np.array([[0, 1, 2], [3, 60, 2]], np.uint16)},
    )
    save_jpg(voc2010 / "JPEGImages" / "2008_000008.jpg", 2, 3)
    prepare = load_prepare("prepare_pascal_context")
    assert prepare.convert(voc2010, voc2010 / "ImageSets" / "Main" / "train.txt", "train") == 1
    assert not (voc2010 / "annotations_detectron2" / "pc59_val").exists()  # PC-59: val only
    prepare.convert(voc2010, voc2010 / "ImageSets" / "Main" / "val.txt", "val")
    pascal_context.register_all_pascal_context(root)

    (train,) = DatasetCatalog.get("openseg_pascal_context459_sem_seg_train")
    assert train["file_name"] == str(voc2010 / "JPEGImages" / "2008_000008.jpg")
    np.testing.assert_array_equal(
        np.asarray(Image.open(train["sem_seg_file_name"])), [[65535, 0, 65535], [2, 59, 65535]]
    )
    (val,) = DatasetCatalog.get("openseg_pascal_context459_sem_seg_val")
    np.testing.assert_array_equal(
        np.asarray(Image.open(val["sem_seg_file_name"])), [[65535, 0, 1], [2, 59, 1]]
    )
    meta = MetadataCatalog.get("openseg_pascal_context459_sem_seg_train")
    assert meta.stuff_classes == names and meta.ignore_label == 65535
    with pytest.raises(ValueError, match="split"):
        prepare.convert(voc2010, voc2010 / "ImageSets" / "Main" / "val.txt", "test")


# ------------------------------------------------------------------ ScanNet
def test_scannet_20_and_40(root):
    scannet_dir = root / "scannet"
    frames = scannet_dir / "scannet_frames_25k" / "scene0011_00"
    raw = np.array([[0, 1, 2], [40, 300, 999]], np.uint16)  # 999 is not in the tsv
    (frames / "label").mkdir(parents=True)
    Image.fromarray(raw).save(frames / "label" / "000100.png")
    save_jpg(frames / "color" / "000100.jpg", 2, 3)
    (scannet_dir / "scannetv2_val.txt").write_text("scene0011_00\n")
    tsv = scannet_dir / "scannetv2-labels.combined.tsv"
    tsv.write_text(
        "id\traw_category\tnyu40id\n1\twall\t1\n2\tchair\t5\n40\tkeyboard\t40\n300\tfridge\t24\n"
    )
    prepare = load_prepare("prepare_scannet")
    frames_root, scenes = scannet_dir / "scannet_frames_25k", scannet_dir / "scannetv2_val.txt"
    assert prepare.convert(scannet_dir, frames_root, scenes, prepare.read_raw_to_nyu40(tsv)) == 1
    scannet.register_all_scannet(root)
    (s40,) = DatasetCatalog.get("openseg_scannet40_sem_seg_val")
    (s20,) = DatasetCatalog.get("openseg_scannet20_sem_seg_val")
    assert Path(s40["file_name"]).name == "scene0011_00_000100.jpg"
    np.testing.assert_array_equal(
        np.asarray(Image.open(s40["sem_seg_file_name"])), [[255, 0, 4], [39, 23, 255]]
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(s20["sem_seg_file_name"])), [[255, 0, 4], [255, 14, 255]]
    )
    assert scannet.SCANNET_20_CLASSES[14] == "refrigerator"


# ------------------------------------------------------------------ RefCOCOg
def test_refcocog_umd(root):
    refcocog = root / "refcoco" / "refcocog"
    refcocog.mkdir(parents=True)
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "val", "category_id": 18,
         "sentences": [{"sent": "the brown dog"}, {"sent": "dog on the left"}]},
        {"ref_id": 2, "ann_id": 12, "image_id": 5, "split": "train", "category_id": 1,
         "sentences": [{"sent": "a man"}]},
    ]  # fmt: skip
    with open(refcocog / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f)
    polygon = [[0, 0, 2, 0, 2, 2]]
    instances = {
        "images": [
            {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 4, "width": 6}
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 5,
                "category_id": 18,
                "bbox": [0, 0, 2, 2],
                "segmentation": polygon,
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 5,
                "category_id": 1,
                "bbox": [1, 1, 2, 2],
                "segmentation": polygon,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3, 18)],
    }
    (refcocog / "instances.json").write_text(json.dumps(instances))
    save_jpg(root / "coco" / "train2014" / "COCO_train2014_000000000005.jpg", 4, 6)
    refcoco.register_all_refcoco(root)
    (record,) = DatasetCatalog.get("openseg_refcocog_umd_val")
    assert record["sentences"] == ["the brown dog", "dog on the left"]
    assert record["annotations"][0]["category_id"] == 3 and record["annotations"][0]["bbox"] == [
        0,
        0,
        2,
        2,
    ]
    assert (record["height"], record["width"], record["image_id"]) == (4, 6, 5)
    assert Path(record["file_name"]).exists()
    assert MetadataCatalog.get("openseg_refcocog_umd_val").evaluators == ["referring"]
    with pytest.raises(ValueError, match="test"):
        DatasetCatalog.get("openseg_refcocog_umd_test")


# ------------------------------------------------------------------ ADE20K-Full, SUN RGB-D
def test_ade20k_full_selects_classes_of_both_splits(root):
    ade_full = root / "ADE20K_2021_17_01"
    folders = [
        "ADE20K_2021_17_01/images/ADE/training/urban/street",
        "ADE20K_2021_17_01/images/ADE/validation/home",
    ]
    filenames = ["ADE_train_00000001.jpg", "ADE_frame_00000002.jpg"]
    presence = np.array([[1, 2], [1, 1], [3, 0], [0, 1]])  # wall, person both; sky train; cat val
    index = {"folder": folders, "filename": filenames, "objectPresence": presence,
             "objectnames": ["wall", "person, individual", "sky", "cat"]}  # fmt: skip
    ade_full.mkdir()
    with open(ade_full / "index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f)
    values = np.array([[1, 2, 3], [0, 2, 1]])  # objectnames index + 1; encoded R = v // 256 * 10
    seg = np.stack([values // 256 * 10, values % 256, np.zeros_like(values)], axis=-1).astype(
        np.uint8
    )
    for folder, filename in zip(folders, filenames):
        save_jpg(root / folder / filename, 2, 3)
        save_png(root / folder / filename.replace(".jpg", "_seg.png"), seg)
    load_prepare("prepare_ade20k_full").convert(ade_full)
    ade20k.register_all_ade20k(root)
    (record,) = DatasetCatalog.get("openseg_ade20k_full_sem_seg_val")
    assert Path(record["file_name"]).name == "ADE_frame_00000002.jpg"
    ignore = ade20k.ADE_FULL_IGNORE_LABEL
    np.testing.assert_array_equal(
        np.asarray(Image.open(record["sem_seg_file_name"])), [[0, 1, ignore], [ignore, 1, 0]]
    )
    assert MetadataCatalog.get("openseg_ade20k_full_sem_seg_val").stuff_classes == [
        "wall",
        "person",
    ]


def test_sun_rgbd_round_trip(root):
    sun = root / "sun_rgbd"
    save_png(sun / "test" / "label37" / "img-000001.png", np.array([[0, 1, 37]], np.uint8))
    save_jpg(sun / "test" / "image" / "img-000001.jpg", 1, 3)
    prepare = load_prepare("prepare_sun_rgbd")
    assert prepare.convert(sun, sun / "test" / "image", sun / "test" / "label37") == 1
    sun_rgbd.register_all_sun_rgbd(root)
    (record,) = DatasetCatalog.get("openseg_sun_rgbd37_sem_seg_val")
    np.testing.assert_array_equal(
        np.asarray(Image.open(record["sem_seg_file_name"])), [[255, 0, 36]]
    )
    assert sun_rgbd.SUN_RGBD_37_CLASSES[36] == "bag"


def test_registered_vocabularies_are_valid(root):
    from openseg.data.vocab import get_vocabulary, validate_vocabulary

    sizes = {"openseg_ade20k_val_panoptic": 150, "openseg_ade20k_instance_val": 100,
             "openseg_lvis_v1_val": 1203, "openseg_cityscapes_fine_panoptic_val": 19,
             "openseg_pascal_voc20_sem_seg_val": 20, "openseg_pascal_context59_sem_seg_val": 59,
             "openseg_sun_rgbd37_sem_seg_val": 37, "openseg_scannet20_sem_seg_val": 20,
             "openseg_scannet40_sem_seg_val": 40, "openseg_refcocog_umd_val": 80}  # fmt: skip
    for register in REGISTER_ALL.values():
        register(root)
    for name, size in sizes.items():
        vocabulary = get_vocabulary(name)
        validate_vocabulary(vocabulary)
        assert len(vocabulary) == size == len(MetadataCatalog.get(name).stuff_classes), name
