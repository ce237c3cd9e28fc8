"""Mask losses and SetCriterion against hand-computed values and brute-force references."""

import math

import pytest
import torch
import torch.nn.functional as F

from openseg.modeling.losses import (
    SetCriterion,
    dice_loss,
    sample_mask_points,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)
from openseg.modeling.matcher import HungarianMatcher

LN3 = math.log(3.0)
# sigmoid: row 0 -> [0.5, 0.5], row 1 -> [0.75, 0.25]
LOGITS = torch.tensor([[0.0, 0.0], [LN3, -LN3]])
TARGETS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def test_dice_loss_hand_computed():
    # row 0: 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3; row 1: 1 - (2*1 + 1) / (1 + 2 + 1) = 1/4
    assert dice_loss(LOGITS, TARGETS, 2).item() == pytest.approx((1 / 3 + 1 / 4) / 2, rel=1e-6)


def test_sigmoid_ce_loss_hand_computed():
    row0 = math.log(2)
    row1 = (math.log(4 / 3) + math.log(4)) / 2
    assert sigmoid_ce_loss(LOGITS, TARGETS, 4).item() == pytest.approx((row0 + row1) / 4, rel=1e-6)


def test_sigmoid_focal_loss_hand_computed():
    # alpha_t * (1 - p_t)^2 * CE per point, averaged over points, summed over masks
    row0 = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)) / 2
    row1 = (0.25 * 0.0625 * math.log(4 / 3) + 0.25 * 0.5625 * math.log(4)) / 2
    value = sigmoid_focal_loss(LOGITS, TARGETS, 2, alpha=0.25, gamma=2.0).item()
    assert value == pytest.approx((row0 + row1) / 2, rel=1e-6)
    no_alpha = sigmoid_focal_loss(LOGITS, TARGETS, 1, alpha=-1, gamma=0.0).item()
    assert no_alpha == pytest.approx(sigmoid_ce_loss(LOGITS, TARGETS, 1).item(), rel=1e-6)


def make_criterion(num_classes=3, **kwargs):
    params = dict(
        num_classes=num_classes,
        matcher=HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=64,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    params.update(kwargs)
    return SetCriterion(**params)


def test_classification_loss_with_eos_weight_brute_force():
    torch.manual_seed(0)
    num_classes, num_queries = 3, 4
    criterion = make_criterion(num_classes)
    logits = torch.randn(2, num_queries, num_classes + 1)
    targets = [
        {"labels": torch.tensor([2, 0]), "masks": torch.ones(2, 4, 4)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)},
    ]
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, 3)["loss_ce"]
    # every query's target: matched label, else no-object (index num_classes, weight 0.1)
    wanted = {(0, 1): 0, (0, 3): 2, (1, 2): 1}
    numerator = denominator = 0.0
    for b in range(2):
        for q in range(num_queries):
            cls = wanted.get((b, q), num_classes)
            weight = 0.1 if cls == num_classes else 1.0
            numerator += -weight * torch.log_softmax(logits[b, q], -1)[cls].item()
            denominator += weight
    assert loss.item() == pytest.approx(numerator / denominator, rel=1e-5)
    reference = F.cross_entropy(
        logits.reshape(-1, num_classes + 1),
        torch.tensor([3, 0, 3, 2, 3, 3, 1, 3]),
        weight=torch.tensor([1.0, 1.0, 1.0, 0.1]),
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def scene_targets():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    masks[1, 8:, 4:12] = True
    return [{"labels": torch.tensor([0, 2]), "masks": masks}]


def predictions_for(masks: torch.Tensor, labels: torch.Tensor, num_queries: int, num_classes: int):
    """Logits +/-8 from binary masks (at half resolution) and strongly peaked class logits."""
    pred_masks = torch.full((1, num_queries, 8, 8), -8.0)
    pred_logits = torch.full((1, num_queries, num_classes + 1), -8.0)
    pred_logits[0, :, num_classes] = 8.0
    small = F.interpolate(masks[None].float(), size=(8, 8), mode="nearest")[0]
    for i, label in enumerate(labels.tolist()):
        pred_masks[0, i] = small[i] * 16 - 8
        pred_logits[0, i] = -8.0
        pred_logits[0, i, label] = 8.0
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}


def total(criterion, outputs, targets):
    return sum(criterion.weighted(criterion(outputs, targets)).values()).item()


def test_perfect_prediction_beats_wrong_one():
    torch.manual_seed(0)
    criterion = make_criterion(3)
    targets = scene_targets()
    perfect = predictions_for(targets[0]["masks"], targets[0]["labels"], 5, 3)
    wrong_masks = predictions_for(~targets[0]["masks"], targets[0]["labels"], 5, 3)
    wrong_labels = predictions_for(targets[0]["masks"], torch.tensor([1, 1]), 5, 3)
    perfect_loss = total(criterion, perfect, targets)
    assert perfect_loss < 0.1 * total(criterion, wrong_masks, targets)
    assert perfect_loss < 0.1 * total(criterion, wrong_labels, targets)


