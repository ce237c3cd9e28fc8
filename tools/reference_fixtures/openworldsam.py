"""Reference fixtures of the released OpenWorldSAM (GinnyXiao/OpenWorldSAM, `model/`).

Builds the release's `OpenWorldSAM2` at a small size with random weights on CPU:
* SAM2 Hiera-T (the release's own SAM2 copy, `sam2_hiera_t.yaml`) at a 256 x 256 input. Its
  39 M parameters (156 MB) are too big to commit, so they are *seed-generated*: the installed
  `sam2` package builds Hiera-T after `torch.manual_seed(SAM2_SEED)` exactly as openseg's
  `FrozenSAM2` does, the state dict is loaded (strict) into the release's copy, and a
  per-tensor checksum (sum and sum of squares) is saved so the test can prove it rebuilt the
  same weights.
* BEiT-3 through torchscale at a tiny size (64-d, 2 layers, 4 heads) with the release's
  encoder settings, a tiny sentencepiece model trained here (`beit3_tiny.spm`) read by
  transformers' `XLMRobertaTokenizer` (the release's tokenizer class), `model_max_length` 16
  so a long prompt is truncated.
* The adapter as released (2 cross-attention layers, K = 5 tie-breakers), its MLP width set
  to 64 through the released class's `mlp_dim` argument (the release uses 4 x 256) so the
  committed weights stay small.
* BEiT-3's weights are moved to sane scales with [CLS] attending to the prompt
  (`condition_beit3`), so the projector needs no large weights and the outputs are well
  conditioned; BEiT-3 and the adapter come from the first seed from SEED whose exactly
  compared outputs (segment maps, instances, referring masks) survive noise on the mask
  decoder's outputs of the size of float32 differences between CPUs.

The release hard-codes a 1024 input (`ImageList.from_tensors(images, 1024)` and
`_bb_feat_sizes`); both are set to the 256 input here, nothing else is changed. The model
runs with batch size 1 (the release returns after the first image at inference) on:
class prompts (semantic / instance / panoptic), the same with two-stage inference, referring
sentences, and a training batch (loss with dropout set to 0, with and without a dice term).
Saved: `weights.pt` (BEiT-3 + adapter, in the release's names), `sam2_checksum.pt`,
`inputs.pt`, `outputs.pt`, `beit3_tiny.spm`.
"""
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ._stubs import add_reference_to_path
from .mask2former import _Unstable, check_stable_under_noise

SAM2_SEED = 0
SEED = 1  # BEiT-3 and adapter weights: the first seed from here whose exact-match outputs keep margins
IMAGE_SIZE = 256
NUM_TOKENS = 5
MLP_DIM = 64
OUTPUT_SIZE = (96, 128)  # non-square "original" size the outputs are resized to
CLASS_NAMES = ["wall-other", "person", "dog", "tree-merged", "sky-other-merged", "car"]
THING_IDS = [1, 2, 5]
ORACLE_CLASSES = [0, 1, 2, 4]
# SAM2's mask logits differ by up to 1.7e-6 of their scale between ATen's AVX2 and AVX-512
# kernels (measured on these fixtures), more than the 2e-6 default leaves room for
DECODER_NOISE = 5e-6
# outputs the tests compare exactly (the rest within a tolerance)
SEGMENTATION = ("panoptic_seg", "segments_info", "instance_masks", "instance_classes")
SENTENCES = ["the dog on the left", "a person standing near the wall in a very long sentence"]
MAX_TEXT_LENGTH = 16
CORPUS = (
    CLASS_NAMES + [n.split("-")[0] for n in CLASS_NAMES] + SENTENCES
    + ["a photo of a cat", "the red car", "person on the right", "object", "green tree", "blue sky"]
)
SAM2_CONFIG = "configs/sam2/sam2_hiera_t.yaml"


def train_tokenizer(out_dir: Path) -> Path:
    import sentencepiece

    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "beit3_tiny"), vocab_size=60,
        model_type="unigram", normalization_rule_name="identity", hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "beit3_tiny.vocab").unlink()
    model = out_dir / "beit3_tiny.model"
    target = out_dir / "beit3_tiny.spm"
    model.replace(target)
    return target


