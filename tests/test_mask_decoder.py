"""Masked-attention decoder: shapes, query-group isolation, fixed-mask attention, empty masks."""

import pytest
import torch
from detectron2.config import get_cfg

from openseg.config import add_openseg_config
from openseg.modeling.mask_decoder import QueryGroup, build_transformer_decoder

HIDDEN = 16
NUM_QUERIES = 5
NUM_CLASSES = 3
BATCH = 2
# image 128x128: levels at strides 32/16/8, mask features at stride 4
LEVEL_SIZES = [(4, 4), (8, 8), (16, 16)]
MASK_SIZE = (32, 32)


def _decoder(dec_layers: int = 4, class_agnostic: bool = False):
    cfg = get_cfg()
    add_openseg_config(cfg)
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM = HIDDEN
    mf.NUM_OBJECT_QUERIES = NUM_QUERIES
    mf.NHEADS = 2
    mf.DIM_FEEDFORWARD = 32
    mf.DEC_LAYERS = dec_layers
    mf.CLASS_AGNOSTIC = class_agnostic
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = HIDDEN
    return build_transformer_decoder(cfg, in_channels=HIDDEN).eval()


def _inputs():
    features = [torch.randn(BATCH, HIDDEN, h, w) for h, w in LEVEL_SIZES]
    return features, torch.randn(BATCH, HIDDEN, *MASK_SIZE)


def _group(size: int, **kwargs) -> QueryGroup:
    return QueryGroup(
        content=torch.randn(BATCH, size, HIDDEN), pos=torch.randn(BATCH, size, HIDDEN), **kwargs
    )


def test_shapes_and_aux_count():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=4)
    out = decoder(*_inputs(), extra_groups=[_group(3)])
    assert out["pred_logits"].shape == (BATCH, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (BATCH, NUM_QUERIES, *MASK_SIZE)
    assert out["pred_embeds"].shape == (BATCH, NUM_QUERIES, HIDDEN)
    assert len(out["aux_outputs"]) == 3  # DEC_LAYERS predictions in total, the last is final
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "pred_embeds", "pred_queries"}
        # pred_embeds are the decoder-normed query states
        torch.testing.assert_close(decoder.decoder_norm(aux["pred_queries"]), aux["pred_embeds"])
        assert aux["pred_masks"].shape == (BATCH, NUM_QUERIES, *MASK_SIZE)
    (extra,) = out["extra"]
    assert extra["pred_logits"].shape == (BATCH, 3, NUM_CLASSES + 1)
    assert extra["pred_masks"].shape == (BATCH, 3, *MASK_SIZE)
    assert len(extra["aux_outputs"]) == 3
    assert _decoder(class_agnostic=True)(*_inputs())["pred_logits"].shape[-1] == 2


def test_class_predictor_is_used_for_all_logits():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=3)

    class Constant(torch.nn.Module):
        def forward(self, embeds):
            return torch.full((*embeds.shape[:2], 7), 2.0)

    decoder.class_predictor = Constant()
    out = decoder(*_inputs(), extra_groups=[_group(2)])
    for pred in [out] + out["aux_outputs"] + [out["extra"][0]]:
        assert torch.equal(
            pred["pred_logits"], torch.full((BATCH, pred["pred_embeds"].shape[1], 7), 2.0)
        )


def test_main_outputs_unchanged_by_extra_groups():
    torch.manual_seed(0)
    decoder = _decoder()
    features, mask_features = _inputs()
    alone = decoder(features, mask_features)
    with_groups = decoder(
        features,
        mask_features,
        extra_groups=[
            _group(3),
            _group(2, sees_main=False),
            _group(4, fixed_masks=torch.rand(BATCH, 4, 32, 32) > 0.5),
        ],
    )
    for key in ("pred_logits", "pred_masks", "pred_embeds"):
        torch.testing.assert_close(with_groups[key], alone[key], atol=1e-6, rtol=0)
        for aux_a, aux_b in zip(with_groups["aux_outputs"], alone["aux_outputs"]):
            torch.testing.assert_close(aux_a[key], aux_b[key], atol=1e-6, rtol=0)


