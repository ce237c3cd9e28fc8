"""OpenWorldSAM meta-architecture (Xiao et al. 2025): SAM2 prompted by language.

Per image: the frozen SAM2 image encoder and the frozen vision-language encoder run once;
every language prompt (a class name or a referring expression) becomes one fused vector,
K queries (tie-breakers, Sec. 3.2) refined by the soft-prompting transformer (Sec. 3.3), and
K SAM2 masks with IoU estimates, each labelled with its prompt.

Training (Sec. 3.4): the prompts of an image are the classes in its ground truth (or its
referring expressions); each prompt's K masks are Hungarian-matched to the ground-truth
instances of that class and the matched pairs get sigmoid focal + dice losses. All prompts of
an image go through the adapter and SAM2's decoder as one batch.

DDP: only the adapter trains, and every step runs every adapter parameter on at least one
prompt (an image without ground truth still sends one unmatched prompt, its loss times zero),
so DistributedDataParallel works with find_unused_parameters=False even though the number of
prompts differs between images and ranks. The loss normaliser (matched masks) is averaged
over ranks.
"""
import logging
from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import batched_nms

from openseg.data.vocab import get_vocabulary
from openseg.modeling.inference import masks_to_boxes, panoptic_inference, semantic_inference
from openseg.modeling.losses import (
    calculate_uncertainty,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sigmoid_focal_loss,
)
from openseg.modeling.matcher import HungarianMatcher

from .modeling import FrozenSAM2, LanguagePromptAdapter
from .vl_encoder import VisionLanguageEncoder, build_vl_encoder

logger = logging.getLogger(__name__)

PROMPT_PROTOCOLS = ("global", "oracle")


def check_prompt_protocol(protocol: str) -> None:
    if protocol not in PROMPT_PROTOCOLS:
        raise ValueError(
            f"cfg.MODEL.OPENWORLDSAM.TEST.PROMPTS={protocol!r}: choose one of {PROMPT_PROTOCOLS}."
        )


