"""Ground-truth oracles of "What holds back open-vocabulary segmentation?" (Sec. 4.1-4.3):
hand-built images whose expected panoptic outputs follow from the paper's definitions, run
through `OpenSegMaskFormer.postprocess` (the shared inference every subclass uses)."""

import itertools
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import ImageList, Instances

from openseg.config import load_config
from openseg.data.datasets.common import register_subset
from openseg.data.mappers import build_mapper
from openseg.engine import Trainer
from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.modeling.oracles import (
    PAPER_ROWS,
    OracleSwitches,
    apply_oracles,
    ground_truth_of_input,
    match_masks,
    oracle_variants,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "maskformer_R18.yaml")
NUM_CLASSES = 8  # demo vocabulary: things 0-3, stuff 4-7
BIG = 12.0  # |mask logit| of hand-built candidate masks


def demo_cfg(*opts):
    return load_config(
        DEMO_CONFIG,
        ["DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
         "MODEL.MASK_FORMER.DEC_LAYERS", "2", *opts],
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(demo_cfg()).eval()


def region(rows, cols, size=8):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def class_logits(probs):
    """[Q, K+1] logits from rows {class: probability} (the rest spread evenly)."""
    rows = []
    for row in probs:
        p = torch.full((NUM_CLASSES + 1,), (1 - sum(row.values())) / (NUM_CLASSES + 1 - len(row)))
        for k, v in row.items():
            p[k] = v
        rows.append(p.log())
    return torch.stack(rows)


def run(model, switches, mask_cls, masks, gt_labels, gt_masks, object_threshold=0.5, overlap=0.3):
    """Post-process one 8x8 image whose candidates are `masks` with logits `mask_cls`."""
    model.object_mask_threshold = object_threshold
    model.overlap_threshold = overlap
    model.oracles = switches
    instances = Instances((8, 8))
    instances.gt_classes = torch.tensor(gt_labels)
    instances.gt_masks = torch.stack(gt_masks)
    batched = [{"image": torch.zeros(3, 8, 8), "height": 8, "width": 8, "instances": instances}]
    outputs = {
        "pred_logits": mask_cls[None],
        "pred_masks": torch.where(torch.stack(masks), BIG, -BIG)[None],
    }
    images = ImageList(torch.zeros(1, 3, 8, 8), [(8, 8)])
    panoptic, segments = model.postprocess(outputs, batched, images)[0]["panoptic_seg"]
    return panoptic, {s["id"]: s for s in segments}


def segment_classes(panoptic, segments, gt_masks):
    """For each ground-truth mask, the class of the predicted segment covering all of it, or None."""
    result = []
    for gt in gt_masks:
        ids = panoptic[gt].unique().tolist()
        result.append(segments[ids[0]]["category_id"] if ids != [0] and len(ids) == 1 else None)
    return result


# ---- classification oracle (Sec. 4.2, Table 2) ------------------------------------------------

def test_classification_oracle_relabels_the_final_panoptic_map_only(model):
    """GT: top half class 1, bottom-left class 2, bottom-right class 3.
    q0 (class 5, confident) covers rows 0-5: final IoU with the top half 32/48 > 0.5 -> class 1.
    q1 (class 6) is exactly bottom-left as a candidate, but q0 takes rows 4-5 of it, so its final
    segment has IoU exactly 0.5 -> keeps class 6 (relabelling candidates would give class 2).
    q2 is exactly bottom-right with no-object 0.3 and classes 0.0875 each: inference discards it,
    and the oracle must not revive it (giving it class 3 before post-processing would)."""
    top, left, right = region(slice(0, 4), slice(None)), region(slice(4, 8), slice(0, 4)), region(slice(4, 8), slice(4, 8))
    masks = [region(slice(0, 6), slice(None)), left, right, region(0, 0)]
    mask_cls = class_logits([{5: 0.95}, {6: 0.9}, {NUM_CLASSES: 0.3}, {NUM_CLASSES: 0.99}])
    gt_masks = [top, left, right]
    panoptic, segments = run(model, OracleSwitches(), mask_cls, masks, [1, 2, 3], gt_masks)
    assert sorted(s["category_id"] for s in segments.values()) == [5, 6]

    panoptic_o, segments_o = run(
        model, OracleSwitches(classification=True), mask_cls, masks, [1, 2, 3], gt_masks
    )
    assert torch.equal(panoptic_o, panoptic)  # the map itself is untouched
    by_class = {s["category_id"]: s for s in segments_o.values()}
    assert sorted(by_class) == [1, 6]
    assert by_class[1]["isthing"] and not by_class[6]["isthing"]
    assert int((panoptic_o == by_class[6]["id"]).sum()) == 8  # IoU 8 / 16 = 0.5: not relabelled
    assert (panoptic_o[right & ~masks[0]] == 0).all()  # discarded mask stays discarded


# ---- mask-selection oracle (Sec. 4.3, Table 3) -------------------------------------------------

def selection_case():
    """GT: top half class 1, bottom half class 2. q0: exactly the top half, class 1 (0.9).
    q1: exactly the bottom half, class 2 (0.39) but no-object 0.6. q2: a confident class-4 strip
    (column 0) that matches no ground truth better than q0 / q1. q3: empty, no-object."""
    top, bottom = region(slice(0, 4), slice(None)), region(slice(4, 8), slice(None))
    masks = [top, bottom, region(slice(None), 0), torch.zeros(8, 8, dtype=torch.bool)]
    mask_cls = class_logits([{1: 0.9}, {2: 0.39, NUM_CLASSES: 0.6}, {4: 0.95}, {NUM_CLASSES: 0.99}])
    return mask_cls, masks, [1, 2], [top, bottom]


def test_selection_row2_loses_a_correct_mask_to_no_object_and_row3_keeps_it(model):
    mask_cls, masks, labels, gt_masks = selection_case()
    none = segment_classes(*run(model, OracleSwitches(), mask_cls, masks, labels, gt_masks), gt_masks)
    row2 = segment_classes(
        *run(model, OracleSwitches(mask_selection=True), mask_cls, masks, labels, gt_masks), gt_masks
    )
    row3 = segment_classes(
        *run(model, OracleSwitches(mask_selection=True, drop_no_object=True), mask_cls, masks,
             labels, gt_masks), gt_masks,
    )
    assert none == [None, None]  # the class-4 strip cuts column 0 out of both halves
    assert row2 == [1, None]  # strip discarded by selection, bottom half lost to no-object
    assert row3 == [1, 2]  # no-object logit removed: the matched bottom half is kept


def test_selection_row2_keeps_the_object_mask_threshold(model):
    """Standard inference after selection: a matched mask whose best class probability is not
    above OBJECT_MASK_THRESHOLD is dropped in row 2; row 3 includes every selected mask."""
    mask_cls, masks, labels, gt_masks = selection_case()
    mask_cls = class_logits([{1: 0.45}, {2: 0.9}, {4: 0.95}, {NUM_CLASSES: 0.99}])
    switches = OracleSwitches(mask_selection=True)
    row2 = run(model, switches, mask_cls, masks, labels, gt_masks, object_threshold=0.5)
    assert segment_classes(*row2, gt_masks) == [None, 2]
    row3 = run(
        model, OracleSwitches(mask_selection=True, drop_no_object=True), mask_cls, masks, labels,
        gt_masks, object_threshold=0.5,
    )
    assert segment_classes(*row3, gt_masks) == [1, 2]


def naive_mask_cost(pred_logits, target):
    """5 x mean BCE + 5 x Dice over all pixels, from the formulas."""
    p = 1 / (1 + np.exp(-pred_logits.numpy().ravel().astype(np.float64)))
    t = target.numpy().ravel().astype(np.float64)
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return 5 * bce + 5 * dice


def test_mask_selection_matches_the_brute_force_optimal_assignment():
    generator = torch.Generator().manual_seed(3)
    mask_pred = 3 * torch.randn(5, 8, 8, generator=generator)
    gt_masks = torch.rand(3, 8, 8, generator=generator) > 0.5
    cost = np.array([[naive_mask_cost(mask_pred[q], gt_masks[j]) for j in range(3)] for q in range(5)])
    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost[q, j] for j, q in enumerate(qs)))
    query_index, gt_index = match_masks(mask_pred, gt_masks, (8, 8))
    assert {(int(q), int(j)) for q, j in zip(query_index, gt_index)} == {(q, j) for j, q in enumerate(best)}


