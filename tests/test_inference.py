"""Semantic / panoptic / instance post-processing on hand-built cases."""

import math

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from openseg.modeling.inference import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    semantic_inference,
)

BIG = 20.0  # mask logit whose sigmoid is 1 to float precision


def class_logits(probabilities):
    """Logits whose softmax is exactly the given rows of probabilities."""
    return torch.tensor(probabilities).log()


def test_semantic_inference_hand_computed():
    mask_cls = class_logits([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ln3 = math.log(3.0)
    mask_pred = torch.tensor([[[0.0, ln3]], [[ln3, -ln3]]])  # sigmoid: [.5, .75], [.75, .25]
    expected = torch.tensor(
        [
            [[0.5 * 0.5 + 0.1 * 0.75, 0.5 * 0.75 + 0.1 * 0.25]],
            [[0.3 * 0.5 + 0.6 * 0.75, 0.3 * 0.75 + 0.6 * 0.25]],
        ]
    )
    result = semantic_inference(mask_cls, mask_pred)
    assert result.shape == (2, 1, 2)
    torch.testing.assert_close(result, expected)


def mask_logits(height, width, regions):
    """[Q, H, W] logits: +BIG inside each (row slice, col slice) region, -BIG elsewhere."""
    masks = torch.full((len(regions), height, width), -BIG)
    for q, (rows, cols) in enumerate(regions):
        masks[q, rows, cols] = BIG
    return masks


def panoptic_case():
    # classes: 0 thing, 1 thing, 2 stuff; index 3 = no object
    mask_cls = class_logits(
        [
            [0.95, 0.02, 0.02, 0.01],  # q0 thing 0, cols 0-1
            [0.90, 0.05, 0.03, 0.02],  # q1 thing 0, cols 1-2: loses col 1 to q0 -> half visible
            [0.02, 0.03, 0.90, 0.05],  # q2 stuff 2, col 3 rows 0-1
            [0.02, 0.03, 0.90, 0.05],  # q3 stuff 2, col 3 rows 2-3 -> merged with q2
            [0.01, 0.01, 0.01, 0.97],  # q4 no object
            [0.20, 0.50, 0.20, 0.10],  # q5 thing 1 but below the score threshold
        ]
    )
    all_rows = slice(0, 4)
    mask_pred = mask_logits(
        4,
        4,
        [
            (all_rows, slice(0, 2)),
            (all_rows, slice(1, 3)),
            (slice(0, 2), slice(3, 4)),
            (slice(2, 4), slice(3, 4)),
            (all_rows, slice(0, 4)),
            (all_rows, slice(2, 3)),
        ],
    )
    return mask_cls, mask_pred


def test_panoptic_overlap_merge_and_threshold():
    mask_cls, mask_pred = panoptic_case()
    panoptic_seg, segments_info = panoptic_inference(
        mask_cls, mask_pred, thing_ids={0, 1}, object_mask_threshold=0.8, overlap_threshold=0.8
    )
    expected = torch.tensor([[1, 1, 0, 2]] * 4, dtype=torch.int32)
    assert panoptic_seg.dtype == torch.int32
    assert torch.equal(panoptic_seg, expected)
    assert segments_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 2},
    ]


def test_panoptic_low_overlap_threshold_keeps_partial_segment():
    mask_cls, mask_pred = panoptic_case()
    panoptic_seg, segments_info = panoptic_inference(
        mask_cls, mask_pred, thing_ids={0, 1}, object_mask_threshold=0.8, overlap_threshold=0.4
    )
    assert torch.equal(panoptic_seg, torch.tensor([[1, 1, 2, 3]] * 4, dtype=torch.int32))
    assert [s["category_id"] for s in segments_info] == [0, 0, 2]
    assert [s["isthing"] for s in segments_info] == [True, True, False]


def test_panoptic_nothing_survives():
    mask_cls, mask_pred = panoptic_case()
    panoptic_seg, segments_info = panoptic_inference(
        mask_cls, mask_pred, thing_ids={0, 1}, object_mask_threshold=0.99, overlap_threshold=0.8
    )
    assert segments_info == [] and panoptic_seg.shape == (4, 4) and panoptic_seg.sum() == 0
    panoptic_seg, segments_info = panoptic_inference(
        torch.zeros(0, 4),
        torch.zeros(0, 3, 5),
        thing_ids=set(),
        object_mask_threshold=0.5,
        overlap_threshold=0.5,
    )
    assert segments_info == [] and panoptic_seg.shape == (3, 5)


