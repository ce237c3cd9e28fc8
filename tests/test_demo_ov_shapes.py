"""The open-vocabulary shapes split (`openseg_demo_ov_shapes_*`, demo.OV_SHAPES) and demo CLIP
pre-training on shape scenes: unseen classes drawn but void in training labels and labelled in
val, seen / unseen metadata, counts, panoptic files consistent with their JSON, disjoint seed
streams, and the existing demo renders unchanged."""

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from demo_utils import demo_registered_at
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO
from script_utils import load_script

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.demo import (
    DEMO,
    OV_SHAPES,
    SEED_STREAMS,
    SHAPES_SEED,
    _render_shapes,
    generate_demo,
    render_image,
)
from openseg.data.datasets.lvis_ow import DEMO_OW_SHAPES_CLASSES
from openseg.modeling.demo_clip import render_batch

CLASSES = [
    "circle", "square", "triangle", "cross", "ellipse", "diamond", "ring", "semicircle",
    "hexagon", "ell", "crescent", "star", "sky", "grass", "water", "sand",
]
UNSEEN_IDS = [3, 10, 11, 15]  # cross, crescent, star, sand
# sha256 of the first three open-world shapes renders per split, computed with the renderer
# before the open-vocabulary split existed: those files must stay as they were
OW_SHAPES_DIGEST = "cbac7405258fee65f4cfa96ba241e19c36d42d24bde47e8385d2e7c07f043268"


@pytest.fixture(scope="module")
def ov_root(tmp_path_factory):
    """The registered split generated once into a temporary root; the default registration is
    restored afterwards."""
    root = tmp_path_factory.mktemp("datasets")
    with demo_registered_at(root, "openseg_demo_ov_shapes") as (train, val):
        yield root, train, val


def _pan_ids(record) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))


def test_metadata_counts_and_classes(ov_root):
    root, train, val = ov_root
    assert len(train) == 400 and len(val) == 100
    assert (root / "openseg_demo_ov_shapes" / "VERSION").read_text() == (
        "openseg-demo-ov-shapes-v1 train=400 val=100\n"
    )
    for name in ("openseg_demo_ov_shapes_train", "openseg_demo_ov_shapes_val"):
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == CLASSES and meta.thing_classes == CLASSES[:12]
        assert meta.class_splits == {
            "seen": [i for i in range(16) if i not in UNSEEN_IDS], "unseen": UNSEEN_IDS
        }
        assert [names[0] for names in meta.synonyms] == CLASSES
        assert all(len(set(names)) == len(names) >= 2 for names in meta.synonyms)
    ids = [r["image_id"] for r in train + val]
    assert len(set(ids)) == len(ids)


def test_unseen_drawn_but_void_in_train_and_labelled_in_val(ov_root):
    _, train, val = ov_root
    voided_images = 0
    for index, record in enumerate(train):
        assert not set(UNSEEN_IDS) & {s["category_id"] for s in record["segments_info"]}
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert not set(UNSEEN_IDS) & set(np.unique(semantic).tolist())
        # the void pixels are exactly the unseen segments the image draws
        _, segments = render_image("train", index, OV_SHAPES)
        unseen = np.zeros((128, 128), bool)
        for name, mask in segments:
            if CLASSES.index(name) in UNSEEN_IDS:
                unseen |= mask
        void = _pan_ids(record) == 0
        assert np.array_equal(void, unseen) and np.array_equal(semantic == 255, unseen)
        voided_images += bool(void.any())
    assert voided_images > 200  # sand alone covers part of about half of the images
    for record in val:  # every pixel labelled: stuff bands cover the image
        assert (_pan_ids(record) != 0).all()
    assert {s["category_id"] for r in val for s in r["segments_info"]} == set(range(16))
    shapes_in_train = {s["category_id"] for r in train for s in r["segments_info"] if s["isthing"]}
    assert shapes_in_train == set(range(12)) - set(UNSEEN_IDS)


def test_panoptic_png_matches_json_and_scores_perfectly(ov_root):
    _, train, val = ov_root
    for split, records in (("train", train[:50]), ("val", val)):
        meta = MetadataCatalog.get(f"openseg_demo_ov_shapes_{split}")
        raw = {a["image_id"]: a for a in json.loads(Path(meta.panoptic_json).read_text())["annotations"]}
        for record in records:
            pan_ids = _pan_ids(record)
            semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
            segments = raw[record["image_id"]]["segments_info"]
            assert set(np.unique(pan_ids)) - {0} == {s["id"] for s in segments}
            for segment in segments:
                mask = pan_ids == segment["id"]
                assert mask.sum() == segment["area"]
                assert segment["id"] // 1000 == segment["category_id"]  # LABEL_DIVISOR ids
                assert (semantic[mask] == segment["category_id"] - 1).all()
                assert segment["category_id"] in meta.stuff_dataset_id_to_contiguous_id
            things = [s for s in record["segments_info"] if s["isthing"]]
            assert len(things) == len(record["annotations"]) <= 4
            assert things or split == "train"  # a training image may draw only unseen shapes
    meta = MetadataCatalog.get("openseg_demo_ov_shapes_val")
    with contextlib.redirect_stdout(io.StringIO()):
        result = pq_compute(meta.panoptic_json, meta.panoptic_json, meta.panoptic_root, meta.panoptic_root)
        coco = COCO(meta.json_file)
    assert result["All"]["pq"] == pytest.approx(1.0) and result["All"]["n"] == 16
    assert sorted(coco.getCatIds()) == list(range(1, 13))