# ---- selection + segmentation / classification (Table 4) ---------------------------------------

def test_selection_plus_classification_uses_the_matched_class_even_at_low_iou():
    """A matched candidate overlapping its ground truth with IoU 1/3 takes the ground-truth
    class one-hot (the classification oracle alone would need IoU > 0.5)."""
    gt_masks = torch.stack([region(slice(0, 4), slice(0, 4))])
    mask_pred = torch.where(torch.stack([region(slice(0, 2), slice(0, 8))]), BIG, -BIG)
    mask_cls = class_logits([{5: 0.9}])
    switches = OracleSwitches(mask_selection=True, drop_no_object=True, classification=True)
    new_cls, new_pred = apply_oracles(
        switches, mask_cls, mask_pred, torch.tensor([2]), gt_masks, (8, 8), None
    )
    torch.testing.assert_close(new_pred, mask_pred)
    probs = new_cls.softmax(-1)
    assert float(probs[0, 2]) == pytest.approx(1.0) and float(probs[0, -1]) < 1e-6


def test_selection_plus_segmentation_keeps_the_models_classes_on_ground_truth_masks(model):
    mask_cls, masks, labels, gt_masks = selection_case()
    shifted = [region(slice(0, 3), slice(None)), region(slice(3, 8), slice(None))] + masks[2:]
    switches = OracleSwitches(mask_selection=True, drop_no_object=True, segmentation=True)
    panoptic, segments = run(model, switches, mask_cls, shifted, labels, gt_masks)
    assert segment_classes(panoptic, segments, gt_masks) == [1, 2]
    assert {int(i) for i in panoptic.unique()} == set(segments)  # nothing outside the GT masks
    # the model's own class for a wrong one: relabelled only by the classification oracle
    wrong = class_logits([{3: 0.9}, {2: 0.39, NUM_CLASSES: 0.6}, {4: 0.95}, {NUM_CLASSES: 0.99}])
    assert segment_classes(*run(model, switches, wrong, shifted, labels, gt_masks), gt_masks) == [3, 2]


