"""OpenWorldSAM on CPU.

* Equivalence with the release (GinnyXiao/OpenWorldSAM): fixtures from
  `tools/reference_fixtures/openworldsam.py` (the released `OpenWorldSAM2` with SAM2 Hiera-T
  at 256 x 256, a tiny torchscale BEiT-3 and tokenizer, random weights): tokens, BEiT-3
  [CLS], projector outputs, prompt embeddings, masks, IoU scores, semantic / instance /
  panoptic / referring outputs, two-stage inference and the training loss, within 1e-5.
* Hand cases and brute force: matching, thresholds, NMS, referring choice, semantic merge.
* Checkpoint formats (released OpenWorldSAM, BEiT-3, SAM2 / SAM2.1) on random-weight files.
* The pipeline on the demo data (training step, protocols, encoder calls per image).
Every test sets the train / eval mode it needs, so each passes alone and in any order.
"""
import functools
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torchvision.ops import sigmoid_focal_loss as torchvision_focal

from openseg.config import add_openseg_config
from openseg.data.mappers import build_mapper
from openseg.projects.openworldsam import (
    BEiT3EarlyFusionEncoder,
    BEiT3Tokenizer,
    FrozenSAM2,
    LanguagePromptAdapter,
    OpenWorldSAM,
    add_openworldsam_config,
    batch_sigmoid_focal_cost,
    classwise_mask_nms,
    released_to_openseg_name,
    semantic_logits,
    sparse_prompt_tokens,
    threshold_nms_instances,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "openworldsam"
SPM = str(FIXTURES / "beit3_tiny.spm")
FIXTURE_DATASET = "openworldsam_reference_fixture"
CLIP_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "open_clip")
open_clip.add_model_config(CLIP_CONFIG_DIR)
DEMO_SIZE = 128
DEMO_QUERIES = 4
ATOL = 1e-5


# ---------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def reference(name: str):
    return torch.load(FIXTURES / f"{name}.pt", weights_only=False)


def base_cfg(*opts):
    cfg = get_cfg()
    add_openseg_config(cfg)
    add_openworldsam_config(cfg)
    cfg.merge_from_file("configs/openworldsam/Base-OpenWorldSAM.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def tiny_beit3_opts(max_length: int = 16):
    return [
        "MODEL.OPENWORLDSAM.BEIT3.EMBED_DIM", 64, "MODEL.OPENWORLDSAM.BEIT3.LAYERS", 2,
        "MODEL.OPENWORLDSAM.BEIT3.HEADS", 4, "MODEL.OPENWORLDSAM.BEIT3.FFN_DIM", 128,
        "MODEL.OPENWORLDSAM.BEIT3.VOCAB_SIZE", 64, "MODEL.OPENWORLDSAM.BEIT3.TOKENIZER", SPM,
        "MODEL.OPENWORLDSAM.BEIT3.MAX_TEXT_LENGTH", max_length,
        "MODEL.OPENWORLDSAM.PROJECTOR_HIDDEN_DIM", 64,
    ]


def register_fixture_dataset() -> None:
    inputs = reference("inputs")
    if FIXTURE_DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(FIXTURE_DATASET, lambda: [])
        MetadataCatalog.get(FIXTURE_DATASET).set(
            stuff_classes=list(inputs["class_names"]),
            thing_dataset_id_to_contiguous_id={i: i for i in inputs["thing_ids"]},
        )


def fixture_cfg(*opts):
    register_fixture_dataset()
    inputs, outputs = reference("inputs"), reference("outputs")
    return base_cfg(
        *tiny_beit3_opts(inputs["max_text_length"]),
        "MODEL.OPENWORLDSAM.SAM2_CONFIG", inputs["sam2_config"],
        "MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE", inputs["image_size"],
        "MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS", inputs["num_tokens"],
        "MODEL.OPENWORLDSAM.SOFT_PROMPT_LAYERS", 2,
        "MODEL.OPENWORLDSAM.DIM_FEEDFORWARD", inputs["mlp_dim"],
        "MODEL.OPENWORLDSAM.TEST.SCORE_THRESHOLD", outputs["score_threshold"],
        "DATASETS.TRAIN", (FIXTURE_DATASET,), "DATASETS.TEST", (FIXTURE_DATASET,), *opts,
    )


def build_fixture_model(*opts) -> OpenWorldSAM:
    """Our model with the fixture's weights: SAM2 from the same seed (checked against the
    fixture's checksum), BEiT-3 + adapter from the release's state dict (released names,
    through the checkpoint converter)."""
    torch.manual_seed(reference("inputs")["sam2_seed"])
    model = build_model(fixture_cfg(*opts))
    for name, (total, squares) in reference("sam2_checksum").items():
        if name.startswith(("image_encoder.", "sam_mask_decoder.", "sam_prompt_encoder.")):
            ours = name.replace("sam_mask_decoder", "mask_decoder").replace(
                "sam_prompt_encoder", "prompt_encoder")
            value = model.sam2.state_dict()[ours].double()
            assert value.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), (
                f"SAM2 weight {name} differs from the fixture's seed-generated weights "
                "(torch's RNG changed?): regenerate the fixture"
            )
            assert value.pow(2).sum().item() == pytest.approx(squares, rel=1e-9, abs=1e-9)
    incompatible = model.load_state_dict(reference("weights"), strict=False)
    assert not incompatible.unexpected_keys
    loaded = {released_to_openseg_name(k) for k in reference("weights")}
    assert {k for k in model.state_dict() if k.startswith(("adapter.", "vl_encoder."))} == loaded
    return model


