"""HungarianMatcher and its cost functions against hand-computed values and brute force."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from openseg.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost

LN3 = math.log(3.0)
# sigmoid: row 0 -> [0.5, 0.5], row 1 -> [0.75, 0.25]
LOGITS = torch.tensor([[0.0, 0.0], [LN3, -LN3]])
TARGETS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def test_sigmoid_ce_cost_hand_computed():
    expected = torch.tensor(
        [
            [math.log(2), math.log(2)],
            [math.log(4 / 3), (math.log(4 / 3) + math.log(4)) / 2],
        ]
    )
    torch.testing.assert_close(batch_sigmoid_ce_cost(LOGITS, TARGETS), expected)


def test_dice_cost_hand_computed():
    # pred 0 vs target 0: 1 - (2*0.5 + 1) / (1 + 1 + 1); vs target 1: 1 - (2*1 + 1) / (1 + 2 + 1)
    expected = torch.tensor([[1 / 3, 1 / 4], [1 / 6, 1 / 4]])
    torch.testing.assert_close(batch_dice_cost(LOGITS, TARGETS), expected)


def pixel_centre_coords(height: int, width: int) -> torch.Tensor:
    """Points at pixel centres, where bilinear point sampling returns the pixel value."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([(xs + 0.5) / width, (ys + 0.5) / height], -1).reshape(-1, 2).float()


def test_cost_matrix_matches_naive_loop():
    torch.manual_seed(0)
    num_queries, num_targets, num_classes, size = 4, 3, 5, 6
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=10)
    logits = torch.randn(num_queries, num_classes + 1)
    masks = torch.randn(num_queries, size, size)
    labels = torch.tensor([4, 0, 2])
    tgt_masks = torch.rand(num_targets, size, size) > 0.5
    cost = matcher.cost_matrix(
        logits, masks, labels, tgt_masks, point_coords=pixel_centre_coords(size, size)
    )
    expected = torch.zeros(num_queries, num_targets)
    for i in range(num_queries):
        for j in range(num_targets):
            x, t = masks[i].flatten(), tgt_masks[j].flatten().float()
            bce = F.binary_cross_entropy_with_logits(x, t)
            p = x.sigmoid()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            prob = logits[i].softmax(-1)[labels[j]]
            expected[i, j] = -2.0 * prob + 5.0 * bce + 3.0 * dice
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)


def brute_force_min(cost: torch.Tensor) -> float:
    num_queries, num_targets = cost.shape
    best = math.inf
    if num_queries >= num_targets:
        for queries in itertools.permutations(range(num_queries), num_targets):
            best = min(best, sum(cost[q, t].item() for t, q in enumerate(queries)))
    else:
        for targets in itertools.permutations(range(num_targets), num_queries):
            best = min(best, sum(cost[q, t].item() for q, t in enumerate(targets)))
    return best


@pytest.mark.parametrize("num_queries,num_targets", [(3, 3), (5, 2), (4, 1), (2, 4), (3, 5)])
def test_assignment_is_brute_force_optimum(num_queries, num_targets):
    torch.manual_seed(num_queries * 10 + num_targets)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=16)
    batch, num_classes, size = 2, 3, 8
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1),
        "pred_masks": torch.randn(batch, num_queries, size, size),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (num_targets,)),
            "masks": torch.rand(num_targets, 2 * size, 2 * size) > 0.5,
        }
        for _ in range(batch)
    ]
    torch.manual_seed(123)
    indices = matcher(outputs, targets)
    torch.manual_seed(123)  # same random points as inside forward, image by image
    for b, (query_idx, target_idx) in enumerate(indices):
        cost = matcher.cost_matrix(
            outputs["pred_logits"][b],
            outputs["pred_masks"][b],
            targets[b]["labels"],
            targets[b]["masks"],
        )
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert len(query_idx) == len(target_idx) == min(num_queries, num_targets)
        assert len(set(query_idx.tolist())) == len(query_idx)
        assert len(set(target_idx.tolist())) == len(target_idx)
        total = cost[query_idx, target_idx].sum().item()
        assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_zero_targets():
    torch.manual_seed(0)
    matcher = HungarianMatcher(num_points=8)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 4, 4)}
    targets = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 4, 4, dtype=torch.bool),
        },
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)},
    ]
    indices = matcher(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[1][1].tolist() == [0] and len(indices[1][0]) == 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="TRAIN_NUM_POINTS"):
        HungarianMatcher(num_points=0)
    matcher = HungarianMatcher(num_points=4)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 4, 4)}
    with pytest.raises(ValueError, match="target dicts"):
        matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}])


def test_mask_costs_stay_float32_under_autocast():
    """The release computes the matching costs with autocast disabled; bfloat16 matmuls would
    change which query a target is matched to."""
    torch.manual_seed(0)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    logits, masks = torch.randn(6, 4), torch.randn(6, 12, 12) * 3
    labels, tgt_masks = torch.tensor([0, 2]), torch.rand(2, 12, 12) > 0.5
    points = torch.rand(50, 2)
    expected = matcher.cost_matrix(logits, masks, labels, tgt_masks, point_coords=points)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = matcher.cost_matrix(logits, masks, labels, tgt_masks, point_coords=points)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)


def test_points_are_drawn_like_the_release():
    """One torch.rand(1, P, 2) per image, also for an image without targets, so a seeded run
    draws the same points as Mask2Former's matcher."""
    matcher = HungarianMatcher(num_points=7)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8)},
    ]
    torch.manual_seed(3)
    matcher(outputs, targets)
    after_matching = torch.rand(1)
    torch.manual_seed(3)
    torch.rand(1, 7, 2), torch.rand(1, 7, 2)
    assert torch.equal(torch.rand(1), after_matching)
