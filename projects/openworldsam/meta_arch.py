"""OpenWorldSAM meta-architecture (Xiao et al. 2025): SAM2 prompted by language.

Per image: the frozen SAM2 image encoder runs once; every language prompt (a class name or
a referring expression) is fused with the image by the frozen BEiT-3 into one vector
(Sec. 3.1), turned into K queries (tie-breakers, Sec. 3.2) refined by the soft-prompting
transformer (Sec. 3.3), and decoded by SAM2 into K masks with IoU estimates, each labelled
with its prompt.

Training (Sec. 3.4, App. A.1): the prompts of an image are (at most `max_train_prompts`
randomly chosen) classes of its ground truth, or one of each referring expression's
sentences; each prompt's K masks are Hungarian-matched to the ground-truth masks of that
prompt (focal cost on the predicted 4x-downsampled grid, targets nearest-downsampled), and
the matched pairs get `mask_weight` x sigmoid focal (+ `dice_weight` x dice) on the masks
upsampled to the target resolution, normalised by the prompt's target count; the loss is
the mean over every prompt of the batch. This is the release's criterion (MASK_WEIGHT 20,
DICE_WEIGHT 0, objectness weight 0).

DDP: only the adapter trains, and every step runs every adapter parameter on at least one
prompt (an image without ground truth sends the prompt "object" with no target, as the
release, whose loss is 0), so DistributedDataParallel works with find_unused_parameters=False
although prompt counts differ per image and per rank. Normalisers are local (per prompt).
"""
import logging
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import nms

from openseg.data.vocab import get_vocabulary
from openseg.modeling.inference import masks_to_boxes, panoptic_inference, semantic_inference
from openseg.modeling.losses import dice_loss, sigmoid_focal_loss
from openseg.modeling.matcher import batch_dice_cost

from .checkpoint import convert_released_state_dict
from .modeling import (
    PROMPT_TOKEN_LAYOUTS,
    FrozenSAM2,
    LanguagePromptAdapter,
    sparse_prompt_tokens,
)
from .vl_encoder import VisionLanguageEncoder, build_vl_encoder

logger = logging.getLogger(__name__)

PROMPT_PROTOCOLS = ("oracle", "global")
# the release's prompt for an image without annotations (a target-less step)
EMPTY_IMAGE_PROMPT = "object"


def check_choices(protocol: str, token_layout: str) -> None:
    if protocol not in PROMPT_PROTOCOLS:
        raise ValueError(
            f"cfg.MODEL.OPENWORLDSAM.TEST.PROMPTS={protocol!r}: choose one of {PROMPT_PROTOCOLS}."
        )
    if token_layout not in PROMPT_TOKEN_LAYOUTS:
        raise ValueError(
            f"cfg.MODEL.OPENWORLDSAM.PROMPT_TOKENS={token_layout!r}: choose one of "
            f"{PROMPT_TOKEN_LAYOUTS}."
        )


