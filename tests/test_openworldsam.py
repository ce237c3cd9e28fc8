"""OpenWorldSAM on CPU: SAM2-tiny (random weights, 128x128 input) + a tiny open_clip model."""
import functools
import os
from itertools import combinations

import numpy as np
import open_clip
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torchvision.ops import box_iou

from openseg.config import add_openseg_config
from openseg.data.mappers import build_mapper
from openseg.projects.openworldsam import (
    LanguagePromptAdapter,
    OpenWorldSAM,
    add_openworldsam_config,
    prompt_logits,
    threshold_nms_instances,
)

CLIP_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "open_clip")
open_clip.add_model_config(CLIP_CONFIG_DIR)
SAM2_TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"
IMAGE_SIZE = 128
NUM_QUERIES = 5


@functools.lru_cache(maxsize=1)
def _base_cfg():
    """Shared + OpenWorldSAM keys only, so other projects' packages play no part here."""
    cfg = get_cfg()
    add_openseg_config(cfg)
    add_openworldsam_config(cfg)
    cfg.merge_from_file("configs/openworldsam/Base-OpenWorldSAM.yaml")
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.CLIP.MODEL_NAME", "openseg-test-convnext",
            "MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES", ["{}"],
            "MODEL.OPENWORLDSAM.SAM2_CONFIG", SAM2_TINY,
            "MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE", IMAGE_SIZE,
            "MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS", NUM_QUERIES,
            "MODEL.OPENWORLDSAM.PROJECTOR_HIDDEN_DIM", 64,
            "MODEL.OPENWORLDSAM.DIM_FEEDFORWARD", 64,
            "MODEL.OPENWORLDSAM.TRAIN_NUM_POINTS", 256,
            "DATASETS.TRAIN", ("openseg_demo_train",),
            "DATASETS.TEST", ("openseg_demo_val",),
            "INPUT.MIN_SIZE_TRAIN", (128,),
            "INPUT.MAX_SIZE_TRAIN", 128,
            "INPUT.MIN_SIZE_TEST", 128,
            "INPUT.MAX_SIZE_TEST", 128,
        ]
    )
    return cfg


def tiny_cfg(*opts):
    cfg = _base_cfg().clone()
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


@pytest.fixture(scope="module")
def train_batch():
    mapper = build_mapper(tiny_cfg(), is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("openseg_demo_train")[:2]]


@pytest.fixture(scope="module")
def val_input():
    mapper = build_mapper(tiny_cfg(), is_train=False)
    return mapper(DatasetCatalog.get("openseg_demo_val")[0])


def _adapter_parameter_formula(d_in, hidden, d, k, layers, ffn):
    """Hand count: Linear(a, b) has a*b + b weights; nn.MultiheadAttention has in-projection
    3d*d + 3d and out-projection d*d + d; LayerNorm has 2d."""
    projector = d_in * hidden + hidden + hidden * d + d
    attention = 3 * d * d + 3 * d + d * d + d
    layer = 2 * attention + (d * ffn + ffn + ffn * d + d) + 3 * 2 * d
    return projector + k * d + layers * layer


def test_paper_dimensions_give_about_4_5m_trainable_parameters():
    adapter = LanguagePromptAdapter(
        input_dim=1024, hidden_dim=1024, prompt_dim=256, num_tie_breakers=20, num_layers=3,
        nheads=8, dim_feedforward=1024, dropout=0.0,
    )
    count = sum(p.numel() for p in adapter.parameters())
    assert count == _adapter_parameter_formula(1024, 1024, 256, 20, 3, 1024)
    assert 4.3e6 < count < 4.7e6


def test_only_the_adapter_trains(model):
    counts = model.trainable_parameter_counts()
    assert counts["total"] == _adapter_parameter_formula(
        model.vl_encoder.output_dim, 64, 256, NUM_QUERIES, 3, 64
    )
    assert not any(p.requires_grad for p in model.sam2.parameters())
    assert not any(p.requires_grad for p in model.vl_encoder.parameters())
    model.train()
    assert not model.sam2.training and not model.vl_encoder.training
    model.eval()