def seeded_sam2_state() -> dict:
    """Hiera-T weights as openseg's FrozenSAM2 creates them after torch.manual_seed."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(SAM2_SEED)
    model = build_sam2(
        SAM2_CONFIG, ckpt_path=None, device="cpu", apply_postprocessing=True,
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )
    return model.state_dict()


def checksum(state: dict) -> dict:
    return {k: (v.double().sum().item(), v.double().pow(2).sum().item()) for k, v in state.items()}


def smooth_image(seed: int) -> np.ndarray:
    """A 256 x 256 RGB uint8 image of a few smooth blobs (no flat regions, no saturation)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        image += blob[..., None] * rng.uniform(40, 120, size=3)
    image += rng.uniform(0, 20, size=image.shape)
    return np.clip(image + 30, 0, 255).astype(np.uint8)


def gt_masks(seed: int) -> torch.Tensor:
    """Four rectangles (class ids 1, 1, 2, 0 in `gt_classes`)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for m in masks:
        y0, x0 = rng.integers(0, IMAGE_SIZE // 2, size=2)
        h, w = rng.integers(40, IMAGE_SIZE // 2, size=2)
        m[y0 : y0 + h, x0 : x0 + w] = 1
    return torch.from_numpy(masks)


def evf_input(image: np.ndarray) -> torch.Tensor:
    """The release's `beit3_preprocess` (tensor path of torchvision's Resize)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize((224, 224), interpolation=3, antialias=None),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])(image)


@torch.no_grad()
def condition_beit3(mm_extractor: torch.nn.Module, generator: torch.Generator) -> None:
    """BEiT-3's initialisation (weights of std 0.02) leaves [CLS] at its position embedding
    plus ~1 % of prompt-dependent signal: a projector telling prompts apart would amplify that
    ~150 times, cancelling terms of ~300, and its output would differ between CPUs by 1e-4.
    Here every weight leaves its initial value at a sane scale (unit-gain linear layers,
    layer norms near 1, position embeddings at 0.3) and, per head, the image tokens' query bias
    is aligned with the text tokens' key bias (a logit bonus of 4), so [CLS] attends to the
    prompt and prompts differ by about half of [CLS]'s norm."""
    def noise(shape, scale: float) -> torch.Tensor:
        return scale * torch.randn(shape, generator=generator)

    for name, tensor in mm_extractor.named_parameters():
        if ".embed_positions." in name:
            tensor.mul_(0.3)
        elif "norm" in name or "_ln." in name:
            tensor.copy_(1.0 + noise(tensor.shape, 0.2) if name.endswith("weight") else noise(tensor.shape, 0.1))
        elif ".layers." in name:
            tensor.copy_(noise(tensor.shape, tensor.shape[-1] ** -0.5 if tensor.dim() == 2 else 0.1))
    heads = mm_extractor.beit3.args.encoder_attention_heads
    for layer in mm_extractor.beit3.encoder.layers:
        direction = noise((heads, layer.self_attn.head_dim), 1.0)
        direction = (4.0 * direction / direction.norm(dim=1, keepdim=True)).flatten()
        layer.self_attn.q_proj.A.bias.copy_(direction)
        layer.self_attn.k_proj.B.bias.copy_(direction)


@torch.no_grad()
def calibrate_projector(mm_extractor, text_hidden_fcs, tokenizer, evf_image) -> None:
    """The projector's random weights are rescaled so that its hidden layer sees [CLS] minus
    the mean over the fixture's prompts at unit spread, and its output has unit spread like
    the tie-breakers: prompts then give clearly different masks (with `condition_beit3`'s
    [CLS] the first layer's weights stay below 0.5 and its bias below 4)."""
    prompts = [class_prompt(n) for n in CLASS_NAMES] + SENTENCES
    ids = [torch.tensor(tokenizer(p).input_ids[:MAX_TEXT_LENGTH]) for p in prompts]
    ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=1)
    cls = mm_extractor.beit3(
        visual_tokens=evf_image[None].expand(len(prompts), -1, -1, -1), textual_tokens=ids,
        text_padding_position=ids.eq(1),
    )["encoder_out"][:, 0]
    first, second = text_hidden_fcs[0][0], text_hidden_fcs[0][2]
    centred = (cls - cls.mean(0)) @ first.weight.T
    first.weight.div_(centred.std())
    first.bias.copy_(-cls.mean(0) @ first.weight.T + 0.1)
    second.weight.div_(text_hidden_fcs[0](cls).std())


def class_prompt(name: str) -> str:
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