# ---- segmentation oracle (Sec. 4.1) --------------------------------------------------------------

def test_segmentation_oracle_classifies_ground_truth_masks_with_the_models_classifier():
    gt_masks = torch.stack([region(slice(0, 4), slice(None)), region(slice(4, 8), slice(None))])
    seen = []

    def classifier(masks):
        seen.append(masks)
        return class_logits([{3: 0.3, NUM_CLASSES: 0.6}, {6: 0.5}])

    new_cls, new_pred = apply_oracles(
        OracleSwitches(segmentation=True), class_logits([{0: 0.9}] * 3), torch.zeros(3, 8, 8),
        torch.tensor([1, 2]), gt_masks, (8, 8), classifier,
    )
    assert torch.equal(seen[0], gt_masks)
    assert torch.equal(new_pred > 0, gt_masks) and torch.all(new_pred.abs() >= 10)
    assert new_cls.softmax(-1)[:, :-1].argmax(-1).tolist() == [3, 6]  # no-object excluded


class LowConfidenceMaskClassifier(OpenSegMaskFormer):
    """Classifies any mask as class 1 (0.2) with no-object most likely (0.7)."""

    def classify_masks(self, outputs, image_index, masks, mask_cls, mask_pred, image_size):
        return class_logits([{1: 0.2, NUM_CLASSES: 0.7}] * masks.shape[0])


def test_segmentation_oracle_keeps_one_segment_per_ground_truth_mask():
    """"one [perfect binary mask] for each panoptic segment": each ground-truth mask becomes a
    segment with the classifier's best class, whatever no-object and the threshold say."""
    torch.manual_seed(0)
    model = LowConfidenceMaskClassifier(demo_cfg()).eval()
    gt_masks = [
        region(slice(0, 4), slice(None)), region(slice(4, 8), slice(0, 3)),
        region(slice(5, 8), slice(3, 8)),
    ]
    mask_cls, masks, _, _ = selection_case()
    panoptic, segments = run(
        model, OracleSwitches(segmentation=True), mask_cls, masks, [2, 3, 5], gt_masks,
        object_threshold=0.8,
    )
    assert segment_classes(panoptic, segments, gt_masks) == [1, 1, 1]
    assert len(segments) == 3 and (panoptic[gt_masks[0] | gt_masks[1] | gt_masks[2]] > 0).all()