def prompt_logits(scores: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """[N, C+1] logits whose softmax gives probability `scores[i]` to class `classes[i]` and
    the rest to no-object, so the shared Mask2Former post-processing weights each mask by its
    SAM2 confidence (a confidence-weighted merge per class for semantic segmentation)."""
    probs = scores.clamp(1e-6, 1 - 1e-6)
    logits = scores.new_full((scores.shape[0], num_classes + 1), float("-inf"))
    rows = torch.arange(scores.shape[0], device=scores.device)
    logits[rows, classes] = probs.log()
    logits[:, num_classes] = (1 - probs).log()
    return logits


def resize_masks(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize of [N, h, w] maps to [N, *size] (N may be 0)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]


def threshold_nms_instances(
    mask_logits: Tensor,
    scores: Tensor,
    classes: Tensor,
    *,
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    output_size: Tuple[int, int],
) -> Instances:
    """Instance output of OpenWorldSAM (Sec. 3.5): masks with score >= `score_threshold`,
    class-wise box NMS at IoU `nms_threshold` (torchvision), the `max_detections` best kept.

    Args:
        mask_logits: [N, h, w] low-resolution logits covering the whole image.
        scores, classes: [N] confidence and class of each mask.
        output_size: (height, width) of the returned masks.
    """
    keep = torch.nonzero(scores >= score_threshold).flatten()
    boxes = masks_to_boxes(mask_logits[keep] > 0)
    kept = keep[batched_nms(boxes, scores[keep], classes[keep], nms_threshold)][:max_detections]
    masks = resize_masks(mask_logits[kept], output_size) > 0
    result = Instances(output_size)
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks))
    result.scores = scores[kept]
    result.pred_classes = classes[kept].long()
    return result


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
        matcher: HungarianMatcher,
        focal_weight: float,
        dice_weight: float,
        focal_alpha: float,
        focal_gamma: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        train_dataset: str,
        test_dataset: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        prompt_protocol: str = "global",
        score_threshold: float = 0.7,
        nms_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        two_stage_refinement: bool = False,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
        max_detections: int = 100,
        decoder_chunk_size: int = 512,
    ):
        """
        Args:
            sam2, vl_encoder: frozen SAM2 and vision-language encoder.
            adapter: the trainable projector + tie-breakers + soft-prompting transformer.
            matcher: its `cost_matrix` matches a prompt's K masks to that class's instances.
            focal_weight, dice_weight, focal_alpha, focal_gamma: loss weights and focal shape.
            num_points, oversample_ratio, importance_sample_ratio: point-sampled mask losses.
            train_dataset, test_dataset: datasets whose vocabularies give the class prompts.
            pixel_mean, pixel_std: SAM2's RGB normalisation in 0-255 units.
            prompt_protocol: "global" (whole vocabulary) or "oracle" (ground-truth classes).
            score_threshold, nms_threshold: instance / panoptic confidence and NMS IoU.
            overlap_threshold: panoptic visible-fraction rule (Mask2Former).
            two_stage_refinement: decode again with the first masks as dense prompts.
            semantic_on, instance_on, panoptic_on: which outputs inference produces.
            max_detections: maximum instances per image.
            decoder_chunk_size: (prompt, query) pairs per adapter / decoder call at test time.
        """
        super().__init__()
        check_prompt_protocol(prompt_protocol)
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError(
                "OpenWorldSAM: MODEL.MASK_FORMER.TEST.SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON "
                "are all False; enable at least one output."
            )
        self.sam2 = sam2
        self.vl_encoder = vl_encoder
        self.adapter = adapter
        self.matcher = matcher
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.prompt_protocol = prompt_protocol
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.overlap_threshold = overlap_threshold
        self.two_stage_refinement = two_stage_refinement
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.max_detections = max_detections
        self.decoder_chunk_size = max(1, decoder_chunk_size)
        metadata = MetadataCatalog.get(test_dataset or train_dataset or "__openseg_no_dataset__")
        self.thing_ids: Set[int] = set(
            getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values()
        )
        logger.info(self.parameter_report())

    @classmethod
    def from_config(cls, cfg) -> Dict:
        node = cfg.MODEL.OPENWORLDSAM
        check_prompt_protocol(node.TEST.PROMPTS)  # before building the heavy parts
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(
                f"OpenWorldSAM: cfg.INPUT.FORMAT={cfg.INPUT.FORMAT!r}; SAM2 and CLIP read RGB "
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
            "matcher": HungarianMatcher(
                cost_class=0.0,
                cost_mask=mask_former.MASK_WEIGHT,
                cost_dice=mask_former.DICE_WEIGHT,
                num_points=node.TRAIN_NUM_POINTS,
            ),
            "focal_weight": node.FOCAL_WEIGHT,
            "dice_weight": node.DICE_WEIGHT,
            "focal_alpha": node.FOCAL_ALPHA,
            "focal_gamma": node.FOCAL_GAMMA,
            "num_points": node.TRAIN_NUM_POINTS,
            "oversample_ratio": node.OVERSAMPLE_RATIO,
            "importance_sample_ratio": node.IMPORTANCE_SAMPLE_RATIO,
            "train_dataset": cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "",
            "test_dataset": cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "",
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "prompt_protocol": node.TEST.PROMPTS,
            "score_threshold": node.TEST.SCORE_THRESHOLD,
            "nms_threshold": node.TEST.NMS_THRESHOLD,
            "overlap_threshold": mask_former.TEST.OVERLAP_THRESHOLD,
            "two_stage_refinement": node.TEST.TWO_STAGE_REFINEMENT,
            "semantic_on": mask_former.TEST.SEMANTIC_ON,
            "instance_on": mask_former.TEST.INSTANCE_ON,
            "panoptic_on": mask_former.TEST.PANOPTIC_ON,
            "max_detections": mask_former.TEST.DETECTIONS_PER_IMAGE,
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
            "tie_breakers": sum(
                p.numel() for p in adapter.tie_breakers.parameters() if p.requires_grad
            ),
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
        """[B, 3, S, S]: each image resized to SAM2's square input and normalised."""
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

    def prompt_masks(
        self, features: Dict[str, Tensor], image_index: int, prompt_vectors: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """[P, K, S/4, S/4] mask logits and [P, K] IoU estimates of P fused prompt vectors."""
        queries = self.adapter(
            prompt_vectors, features["image_embed"][image_index], features["image_pe"][0]
        )
        num_prompts, num_queries = queries.shape[:2]
        masks, scores = self.sam2.decode(features, image_index, queries.flatten(0, 1))
        if self.two_stage_refinement and not self.training:
            masks, scores = self.sam2.decode(
                features, image_index, queries.flatten(0, 1), mask_prompts=masks[:, None]
            )
        return (
            masks.view(num_prompts, num_queries, *masks.shape[-2:]),
            scores.view(num_prompts, num_queries),
        )

    def chunked_prompt_masks(
        self, features: Dict[str, Tensor], image_index: int, prompt_vectors: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """`prompt_masks` over chunks of prompts (bounded memory for large vocabularies)."""
        per_chunk = max(1, self.decoder_chunk_size // self.adapter.num_tie_breakers)
        outputs = [
            self.prompt_masks(features, image_index, prompt_vectors[start : start + per_chunk])
            for start in range(0, prompt_vectors.shape[0], per_chunk)
        ]
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
    def training_prompts(
        self, x: Dict, vocabulary: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """Prompt features and, per prompt, its target masks [M, H, W] (bool).

        Class prompts are the classes of the image's ground truth; referring inputs use each
        sentence as a prompt of the referred object(s). An image without targets sends one
        prompt with no targets, so every adapter parameter still runs (DDP)."""
        if "instances" not in x:
            raise KeyError(
                "OpenWorldSAM: training inputs need 'instances' (gt_classes, gt_masks); use a "
                "training mapper (cfg.INPUT.DATASET_MAPPER_NAME, e.g. 'panoptic' or 'referring')."
            )
        instances = x["instances"].to(self.device)
        gt_masks = instances.gt_masks
        gt_masks = (gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks).bool()
        if "sentences" in x:
            sentences = list(x["sentences"])
            return self.vl_encoder.text_features(sentences), [gt_masks] * len(sentences)
        classes = instances.gt_classes.long()
        present = torch.unique(classes)
        if present.numel() == 0:
            return vocabulary[:1], [gt_masks[:0]]
        return vocabulary[present], [gt_masks[classes == c] for c in present]

    def match_prompt(self, pred_masks: Tensor, target_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Hungarian matching of one prompt's K masks to its M targets (mask costs only)."""
        if target_masks.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=pred_masks.device)
            return empty, empty
        cost = self.matcher.cost_matrix(
            pred_masks.new_zeros(pred_masks.shape[0], 1), pred_masks,
            torch.zeros(target_masks.shape[0], dtype=torch.int64, device=pred_masks.device),
            target_masks,
        )
        pred_idx, tgt_idx = linear_sum_assignment(cost.cpu().numpy())
        return (
            torch.as_tensor(pred_idx, dtype=torch.int64, device=pred_masks.device),
            torch.as_tensor(tgt_idx, dtype=torch.int64, device=pred_masks.device),
        )

    def losses(
        self, batched_inputs: List[Dict], features: Dict[str, Tensor], contexts: List[Tensor]
    ) -> Dict[str, Tensor]:
        vocabulary = None
        if any("sentences" not in x for x in batched_inputs):
            vocabulary = self.vocabulary_features(self.train_dataset)
        point_logits, point_labels = [], []
        keep_graph = []
        for index, (x, context) in enumerate(zip(batched_inputs, contexts)):
            prompt_features, targets = self.training_prompts(x, vocabulary)
            masks, _ = self.prompt_masks(
                features, index, self.vl_encoder.fuse(context, prompt_features)
            )
            keep_graph.append(masks.sum() * 0.0)
            for prompt_masks, target_masks in zip(masks, targets):
                pred_idx, tgt_idx = self.match_prompt(prompt_masks, target_masks)
                if pred_idx.numel() == 0:
                    continue
                logits, labels = self.sample_points(
                    prompt_masks[pred_idx], target_masks[tgt_idx]
                )
                point_logits.append(logits)
                point_labels.append(labels)
        num_masks = self.average_over_ranks(float(sum(len(p) for p in point_logits)))
        zero = torch.stack(keep_graph).sum()
        if not point_logits:
            return {"loss_focal": zero, "loss_dice": zero.clone()}
        logits, labels = torch.cat(point_logits), torch.cat(point_labels)
        focal = sigmoid_focal_loss(logits, labels, num_masks, self.focal_alpha, self.focal_gamma)
        return {
            "loss_focal": self.focal_weight * focal + zero,
            "loss_dice": self.dice_weight * dice_loss(logits, labels, num_masks),
        }

    def sample_points(self, pred_masks: Tensor, target_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Logits and 0/1 labels of matched masks at uncertainty-biased points (Mask2Former
        Sec. 3.3); predictions and targets share normalised coordinates of the full image."""
        pred = pred_masks[:, None].float()
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                pred, calculate_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = point_sample(target_masks[:, None].float(), coords, align_corners=False)
        logits = point_sample(pred, coords, align_corners=False)
        return logits[:, 0], labels[:, 0]

    def average_over_ranks(self, count: float) -> float:
        """Matched-mask count averaged over DDP ranks, at least 1 (the loss normaliser)."""
        value = torch.tensor([count], dtype=torch.float32, device=self.device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(value)
            value = value / comm.get_world_size()
        return max(value.item(), 1.0)

    # ------------------------------------------------------------------ inference
    def oracle_classes(self, x: Dict) -> Tensor:
        """Contiguous ids of the classes in the test image's ground truth (oracle protocol)."""
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

    def inference(
        self, batched_inputs: List[Dict], features: Dict[str, Tensor], contexts: List[Tensor]
    ) -> List[Dict]:
        vocabulary = None
        if any("sentences" not in x for x in batched_inputs):
            vocabulary = self.vocabulary_features(self.test_dataset)
        results = []
        for index, (x, context) in enumerate(zip(batched_inputs, contexts)):
            height = x.get("height", x["image"].shape[-2])
            width = x.get("width", x["image"].shape[-1])
            if "sentences" in x:
                prompt_features = self.vl_encoder.text_features(list(x["sentences"]))
                masks, scores = self.chunked_prompt_masks(
                    features, index, self.vl_encoder.fuse(context, prompt_features)
                )
                results.append(self.referring_output(masks, scores, (height, width)))
                continue
            if self.prompt_protocol == "oracle":
                classes = self.oracle_classes(x)
            else:
                classes = torch.arange(vocabulary.shape[0], device=self.device)
            masks, scores = self.chunked_prompt_masks(
                features, index, self.vl_encoder.fuse(context, vocabulary[classes])
            )
            results.append(
                self.segmentation_output(
                    masks.flatten(0, 1), scores.flatten(),
                    classes.repeat_interleave(masks.shape[1]), vocabulary.shape[0],
                    (height, width),
                )
            )
        return results

    def referring_output(
        self, masks: Tensor, scores: Tensor, output_size: Tuple[int, int]
    ) -> Dict[str, Tensor]:
        """Per sentence, its highest-IoU-estimate mask among the K."""
        best = scores.argmax(1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        chosen = resize_masks(masks[rows, best], output_size)
        return {"ref_seg": chosen > 0, "ref_scores": scores[rows, best]}

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
        mask_cls = prompt_logits(scores, classes, num_classes)
        if self.semantic_on:
            result["sem_seg"] = resize_masks(semantic_inference(mask_cls, masks), output_size)
        if self.panoptic_on:
            keep = scores > self.score_threshold
            result["panoptic_seg"] = panoptic_inference(
                mask_cls[keep],
                resize_masks(masks[keep], output_size),
                thing_ids=self.thing_ids,
                object_mask_threshold=self.score_threshold,
                overlap_threshold=self.overlap_threshold,
            )
        if self.instance_on:
            keep = torch.ones_like(scores, dtype=torch.bool)
            if self.panoptic_on and self.thing_ids:
                keep = torch.tensor(
                    [int(c) in self.thing_ids for c in classes.tolist()],
                    dtype=torch.bool, device=scores.device,
                )
            result["instances"] = threshold_nms_instances(
                masks[keep], scores[keep], classes[keep],
                score_threshold=self.score_threshold,
                nms_threshold=self.nms_threshold,
                max_detections=self.max_detections,
                output_size=output_size,
            )
        return result

    def extra_repr(self) -> str:
        """Shown in the "Model:" log line detectron2's trainer writes at start, so the
        trainable parameter count is reported whatever the openseg logger's level."""
        return (
            f"prompt_protocol={self.prompt_protocol}, score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, two_stage_refinement={self.two_stage_refinement}"
            f"\n{self.parameter_report()}"
        )