def generate(reference_root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    spm = train_tokenizer(out_dir)
    sam2_state = seeded_sam2_state()

    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # the release's sam2 copy initialises its own configs
    add_reference_to_path(reference_root, "GinnyXiao__OpenWorldSAM")
    for name in [m for m in sys.modules if m == "model" or m.startswith("model.")]:
        del sys.modules[name]
    from detectron2.structures import ImageList
    from transformers import XLMRobertaTokenizer

    import model.open_world_sam2 as owsam_module
    from model.segment_anything_2.sam2.build_sam import build_sam2 as reference_build_sam2

    visual_model = reference_build_sam2(
        "sam2_hiera_t.yaml", None, device="cpu",
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )
    visual_model.load_state_dict(sam2_state, strict=True)
    for p in visual_model.parameters():
        p.requires_grad = False

    # transformers 5 builds XLM-R's tokenizer by converting the sentencepiece model (the
    # release used 4.36's slow class on the same file; both give <s>=0 <pad>=1 </s>=2 <unk>=3,
    # piece id + 1)
    tokenizer_dir = out_dir / "_tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    shutil.copy(spm, tokenizer_dir / "sentencepiece.bpe.model")
    tokenizer = XLMRobertaTokenizer.from_pretrained(
        str(tokenizer_dir), model_max_length=MAX_TEXT_LENGTH
    )
    shutil.rmtree(tokenizer_dir)

    # the release pads SAM2 inputs to a multiple of 1024; the images here are already square
    original_from_tensors = ImageList.from_tensors

    def from_tensors(tensors, size_divisibility=0, **kwargs):
        return original_from_tensors(tensors, 0 if size_divisibility == 1024 else size_divisibility)

    owsam_module.ImageList.from_tensors = staticmethod(from_tensors)

    for seed in range(SEED, SEED + 20):
        try:
            _attempt(seed, visual_model, tokenizer, out_dir)
        except _Unstable as why:
            print(f"[openworldsam] seed {seed} rejected: {why}", file=sys.stderr)
            continue
        torch.save(checksum(sam2_state), out_dir / "sam2_checksum.pt")
        return
    raise RuntimeError("no stable seed found in 20 attempts")


def _attempt(seed: int, visual_model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Adapter and BEiT-3 weights from `seed`; raises `_Unstable` if an exact-match output
    is within noise of flipping, else saves the fixtures."""
    from detectron2.structures import Instances
    from torchscale.architecture.config import EncoderConfig

    import model.open_world_sam2 as owsam_module
    from model.criterion import SetCriterion
    from model.matcher import HungarianMatcher
    from model.unilm.beit3.modeling_utils import BEiT3Wrapper

    torch.manual_seed(seed)
    beit_config = EncoderConfig(
        img_size=224, patch_size=16, vocab_size=64, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, drop_path_rate=0.0,
        encoder_embed_dim=64, encoder_attention_heads=4, encoder_ffn_embed_dim=128,
        encoder_layers=2,
    )
    mm_extractor = BEiT3Wrapper(beit_config)
    for p in mm_extractor.parameters():
        p.requires_grad = False
    text_hidden_fcs = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 256))]
    )
    positional_tokens = torch.nn.Parameter(torch.randn(NUM_TOKENS, 256))

    condition_beit3(mm_extractor, torch.Generator().manual_seed(seed))
    calibrate_projector(mm_extractor, text_hidden_fcs, tokenizer, evf_input(smooth_image(0)))

    def criterion(dice_weight: float) -> SetCriterion:
        matcher = HungarianMatcher(cost_class=0.0, cost_mask=20.0, cost_dice=dice_weight)
        weights = {"loss_ce": 0.0, "loss_mask": 20.0, "loss_dice": dice_weight}
        return SetCriterion(1, matcher, weights, 0.0, ["labels", "masks"])

    metadata = SimpleNamespace(
        thing_dataset_id_to_contiguous_id={i: i for i in THING_IDS}, stuff_classes=CLASS_NAMES
    )

    # the released transformer with a narrower MLP (its `mlp_dim` argument) to keep the
    # fixture small; built once so every run below shares its weights
    soft_prompt = owsam_module.CrossAttentionTransformer(
        embedding_dim=256, num_heads=8, mlp_dim=MLP_DIM, num_layers=2, dropout=0.1
    )

    def build(score_threshold: float, two_stage: bool, refer: bool, dice_weight: float = 0.0):
        model = owsam_module.OpenWorldSAM2(
            evf_sam2=torch.nn.Module(), tokenizer=tokenizer, visual_model=visual_model,
            mm_extractor=mm_extractor, text_hidden_fcs=text_hidden_fcs, query_dim=256,
            num_tokens=NUM_TOKENS, positional_tokens=positional_tokens,
            criterion=criterion(dice_weight),
            pixel_mean=(123.675, 116.280, 103.530), pixel_std=(58.395, 57.120, 57.375),
            dtype=torch.float32, test_topk_per_image=100, top_k_on=False, nms_on=True,
            nms_threshold=0.5, iou_threshold=score_threshold, semantic_on=True,
            instance_on=True, panoptic_on=True, use_visual_tokens=True,
            use_cross_attention=True, cross_attention_layers=2,
            two_stage_inference=two_stage, refer_on=refer, metadata=metadata,
        )
        model._bb_feat_sizes = [(IMAGE_SIZE // 4,) * 2, (IMAGE_SIZE // 8,) * 2, (IMAGE_SIZE // 16,) * 2]
        model.cross_attention_transformer = soft_prompt
        return model

    image = smooth_image(0)
    sam_image = (torch.from_numpy(image).permute(2, 0, 1).float()
                 - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)) / torch.tensor(
        [58.395, 57.12, 57.375]).view(3, 1, 1)
    evf_image = evf_input(image)

    captured = {}

    def hook(name):
        def fn(module, args, output):
            captured.setdefault(name, []).append(output)
        return fn

    def run(model, prompts, categories, noise=None):
        captured.clear()
        handles = [] if noise is None else [model.visual_model.sam_mask_decoder.register_forward_hook(
            lambda module, args, out: (noise(out[0]), noise(out[1]), *out[2:])
        )]
        handles += [
            model.mm_extractor.beit3.register_forward_hook(hook("beit3")),
            model.text_hidden_fcs[0].register_forward_hook(hook("projector")),
            model.visual_model.sam_prompt_encoder.register_forward_hook(hook("prompt_encoder")),
            model.visual_model.sam_mask_decoder.register_forward_hook(hook("mask_decoder")),
        ]
        x = {
            "image": sam_image, "evf_image": evf_image, "height": OUTPUT_SIZE[0],
            "width": OUTPUT_SIZE[1], "prompt": prompts, "unique_categories": categories,
        }
        with torch.no_grad():
            result = model([x])[0]
        for h in handles:
            h.remove()
        input_ids, _ = model.tokenize_prompts(prompts)
        first_decoder = captured["mask_decoder"][0]
        record = {
            "input_ids": input_ids,
            "beit3_cls": captured["beit3"][0]["encoder_out"][:, 0].clone(),
            "projector": captured["projector"][0][:, 0].clone(),
            # [N, N, 256]: the release's skip connection broadcasts [N, 1, C] + [N, C], so
            # mask n is decoded from N sparse tokens q_n + T(q)_j
            "prompt_embeddings": captured["prompt_encoder"][0][0].clone(),
            "masks": first_decoder[0][:, 0].clone(),
            "scores": first_decoder[1][:, 0].clone(),
        }
        if len(captured["mask_decoder"]) > 1:
            record["refined_masks"] = captured["mask_decoder"][1][0][:, 0].clone()
            record["refined_scores"] = captured["mask_decoder"][1][1][:, 0].clone()
        pan_seg, segments = result["panoptic_seg"]
        instances = result["instances"]
        record.update({
            "sem_seg": result["sem_seg"].clone(),
            "panoptic_seg": pan_seg.clone(), "segments_info": segments,
            "instance_masks": instances.pred_masks.bool().clone(),
            "instance_boxes": instances.pred_boxes.tensor.clone(),
            "instance_scores": instances.scores.clone(),
            "instance_classes": instances.pred_classes.clone(),
        })
        if "grounding_mask" in result:
            record["ref_masks"] = (result["grounding_mask"] > 0).clone()
            record["ref_scores"] = result["grounding_scores"].clone()
        return record

    def check_stable(model, prompts, categories, keys, what):
        """The exact-match outputs `keys` (and which masks two-stage inference refines) survive
        noise on every mask decoder output."""
        def decide(noise):
            record = run(model, prompts, categories, noise)
            refined = record.get("refined_scores", torch.empty(0))
            return [record[key] for key in keys] + [tuple(refined.shape)]

        check_stable_under_noise(decide, what, level=DECODER_NOISE)

    class_prompts = [class_prompt(CLASS_NAMES[c]) for c in ORACLE_CLASSES]
    probe = build(0.0, False, False)
    probe.eval()
    scores = run(probe, class_prompts, ORACLE_CLASSES)["scores"].sort().values
    # a panoptic / instance threshold in the widest gap between the 2nd and the 6th best
    # score: SAM2's random masks are flat (logits within +-0.3, scores within 0.5-0.55), so
    # every further kept mask adds boundaries decided by near ties
    best = scores.flip(0)[1:6]
    gap = int((best[:-1] - best[1:]).argmax())
    threshold = float((best[gap] + best[gap + 1]) / 2)

    outputs = {"score_threshold": threshold, "sam2_scores_sorted": scores}
    model = build(threshold, False, False)
    model.eval()
    outputs["classes"] = run(model, class_prompts, ORACLE_CLASSES)
    check_stable(model, class_prompts, ORACLE_CLASSES, SEGMENTATION, "class-prompt post-processing")
    two_stage = build(threshold, True, False)
    two_stage.eval()
    outputs["two_stage"] = run(two_stage, class_prompts, ORACLE_CLASSES)
    check_stable(two_stage, class_prompts, ORACLE_CLASSES, SEGMENTATION, "two-stage post-processing")
    refer = build(0.0, False, True)
    refer.eval()
    outputs["referring"] = run(refer, SENTENCES, list(range(len(SENTENCES))))
    check_stable(refer, SENTENCES, list(range(len(SENTENCES))), ["ref_masks"], "referring mask choice")
    outputs["tokenizer_probe"] = {
        text: tokenizer(text).input_ids for text in ["dog", "Ω zebra", SENTENCES[1], "object"]
    }

    masks = gt_masks(1)
    classes = torch.tensor([1, 1, 2, 0])
    train_categories = sorted(set(classes.tolist()))
    grouped = []
    for c in train_categories:
        inst = Instances((IMAGE_SIZE, IMAGE_SIZE))
        inst.gt_masks = masks[classes == c]
        inst.gt_classes = classes[classes == c]
        grouped.append(inst)
    train_x = {
        "image": sam_image, "evf_image": evf_image, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
        "prompt": [class_prompt(CLASS_NAMES[c]) for c in train_categories],
        "unique_categories": train_categories, "instances": grouped,
    }
    for dice_weight in (0.0, 1.0):
        trainer = build(threshold, False, False, dice_weight)
        trainer.train()
        for module in trainer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
        losses = trainer([train_x])
        outputs[f"loss_dice{dice_weight:g}"] = {k: v.detach().clone() for k, v in losses.items()}

    # the release's trainable parameters at its sizes (BEiT-3-L 1024-d, K = 20, 3 layers,
    # MLP 4 x 256): projector + tie-breakers + cross-attention transformer
    released = [
        torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)),
        owsam_module.CrossAttentionTransformer(256, 8, 256 * 4, num_layers=3, dropout=0.1),
    ]
    outputs["released_trainable_parameters"] = 20 * 256 + sum(
        p.numel() for module in released for p in module.parameters()
    )

    state = {
        k: v for k, v in model.state_dict().items()
        if k.startswith(("mm_extractor.", "text_hidden_fcs.", "positional_tokens",
                         "cross_attention_transformer."))
    }
    torch.save(state, out_dir / "weights.pt")
    torch.save(
        {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "gt_masks": masks.bool(),
         "gt_classes": classes, "class_names": CLASS_NAMES, "thing_ids": THING_IDS,
         "oracle_classes": ORACLE_CLASSES, "sentences": SENTENCES,
         "max_text_length": MAX_TEXT_LENGTH, "num_tokens": NUM_TOKENS, "mlp_dim": MLP_DIM,
         "output_size": OUTPUT_SIZE,
         "image_size": IMAGE_SIZE, "sam2_seed": SAM2_SEED, "sam2_config": SAM2_CONFIG},
        out_dir / "inputs.pt",
    )
    torch.save(outputs, out_dir / "outputs.pt")
    print(f"[openworldsam] seed {seed}: threshold {threshold:.4f}; scores {scores.tolist()}")