def fixture_input(**extra):
    inputs = reference("inputs")
    height, width = inputs["output_size"]
    return dict(image=inputs["image"], height=height, width=width, **extra)


def capture(model):
    """Hooks recording BEiT-3 [CLS], projector, SAM2 sparse prompt tokens and decoder outputs."""
    records = {"beit3": [], "projector": [], "tokens": [], "decoder": []}
    handles = [
        model.vl_encoder.beit3.register_forward_hook(
            lambda m, a, out: records["beit3"].append(out["encoder_out"][:, 0])),
        model.adapter.projector.register_forward_hook(
            lambda m, a, out: records["projector"].append(out)),
        model.sam2.mask_decoder.register_forward_pre_hook(
            lambda m, a, kw: records["tokens"].append(kw["sparse_prompt_embeddings"]),
            with_kwargs=True),
        model.sam2.mask_decoder.register_forward_hook(
            lambda m, a, out: records["decoder"].append((out[0][:, 0], out[1][:, 0]))),
    ]
    return records, handles


class WarningRecords(logging.Handler):
    """Collects the BEiT-3 tokenizer's warnings whatever the logger's propagation."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
        self.logger = logging.getLogger(BEiT3Tokenizer.__module__)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)

    @property
    def text(self):
        return "\n".join(self.messages)


def assert_close(actual, expected, name):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")


def assert_segmentation_matches(ours, expected):
    assert_close(ours["sem_seg"], expected["sem_seg"], "sem_seg")
    pan_seg, segments = ours["panoptic_seg"]
    assert torch.equal(pan_seg.int(), expected["panoptic_seg"].int())
    assert segments == expected["segments_info"]
    instances = ours["instances"]
    assert torch.equal(instances.pred_masks, expected["instance_masks"])
    assert_close(instances.pred_boxes.tensor, expected["instance_boxes"], "boxes")
    assert_close(instances.scores, expected["instance_scores"], "instance scores")
    assert torch.equal(instances.pred_classes, expected["instance_classes"])


@pytest.fixture(scope="module")
def fixture_model():
    return build_fixture_model()


# ---------------------------------------------------------------------------- equivalence
def test_tokenizer_matches_release():
    outputs = reference("outputs")
    tokenizer = BEiT3Tokenizer(SPM, max_length=1000)
    for text, ids in outputs["tokenizer_probe"].items():
        assert tokenizer.encode(text) == ids, text
    register_fixture_dataset()
    model_ids = BEiT3Tokenizer(SPM, max_length=16)(reference("inputs")["sentences"])
    assert torch.equal(model_ids, outputs["referring"]["input_ids"])


def test_class_prompts_match_release(fixture_model):
    """Oracle prompts: BEiT-3 early fusion, projector, prompt tokens, masks, scores and the
    semantic / instance / panoptic outputs of the release."""
    fixture_model.eval()
    expected = reference("outputs")["classes"]
    segments = [{"category_id": c} for c in reference("inputs")["oracle_classes"]]
    records, handles = capture(fixture_model)
    try:
        with torch.no_grad():
            ours = fixture_model([fixture_input(segments_info=segments)])[0]
    finally:
        for handle in handles:
            handle.remove()
    assert_close(records["beit3"][0], expected["beit3_cls"], "BEiT-3 [CLS]")
    assert_close(records["projector"][0], expected["projector"], "projector")
    assert_close(records["tokens"][0], expected["prompt_embeddings"], "prompt embeddings")
    masks, scores = records["decoder"][0]
    assert_close(masks, expected["masks"], "masks")
    assert_close(scores, expected["scores"], "IoU scores")
    assert len(ours["instances"]) > 0 and len(ours["panoptic_seg"][1]) > 0
    assert_segmentation_matches(ours, expected)


def test_two_stage_inference_matches_release():
    model = build_fixture_model("MODEL.OPENWORLDSAM.TEST.TWO_STAGE_REFINEMENT", True)
    model.eval()
    expected = reference("outputs")["two_stage"]
    segments = [{"category_id": c} for c in reference("inputs")["oracle_classes"]]
    records, handles = capture(model)
    try:
        with torch.no_grad():
            ours = model([fixture_input(segments_info=segments)])[0]
    finally:
        for handle in handles:
            handle.remove()
    refined_masks, refined_scores = records["decoder"][1]
    assert refined_scores.shape[0] < expected["scores"].shape[0]  # only masks >= threshold
    assert_close(refined_masks, expected["refined_masks"], "refined masks")
    assert_close(refined_scores, expected["refined_scores"], "refined scores")
    assert_segmentation_matches(ours, expected)


def test_referring_matches_release(fixture_model):
    """Sentences (one longer than the 16-token limit: truncated with a warning as the
    release truncates), the best of each sentence's K masks."""
    fixture_model.eval()
    expected = reference("outputs")["referring"]
    records, handles = capture(fixture_model)
    try:
        with torch.no_grad(), WarningRecords() as warnings:
            ours = fixture_model([fixture_input(sentences=reference("inputs")["sentences"])])[0]
    finally:
        for handle in handles:
            handle.remove()
    assert "truncated to 16" in warnings.text
    assert_close(records["beit3"][0], expected["beit3_cls"], "BEiT-3 [CLS]")
    assert_close(records["tokens"][0], expected["prompt_embeddings"], "prompt embeddings")
    assert_close(records["decoder"][0][1], expected["scores"], "IoU scores")
    assert torch.equal(ours["ref_seg"], expected["ref_masks"])
    assert_close(ours["ref_scores"], expected["ref_scores"], "referring scores")


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_loss_matches_release(dice_weight):
    """Training loss of a fixed batch (3 class prompts, 4 targets; dropout 0) with the
    release's weights (focal x 20, dice x 0) and with a dice term."""
    model = build_fixture_model(
        "MODEL.OPENWORLDSAM.DROPOUT", 0.0, "MODEL.OPENWORLDSAM.DICE_WEIGHT", dice_weight
    )
    model.train()
    inputs = reference("inputs")
    instances = Instances((inputs["image_size"],) * 2)
    instances.gt_classes = inputs["gt_classes"]
    instances.gt_masks = inputs["gt_masks"]
    losses = model([dict(image=inputs["image"], instances=instances)])
    expected = reference("outputs")[f"loss_dice{dice_weight:g}"]
    assert_close(losses["loss_mask"], expected["loss_mask"], "focal loss")
    assert_close(losses["loss_dice"], expected["loss_dice"], "dice loss")
    assert losses["loss_mask"] > 0 and (dice_weight == 0) == (losses["loss_dice"] == 0)


