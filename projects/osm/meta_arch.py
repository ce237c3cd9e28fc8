"""The OSM meta-architecture (Yu, Shen and Chen, "Towards Open-Ended Visual Recognition with
Large Language Model", ECCV 2024): names every mask of an image with free text.

Training (Sec. 3.3 "Training Protocols"): each image contributes one ground-truth mask chosen
at random, one of the Table 4 templates chosen at random with the class name appended, and a
next-token loss. Half of each batch uses the dataset's vocabulary-specific mode query, the
other half the vocabulary-agnostic one (as the release: the first half specific).
Testing: the first template, greedy decoding (Sec. 3.3), on ground-truth masks (Sec. 4.1) or
on masks of a class-agnostic segmenter (Sec. 4.2: a registry meta-architecture, or SAM2's
automatic mask generator). Outputs per image: `instances` with `pred_masks`, `scores`,
`pred_texts`. The model itself is `omniscient.OmniScient`.
"""

import logging
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Instances
from torch import Tensor, nn

from openseg.checkpoint import OpenSegCheckpointer
from openseg.data.vocab import get_vocabulary

from .omniscient import (
    OmniScient, context_box_mask, load_base_model, load_released_checkpoint, tokenize_padded,
)
from .opal import OPAL, add_lora
from .templates import INSTRUCTION_TEMPLATES, answer_text

__all__ = ["OSM", "build_proposal_model", "parse_dataset_modes"]

logger = logging.getLogger(__name__)


def parse_dataset_modes(entries: Sequence[str], modes: Sequence[str]) -> Dict[str, str]:
    """cfg.MODEL.OSM.DATASET_MODES ("dataset_name:mode" strings) -> {dataset: mode}."""
    result = {}
    for entry in entries:
        dataset, sep, mode = entry.rpartition(":")
        if not sep or mode not in modes:
            raise ValueError(
                f"cfg.MODEL.OSM.DATASET_MODES entry {entry!r} must be 'dataset_name:mode' with a "
                f"mode of MODEL.OSM.MODES {list(modes)}."
            )
        result[dataset] = mode
    return result