def test_generation_is_deterministic_and_atomic(tmp_path):
    first = generate_demo(tmp_path / "a", 6, 4, OV_SHAPES)
    second = generate_demo(tmp_path / "b", 6, 4, OV_SHAPES)
    digests = [
        {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}
        for d in (first, second)
    ]
    assert digests[0] == digests[1] and len(digests[0]) == 3 * (6 + 4) + 4 + 1  # image, panoptic, semantic; 4 JSON; VERSION
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["openseg_demo_ov_shapes"]


def test_existing_demo_renders_unchanged():
    for stream in ("train", "val"):
        image, segments = render_image(stream, 0)
        explicit, explicit_segments = render_image(stream, 0, DEMO)
        assert np.array_equal(image, explicit)
        assert [n for n, _ in segments] == [n for n, _ in explicit_segments]
    digest = hashlib.sha256()
    for split_index, drawn in ((0, DEMO_OW_SHAPES_CLASSES[:9]), (1, DEMO_OW_SHAPES_CLASSES)):
        for index in range(3):
            image, segments = _render_shapes(
                np.random.default_rng([SHAPES_SEED, split_index, index]), drawn
            )
            digest.update(image.tobytes())
            for name, mask in segments:
                if name in DEMO_OW_SHAPES_CLASSES:
                    digest.update(name.encode() + np.packbits(mask).tobytes())
    assert digest.hexdigest() == OW_SHAPES_DIGEST


def test_pretraining_shape_scenes_are_disjoint_and_hold_every_class():
    assert len(set(SEED_STREAMS.values())) == len(SEED_STREAMS)
    dataset = {render_image(s, i, OV_SHAPES)[0].tobytes() for s in ("train", "val") for i in range(32)}
    names = set()
    for stream in ("clip_pretrain", "clip_held_out"):
        images, masks, labels, owners = render_batch(stream, range(32), OV_SHAPES)
        for image in images:
            assert image.permute(1, 2, 0).to(torch.uint8).numpy().tobytes() not in dataset
        assert len(masks) == len(labels) == len(owners)
        # segments of one image never overlap and cover it
        for b in range(len(images)):
            assert (masks[owners == b].sum(dim=0) == 1).all()
        names |= {CLASSES[i] for i in labels.tolist()}
    assert names == set(CLASSES)  # the unseen classes too
    assert OV_SHAPES.synonyms[CLASSES.index("star")][0] == "star"


def test_pretrain_tool_shape_scenes_report_all_classes(tmp_path, capsys):
    tool = load_script("tools/pretrain_demo_clip.py")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "maftplus_pico_convnext.yaml")
    accuracy = tool.main(
        ["--config-file", config, "--scenes", "shapes", "--output", str(tmp_path / "clip.pt"),
         "--steps", "1", "--batch-size", "2", "--held-out-images", "4", "--log-period", "0"]
    )
    assert list(accuracy) == CLASSES
    out = capsys.readouterr().out
    assert "crescent (unseen)" in out and "ellipse (seen)" in out and "held-out shapes renders" in out


def test_pretraining_input_size_resizes_images_only():
    from openseg.config import load_config
    from openseg.modeling.backbones.clip import build_openclip_backbone
    from openseg.modeling.demo_clip import segment_embeddings

    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "maftplus_pico_convnext.yaml"
    torch.manual_seed(0)
    backbone = build_openclip_backbone(load_config(str(config)), None).eval()
    images, masks, _, owners = render_batch("clip_held_out", range(2), OV_SHAPES)
    upsampled = torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear")
    with torch.no_grad():
        native = segment_embeddings(backbone, images, masks, owners)
        assert torch.equal(segment_embeddings(backbone, images, masks, owners, 128), native)
        resized = segment_embeddings(backbone, images, masks, owners, 256)
        # masks stay at 128 px: their cell coverage is the same on the 8 x 8 grid of 256 px
        by_hand = segment_embeddings(backbone, upsampled, masks, owners)
    assert torch.allclose(resized, by_hand, atol=1e-6) and not torch.allclose(resized, native, atol=1e-3)