def test_released_trainable_parameter_count():
    """4.5 M (paper) = the release's adapter at its sizes (counted on the release's modules in
    the fixture script): BEiT-3-L 1024-d projector, K = 20, 3 layers, MLP 1024."""
    adapter = LanguagePromptAdapter(
        input_dim=1024, hidden_dim=1024, prompt_dim=256, num_tie_breakers=20, num_layers=3,
        nheads=8, dim_feedforward=1024, dropout=0.1,
    )
    count = sum(p.numel() for p in adapter.parameters())
    assert count == reference("outputs")["released_trainable_parameters"] == 4_477_440


# ---------------------------------------------------------------------------- hand cases
def brute_force_assignment(cost: np.ndarray):
    rows, cols = cost.shape
    best = None
    for perm in itertools.permutations(range(rows), cols):
        total = sum(cost[perm[j], j] for j in range(cols))
        if best is None or total < best[0]:
            best = (total, perm)
    return best


def test_matching_equals_brute_force_assignment():
    """Each prompt's K masks vs its targets: the Hungarian result has the minimum total cost
    of every assignment, and the pair cost is 20 x mean focal (torchvision's focal loss) +
    dice on the prediction grid."""
    generator = torch.Generator().manual_seed(0)
    owner = type("Owner", (), {})()
    owner.mask_weight, owner.dice_weight, owner.focal_alpha, owner.focal_gamma = 20.0, 1.0, 0.25, 2.0
    for trial in range(5):
        preds = torch.randn(5, 8, 8, generator=generator) * 3
        targets = (torch.rand(3, 16, 16, generator=generator) > 0.5).float()
        small = targets[:, ::2, ::2]  # nearest downsampling to the prediction grid
        cost = np.zeros((5, 3))
        for i in range(5):
            for j in range(3):
                focal = torchvision_focal(preds[i].flatten(), small[j].flatten(), 0.25, 2.0).mean()
                p = preds[i].sigmoid().flatten()
                dice = 1 - (2 * (p * small[j].flatten()).sum() + 1) / (p.sum() + small[j].sum() + 1)
                cost[i, j] = 20 * focal + dice
        pred_idx, tgt_idx = OpenWorldSAM.match_prompt(owner, preds, targets)
        total = sum(cost[i, j] for i, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
        best_total, best_perm = brute_force_assignment(cost)
        assert sorted(tgt_idx.tolist()) == [0, 1, 2]
        assert total == pytest.approx(best_total, rel=1e-6)
        assert {(p, t) for t, p in enumerate(best_perm)} == set(zip(pred_idx.tolist(), tgt_idx.tolist()))


def test_focal_cost_is_mean_focal_loss_of_each_pair():
    torch.manual_seed(0)
    inputs, targets = torch.randn(4, 30), (torch.rand(3, 30) > 0.4).float()
    cost = batch_sigmoid_focal_cost(inputs, targets, 0.25, 2.0)
    for i, j in itertools.product(range(4), range(3)):
        expected = torchvision_focal(inputs[i], targets[j], 0.25, 2.0).mean()
        assert cost[i, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_instance_threshold_and_nms_hand_case():
    """Score >= 0.7 kept (0.69 dropped); box NMS at 0.5 across classes in score order:
    IoU 0.67 suppressed even for another class, IoU 0.33 kept (NMS at 0.9 would keep 4)."""
    masks = torch.full((5, 20, 20), -5.0)
    masks[0, 0:10, 0:10] = 5    # 0.9, class 1
    masks[1, 0:10, 2:12] = 5    # 0.8, class 2: box IoU 80 / 120 with mask 0 -> suppressed
    masks[2, 0:10, 5:15] = 5    # 0.7, class 1: IoU 50 / 150 with mask 0 -> kept
    masks[3, 12:20, 12:20] = 5  # 0.69 -> below the threshold
    masks[4, 10:20, 0:10] = 5   # 0.75, class 3: touches mask 0 only -> kept
    scores = torch.tensor([0.9, 0.8, 0.7, 0.69, 0.75])
    classes = torch.tensor([1, 2, 1, 1, 3])
    result = threshold_nms_instances(
        masks, scores, classes, score_threshold=0.7, nms_threshold=0.5, topk=0,
        output_size=(40, 40),
    )
    assert result.scores.tolist() == pytest.approx([0.9, 0.75, 0.7])
    assert result.pred_classes.tolist() == [1, 3, 1]
    assert result.pred_masks.shape == (3, 40, 40) and result.pred_masks[0].sum() == 400
    assert result.pred_boxes.tensor[0].tolist() == [0.0, 0.0, 20.0, 20.0]
    top = threshold_nms_instances(
        masks, scores, classes, score_threshold=0.0, nms_threshold=1.0, topk=2,
        output_size=(20, 20),
    )
    assert top.scores.tolist() == pytest.approx([0.9, 0.8])


def test_panoptic_mask_nms_hand_case():
    """Class-wise mask NMS at 0.5: same-class IoU 0.6 suppressed, other class kept, IoU 0.4
    kept, processed in score order (the lower-scored duplicate goes)."""
    probs = torch.zeros(4, 10, 10)
    probs[0, 0:10, 0:5] = 0.9             # 50 px
    probs[1, 0:10, 1:6] = 0.9             # same class, IoU 40/60 = 0.67 with 0
    probs[2, 0:10, 1:6] = 0.9             # other class, same mask
    probs[3, 0:10, 3:8] = 0.9             # same class as 0, IoU 20/80 = 0.25
    scores = torch.tensor([0.8, 0.9, 0.85, 0.75])
    classes = torch.tensor([0, 0, 1, 0])
    keep = classwise_mask_nms(probs, scores, classes, 0.5)
    # mask 1 (0.9) beats mask 0 (0.8); mask 3 overlaps mask 1 by 30/70 = 0.43 -> kept
    assert keep.tolist() == [False, True, True, True]
    assert classwise_mask_nms(probs, scores, classes, 0.7).tolist() == [True, True, True, True]


def test_referring_output_picks_the_best_mask():
    masks = torch.full((6, 4, 4), -1.0)
    for i in range(6):
        masks[i].view(-1)[i] = 1.0  # mask i covers pixel i only
    scores = torch.tensor([0.2, 0.9, 0.4, 0.8, 0.1, 0.3])
    sentence = torch.tensor([0, 0, 0, 1, 1, 1])
    out = OpenWorldSAM.referring_output(masks, scores, sentence, 2, (4, 4))
    assert out["ref_scores"].tolist() == pytest.approx([0.9, 0.8])
    assert out["ref_seg"][0].view(-1).nonzero().flatten().tolist() == [1]
    assert out["ref_seg"][1].view(-1).nonzero().flatten().tolist() == [3]


def test_semantic_merge_hand_case():
    """Release rule: softmax over C+1 of (score at the mask's class, 0 elsewhere), no-object
    dropped, times the mask probability, summed over masks."""
    from openseg.modeling.inference import semantic_inference

    torch.manual_seed(0)
    masks = torch.randn(3, 4, 4)
    scores = torch.tensor([0.9, 0.6, 0.8])
    classes = torch.tensor([0, 0, 2])
    semantic = semantic_inference(semantic_logits(scores, classes, 3), masks)
    expected = torch.zeros(3, 4, 4)
    for mask, score, cls in zip(masks, scores, classes):
        weights = torch.ones(4)
        weights[cls] = score.exp()
        weights = weights / weights.sum()
        expected += weights[:3, None, None] * mask.sigmoid()
    torch.testing.assert_close(semantic, expected)


# ---------------------------------------------------------------------------- checkpoints
def test_released_checkpoint_names_cover_the_model(fixture_model):
    """A released OpenWorldSAM checkpoint (adapter, SAM2 as visual_model.*, BEiT-3 as
    mm_extractor.beit3.*, EVF-SAM2 duplicates) loads every parameter of the model."""
    state = {}
    sam2_names = {"image_encoder": "image_encoder", "prompt_encoder": "sam_prompt_encoder",
                  "mask_decoder": "sam_mask_decoder"}
    for name, value in fixture_model.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "sam2":
            part, _, tail = rest.partition(".")
            released = f"visual_model.{sam2_names.get(part, part)}" + (f".{tail}" if tail else "")
            state[released] = value + 1.0
            state["evf_sam2." + released] = value - 1.0
        elif head == "vl_encoder":
            state["mm_extractor." + rest] = value + 1.0
    state.update(reference("weights"))
    model = build_fixture_model()
    incompatible = model.load_state_dict(state, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    torch.testing.assert_close(
        model.sam2.mask_decoder.iou_token.weight,
        fixture_model.sam2.mask_decoder.iou_token.weight + 1.0,
    )


def test_beit3_checkpoint_formats(tmp_path):
    torch.manual_seed(3)
    cfg = fixture_cfg()
    beit3 = BEiT3EarlyFusionEncoder.build_beit3(cfg)
    for name, prefix in (("official.pth", "beit3."), ("evf.pth", "mm_extractor.beit3.")):
        path = tmp_path / name
        torch.save({"model": {prefix + k: v for k, v in beit3.state_dict().items()}}, path)
        encoder = BEiT3EarlyFusionEncoder.from_config(
            fixture_cfg("MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT", str(path))
        )
        for key, value in beit3.state_dict().items():
            assert torch.equal(encoder.beit3.state_dict()[key], value), key
    wrong_size = tmp_path / "wrong.pth"
    torch.save({"model": {"beit3.text_embed.weight": torch.zeros(3, 3)}}, wrong_size)
    with pytest.raises(KeyError, match="BEIT3.CHECKPOINT"):
        BEiT3EarlyFusionEncoder.from_config(
            fixture_cfg("MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT", str(wrong_size))
        )


@pytest.mark.parametrize(
    "config", ["configs/sam2/sam2_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_t.yaml"]
)
def test_sam2_checkpoint_formats(tmp_path, config):
    """Official SAM2 / SAM2.1 checkpoints ({"model": state_dict}) load strictly."""
    torch.manual_seed(5)
    source = build_sam2(config, ckpt_path=None, device="cpu")
    path = tmp_path / "sam2.pt"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(6)
    loaded = FrozenSAM2(config, str(path), image_size=1024)
    for ours, theirs in ((loaded.image_encoder, source.image_encoder),
                         (loaded.mask_decoder, source.sam_mask_decoder)):
        for (name, value), reference_value in zip(ours.state_dict().items(),
                                                  theirs.state_dict().values()):
            assert torch.equal(value, reference_value), name


@pytest.mark.parametrize(
    "opts, error, match",
    [
        (("MODEL.OPENWORLDSAM.SAM2_CHECKPOINT", "/nonexistent/sam2.pt"), FileNotFoundError,
         r"SAM2_CHECKPOINT='/nonexistent/sam2.pt'"),
        (("MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT", "/nonexistent/beit3.pth"), FileNotFoundError,
         r"BEIT3.CHECKPOINT='/nonexistent/beit3.pth'"),
        (("MODEL.OPENWORLDSAM.BEIT3.TOKENIZER", "/nonexistent/beit3.spm"), FileNotFoundError,
         r"BEIT3.TOKENIZER='/nonexistent/beit3.spm'"),
        (("MODEL.OPENWORLDSAM.TEST.PROMPTS", "all"), ValueError, "TEST.PROMPTS"),
        (("MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE", 100), ValueError, "SAM2_IMAGE_SIZE"),
        (("MODEL.OPENWORLDSAM.SAM2_CONFIG", "configs/sam2.1/nope.yaml"), ValueError,
         "SAM2_CONFIG"),
        (("MODEL.OPENWORLDSAM.VL_ENCODER", "BEiT3"), KeyError, "VL_ENCODER"),
        (("MODEL.OPENWORLDSAM.TEST.SCORE_THRESHOLD", 0.3), ValueError, "SCORE_THRESHOLD"),
        (("INPUT.FORMAT", "BGR"), ValueError, "RGB"),
    ],
)
def test_config_errors(opts, error, match):
    with pytest.raises(error, match=match):
        OpenWorldSAM(demo_cfg(*opts))


def test_long_prompts_are_truncated_with_a_warning():
    tokenizer = BEiT3Tokenizer(SPM, max_length=6)
    with WarningRecords() as caplog:
        ids = tokenizer(["dog", "a person standing near the wall"])
    assert ids.shape == (2, 6) and ids[0].tolist() == tokenizer.encode("dog") + [1] * 3
    assert "truncated to 6" in caplog.text and "MAX_TEXT_LENGTH" in caplog.text


# ---------------------------------------------------------------------------- demo pipeline
def demo_cfg(*opts):
    return base_cfg(
        *tiny_beit3_opts(),
        "MODEL.OPENWORLDSAM.SAM2_CONFIG", "configs/sam2.1/sam2.1_hiera_t.yaml",
        "MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE", DEMO_SIZE,
        "MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS", DEMO_QUERIES,
        "MODEL.OPENWORLDSAM.DIM_FEEDFORWARD", 64,
        "DATASETS.TRAIN", ("openseg_demo_train",), "DATASETS.TEST", ("openseg_demo_val",),
        "INPUT.MIN_SIZE_TRAIN", (DEMO_SIZE,), "INPUT.MAX_SIZE_TRAIN", DEMO_SIZE,
        "INPUT.MIN_SIZE_TEST", DEMO_SIZE, "INPUT.MAX_SIZE_TEST", DEMO_SIZE, *opts,
    )


@pytest.fixture(scope="module")
def demo_model():
    torch.manual_seed(0)
    return build_model(demo_cfg())


@pytest.fixture(scope="module")
def train_batch():
    mapper = build_mapper(demo_cfg(), is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("openseg_demo_train")[:2]]


@pytest.fixture(scope="module")
def val_input():
    mapper = build_mapper(demo_cfg(), is_train=False)
    return mapper(DatasetCatalog.get("openseg_demo_val")[0])


def test_only_the_adapter_trains(demo_model):
    demo_model.train()
    counts = demo_model.trainable_parameter_counts()
    assert counts["total"] == sum(p.numel() for p in demo_model.adapter.parameters())
    assert not any(p.requires_grad for p in demo_model.sam2.parameters())
    assert not any(p.requires_grad for p in demo_model.vl_encoder.parameters())
    assert demo_model.sam2.training and not demo_model.vl_encoder.training


def test_tie_breakers_give_distinct_queries(demo_model):
    demo_model.eval()
    torch.manual_seed(0)
    adapter = demo_model.adapter
    prompt = torch.randn(1, demo_model.vl_encoder.output_dim)
    initial = adapter.initial_queries(prompt)[0]
    for i, j in itertools.combinations(range(DEMO_QUERIES), 2):
        torch.testing.assert_close(initial[i] - initial[j], adapter.tie_breakers[i] - adapter.tie_breakers[j])
    features = demo_model.sam2.image_features(torch.randn(1, 3, DEMO_SIZE, DEMO_SIZE))
    with torch.no_grad():
        queries, refined = adapter(prompt, features["image_embed"][0])
        queries = (queries + refined)[0]
    assert torch.cdist(queries, queries)[~torch.eye(DEMO_QUERIES, dtype=torch.bool)].min() > 1e-3


def test_self_attention_spans_every_prompt_of_the_image(demo_model):
    """As released, the K queries of all prompts of an image are one sequence: adding a
    prompt changes the other prompts' tokens (a per-prompt sequence would not)."""
    demo_model.eval()
    torch.manual_seed(2)
    features = demo_model.sam2.image_features(torch.randn(1, 3, DEMO_SIZE, DEMO_SIZE))
    prompts = torch.randn(2, demo_model.vl_encoder.output_dim)
    with torch.no_grad():
        alone = demo_model.adapter(prompts[:1], features["image_embed"][0])[1]
        together = demo_model.adapter(prompts, features["image_embed"][0])[1]
    assert (alone[0] - together[0]).abs().max() > 1e-4


def test_sparse_prompt_token_layouts():
    """Paper: one token q_i + T(q)_i per mask; release: mask i gets q_i + T(q)_j for all j."""
    queries, refined = torch.randn(6, 8), torch.randn(6, 8)
    rows = slice(2, 5)
    paper = sparse_prompt_tokens(queries, refined, rows, "per_query")
    assert paper.shape == (3, 1, 8)
    torch.testing.assert_close(paper[:, 0], queries[2:5] + refined[2:5])
    released = sparse_prompt_tokens(queries, refined, rows, "released")
    assert released.shape == (3, 6, 8)
    for i, j in itertools.product(range(3), range(6)):
        torch.testing.assert_close(released[i, j], queries[2 + i] + refined[j])


def test_image_features_match_sam2_image_predictor(demo_model):
    """FrozenSAM2.image_features against sam2's own SAM2ImagePredictor on the same weights."""
    demo_model.eval()
    predictor_model = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
        hydra_overrides_extra=[f"++model.image_size={DEMO_SIZE}"],
    )
    predictor_model.image_encoder.load_state_dict(demo_model.sam2.image_encoder.state_dict())
    predictor_model.sam_mask_decoder.load_state_dict(demo_model.sam2.mask_decoder.state_dict())
    predictor_model.no_mem_embed.data.copy_(demo_model.sam2.no_mem_embed.data)
    predictor = SAM2ImagePredictor(predictor_model)
    predictor._bb_feat_sizes = [(DEMO_SIZE // s,) * 2 for s in (4, 8, 16)]
    image = np.random.default_rng(0).integers(0, 256, (DEMO_SIZE, DEMO_SIZE, 3), dtype=np.uint8)
    predictor.set_image(image)
    ours = demo_model.sam2.image_features(
        demo_model.preprocess_images([{"image": torch.from_numpy(image).permute(2, 0, 1)}])
    )
    torch.testing.assert_close(ours["image_embed"], predictor._features["image_embed"],
                               atol=1e-4, rtol=1e-4)
    for level, ref_level in zip(ours["high_res_features"], predictor._features["high_res_feats"]):
        torch.testing.assert_close(level, ref_level, atol=1e-4, rtol=1e-4)


def test_training_step_on_demo_data(demo_model, train_batch):
    """Loss decreases on one batch, every adapter parameter gets a gradient (DDP)."""
    torch.manual_seed(0)
    trainable = [p for p in demo_model.parameters() if p.requires_grad]
    initial_state = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    demo_model.train()
    totals = []
    batch = train_batch[:1]
    features, contexts = demo_model.encode_images(batch)
    try:
        for step in range(6):
            losses = demo_model.losses(batch, features, contexts)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            if step == 0:
                assert all(p.grad is not None for p in trainable)
            optimizer.step()
            totals.append(total.item())
    finally:
        with torch.no_grad():
            for param, value in zip(trainable, initial_state):
                param.copy_(value)
    assert set(losses) == {"loss_mask", "loss_dice"}
    assert np.mean(totals[-2:]) < 0.9 * totals[0], totals


def test_image_without_ground_truth_still_uses_every_parameter(demo_model, train_batch):
    empty = dict(train_batch[0])
    empty["instances"] = train_batch[0]["instances"][:0]
    demo_model.train()
    demo_model.zero_grad()
    losses = demo_model([empty])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in demo_model.parameters() if p.requires_grad)
    assert all(v.item() == 0.0 for v in losses.values())
    demo_model.zero_grad()


def test_training_prompts_are_at_most_six_classes(demo_model):
    demo_model.train()
    instances = Instances((8, 8))
    instances.gt_classes = torch.arange(8)
    instances.gt_masks = torch.ones(8, 8, 8, dtype=torch.bool)
    vocabulary = torch.arange(8)[:, None].expand(8, 3)
    torch.manual_seed(0)
    prompts, targets = demo_model.training_prompts({"instances": instances}, vocabulary)
    assert prompts.shape[0] == 6 == len(targets)
    chosen = prompts[:, 0].tolist()
    assert chosen == sorted(chosen) and len(set(chosen)) == 6


def test_oracle_protocol_is_default_and_global_prompts_everything(demo_model, val_input):
    demo_model.eval()
    assert base_cfg().MODEL.OPENWORLDSAM.TEST.PROMPTS == "oracle"
    present = sorted({s["category_id"] for s in val_input["segments_info"]})
    prompted = []
    handle = demo_model.adapter.register_forward_hook(
        lambda m, args, out: prompted.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            oracle = demo_model([val_input])[0]
            demo_model.prompt_protocol = "global"
            global_output = demo_model([val_input])[0]
    finally:
        demo_model.prompt_protocol = "oracle"
        handle.remove()
    assert prompted == [len(present), 8]
    absent = [c for c in range(8) if c not in present]
    # classes never prompted only get the uniform share of the semantic merge
    assert torch.allclose(oracle["sem_seg"][absent], oracle["sem_seg"][absent[0]].expand(len(absent), -1, -1))
    assert set(oracle["instances"].pred_classes.tolist()) <= set(present)
    assert global_output["sem_seg"].shape == oracle["sem_seg"].shape == (
        8, val_input["height"], val_input["width"])
    stripped = {k: v for k, v in val_input.items() if k != "segments_info"}
    with pytest.raises(KeyError, match="oracle"):
        demo_model([stripped])


def test_encoders_run_once_per_image(demo_model, val_input):
    demo_model.eval()
    calls = {"sam2": 0, "beit3": 0}
    hooks = [
        demo_model.sam2.image_encoder.register_forward_hook(
            lambda *_: calls.__setitem__("sam2", calls["sam2"] + 1)),
        demo_model.vl_encoder.beit3.register_forward_hook(
            lambda *_: calls.__setitem__("beit3", calls["beit3"] + 1)),
    ]
    try:
        with torch.no_grad():
            demo_model([val_input, val_input])
    finally:
        for hook in hooks:
            hook.remove()
    # one batched SAM2 call; BEiT-3 fuses image and prompts: one call per image (<= 64 prompts)
    assert calls == {"sam2": 1, "beit3": 2}


def test_openclip_late_fusion_encoder_stays_available():
    torch.manual_seed(0)
    cfg = demo_cfg(
        "MODEL.OPENWORLDSAM.VL_ENCODER", "OpenCLIPLateFusionEncoder",
        "MODEL.CLIP.MODEL_NAME", "openseg-test-convnext",
        "MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES", ["{}"],
    )
    model = build_model(cfg).eval()
    mapper = build_mapper(cfg, is_train=False)
    x = mapper(DatasetCatalog.get("openseg_demo_val")[0])
    with torch.no_grad():
        out = model([dict(x, sentences=["a red circle"])])[0]
    assert out["ref_seg"].shape == (1, x["height"], x["width"])


def test_coco_training_set_leaves_out_refcocog_umd_val_images(tmp_path, monkeypatch):
    """openseg_coco_2017_train_panoptic_filtrefgumdval (App. A.1): COCO train panoptic minus
    every image of RefCOCOg-umd val, read from the refer toolkit's refs(umd).p."""
    import pickle

    from openseg.data.datasets import coco

    refs = tmp_path / "refcoco" / "refcocog"
    refs.mkdir(parents=True)
    with open(refs / "refs(umd).p", "wb") as f:
        pickle.dump([{"image_id": 2, "split": "val"}, {"image_id": 3, "split": "train"},
                     {"image_id": 5, "split": "val"}, {"image_id": 7, "split": "test"}], f)
    monkeypatch.setattr(
        coco, "load_coco_panoptic_with_sem_seg",
        lambda paths, meta: [{"image_id": i} for i in range(1, 9)],
    )
    kept = coco.load_coco_panoptic_without_refcocog_val({}, {}, tmp_path)
    assert [d["image_id"] for d in kept] == [1, 3, 4, 6, 7, 8]
    meta = MetadataCatalog.get("openseg_coco_2017_train_panoptic_filtrefgumdval")
    assert meta.evaluators == ["panoptic", "semantic", "instance"]