@META_ARCH_REGISTRY.register()
class OSM(nn.Module):
    """Open-ended mask recognition; see the module docstring."""

    @configurable
    def __init__(
        self,
        *,
        model: OmniScient,
        tokenizer,
        qformer_tokenizer,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        class_names: Dict[str, List[str]],
        dataset_modes: Dict[str, str],
        training_datasets: Sequence[str],
        agnostic_mode: str = "any",
        test_mode: str = "any",
        templates: Sequence[str] = tuple(INSTRUCTION_TEMPLATES),
        test_template: int = 0,
        context_ratio: float = 0.5,
        max_text_tokens: int = 32,
        max_new_tokens: int = 12,
        min_train_mask_area: int = 100,
        test_masks_per_batch: int = 16,
        mask_generator=None,
        proposal_topk: int = 50,
        opal=None,
        input_format: str = "RGB",
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"OSM: cfg.INPUT.FORMAT={input_format!r} must be RGB or BGR.")
        if tokenizer.eos_token_id is None:
            raise ValueError("OSM: the LLM tokenizer of MODEL.OSM.BASE_MODEL has no eos token.")
        for mode in {agnostic_mode, test_mode, *dataset_modes.values()}:
            model.mode_indices([mode], torch.device("cpu"))  # fails naming an unknown mode
        if not 0 <= test_template < len(templates):
            raise ValueError(f"cfg.MODEL.OSM.TEST_TEMPLATE={test_template} is not an index of the templates.")
        self.model = model
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.class_names = class_names
        self.dataset_modes = dataset_modes
        self.training_datasets = list(training_datasets)
        self.agnostic_mode = agnostic_mode
        self.test_mode = test_mode
        self.templates = list(templates)
        self.test_template = test_template
        self.context_ratio = context_ratio
        self.max_text_tokens = max_text_tokens
        self.max_new_tokens = max_new_tokens
        self.min_train_mask_area = min_train_mask_area
        self.test_masks_per_batch = test_masks_per_batch
        self.mask_generator = mask_generator
        self.proposal_topk = proposal_topk
        self.opal = opal
        self.input_format = input_format
        self.register_buffer("image_mean", torch.tensor(image_mean).view(-1, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        osm = cfg.MODEL.OSM
        base, tokenizer, qformer_tokenizer, image_processor = load_base_model(osm.BASE_MODEL)
        model = OmniScient(base, osm.INPUT_SIZE, osm.WINDOW_STRIDE or None, osm.MODES)
        if osm.CHECKPOINT:
            load_released_checkpoint(model, osm.CHECKPOINT)
        opal = None
        if osm.OPAL.ENABLED:  # LoRA after the released weights, which have none
            o = osm.OPAL
            add_lora(model.language_model, o.LORA_RANK, o.LORA_ALPHA, o.LORA_DROPOUT, o.LORA_TARGET_MODULES)
            opal = OPAL(tokenizer, model.language_model, o.WEIGHT, o.TEMPERATURE)
        dataset_modes = parse_dataset_modes(osm.DATASET_MODES, osm.MODES)
        names = {
            name: [synonyms[0].lower() for synonyms in get_vocabulary(name)]
            for name in list(cfg.DATASETS.TRAIN)
        }
        return {
            "model": model,
            "tokenizer": tokenizer,
            "qformer_tokenizer": qformer_tokenizer,
            "image_mean": image_processor["image_mean"],
            "image_std": image_processor["image_std"],
            "class_names": names,
            "dataset_modes": dataset_modes,
            "training_datasets": list(cfg.DATASETS.TRAIN),
            "agnostic_mode": osm.AGNOSTIC_MODE,
            "test_mode": osm.TEST_MODE,
            "templates": tuple(osm.INSTRUCTION_TEMPLATES) or tuple(INSTRUCTION_TEMPLATES),
            "test_template": osm.TEST_TEMPLATE,
            "context_ratio": osm.CONTEXT_RATIO,
            "max_text_tokens": osm.MAX_TEXT_TOKENS,
            "max_new_tokens": osm.MAX_NEW_TOKENS,
            "min_train_mask_area": osm.MIN_TRAIN_MASK_AREA,
            "test_masks_per_batch": osm.TEST_MASKS_PER_BATCH,
            "mask_generator": build_mask_generator(cfg),
            "proposal_topk": osm.PROPOSAL_TOPK,
            "opal": opal,
            "input_format": cfg.INPUT.FORMAT,
        }

    @classmethod
    def build_train_loader(cls, cfg):
        """DATASETS.TRAIN mixed by MODEL.OSM.DATASET_RATIOS, records tagged with their
        dataset (used by openseg's Trainer)."""
        from .data import build_mixture_train_loader

        return build_mixture_train_loader(cfg)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    def train(self, mode: bool = True) -> "OSM":
        """The frozen parts (ViT, LLM without OPAL's LoRA, mask generator) stay in eval mode."""
        super().train(mode)
        self.model.base_model.vision_model.eval()
        if self.opal is None:
            self.model.language_model.eval()
        if isinstance(self.mask_generator, nn.Module):
            self.mask_generator.eval()
        return self

    # ------------------------------------------------------------------ images and masks
    def _resized_hw(self, height: int, width: int) -> Tuple[int, int]:
        """The longer side to INPUT_SIZE, the shorter scaled and floored (the release's
        `resize(size=S - 1, max_size=S)`)."""
        size = self.model.input_size
        if height == width:
            return size, size
        if height > width:
            return size, int(size * width / height)
        return int(size * height / width), size

    def prepare_image(self, image: Tensor) -> Tensor:
        """uint8 [3, H, W] in cfg.INPUT.FORMAT -> normalised RGB [3, S, S]: longer side
        resized to S (bicubic, as the release), zero-padded bottom / right, then
        normalised with the base model's image-processor mean / std."""
        size = self.model.input_size
        image = image.to(self.device).float()
        if self.input_format == "BGR":
            image = image.flip(0)
        new_hw = self._resized_hw(*image.shape[-2:])
        if tuple(image.shape[-2:]) != new_hw:
            image = F.interpolate(image[None], size=new_hw, mode="bicubic", align_corners=False, antialias=True)[0]
            image = image.clamp(0, 255).round()
        image = F.pad(image, (0, size - new_hw[1], 0, size - new_hw[0]))
        return (image / 255.0 - self.image_mean) / self.image_std

    def prepare_masks(self, masks: Tensor) -> Tensor:
        """bool [M, H, W] at the input image size -> bool [M, S, S] like `prepare_image`."""
        size = self.model.input_size
        new_hw = self._resized_hw(*masks.shape[-2:])
        resized = F.interpolate(masks.to(self.device)[:, None].float(), size=new_hw, mode="nearest")[:, 0]
        return F.pad(resized, (0, size - new_hw[1], 0, size - new_hw[0])) > 0.5

    def context_masks(self, masks: Tensor) -> Tensor:
        return torch.stack([context_box_mask(m, self.context_ratio) for m in masks])

    # ------------------------------------------------------------------ text
    def _tokenize(self, tokenizer, texts: List[str], max_length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        return tokenize_padded(tokenizer, texts, self.device, max_length)

    def training_text(self, prompts: List[str], names: List[str]) -> Tuple[Tensor, Tensor, Tensor]:
        """LLM ids, attention and labels of "<template> <class></s>": every token but the
        first (bos) and padding is a label, as the release's `train_utils.parse_data`."""
        texts = [answer_text(p, n, self.tokenizer.eos_token) for p, n in zip(prompts, names)]
        ids, attention = self._tokenize(self.tokenizer, texts, self.max_text_tokens)
        labels = ids.clone()
        labels[attention == 0] = -100
        if self.tokenizer.pad_token_id is not None:
            labels[ids == self.tokenizer.pad_token_id] = -100
        labels[:, 0] = -100
        return ids, attention, labels

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def dataset_of(self, batched_input: Dict) -> str:
        """The training dataset of an input: its `dataset_name`, or the only one."""
        if "dataset_name" in batched_input:
            return batched_input["dataset_name"]
        if len(self.training_datasets) != 1:
            raise KeyError(
                f"OSM trains on {self.training_datasets}: each input needs a `dataset_name` key to "
                "pick its class names and mode query."
            )
        return self.training_datasets[0]

    def sample_training_mask(self, batched_input: Dict) -> Optional[Tuple[Tensor, str]]:
        """One random ground-truth mask of the input with more than MIN_TRAIN_MASK_AREA pixels
        at the model's input size, and its class name (Sec. 3.3); None if it has none."""
        instances = batched_input.get("instances")
        if instances is None:
            raise KeyError("OSM training inputs need `instances` (ground-truth masks and classes).")
        if len(instances) == 0:
            return None
        masks = instances.gt_masks
        masks = self.prepare_masks(masks.tensor if hasattr(masks, "tensor") else masks)
        valid = torch.nonzero(masks.flatten(1).sum(1) > self.min_train_mask_area)[:, 0]
        if valid.numel() == 0:
            return None
        index = int(valid[torch.randint(valid.numel(), (1,))])
        names = self.class_names[self.dataset_of(batched_input)]
        return masks[index], names[int(instances.gt_classes[index])]

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, Tensor]:
        samples, modes, images = [], [], []
        half = len(batched_inputs) // 2
        for index, batched_input in enumerate(batched_inputs):
            sample = self.sample_training_mask(batched_input)
            if sample is None:
                continue
            samples.append(sample)
            images.append(self.prepare_image(batched_input["image"]))
            specific = self.dataset_modes.get(self.dataset_of(batched_input), self.agnostic_mode)
            modes.append(specific if index < half else self.agnostic_mode)
        trained = [p for p in self.parameters() if p.requires_grad]
        if not samples:
            # no usable mask: a zero loss touching every trained parameter (DDP needs them)
            return {"loss_text": sum(p.sum() for p in trained) * 0.0}
        masks = torch.stack([s[0] for s in samples])
        names = [s[1] for s in samples]
        prompts = [random.choice(self.templates) for _ in samples]
        q_ids, q_attention = self._tokenize(self.qformer_tokenizer, prompts, self.max_text_tokens)
        ids, attention, labels = self.training_text(prompts, names)
        image_embeds = self.model.encode_image(torch.stack(images))
        mode_ids = self.model.mode_indices(modes, self.device)
        inputs_embeds, llm_attention = self.model.prefix_inputs(
            image_embeds, masks, self.context_masks(masks), mode_ids, q_ids, q_attention, ids, attention
        )
        logits = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=llm_attention).logits
        # the release averages the losses of the specific and the agnostic half
        groups = [mode_ids == m for m in mode_ids.unique()]
        loss = sum(self.model.text_loss(logits[g], labels[g]) for g in groups) / len(groups)
        losses = {"loss_text": loss}
        if self.opal is not None:  # the projected mask-query outputs = the mask embedding
            losses.update(self.opal.losses(inputs_embeds[:, : self.model.mask_query.shape[1]], names))
        return losses

    # ------------------------------------------------------------------ inference
    def test_masks(self, batched_inputs: List[Dict]) -> List[Tuple[Tensor, Tensor]]:
        """(bool masks [M, H, W] at the input image size, scores [M]) per image."""
        if self.mask_generator is None:
            result = []
            for x in batched_inputs:
                if "instances" not in x:
                    raise KeyError(
                        "OSM with MASK_SOURCE 'ground_truth' got an image without masks "
                        f"({x.get('file_name', 'an input')} has no `instances`); set "
                        "TEST.ORACLE.SEGMENTATION True so the test mapper keeps them, or use "
                        "MASK_SOURCE 'proposals' / 'sam2'."
                    )
                masks = x["instances"].gt_masks
                masks = (masks.tensor if hasattr(masks, "tensor") else masks).bool()
                result.append((masks, torch.ones(masks.shape[0])))
            return result
        return self.mask_generator(batched_inputs, self.proposal_topk)

    def decode(self, tokens: Tensor, scores: Tensor) -> Tuple[List[str], Tensor]:
        """Texts up to eos and their confidence (product of the greedy tokens' probabilities,
        as the release's `pred_prob`); an empty answer gets confidence 0."""
        eos = self.tokenizer.eos_token_id
        probs = scores.float().softmax(-1).gather(2, tokens[..., None])[..., 0]
        texts, confidence = [], []
        for row, p in zip(tokens.tolist(), probs):
            length = row.index(eos) if eos in row else len(row)
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True).strip()
            texts.append(text)
            confidence.append(p[:length].prod() if text else p.new_zeros(()))
        return texts, torch.stack(confidence) if confidence else probs.new_zeros(0)

    @torch.no_grad()
    def name_masks(self, image_embeds: Tensor, masks: Tensor) -> Tuple[List[str], Tensor]:
        """Greedy answers for masks [M, S, S] of one image (embeddings [1, N, C])."""
        prompt = [self.templates[self.test_template]]
        q_ids, q_attention = self._tokenize(self.qformer_tokenizer, prompt)
        ids, attention = self._tokenize(self.tokenizer, prompt)
        texts, confidence = [], []
        for chunk in masks.split(self.test_masks_per_batch):
            count = chunk.shape[0]
            inputs_embeds, llm_attention = self.model.prefix_inputs(
                image_embeds.expand(count, -1, -1), chunk, self.context_masks(chunk),
                self.model.mode_indices([self.test_mode] * count, self.device),
                q_ids.expand(count, -1), q_attention.expand(count, -1),
                ids.expand(count, -1), attention.expand(count, -1),
            )
            tokens, scores = self.model.generate(
                inputs_embeds, llm_attention, self.max_new_tokens, self.tokenizer.eos_token_id,
                self.tokenizer.pad_token_id,
            )
            chunk_texts, chunk_confidence = self.decode(tokens, scores)
            texts += chunk_texts
            confidence.append(chunk_confidence)
        return texts, torch.cat(confidence)

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        results = []
        for batched_input, (masks, scores) in zip(batched_inputs, self.test_masks(batched_inputs)):
            height = batched_input.get("height", batched_input["image"].shape[-2])
            width = batched_input.get("width", batched_input["image"].shape[-1])
            texts = [""] * masks.shape[0]
            confidence = torch.zeros(masks.shape[0], device=self.device)
            if masks.shape[0]:
                prepared = self.prepare_masks(masks)
                named = torch.nonzero(prepared.flatten(1).any(1))[:, 0]  # empty after resizing: ""
                if named.numel():
                    image_embeds = self.model.encode_image(self.prepare_image(batched_input["image"])[None])
                    named_texts, named_confidence = self.name_masks(image_embeds, prepared[named])
                    for i, text in zip(named.tolist(), named_texts):
                        texts[i] = text
                    confidence[named] = named_confidence
            instances = Instances((height, width))
            resized = F.interpolate(masks.to(self.device)[:, None].float(), size=(height, width), mode="nearest")
            instances.pred_masks = resized[:, 0] > 0.5
            instances.scores = scores.to(self.device) * confidence
            instances.pred_texts = texts
            results.append({"instances": instances})
        return results