def test_segmentation_plus_classification_gives_pq_100_on_demo_data(tmp_path):
    torch.manual_seed(0)
    cfg = demo_cfg(
        "TEST.ORACLE.SEGMENTATION", "True", "TEST.ORACLE.CLASSIFICATION", "True",
        "OUTPUT_DIR", str(tmp_path),
    )
    model = build_model(cfg).eval()  # random weights: everything comes from the oracles
    dataset = register_subset("openseg_demo_val", 6)
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = PanopticEvaluator(dataset, str(tmp_path), distributed=False)
    results = inference_on_dataset(model, loader, evaluator)["panoptic_seg"]
    assert results["PQ"] == pytest.approx(100.0)
    assert results["PQ_unseen"] == pytest.approx(100.0)


# ---- switches, documentation and bad input ----------------------------------------------------

def test_paper_rows_and_the_readme_lines_agree():
    """projects/fcclip/README.md lists each table row as "Table N row M: KEY VALUE ..."."""
    with open(os.path.join(ROOT, "projects", "fcclip", "README.md")) as f:
        lines = dict(re.findall(r"^Table (\d row \d): (.*)$", f.read(), flags=re.M))
    for (table, row), (_, switches) in PAPER_ROWS.items():
        opts = " ".join(switches.config_opts()) or "(no oracle)"
        assert lines.pop(f"{table} row {row}").strip("` ") == opts
    assert PAPER_ROWS[3, 2][1] == OracleSwitches(mask_selection=True)
    assert PAPER_ROWS[3, 3][1] == OracleSwitches(mask_selection=True, drop_no_object=True)
    assert PAPER_ROWS[4, 1][1] == PAPER_ROWS[3, 3][1]
    assert [s.name for s in oracle_variants()][:2] == ["none", "classification"]
    cfg = demo_cfg(*PAPER_ROWS[4, 3][1].config_opts())
    assert OracleSwitches.from_config(cfg) == PAPER_ROWS[4, 3][1]


def test_test_mapper_keeps_ground_truth_only_under_an_oracle():
    record = DatasetCatalog.get("openseg_demo_val")[0]
    plain = build_mapper(demo_cfg(), is_train=False)(record)
    assert "instances" not in plain
    kept = build_mapper(demo_cfg("TEST.ORACLE.CLASSIFICATION", "True"), is_train=False)(record)
    assert isinstance(kept["instances"], Instances)
    assert kept["instances"].gt_masks.shape[-2:] == kept["image"].shape[-2:] == (128, 128)
    assert len(kept["instances"]) == len(record["segments_info"])


def test_oracles_name_what_is_missing(model):
    with pytest.raises(KeyError, match="instances"):
        ground_truth_of_input({"image": torch.zeros(3, 4, 4)}, (4, 4), torch.device("cpu"))
    mask_cls = class_logits([{0: 0.9}] * 3)
    with pytest.raises(ValueError, match="class 9"):
        apply_oracles(
            OracleSwitches(mask_selection=True), mask_cls, torch.zeros(3, 8, 8),
            torch.tensor([0, 9]), torch.zeros(2, 8, 8, dtype=torch.bool), (8, 8), None,
        )
    # a MaskFormer classifies its queries, not given masks
    with pytest.raises(ValueError, match="SEGMENTATION alone needs a classifier"):
        build_model(demo_cfg("TEST.ORACLE.SEGMENTATION", "True"))
    with pytest.raises(ValueError, match="PANOPTIC_ON"):
        build_model(demo_cfg("TEST.ORACLE.CLASSIFICATION", "True",
                             "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"))
    with pytest.raises(ValueError, match="CLASSIFICATION_IOU"):
        OracleSwitches.from_config(demo_cfg("TEST.ORACLE.CLASSIFICATION_IOU", "1.0"))


def test_ground_truth_reaches_the_output_size_of_the_panoptic_map():
    """The classification oracle compares final segments (at the input's height x width) with
    ground truth given in the padded, resized frame: crop the padding, then nearest resize."""
    from openseg.modeling.oracles import ground_truth_at_output

    padded = torch.zeros(1, 6, 6, dtype=torch.bool)
    padded[0, 0, 1] = True
    padded[0, 5, 5] = True  # padding: dropped
    resized = ground_truth_at_output(padded, (4, 4), (8, 8))
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 0:2, 2:4] = True
    assert torch.equal(resized, expected)
    assert ground_truth_at_output(padded[:0], (4, 4), (8, 8)).shape == (0, 8, 8)