def test_tie_breakers_give_distinct_queries(model):
    torch.manual_seed(0)
    adapter = model.adapter
    prompt = torch.randn(1, model.vl_encoder.output_dim)
    initial = adapter.initial_queries(prompt)[0]
    tie = adapter.tie_breakers.weight
    for i, j in combinations(range(NUM_QUERIES), 2):
        torch.testing.assert_close(initial[i] - initial[j], tie[i] - tie[j])
    features = model.sam2.image_features(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    with torch.no_grad():
        queries = adapter(prompt, features["image_embed"][0], features["image_pe"][0])[0]
        masks, _ = model.sam2.decode(features, 0, queries)
    assert torch.cdist(queries, queries)[~torch.eye(NUM_QUERIES, dtype=torch.bool)].min() > 1e-3
    mask_gaps = (masks[:, None] - masks[None]).abs().flatten(2).amax(-1)
    assert mask_gaps[~torch.eye(NUM_QUERIES, dtype=torch.bool)].min() > 1e-4
    # control: without tie-breakers the K queries of one prompt collapse to one
    saved = adapter.tie_breakers.weight.data.clone()
    try:
        adapter.tie_breakers.weight.data.zero_()
        with torch.no_grad():
            collapsed = adapter(prompt, features["image_embed"][0], features["image_pe"][0])[0]
        assert torch.cdist(collapsed, collapsed).max() < 1e-4
    finally:
        adapter.tie_breakers.weight.data.copy_(saved)


def test_image_features_match_sam2_image_predictor(model):
    """FrozenSAM2.image_features against sam2's own SAM2ImagePredictor on the same weights."""
    reference = build_sam2(
        SAM2_TINY, ckpt_path=None, device="cpu", apply_postprocessing=False,
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )
    reference.image_encoder.load_state_dict(model.sam2.image_encoder.state_dict())
    reference.sam_mask_decoder.load_state_dict(model.sam2.mask_decoder.state_dict())
    reference.sam_prompt_encoder.load_state_dict(model.sam2.prompt_encoder.state_dict())
    reference.no_mem_embed.data.copy_(model.sam2.no_mem_embed.data)
    predictor = SAM2ImagePredictor(reference)
    predictor._bb_feat_sizes = [(IMAGE_SIZE // s,) * 2 for s in (4, 8, 16)]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    predictor.set_image(image)
    ours = model.sam2.image_features(
        model.preprocess_images([{"image": torch.from_numpy(image).permute(2, 0, 1)}])
    )
    torch.testing.assert_close(ours["image_embed"], predictor._features["image_embed"],
                               atol=1e-4, rtol=1e-4)
    for level, ref_level in zip(ours["high_res_features"], predictor._features["high_res_feats"]):
        torch.testing.assert_close(level, ref_level, atol=1e-4, rtol=1e-4)


def test_soft_prompt_cross_attention_sees_only_image_features(model):
    torch.manual_seed(1)
    features = model.sam2.image_features(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    embed, pos = features["image_embed"][0], features["image_pe"][0]
    expected_keys = (embed + pos).flatten(1).T
    expected_values = embed.flatten(1).T
    captured = []

    def capture(module, args, kwargs):
        captured.append((args[1].detach().clone(), args[2].detach().clone()))

    handles = [
        layer.cross_attn.register_forward_pre_hook(capture, with_kwargs=True)
        for layer in model.adapter.layers
    ]
    try:
        with torch.no_grad():
            for prompts in (torch.randn(3, model.vl_encoder.output_dim),
                            torch.randn(2, model.vl_encoder.output_dim)):
                model.adapter(prompts, embed, pos)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == 2 * len(model.adapter.layers)
    for keys, values in captured:
        # one key / value per image position, identical for every prompt and layer
        assert keys.shape[1] == embed.shape[1] * embed.shape[2]
        for p in range(keys.shape[0]):
            torch.testing.assert_close(keys[p], expected_keys)
            torch.testing.assert_close(values[p], expected_values)


def test_loss_decreases_on_demo_data(model, train_batch):
    torch.manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial_state = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    model.train()
    totals = []
    batch = train_batch[:1]
    features, contexts = model.encode_images(batch)  # frozen: the same every step
    try:
        for step in range(6):
            losses = model.losses(batch, features, contexts)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            if step == 0:
                assert all(p.grad is not None for p in trainable)  # DDP: no unused parameter
            optimizer.step()
            totals.append(total.item())
    finally:
        model.eval()
        with torch.no_grad():
            for param, value in zip(trainable, initial_state):
                param.copy_(value)
    assert set(losses) == {"loss_focal", "loss_dice"}
    assert np.mean(totals[-2:]) < 0.9 * totals[0] and totals[-1] < min(totals[:3]), totals


def test_image_without_ground_truth_still_uses_every_parameter(model, train_batch):
    empty = dict(train_batch[0])
    empty["instances"] = train_batch[0]["instances"][:0]
    model.train()
    try:
        model.zero_grad()
        losses = model([empty])
        sum(losses.values()).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is not None for p in trainable)
        assert all(v.item() == 0.0 for v in losses.values())
    finally:
        model.zero_grad()
        model.eval()


def test_threshold_nms_instances_hand_case():
    masks = torch.full((5, 20, 20), -5.0)
    masks[0, 0:10, 0:10] = 5   # class 1, score 0.9
    masks[1, 0:10, 1:11] = 5   # class 1, IoU 9/11 with mask 0, score 0.8 -> suppressed
    masks[2, 0:10, 1:11] = 5   # class 2, same box as mask 1: other class -> kept
    masks[3, 12:20, 12:20] = 5  # class 1, score 0.69 -> below threshold
    masks[4, 10:20, 0:10] = 5   # class 1, touching mask 0 only, score 0.75 -> kept
    scores = torch.tensor([0.9, 0.8, 0.7, 0.69, 0.75])
    classes = torch.tensor([1, 1, 2, 1, 1])
    result = threshold_nms_instances(
        masks, scores, classes, score_threshold=0.7, nms_threshold=0.5, max_detections=10,
        output_size=(40, 40),
    )
    assert sorted(result.scores.tolist()) == pytest.approx([0.7, 0.75, 0.9])
    assert sorted(result.pred_classes.tolist()) == [1, 1, 2]
    assert result.pred_masks.shape == (3, 40, 40)
    best = int(result.scores.argmax())
    assert result.pred_masks[best].sum() == 20 * 20  # 10x10 at 20 -> 20x20 at 40
    assert result.pred_boxes.tensor[best].tolist() == [0.0, 0.0, 20.0, 20.0]
    capped = threshold_nms_instances(
        masks, scores, classes, score_threshold=0.7, nms_threshold=0.5, max_detections=2,
        output_size=(40, 40),
    )
    assert capped.scores.tolist() == pytest.approx([0.9, 0.75])


def test_semantic_merge_is_confidence_weighted():
    from openseg.modeling.inference import semantic_inference

    torch.manual_seed(0)
    masks = torch.randn(3, 4, 4)
    scores = torch.tensor([0.9, 0.6, 0.8])
    classes = torch.tensor([0, 0, 2])
    semantic = semantic_inference(prompt_logits(scores, classes, 3), masks)
    expected = torch.zeros(3, 4, 4)
    for mask, score, cls in zip(masks, scores, classes):
        expected[cls] += score * mask.sigmoid()
    torch.testing.assert_close(semantic, expected)


def test_instance_inference_respects_thresholds(model, val_input):
    model.score_threshold = 0.3  # random SAM2 weights: lower so that some masks survive
    try:
        with torch.no_grad():
            output = model([val_input])[0]
    finally:
        model.score_threshold = 0.7
    instances = output["instances"]
    assert len(instances) > 0
    assert instances.scores.min() >= 0.3
    boxes, classes = instances.pred_boxes.tensor, instances.pred_classes
    overlaps = box_iou(boxes, boxes)
    for i, j in combinations(range(len(instances)), 2):
        if classes[i] == classes[j]:
            assert overlaps[i, j] <= 0.5
    assert instances.pred_masks.shape[-2:] == (val_input["height"], val_input["width"])


def test_outputs_and_oracle_protocol(model, val_input):
    with torch.no_grad():
        output = model([val_input])[0]
    num_classes = 8
    assert output["sem_seg"].shape == (num_classes, val_input["height"], val_input["width"])
    panoptic, segments = output["panoptic_seg"]
    assert panoptic.shape == (val_input["height"], val_input["width"])
    assert set(panoptic.unique().tolist()) <= {0} | {s["id"] for s in segments}
    present = {s["category_id"] for s in val_input["segments_info"]}
    model.prompt_protocol = "oracle"
    try:
        with torch.no_grad():
            oracle = model([val_input])[0]
    finally:
        model.prompt_protocol = "global"
    absent = [c for c in range(num_classes) if c not in present]
    assert absent and oracle["sem_seg"][absent].abs().max() == 0
    assert oracle["sem_seg"][sorted(present)].amax() > 0
    assert set(oracle["instances"].pred_classes.tolist()) <= present
    stripped = {k: v for k, v in val_input.items() if k != "segments_info"}
    model.prompt_protocol = "oracle"
    try:
        with pytest.raises(KeyError, match="oracle"):
            model([stripped])
    finally:
        model.prompt_protocol = "global"


def test_referring_mode_and_two_stage_refinement(model, val_input):
    referring = dict(val_input, sentences=["the red circle", "the sky at the top"])
    with torch.no_grad():
        first = model([referring])[0]
        model.two_stage_refinement = True
        try:
            refined = model([referring])[0]
        finally:
            model.two_stage_refinement = False
    assert first["ref_seg"].shape == (2, val_input["height"], val_input["width"])
    assert first["ref_seg"].dtype == torch.bool
    assert not torch.equal(first["ref_scores"], refined["ref_scores"])


def test_encoders_run_once_per_image(model, val_input):
    calls = {"sam2": 0, "clip": 0}
    hooks = [
        model.sam2.image_encoder.register_forward_hook(
            lambda *_: calls.__setitem__("sam2", calls["sam2"] + 1)),
        model.vl_encoder.text_encoder.clip_model.visual.register_forward_hook(
            lambda *_: calls.__setitem__("clip", calls["clip"] + 1)),
    ]
    model.decoder_chunk_size = NUM_QUERIES * 3  # 8 prompts in 3 chunks
    try:
        with torch.no_grad():
            model([val_input, val_input])
    finally:
        model.decoder_chunk_size = 512
        for hook in hooks:
            hook.remove()
    assert calls == {"sam2": 1, "clip": 2}  # one batched SAM2 call, one CLIP call per image


@pytest.mark.parametrize(
    "opts, error, match",
    [
        (("MODEL.OPENWORLDSAM.TEST.PROMPTS", "all"), ValueError, "TEST.PROMPTS"),
        (("MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE", 100), ValueError, "SAM2_IMAGE_SIZE"),
        (("MODEL.OPENWORLDSAM.SAM2_CHECKPOINT", "/nonexistent/sam2.pt"), FileNotFoundError,
         "SAM2_CHECKPOINT"),
        (("MODEL.OPENWORLDSAM.SAM2_CONFIG", "configs/sam2.1/nope.yaml"), ValueError,
         "SAM2_CONFIG"),
        (("MODEL.OPENWORLDSAM.VL_ENCODER", "BEiT3"), KeyError, "BEiT-3"),
        (("INPUT.FORMAT", "BGR"), ValueError, "RGB"),
    ],
)
def test_config_errors(opts, error, match):
    with pytest.raises(error, match=match):
        OpenWorldSAM(tiny_cfg(*opts))