# ---------------------------------------------------------------------- mask sources
class ProposalMasks(nn.Module):
    """Masks of a frozen class-agnostic meta-architecture from the registry (e.g. openseg's
    class-agnostic MaskFormer; the paper uses kMaX-DeepLab, Sec. 4.2): top-k by score."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict], topk: int) -> List[Tuple[Tensor, Tensor]]:
        result = []
        for x, output in zip(batched_inputs, self.model(batched_inputs)):
            instances = output["instances"]
            order = instances.scores.argsort(descending=True)[:topk]
            masks = F.interpolate(
                instances.pred_masks[order].float()[:, None], size=tuple(x["image"].shape[-2:]), mode="nearest"
            )[:, 0]
            result.append((masks > 0.5, instances.scores[order].float()))
        return result


class SAM2Masks(nn.Module):
    """SAM2's automatic mask generator (the `sam2` package), the paper's "segment and
    recognise anything" setting (Fig. 1 / release demo_with_sam.py, there with SAM v1): masks
    sorted by area, largest first, each with score 1 (the release's post-processing ranks by
    OSM's confidence alone)."""

    def __init__(self, config: str, checkpoint: str, image_size: int, points_per_side: int,
                 pred_iou_thresh: float, stability_score_thresh: float, min_mask_region_area: int):
        super().__init__()
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2

        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"cfg.MODEL.OSM.SAM2.CHECKPOINT={checkpoint!r} does not exist.")
        if not checkpoint:
            logger.warning("OSM: SAM2 mask generator without MODEL.OSM.SAM2.CHECKPOINT: random weights.")
        self.sam2 = build_sam2(
            config, ckpt_path=checkpoint or None, device="cpu", apply_postprocessing=False,
            hydra_overrides_extra=[f"++model.image_size={image_size}"],
        ).eval()
        self.sam2.requires_grad_(False)
        self.settings = dict(
            points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, min_mask_region_area=min_mask_region_area,
        )
        self._generator_cls = SAM2AutomaticMaskGenerator

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict], topk: int) -> List[Tuple[Tensor, Tensor]]:
        generator = self._generator_cls(self.sam2, **self.settings)
        # SAM2ImagePredictor assumes 1024-px inputs (stride 4 / 8 / 16 maps); follow IMAGE_SIZE
        size = self.sam2.image_size
        generator.predictor._bb_feat_sizes = [(size // s, size // s) for s in (4, 8, 16)]
        result = []
        for x in batched_inputs:
            image = x["image"].permute(1, 2, 0).cpu().numpy()
            found = sorted(generator.generate(image), key=lambda m: m["area"], reverse=True)[:topk]
            masks = torch.zeros((len(found), *image.shape[:2]), dtype=torch.bool)
            for i, m in enumerate(found):
                masks[i] = torch.as_tensor(m["segmentation"])
            result.append((masks, torch.ones(len(found))))
        return result


def build_proposal_model(config_file: str, weights: str, device: str) -> nn.Module:
    """A class-agnostic segmenter from the registry, frozen, producing `instances`."""
    from openseg.config import load_config

    if not config_file or not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"cfg.MODEL.OSM.PROPOSAL_CONFIG='{config_file}' is not a file; MASK_SOURCE "
            "'proposals' needs the YAML of a class-agnostic meta-architecture."
        )
    proposal_cfg = load_config(config_file, ["MODEL.DEVICE", device])
    model = build_model(proposal_cfg)
    if weights:
        OpenSegCheckpointer(model).load(weights)
    else:
        logger.warning("OSM proposal model has no PROPOSAL_WEIGHTS: random-initialised masks.")
    model.requires_grad_(False)
    return model.eval()


def build_mask_generator(cfg) -> Optional[nn.Module]:
    """The test-time mask source of cfg.MODEL.OSM.MASK_SOURCE (None = ground truth)."""
    osm = cfg.MODEL.OSM
    if osm.MASK_SOURCE == "ground_truth":
        return None
    if osm.MASK_SOURCE == "proposals":
        return ProposalMasks(build_proposal_model(osm.PROPOSAL_CONFIG, osm.PROPOSAL_WEIGHTS, cfg.MODEL.DEVICE))
    if osm.MASK_SOURCE == "sam2":
        s = osm.SAM2
        return SAM2Masks(s.CONFIG, s.CHECKPOINT, s.IMAGE_SIZE, s.POINTS_PER_SIDE, s.PRED_IOU_THRESH,
                         s.STABILITY_SCORE_THRESH, s.MIN_MASK_REGION_AREA)
    raise ValueError(
        f"cfg.MODEL.OSM.MASK_SOURCE={osm.MASK_SOURCE!r}: use 'ground_truth', 'proposals' or 'sam2'."
    )