def instance_case():
    mask_cls = class_logits(
        [
            [0.7, 0.2, 0.1],  # q0
            [0.1, 0.6, 0.3],  # q1
            [0.3, 0.3, 0.4],  # q2
        ]
    )
    mask_pred = torch.full((3, 5, 6), -3.0)
    mask_pred[0, 1:3, 2:5] = 2.0  # rows 1-2, cols 2-4
    mask_pred[1, 0:5, 0:1] = 1.0  # column 0
    mask_pred[2, 4, 5] = 0.5  # one pixel
    return mask_cls, mask_pred


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_instance_topk_scores_and_boxes():
    mask_cls, mask_pred = instance_case()
    result = instance_inference(
        mask_cls, mask_pred, thing_ids={0, 1}, max_detections=3, panoptic_on=False
    )
    assert isinstance(result, Instances) and result.image_size == (5, 6)
    assert set(result.get_fields()) == {"pred_masks", "pred_boxes", "scores", "pred_classes"}
    # (query, class) pairs by probability: (0,0)=.7, (1,1)=.6, then (2,0)/(2,1)=.3 tie
    assert result.pred_classes[:2].tolist() == [0, 1]
    assert result.pred_classes.dtype == torch.int64
    assert result.pred_masks.dtype == torch.bool and result.pred_masks.shape == (3, 5, 6)
    assert torch.equal(result.pred_masks[0], mask_pred[0] > 0)
    expected_scores = [0.7 * sigmoid(2.0), 0.6 * sigmoid(1.0), 0.3 * sigmoid(0.5)]
    assert result.scores.tolist() == pytest.approx(expected_scores, rel=1e-5)
    assert isinstance(result.pred_boxes, Boxes)
    expected_boxes = [[2, 1, 5, 3], [0, 0, 1, 5], [5, 4, 6, 5]]
    assert result.pred_boxes.tensor.tolist() == expected_boxes


def test_instance_panoptic_on_keeps_only_things():
    mask_cls, mask_pred = instance_case()
    result = instance_inference(
        mask_cls, mask_pred, thing_ids={1}, max_detections=4, panoptic_on=True
    )
    # top 4 pairs: (0,0) .7, (1,1) .6, (2,0) .3, (2,1) .3 -> only the class-1 pairs survive
    assert result.pred_classes.tolist() == [1, 1]
    expected_scores = [0.6 * sigmoid(1.0), 0.3 * sigmoid(0.5)]
    assert result.scores.tolist() == pytest.approx(expected_scores, rel=1e-5)
    kept_all = instance_inference(
        mask_cls, mask_pred, thing_ids=None, max_detections=4, panoptic_on=True
    )
    assert len(kept_all) == 4


def test_instance_class_agnostic_and_empty():
    torch.manual_seed(0)
    mask_cls = torch.randn(5, 2)
    mask_pred = torch.randn(5, 4, 4)
    result = instance_inference(
        mask_cls, mask_pred, thing_ids=None, max_detections=10, panoptic_on=False
    )
    assert len(result) == 5 and result.pred_classes.tolist() == [0] * 5
    expected = []
    for q in range(5):
        inside = mask_pred[q] > 0
        mask_score = mask_pred[q].sigmoid()[inside].mean().item() if inside.any() else 0.0
        expected.append(mask_cls[q].softmax(-1)[0].item() * mask_score)
    assert sorted(result.scores.tolist()) == pytest.approx(sorted(expected), rel=1e-4)

    empty = instance_inference(
        torch.zeros(0, 3), torch.zeros(0, 4, 4), thing_ids={0}, max_detections=10, panoptic_on=True
    )
    assert len(empty) == 0 and empty.image_size == (4, 4)
    assert empty.pred_masks.shape == (0, 4, 4) and empty.pred_boxes.tensor.shape == (0, 4)


def test_masks_to_boxes_matches_detectron2_bitmasks():
    torch.manual_seed(0)
    masks = torch.rand(6, 7, 9) > 0.9
    masks[2] = False
    expected = BitMasks(masks).get_bounding_boxes().tensor
    torch.testing.assert_close(masks_to_boxes(masks), expected)