def test_deep_supervision_gradients_and_weights():
    torch.manual_seed(0)
    criterion = make_criterion(3)
    targets = scene_targets()
    leaves = [
        (torch.randn(1, 5, 4, requires_grad=True), torch.randn(1, 5, 8, 8, requires_grad=True))
        for _ in range(3)
    ]
    outputs = {
        "pred_logits": leaves[0][0],
        "pred_masks": leaves[0][1],
        "aux_outputs": [{"pred_logits": l, "pred_masks": m} for l, m in leaves[1:]],
    }
    losses = criterion(outputs, targets)
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected_keys
    assert all(torch.isfinite(v) for v in losses.values())
    weighted = criterion.weighted(losses)
    assert weighted["loss_dice_1"].item() == pytest.approx(5.0 * losses["loss_dice_1"].item())
    assert weighted["loss_ce_0"].item() == pytest.approx(2.0 * losses["loss_ce_0"].item())
    sum(weighted.values()).backward()
    for logits, masks in leaves:
        assert logits.grad.abs().sum() > 0 and masks.grad.abs().sum() > 0

    no_aux = make_criterion(3, deep_supervision=False)(outputs, targets)
    assert set(no_aux) == {"loss_ce", "loss_mask", "loss_dice"}


def test_no_targets_and_num_masks_clamp():
    torch.manual_seed(0)
    criterion = make_criterion(3)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)}]
    assert criterion.get_num_masks(empty, torch.device("cpu")) == 1.0
    assert criterion.get_num_masks(scene_targets() * 2, torch.device("cpu")) == 4.0
    logits = torch.randn(1, 5, 4, requires_grad=True)
    masks = torch.randn(1, 5, 8, 8, requires_grad=True)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and masks.grad is not None


def test_registered_loss_and_given_indices():
    criterion = make_criterion(3)

    def loss_query_count(outputs, targets, indices, num_masks):
        return {
            "loss_count": outputs["pred_logits"].new_tensor(float(sum(len(i) for i, _ in indices)))
        }

    criterion.register_loss("count", loss_query_count)
    criterion.weight_dict["loss_count"] = 0.5
    outputs = predictions_for(scene_targets()[0]["masks"], torch.tensor([0, 2]), 4, 3)
    indices = [(torch.tensor([3]), torch.tensor([1]))]
    losses = criterion.compute(outputs, scene_targets(), 1.0, indices=indices, suffix="_extra")
    assert losses["loss_count_extra"].item() == 1.0
    assert set(losses) == {
        "loss_ce_extra",
        "loss_mask_extra",
        "loss_dice_extra",
        "loss_count_extra",
    }
    assert criterion.loss_weight("loss_count_7") == 0.5
    with pytest.raises(KeyError, match="weight_dict"):
        criterion.loss_weight("loss_unknown")
    with pytest.raises(KeyError, match="register_loss"):
        make_criterion(3, losses=["labels", "boxes"])
    with pytest.raises(ValueError, match="OVERSAMPLE_RATIO"):
        make_criterion(3, oversample_ratio=0.5)


def test_uniform_point_loss_approximates_dense_loss():
    """With uniform points only, point-sampled losses estimate the dense losses computed on the
    prediction upsampled to the target resolution (checks prediction/target alignment)."""
    torch.manual_seed(0)
    criterion = make_criterion(
        3, num_points=40000, oversample_ratio=1.0, importance_sample_ratio=0.0
    )
    targets = scene_targets()
    pred_masks = torch.randn(1, 2, 8, 8) * 3
    outputs = {"pred_logits": torch.randn(1, 2, 4), "pred_masks": pred_masks}
    indices = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]
    losses = criterion.loss_masks(outputs, targets, indices, 2.0)
    dense_pred = F.interpolate(pred_masks, size=(16, 16), mode="bilinear", align_corners=False)[0]
    dense_target = targets[0]["masks"][[1, 0]].float()
    dense_bce = F.binary_cross_entropy_with_logits(dense_pred, dense_target, reduction="none")
    expected_bce = dense_bce.flatten(1).mean(1).sum() / 2
    assert losses["loss_mask"].item() == pytest.approx(expected_bce.item(), rel=0.05)
    expected_dice = dice_loss(dense_pred.flatten(1), dense_target.flatten(1), 2.0)
    assert losses["loss_dice"].item() == pytest.approx(expected_dice.item(), rel=0.05)


def test_sample_mask_points_equals_grid_sample_on_padded_float_masks():
    """The gather-based sampler against F.grid_sample on the zero-padded float copy the release
    samples: non-square masks in a larger canvas, points on pixel centres, edges and outside."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 7, 11, generator=generator) > 0.5
    canvas = (9, 13)
    coords = torch.rand(3, 40, 2, generator=generator) * 1.4 - 0.2
    coords[:, 0] = torch.tensor([0.5 / 13, 0.5 / 9])  # a pixel centre: exactly that pixel
    coords[:, 1] = torch.tensor([11 / 13, 3 / 9])  # the image's right edge inside the canvas
    mask_index = torch.tensor([4, 0, 2])
    padded = F.pad(masks.float(), (0, canvas[1] - 11, 0, canvas[0] - 7))[mask_index]
    expected = F.grid_sample(
        padded[:, None], 2 * coords[:, :, None] - 1, mode="bilinear", align_corners=False
    )[:, 0, :, 0]
    sampled = sample_mask_points(masks, coords, mask_index, canvas)
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-6)
    assert sampled[:, 0].tolist() == masks[mask_index, 0, 0].float().tolist()
    assert 0 < (sampled > 0).float().mean() < 1
    # shared points [K, 2] for every mask, no canvas: all masks in order
    shared = coords[0]
    expected_shared = F.grid_sample(
        masks.float()[:, None], (2 * shared - 1)[None, :, None].expand(5, -1, -1, -1),
        mode="bilinear", align_corners=False,
    )[:, 0, :, 0]
    torch.testing.assert_close(sample_mask_points(masks, shared), expected_shared, rtol=0, atol=1e-6)