def batch_sigmoid_focal_cost(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """[N, M] mean sigmoid-focal loss of every prediction [N, P] (logits) against every
    target [M, P] (0/1): the release matcher's mask cost."""
    probs = inputs.sigmoid()
    positive = (1 - probs) ** gamma * F.binary_cross_entropy_with_logits(
        inputs, torch.ones_like(inputs), reduction="none"
    )
    negative = probs**gamma * F.binary_cross_entropy_with_logits(
        inputs, torch.zeros_like(inputs), reduction="none"
    )
    if alpha >= 0:
        positive, negative = alpha * positive, (1 - alpha) * negative
    return (positive @ targets.T + negative @ (1 - targets).T) / inputs.shape[1]


def prompt_logits(scores: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """[N, C+1] logits whose softmax gives probability `scores[i]` to class `classes[i]` and
    the rest to no-object, so the shared Mask2Former panoptic rule ranks each mask by its SAM2
    confidence (needs scores > 0.5 to keep the class: the panoptic threshold is >= 0.5)."""
    probs = scores.clamp(1e-6, 1 - 1e-6)
    logits = scores.new_full((scores.shape[0], num_classes + 1), float("-inf"))
    rows = torch.arange(scores.shape[0], device=scores.device)
    logits[rows, classes] = probs.log()
    logits[:, num_classes] = (1 - probs).log()
    return logits


def semantic_logits(scores: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """[N, C+1] class logits of the release's semantic merge: 0 everywhere except the mask's
    confidence at its class, softmax-ed over C+1 by `semantic_inference`. The per-pixel
    argmax then ranks classes by sum over their masks of (e^s - 1) / (C + e^s) x mask
    probability: the confidence-weighted merge of Sec. 3.5."""
    logits = scores.new_zeros((scores.shape[0], num_classes + 1))
    logits[torch.arange(scores.shape[0], device=scores.device), classes] = scores
    return logits


def resize_masks(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize of [N, h, w] maps to [N, *size] (N may be 0)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def threshold_nms_instances(
    mask_logits: Tensor,
    scores: Tensor,
    classes: Tensor,
    *,
    score_threshold: float,
    nms_threshold: float,
    topk: int,
    output_size: Tuple[int, int],
) -> Instances:
    """Instance output (App. A.2, as released): optionally the `topk` best masks, then masks
    with score >= `score_threshold`, then box NMS at IoU `nms_threshold` across classes
    (torchvision `nms`, class-agnostic as the release: one region keeps its best-aligned
    class). Boxes and masks at `output_size` (masks upsampled bilinearly, then > 0).

    Args:
        mask_logits: [N, h, w] low-resolution logits covering the whole image.
        scores, classes: [N] SAM2 IoU estimate and class of each mask.
    """
    order = torch.argsort(scores, descending=True)[:topk] if topk > 0 else None
    if order is not None:
        mask_logits, scores, classes = mask_logits[order], scores[order], classes[order]
    keep = scores >= score_threshold
    masks = resize_masks(mask_logits[keep], output_size) > 0
    boxes = masks_to_boxes(masks)
    kept = nms(boxes, scores[keep], nms_threshold)
    result = Instances(output_size)
    result.pred_masks = masks[kept]
    result.pred_boxes = Boxes(boxes[kept])
    result.scores = scores[keep][kept]
    result.pred_classes = classes[keep][kept].long()
    return result


def classwise_mask_nms(probs: Tensor, scores: Tensor, classes: Tensor, threshold: float) -> Tensor:
    """Greedy NMS on binary masks (probability >= 0.5) within each class (App. A.2 panoptic
    NMS, as the release's `mask_nms`): in decreasing score order, a mask suppresses every
    later mask of its class whose mask IoU exceeds `threshold`. Returns a bool keep [N]."""
    count = probs.shape[0]
    keep = torch.ones(count, dtype=torch.bool, device=probs.device)
    if count < 2:
        return keep
    binary = (probs >= 0.5).flatten(1).float()
    intersection = binary @ binary.T
    areas = binary.sum(1)
    union = areas[:, None] + areas[None, :] - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))
    suppress = (iou > threshold) & (classes[:, None] == classes[None, :])
    order = torch.argsort(scores, descending=True).tolist()
    for rank, i in enumerate(order):
        if keep[i]:
            later = torch.as_tensor(order[rank + 1 :], dtype=torch.int64, device=probs.device)
            keep[later[suppress[i, later]]] = False
    return keep


@META_ARCH_REGISTRY.register()
class OpenWorldSAM(nn.Module):
    """Frozen SAM2 + frozen vision-language encoder + trainable language-prompt adapter.

    Inputs: detectron2 dicts with ``image`` (uint8 RGB [3, H, W]); training adds ``instances``
    (``gt_classes``, ``gt_masks``); referring inputs carry ``sentences``. Outputs per image:
    ``sem_seg``, ``panoptic_seg``, ``instances`` (detectron2 formats, at ``height`` x
    ``width``), or for referring inputs ``ref_seg`` (bool [S, H, W], the best-scoring mask of
    each sentence) and ``ref_scores`` [S].
    """

    @configurable
    def __init__(
        self,
        *,
        sam2: FrozenSAM2,
        vl_encoder: VisionLanguageEncoder,
        adapter: LanguagePromptAdapter,
        mask_weight: float,
        dice_weight: float,
        focal_alpha: float,
        focal_gamma: float,
        max_train_prompts: int,
        train_dataset: str,
        test_dataset: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        prompt_protocol: str = "oracle",
        prompt_tokens: str = "released",
        score_threshold: float = 0.7,
        nms_threshold: float = 0.5,
        topk: int = 0,
        overlap_threshold: float = 0.5,
        two_stage_refinement: bool = False,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
        decoder_chunk_size: int = 512,
    ):
        """
        Args:
            sam2, vl_encoder: frozen SAM2 and vision-language encoder.
            adapter: the trainable projector + tie-breakers + soft-prompting transformer.
            mask_weight, dice_weight: weights of the focal / dice matching costs and losses.
            focal_alpha, focal_gamma: focal loss shape.
            max_train_prompts: classes prompted per training image (random subset).
            train_dataset, test_dataset: datasets whose vocabularies give the class prompts.
            pixel_mean, pixel_std: SAM2's RGB normalisation in 0-255 units.
            prompt_protocol: "oracle" (ground-truth classes) or "global" (whole vocabulary).
            prompt_tokens: SAM2 sparse-token layout, "released" or "per_query"
                (`sparse_prompt_tokens`).
            score_threshold, nms_threshold, topk: instance / panoptic filtering and NMS.
            overlap_threshold: panoptic visible-fraction rule.
            two_stage_refinement: decode again with the first masks as dense prompts.
            semantic_on, instance_on, panoptic_on: which outputs inference produces.
            decoder_chunk_size: sparse prompt tokens per SAM2 decoder call (memory bound).
        """
        super().__init__()
        check_choices(prompt_protocol, prompt_tokens)
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError(
                "OpenWorldSAM: MODEL.MASK_FORMER.TEST.SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON "
                "are all False; enable at least one output."
            )
        if panoptic_on and score_threshold < 0.5:
            raise ValueError(
                f"cfg.MODEL.OPENWORLDSAM.TEST.SCORE_THRESHOLD={score_threshold}: the panoptic "
                "output needs >= 0.5 (the paper uses 0.7); turn PANOPTIC_ON off for lower values."
            )
        self.sam2 = sam2
        self.vl_encoder = vl_encoder
        self.adapter = adapter
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.max_train_prompts = max_train_prompts
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.prompt_protocol = prompt_protocol
        self.prompt_tokens = prompt_tokens
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.topk = topk
        self.overlap_threshold = overlap_threshold
        self.two_stage_refinement = two_stage_refinement
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.decoder_chunk_size = max(1, decoder_chunk_size)
        metadata = MetadataCatalog.get(test_dataset or train_dataset or "__openseg_no_dataset__")
        self.thing_ids: Set[int] = set(
            getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values()
        )
        self._register_load_state_dict_pre_hook(convert_released_state_dict)
        logger.info(self.parameter_report())

    @classmethod
    def from_config(cls, cfg) -> Dict:
        node = cfg.MODEL.OPENWORLDSAM
        check_choices(node.TEST.PROMPTS, node.PROMPT_TOKENS)  # before building the heavy parts
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(
                f"OpenWorldSAM: cfg.INPUT.FORMAT={cfg.INPUT.FORMAT!r}; SAM2 and BEiT-3 read RGB "
                "images, set INPUT.FORMAT to 'RGB'."
            )
        sam2 = FrozenSAM2(node.SAM2_CONFIG, node.SAM2_CHECKPOINT, node.SAM2_IMAGE_SIZE)
        vl_encoder = build_vl_encoder(cfg)
        adapter = LanguagePromptAdapter(
            input_dim=vl_encoder.output_dim,
            hidden_dim=node.PROJECTOR_HIDDEN_DIM,
            prompt_dim=sam2.embed_dim,
            num_tie_breakers=node.NUM_TIE_BREAKERS,
            num_layers=node.SOFT_PROMPT_LAYERS,
            nheads=node.NHEADS,
            dim_feedforward=node.DIM_FEEDFORWARD,
            dropout=node.DROPOUT,
        )
        mask_former = cfg.MODEL.MASK_FORMER
        return {
            "sam2": sam2,
            "vl_encoder": vl_encoder,
            "adapter": adapter,
            "mask_weight": node.MASK_WEIGHT,
            "dice_weight": node.DICE_WEIGHT,
            "focal_alpha": node.FOCAL_ALPHA,
            "focal_gamma": node.FOCAL_GAMMA,
            "max_train_prompts": node.MAX_TRAIN_PROMPTS,
            "train_dataset": cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "",
            "test_dataset": cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "",
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "prompt_protocol": node.TEST.PROMPTS,
            "prompt_tokens": node.PROMPT_TOKENS,
            "score_threshold": node.TEST.SCORE_THRESHOLD,
            "nms_threshold": node.TEST.NMS_THRESHOLD,
            "topk": node.TEST.TOPK,
            "overlap_threshold": node.TEST.OVERLAP_THRESHOLD,
            "two_stage_refinement": node.TEST.TWO_STAGE_REFINEMENT,
            "semantic_on": mask_former.TEST.SEMANTIC_ON,
            "instance_on": mask_former.TEST.INSTANCE_ON,
            "panoptic_on": mask_former.TEST.PANOPTIC_ON,
            "decoder_chunk_size": node.DECODER_CHUNK_SIZE,
        }

    # ------------------------------------------------------------------ bookkeeping
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def trainable_parameter_counts(self) -> Dict[str, int]:
        """Trainable parameters per adapter part (the paper reports ~4.5 M in total)."""
        adapter = self.adapter
        counts = {
            "projector": sum(p.numel() for p in adapter.projector.parameters() if p.requires_grad),
            "tie_breakers": adapter.tie_breakers.numel() * int(adapter.tie_breakers.requires_grad),
            "soft_prompt_transformer": sum(
                p.numel() for p in adapter.layers.parameters() if p.requires_grad
            ),
        }
        counts["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    def parameter_report(self) -> str:
        counts = self.trainable_parameter_counts()
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return (
            f"OpenWorldSAM trainable parameters: {counts['total'] / 1e6:.3f} M (projector "
            f"{counts['projector']}, tie-breakers {counts['tie_breakers']}, soft-prompt "
            f"transformer {counts['soft_prompt_transformer']}); frozen SAM2 + vision-language "
            f"encoder: {frozen / 1e6:.1f} M"
        )

    # ------------------------------------------------------------------ shared steps
    def preprocess_images(self, batched_inputs: List[Dict]) -> Tensor:
        """[B, 3, S, S]: each image resized (bilinear) to SAM2's square input, normalised."""
        size = (self.sam2.image_size, self.sam2.image_size)
        images = [
            F.interpolate(
                x["image"].to(self.device, torch.float32)[None], size=size, mode="bilinear",
                align_corners=False,
            )[0]
            for x in batched_inputs
        ]
        return (torch.stack(images) - self.pixel_mean) / self.pixel_std

    def encode_images(self, batched_inputs: List[Dict]) -> Tuple[Dict[str, Tensor], List[Tensor]]:
        """The only image-encoder calls: SAM2 features of the batch and one vision-language
        context per image, shared by every prompt of that image."""
        features = self.sam2.image_features(self.preprocess_images(batched_inputs))
        contexts = [self.vl_encoder.image_context(x["image"]) for x in batched_inputs]
        return features, contexts

    def prompt_queries(
        self, features: Dict[str, Tensor], image_index: int, context: Tensor, prompts: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """q and T(q), [P x K, C] each, of P prompts (encoder features) of one image."""
        vectors = self.vl_encoder.fuse(context, prompts)
        queries, refined = self.adapter(vectors, features["image_embed"][image_index])
        return queries.flatten(0, 1), refined.flatten(0, 1)

    def decode(
        self,
        features: Dict[str, Tensor],
        image_index: int,
        queries: Optional[Tuple[Tensor, Tensor]] = None,
        mask_prompts: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """SAM2 masks [N, S/4, S/4] and scores [N] of N queries (q, T(q)) or N mask prompts,
        decoded in chunks of at most `decoder_chunk_size` sparse tokens (at least one mask;
        SAM2's decoder treats each mask's prompt independently, so chunks do not change the
        result)."""
        count = (queries[0] if queries is not None else mask_prompts).shape[0]
        tokens_per_mask = 1
        if queries is not None and self.prompt_tokens == "released":
            tokens_per_mask = count
        per_call = max(1, self.decoder_chunk_size // tokens_per_mask)
        outputs = []
        for start in range(0, count, per_call):
            rows = slice(start, start + per_call)
            tokens = None
            if queries is not None:
                tokens = sparse_prompt_tokens(*queries, rows, self.prompt_tokens)
            masks = None if mask_prompts is None else mask_prompts[rows]
            outputs.append(self.sam2.decode(features, image_index, tokens, masks))
        if not outputs:
            size = features["image_embed"].shape[-1] * 4
            empty = features["image_embed"].new_zeros((0, size, size))
            return empty, empty.new_zeros(0)
        return torch.cat([m for m, _ in outputs]), torch.cat([s for _, s in outputs])

    def vocabulary_features(self, dataset_name: str) -> Tensor:
        if not dataset_name:
            raise ValueError(
                "OpenWorldSAM needs a dataset vocabulary for class prompts: set DATASETS.TRAIN "
                "(training) / DATASETS.TEST (inference)."
            )
        return self.vl_encoder.vocabulary_features(get_vocabulary(dataset_name)).to(self.device)

    def forward(self, batched_inputs: List[Dict]):
        features, contexts = self.encode_images(batched_inputs)
        if self.training:
            return self.losses(batched_inputs, features, contexts)
        return self.inference(batched_inputs, features, contexts)

    # ------------------------------------------------------------------ training
    def training_prompts(self, x: Dict, vocabulary: Optional[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """Prompt features and, per prompt, its target masks [M, H, W] (float 0/1).

        Class prompts: the classes of the image's ground truth in increasing id order, at most
        `max_train_prompts` of them chosen at random (release). Referring inputs: one randomly
        chosen sentence of the reference, whose targets are the referred masks. An image
        without targets sends the prompt "object" with no target (release)."""
        if "instances" not in x:
            raise KeyError(
                "OpenWorldSAM: training inputs need 'instances' (gt_classes, gt_masks); use a "
                "training mapper (cfg.INPUT.DATASET_MAPPER_NAME, e.g. 'panoptic' or 'referring')."
            )
        instances = x["instances"].to(self.device)
        gt_masks = instances.gt_masks
        gt_masks = (gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks).float()
        if "sentences" in x and gt_masks.shape[0]:
            sentences = list(x["sentences"])
            choice = int(torch.randint(len(sentences), ()))
            return self.vl_encoder.text_features([sentences[choice]]), [gt_masks]
        classes = instances.gt_classes.long()
        present = torch.unique(classes)
        if present.numel() == 0:
            return self.vl_encoder.text_features([EMPTY_IMAGE_PROMPT]), [gt_masks[:0]]
        if present.numel() > self.max_train_prompts:
            chosen = torch.randperm(present.numel())[: self.max_train_prompts]
            present = present[chosen.to(present.device)].sort().values
        return vocabulary[present], [gt_masks[classes == c] for c in present]

    def match_prompt(self, pred_masks: Tensor, target_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Hungarian matching of one prompt's K masks [K, h, w] to its M targets [M, H, W]:
        mask_weight x focal + dice_weight x dice costs on the prediction grid, targets
        nearest-downsampled to it (release)."""
        if target_masks.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=pred_masks.device)
            return empty, empty
        with torch.no_grad():
            targets = F.interpolate(target_masks[:, None], size=pred_masks.shape[-2:], mode="nearest")
            preds, targets = pred_masks.flatten(1).float(), targets.flatten(1)
            cost = self.mask_weight * batch_sigmoid_focal_cost(
                preds, targets, self.focal_alpha, self.focal_gamma
            ) + self.dice_weight * batch_dice_cost(preds, targets)
            cost = cost.nan_to_num(nan=1e6)
        pred_idx, tgt_idx = linear_sum_assignment(cost.cpu().numpy())
        return (
            torch.as_tensor(pred_idx, dtype=torch.int64, device=pred_masks.device),
            torch.as_tensor(tgt_idx, dtype=torch.int64, device=pred_masks.device),
        )

    def prompt_loss(self, pred_masks: Tensor, target_masks: Tensor) -> Dict[str, Tensor]:
        """Weighted focal / dice loss of one prompt: its matched masks upsampled (bilinear) to
        the target resolution, per-mask means summed and divided by max(M, 1)."""
        pred_idx, tgt_idx = self.match_prompt(pred_masks, target_masks)
        num_masks = max(float(target_masks.shape[0]), 1.0)
        logits = resize_masks(pred_masks[pred_idx], target_masks.shape[-2:]).flatten(1)
        labels = target_masks[tgt_idx].flatten(1)
        return {
            "loss_mask": self.mask_weight
            * sigmoid_focal_loss(logits, labels, num_masks, self.focal_alpha, self.focal_gamma),
            "loss_dice": self.dice_weight * dice_loss(logits, labels, num_masks),
        }

    def losses(
        self, batched_inputs: List[Dict], features: Dict[str, Tensor], contexts: List[Tensor]
    ) -> Dict[str, Tensor]:
        vocabulary = None
        if any("sentences" not in x for x in batched_inputs):
            vocabulary = self.vocabulary_features(self.train_dataset)
        per_prompt: Dict[str, List[Tensor]] = {"loss_mask": [], "loss_dice": []}
        for index, (x, context) in enumerate(zip(batched_inputs, contexts)):
            prompts, targets = self.training_prompts(x, vocabulary)
            queries = self.prompt_queries(features, index, context, prompts)
            masks, _ = self.decode(features, index, queries)
            masks = masks.view(prompts.shape[0], -1, *masks.shape[-2:])
            for prompt_masks, target_masks in zip(masks, targets):
                for name, value in self.prompt_loss(prompt_masks, target_masks).items():
                    # `+ 0 x masks` keeps every adapter parameter in the graph (DDP)
                    per_prompt[name].append(value + 0.0 * prompt_masks.sum())
        return {name: torch.stack(values).mean() for name, values in per_prompt.items()}

    # ------------------------------------------------------------------ inference
    def oracle_classes(self, x: Dict) -> Tensor:
        """Contiguous ids of the classes in the test image's ground truth (Oracle-Prompts)."""
        if "segments_info" in x:
            ids = sorted({int(s["category_id"]) for s in x["segments_info"]})
        elif "instances" in x:
            ids = sorted(set(x["instances"].gt_classes.tolist()))
        else:
            raise KeyError(
                "cfg.MODEL.OPENWORLDSAM.TEST.PROMPTS='oracle' needs each test input's ground-truth "
                "classes: 'segments_info' (panoptic datasets) or 'instances'; use a test mapper "
                "that keeps them, or the 'global' protocol."
            )
        return torch.as_tensor(ids, dtype=torch.int64, device=self.device)

    def prompt_masks(
        self, features: Dict[str, Tensor], image_index: int, context: Tensor, prompts: Tensor,
        refine_threshold: float,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Masks [N, h, w], scores [N] and prompt index [N] of every (prompt, query) pair.

        With two-stage refinement (release), the masks with score >= `refine_threshold` are
        decoded again with the mask alone as SAM2's dense prompt (no sparse token); the others
        are dropped. If none passes, the first-stage masks are kept."""
        queries = self.prompt_queries(features, image_index, context, prompts)
        masks, scores = self.decode(features, image_index, queries)
        prompt_index = torch.arange(prompts.shape[0], device=self.device).repeat_interleave(
            self.adapter.num_tie_breakers
        )
        if self.two_stage_refinement:
            keep = scores >= refine_threshold
            if keep.any():
                masks, scores = self.decode(features, image_index, None, masks[keep][:, None])
                prompt_index = prompt_index[keep]
        return masks, scores, prompt_index

    def inference(
        self, batched_inputs: List[Dict], features: Dict[str, Tensor], contexts: List[Tensor]
    ) -> List[Dict]:
        vocabulary = None
        if any("sentences" not in x for x in batched_inputs):
            vocabulary = self.vocabulary_features(self.test_dataset)
        results = []
        for index, (x, context) in enumerate(zip(batched_inputs, contexts)):
            output_size = (
                x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1])
            )
            if "sentences" in x:
                prompts = self.vl_encoder.text_features(list(x["sentences"]))
                # every mask is refined for referring (the release's RefCOCOg threshold is 0)
                masks, scores, sentence = self.prompt_masks(features, index, context, prompts, 0.0)
                results.append(
                    self.referring_output(masks, scores, sentence, prompts.shape[0], output_size)
                )
                continue
            if self.prompt_protocol == "oracle":
                classes = self.oracle_classes(x)
            else:
                classes = torch.arange(vocabulary.shape[0], device=self.device)
            masks, scores, prompt_index = self.prompt_masks(
                features, index, context, vocabulary[classes], self.score_threshold
            )
            results.append(
                self.segmentation_output(
                    masks, scores, classes[prompt_index], vocabulary.shape[0], output_size
                )
            )
        return results

    @staticmethod
    def referring_output(
        masks: Tensor, scores: Tensor, sentence: Tensor, num_sentences: int,
        output_size: Tuple[int, int],
    ) -> Dict[str, Tensor]:
        """Per sentence, its mask with the highest IoU estimate (release `refer_inference`)."""
        chosen = []
        for s in range(num_sentences):
            candidates = torch.nonzero(sentence == s).flatten()
            chosen.append(candidates[scores[candidates].argmax()])
        chosen = torch.stack(chosen)
        return {
            "ref_seg": resize_masks(masks[chosen], output_size) > 0,
            "ref_scores": scores[chosen],
        }

    def semantic_output(
        self, masks: Tensor, scores: Tensor, classes: Tensor, num_classes: int,
        output_size: Tuple[int, int],
    ) -> Tensor:
        """[C, H, W] release semantic merge, accumulated over chunks of masks (memory)."""
        logits = semantic_logits(scores, classes, num_classes)
        sem_seg = masks.new_zeros((num_classes, *output_size))
        for start in range(0, masks.shape[0], self.decoder_chunk_size):
            chunk = slice(start, start + self.decoder_chunk_size)
            sem_seg += semantic_inference(logits[chunk], resize_masks(masks[chunk], output_size))
        return sem_seg

    def panoptic_output(
        self, masks: Tensor, scores: Tensor, classes: Tensor, num_classes: int,
        output_size: Tuple[int, int],
    ):
        """Masks with score > SCORE_THRESHOLD, class-wise mask NMS at NMS_THRESHOLD (App. A.2),
        then each pixel to the mask of highest score x probability, a mask kept if it wins
        >= OVERLAP_THRESHOLD of its own pixels, stuff of one class merged (release)."""
        keep = scores > self.score_threshold
        masks, scores, classes = resize_masks(masks[keep], output_size), scores[keep], classes[keep]
        kept = classwise_mask_nms(masks.sigmoid(), scores, classes, self.nms_threshold)
        return panoptic_inference(
            prompt_logits(scores[kept], classes[kept], num_classes),
            masks[kept],
            thing_ids=self.thing_ids,
            object_mask_threshold=-1.0,
            overlap_threshold=self.overlap_threshold,
        )

    def segmentation_output(
        self,
        masks: Tensor,
        scores: Tensor,
        classes: Tensor,
        num_classes: int,
        output_size: Tuple[int, int],
    ) -> Dict:
        """Semantic / panoptic / instance outputs of N labelled low-resolution masks."""
        result: Dict = {}
        if self.semantic_on:
            result["sem_seg"] = self.semantic_output(
                masks, scores, classes, num_classes, output_size
            )
        if self.panoptic_on:
            result["panoptic_seg"] = self.panoptic_output(
                masks, scores, classes, num_classes, output_size
            )
        if self.instance_on:
            keep = torch.ones_like(scores, dtype=torch.bool)
            if self.panoptic_on:
                # release: with panoptic on, instances are thing classes only
                keep = torch.tensor(
                    [int(c) in self.thing_ids for c in classes.tolist()],
                    dtype=torch.bool, device=scores.device,
                )
            result["instances"] = threshold_nms_instances(
                masks[keep], scores[keep], classes[keep],
                score_threshold=self.score_threshold,
                nms_threshold=self.nms_threshold,
                topk=self.topk,
                output_size=output_size,
            )
        return result

    def extra_repr(self) -> str:
        """Shown in the "Model:" log line detectron2's trainer writes at start, so the
        trainable parameter count is reported whatever the openseg logger's level."""
        return (
            f"prompt_protocol={self.prompt_protocol}, prompt_tokens={self.prompt_tokens}, "
            f"score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, two_stage_refinement={self.two_stage_refinement}"
            f"\n{self.parameter_report()}"
        )