def test_groups_do_not_see_each_other():
    torch.manual_seed(0)
    decoder = _decoder()
    features, mask_features = _inputs()
    group_a, group_b = _group(3), _group(2)
    before = decoder(features, mask_features, extra_groups=[group_a, group_b])
    perturbed_a = QueryGroup(content=group_a.content + 1.0, pos=group_a.pos)
    after = decoder(features, mask_features, extra_groups=[perturbed_a, group_b])
    torch.testing.assert_close(after["pred_embeds"], before["pred_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        after["extra"][1]["pred_embeds"], before["extra"][1]["pred_embeds"], atol=1e-6, rtol=0
    )
    assert (after["extra"][0]["pred_embeds"] - before["extra"][0]["pred_embeds"]).abs().max() > 1e-3


def test_groups_that_see_other_groups_or_are_seen_by_main():
    """`sees_other_groups` lets a group read the other groups (only it changes when another
    group changes); `seen_by_main` lets the main queries read the group."""
    torch.manual_seed(0)
    decoder = _decoder()
    features, mask_features = _inputs()
    group_a, group_b, group_c = _group(3), _group(2, sees_other_groups=True), _group(2)
    before = decoder(features, mask_features, extra_groups=[group_a, group_b, group_c])
    perturbed_a = QueryGroup(content=group_a.content + 1.0, pos=group_a.pos)
    after = decoder(features, mask_features, extra_groups=[perturbed_a, group_b, group_c])
    assert (after["extra"][1]["pred_embeds"] - before["extra"][1]["pred_embeds"]).abs().max() > 1e-3
    torch.testing.assert_close(
        after["extra"][2]["pred_embeds"], before["extra"][2]["pred_embeds"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(after["pred_embeds"], before["pred_embeds"], atol=1e-6, rtol=0)
    seen = QueryGroup(content=group_a.content, pos=group_a.pos, seen_by_main=True)
    seen_perturbed = QueryGroup(content=group_a.content + 1.0, pos=group_a.pos, seen_by_main=True)
    main_before = decoder(features, mask_features, extra_groups=[seen])["pred_embeds"]
    main_after = decoder(features, mask_features, extra_groups=[seen_perturbed])["pred_embeds"]
    assert (main_after - main_before).abs().max() > 1e-3


def test_fixed_masks_restrict_cross_attention():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=4)
    features, mask_features = _inputs()
    # foreground rows 8..23, cols 0..15 of the 32x32 mask: aligned to 8-pixel blocks, so at every
    # level (4, 8, 16 pixels wide) the region is exactly rows/cols [h/4, 3h/4) x [0, w/2)
    fixed = torch.zeros(BATCH, 2, *MASK_SIZE, dtype=torch.bool)
    fixed[:, :, 8:24, 0:16] = True
    group = _group(2, fixed_masks=fixed, sees_main=False)
    base = decoder(features, mask_features, extra_groups=[group])["extra"][0]["pred_embeds"]

    def region(height, width):
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[height // 4 : 3 * height // 4, : width // 2] = True
        return inside

    outside_changed = [f + 5.0 * torch.randn_like(f) * ~region(*f.shape[-2:]) for f in features]
    out = decoder(outside_changed, mask_features, extra_groups=[group])
    torch.testing.assert_close(out["extra"][0]["pred_embeds"], base, atol=1e-6, rtol=0)
    assert (out["pred_embeds"] - decoder(features, mask_features)["pred_embeds"]).abs().max() > 1e-3

    inside_changed = [f + 5.0 * torch.randn_like(f) * region(*f.shape[-2:]) for f in features]
    changed = decoder(inside_changed, mask_features, extra_groups=[group])["extra"][0][
        "pred_embeds"
    ]
    assert (changed - base).abs().max() > 1e-3


def test_empty_predicted_masks_give_no_nan_and_attend_everywhere():
    """Mask2Former un-masks a query whose mask is empty: it must behave like an all-foreground mask."""
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=4)
    features, _ = _inputs()
    mask_features = torch.ones(BATCH, HIDDEN, *MASK_SIZE)
    last = decoder.mask_embed.layers[-1]

    def run(mask_embedding_value):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(mask_embedding_value)  # every mask logit = value * HIDDEN
        return decoder(features, mask_features)

    empty, full = run(-10.0), run(10.0)
    assert (empty["pred_masks"].sigmoid() < 0.5).all()
    for pred in [empty] + empty["aux_outputs"]:
        assert torch.isfinite(pred["pred_embeds"]).all()
        assert torch.isfinite(pred["pred_logits"]).all()
    torch.testing.assert_close(empty["pred_embeds"], full["pred_embeds"], atol=1e-6, rtol=0)


def test_gradients_flow_and_bad_group_rejected():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=3).train()
    features, mask_features = _inputs()
    out = decoder(features, mask_features)
    (out["pred_logits"].sum() + out["pred_masks"].sum()).backward()
    assert decoder.query_feat.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="extra_groups\\[0\\]"):
        decoder(
            features,
            mask_features,
            extra_groups=[QueryGroup(torch.randn(1, 2, HIDDEN), torch.randn(1, 2, HIDDEN))],
        )


def test_decoder_has_no_dropout_whatever_model_dropout():
    """Sec. 3.2.3 removes dropout from the decoder; MASK_FORMER.DROPOUT (the release's default
    0.1) only reaches the pixel decoder, as in the release."""
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = HIDDEN
    cfg.MODEL.MASK_FORMER.NHEADS = 2
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = HIDDEN
    decoder = build_transformer_decoder(cfg, in_channels=HIDDEN)
    rates = [m.p for m in decoder.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.dropout for m in decoder.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert rates and all(rate == 0.0 for rate in rates)
