"""OSM meta-architecture (Yang et al., "Open-ended Semantic Segmentation with MLLMs", Sec. 3):
names every mask of an image with free text.

frozen CLIP ViT in sliding windows at high resolution (+ learned global window position
embedding) -> MaskQ-Former (mask / context / mode queries) -> mask-query embeddings as a prefix
inside an instruction to a frozen causal LLM -> next-token loss on the class name (training) or
greedy decoding (testing). An optional OPAL-style contrastive loss pulls each mask embedding
towards the LLM's last-token embedding of its class name.

Masks come from the ground truth (inputs' `instances`) or from a class-agnostic meta-arch in
the registry (cfg.MODEL.OSM.PROPOSAL_CONFIG + PROPOSAL_WEIGHTS). Outputs per image:
`instances` with `pred_masks`, `scores` and `pred_texts`.
"""

import logging
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_model
from detectron2.structures import Instances
from torch import Tensor, nn

from openseg.data.vocab import get_vocabulary
from openseg.modeling.backbones.clip import OpenCLIPViTBackbone

from .maskq_former import MaskQFormer
from .templates import INSTRUCTION_TEMPLATES, split_template

__all__ = ["OSM", "SlidingWindowCLIP", "load_local_llm"]

logger = logging.getLogger(__name__)


def load_local_llm(path: str):
    """(frozen causal LM, tokenizer) from a local Hugging Face directory; never a hub name."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(
            f"cfg.MODEL.OSM.LLM_PATH='{path}' is not a local directory; point it to a Hugging Face "
            "causal-LM folder (config, weights and tokenizer). Nothing is downloaded."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


class SlidingWindowCLIP(nn.Module):
    """Frozen CLIP ViT applied to WINDOW x WINDOW tiles of an IMAGE x IMAGE input (each tile at
    CLIP's native resolution), the patch tokens reassembled into one map, plus a learned
    embedding per window position so the tokens know where their window is (OSM Sec. 3.1)."""

    def __init__(self, clip: OpenCLIPViTBackbone, image_size: int, window_size: int):
        super().__init__()
        if not isinstance(clip, OpenCLIPViTBackbone):
            raise ValueError("OSM needs a CLIP ViT backbone (cfg.MODEL.CLIP.MODEL_NAME of a ViT).")
        if image_size % window_size:
            raise ValueError(
                f"cfg.MODEL.OSM.IMAGE_SIZE={image_size} must be a multiple of WINDOW_SIZE={window_size}."
            )
        self.clip = clip
        self.image_size, self.window_size = image_size, window_size
        self.windows_per_side = image_size // window_size
        self.width = clip.clip_model.visual.transformer.width
        self.window_pos = nn.Parameter(torch.zeros(self.windows_per_side**2, self.width))
        nn.init.normal_(self.window_pos, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, IMAGE, IMAGE] (CLIP-normalised) -> features [B, width, g*h, g*w]."""
        batch, g, w = images.shape[0], self.windows_per_side, self.window_size
        tiles = images.unfold(2, w, w).unfold(3, w, w)  # [B, 3, g, g, w, w]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(batch * g * g, 3, w, w)
        with torch.no_grad():
            _, tokens, grid = self.clip.vit_tokens(tiles)
        tokens = tokens[:, 1:].reshape(batch, g * g, grid[0] * grid[1], self.width)
        tokens = tokens + self.window_pos[None, :, None, :]
        tokens = tokens.reshape(batch, g, g, grid[0], grid[1], self.width)
        return tokens.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.width, g * grid[0], g * grid[1])


@META_ARCH_REGISTRY.register()
class OSM(nn.Module):
    """Open-ended mask recognition; see the module docstring."""

    @configurable
    def __init__(
        self,
        *,
        encoder: SlidingWindowCLIP,
        maskq_former: MaskQFormer,
        llm: nn.Module,
        tokenizer,
        class_names: Dict[str, List[str]],
        training_datasets: Sequence[str],
        mode_of_dataset: Dict[str, int],
        agnostic_mode: int,
        test_mode: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        max_masks_per_image: int = 32,
        max_new_tokens: int = 8,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.07,
        proposal_model: Optional[nn.Module] = None,
        proposal_topk: int = 50,
        agnostic_mode_prob: float = 0.5,
        templates: Sequence[str] = tuple(INSTRUCTION_TEMPLATES),
        input_format: str = "RGB",
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"OSM: cfg.INPUT.FORMAT='{input_format}' must be RGB or BGR (CLIP reads RGB)."
            )
        self.input_format = input_format
        self.encoder = encoder
        self.maskq_former = maskq_former
        self.llm = llm
        for parameter in self.llm.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("OSM: the LLM tokenizer has no eos token; generation could not stop.")
        self.class_names = class_names
        self.training_datasets = list(training_datasets)
        self.mode_of_dataset = mode_of_dataset
        self.agnostic_mode = agnostic_mode
        self.agnostic_mode_prob = agnostic_mode_prob
        self.test_mode = test_mode
        self.max_masks_per_image = max_masks_per_image
        self.max_new_tokens = max_new_tokens
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        llm_dim = self.llm.get_input_embeddings().embedding_dim
        self.contrastive_proj = nn.Linear(llm_dim, llm_dim) if contrastive_weight > 0 else None
        self.proposal_model = proposal_model
        self.proposal_topk = proposal_topk
        self.templates = [split_template(t) for t in templates]
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        osm = cfg.MODEL.OSM
        clip = build_backbone(cfg)
        llm, tokenizer = load_local_llm(osm.LLM_PATH)
        train_sets = list(cfg.DATASETS.TRAIN)
        mode_of_dataset = (
            {name: i for i, name in enumerate(train_sets)} if osm.VOCABULARY_SPECIFIC else {}
        )
        agnostic = len(mode_of_dataset)
        if osm.TEST_MODE and osm.TEST_MODE not in mode_of_dataset:
            raise ValueError(
                f"cfg.MODEL.OSM.TEST_MODE='{osm.TEST_MODE}' is not a training dataset with its own "
                f"mode query ({sorted(mode_of_dataset)}); use '' for the vocabulary-agnostic one."
            )
        names = {
            name: [synonyms[0] for synonyms in get_vocabulary(name)]
            for name in list(train_sets) + list(cfg.DATASETS.TEST)
        }
        proposal_model = None
        if osm.MASK_SOURCE == "proposals":
            proposal_model = build_proposal_model(
                osm.PROPOSAL_CONFIG, osm.PROPOSAL_WEIGHTS, cfg.MODEL.DEVICE
            )
        elif osm.MASK_SOURCE != "ground_truth":
            raise ValueError(
                f"cfg.MODEL.OSM.MASK_SOURCE='{osm.MASK_SOURCE}': use 'ground_truth' or 'proposals'."
            )
        encoder = SlidingWindowCLIP(clip, osm.IMAGE_SIZE, osm.WINDOW_SIZE)
        maskq_former = MaskQFormer(
            feature_dim=encoder.width,
            dim=osm.HIDDEN_DIM,
            out_dim=llm.get_input_embeddings().embedding_dim,
            num_layers=osm.NUM_LAYERS,
            num_heads=osm.NUM_HEADS,
            dim_feedforward=osm.DIM_FEEDFORWARD,
            num_mask_queries=osm.NUM_MASK_QUERIES,
            num_context_queries=osm.NUM_CONTEXT_QUERIES,
            num_modes=agnostic + 1,
            context_ratio=osm.CONTEXT_RATIO,
        )
        return {
            "encoder": encoder,
            "maskq_former": maskq_former,
            "llm": llm,
            "tokenizer": tokenizer,
            "class_names": names,
            "training_datasets": train_sets,
            "mode_of_dataset": mode_of_dataset,
            "agnostic_mode": agnostic,
            "agnostic_mode_prob": osm.AGNOSTIC_MODE_PROB if mode_of_dataset else 1.0,
            "test_mode": mode_of_dataset.get(osm.TEST_MODE, agnostic),
            "pixel_mean": clip.pixel_mean,
            "pixel_std": clip.pixel_std,
            "max_masks_per_image": osm.MAX_MASKS_PER_IMAGE,
            "max_new_tokens": osm.MAX_NEW_TOKENS,
            "contrastive_weight": osm.CONTRASTIVE_WEIGHT,
            "contrastive_temperature": osm.CONTRASTIVE_TEMPERATURE,
            "proposal_model": proposal_model,
            "proposal_topk": osm.PROPOSAL_TOPK,
            "input_format": cfg.INPUT.FORMAT,
            "templates": tuple(osm.INSTRUCTION_TEMPLATES) or tuple(INSTRUCTION_TEMPLATES),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True) -> "OSM":
        """The LLM (and proposal model) stay in eval mode: they are frozen."""
        super().train(mode)
        self.llm.eval()
        if self.proposal_model is not None:
            self.proposal_model.eval()
        return self

    # ------------------------------------------------------------------ images and masks
    def _scale(self, height: int, width: int) -> float:
        return self.encoder.image_size / max(height, width)

    def prepare_image(self, image: Tensor) -> Tensor:
        """uint8 [3, H, W] in cfg.INPUT.FORMAT -> CLIP-normalised RGB [3, IMAGE, IMAGE]: longer
        side resized, zero-padded."""
        size = self.encoder.image_size
        scale = self._scale(*image.shape[-2:])
        new_size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
        image = image.to(self.device).float()
        if self.input_format == "BGR":
            image = image.flip(0)
        image = (image - self.pixel_mean) / self.pixel_std
        image = F.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False)[0]
        return F.pad(image, (0, size - new_size[1], 0, size - new_size[0]))

    def prepare_masks(self, masks: Tensor) -> Tensor:
        """bool [M, H, W] at the input image size -> bool [M, IMAGE, IMAGE] like `prepare_image`."""
        size = self.encoder.image_size
        scale = self._scale(*masks.shape[-2:])
        new_size = (round(masks.shape[-2] * scale), round(masks.shape[-1] * scale))
        resized = F.interpolate(
            masks.to(self.device)[:, None].float(), size=new_size, mode="nearest"
        )
        return F.pad(resized[:, 0], (0, size - new_size[1], 0, size - new_size[0])) > 0.5

    def dataset_of(self, batched_input: Dict) -> str:
        """The training dataset an input comes from: its `dataset_name`, or the only one."""
        if "dataset_name" in batched_input:
            return batched_input["dataset_name"]
        if len(self.training_datasets) != 1:
            raise KeyError(
                f"OSM trains on {self.training_datasets}: each input needs a `dataset_name` key to "
                "pick its class names and mode query."
            )
        return self.training_datasets[0]

    def mode_of(self, batched_input: Dict) -> int:
        """Test: the configured mode query. Training: the input's dataset's vocabulary-specific
        query, or with probability `agnostic_mode_prob` the vocabulary-agnostic one, so that both
        kinds are trained."""
        if not self.training:
            return self.test_mode
        if random.random() < self.agnostic_mode_prob:
            return self.agnostic_mode
        return self.mode_of_dataset.get(self.dataset_of(batched_input), self.agnostic_mode)

    # ------------------------------------------------------------------ LLM sequences
    def _token_ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _embed(self, ids: List[int]) -> Tensor:
        return self.llm.get_input_embeddings()(
            torch.tensor(ids, dtype=torch.long, device=self.device)
        )

    def build_sequences(
        self, mask_embeds: Tensor, template_ids: Sequence[int], answers: Optional[List[str]] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Right-padded LLM inputs of each mask: [bos] instruction-before, mask embeddings,
        instruction-after, then (training) the answer tokens + eos. Returns inputs_embeds
        [M, T, D], attention_mask [M, T] and labels [M, T] (-100 except the answer)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        rows, labels = [], []
        for index, embeds in enumerate(mask_embeds):
            before, after = self.templates[template_ids[index]]
            prefix = self._embed(bos + self._token_ids(before))
            suffix_ids = self._token_ids(after)
            answer_ids = []
            if answers is not None:
                answer_ids = self._token_ids(" " + answers[index]) + [self.tokenizer.eos_token_id]
            row = torch.cat([prefix, embeds.to(prefix.dtype), self._embed(suffix_ids + answer_ids)])
            label = torch.full((row.shape[0],), -100, dtype=torch.long, device=self.device)
            if answer_ids:
                label[-len(answer_ids) :] = torch.tensor(answer_ids, device=self.device)
            rows.append(row)
            labels.append(label)
        length = max(r.shape[0] for r in rows)
        inputs = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        attention = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        padded_labels = torch.full((len(rows), length), -100, dtype=torch.long, device=self.device)
        for index, (row, label) in enumerate(zip(rows, labels)):
            inputs[index, : row.shape[0]] = row
            attention[index, : row.shape[0]] = 1
            padded_labels[index, : row.shape[0]] = label
        return inputs, attention, padded_labels

    def next_token_loss(self, inputs: Tensor, attention: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of each answer token given everything before it."""
        logits = self.llm(inputs_embeds=inputs, attention_mask=attention).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )

    def text_embeddings(self, names: List[str]) -> Tensor:
        """The frozen LLM's last-layer hidden state at the last token of each name."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        embeddings = []
        with torch.no_grad():
            for name in names:
                ids = torch.tensor([bos + self._token_ids(" " + name)], device=self.device)
                hidden = self.llm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                embeddings.append(hidden[0, -1])
        return torch.stack(embeddings)

    def contrastive_loss(self, mask_embeds: Tensor, answers: List[str]) -> Tensor:
        """InfoNCE over the distinct class names of the batch (OPAL-style alignment)."""
        names = sorted(set(answers))
        targets = torch.tensor([names.index(a) for a in answers], device=self.device)
        text = F.normalize(self.text_embeddings(names).float(), dim=-1)
        masks = F.normalize(self.contrastive_proj(mask_embeds.mean(dim=1)).float(), dim=-1)
        return F.cross_entropy(masks @ text.T / self.contrastive_temperature, targets)

    @torch.no_grad()
    def generate(self, inputs: Tensor, attention: Tensor) -> Tuple[List[str], Tensor]:
        """Greedy decoding with the KV cache; inputs must not be padded (one template for all
        masks). Returns the texts and exp(mean log-probability) of each answer."""
        eos = self.tokenizer.eos_token_id
        output = self.llm(inputs_embeds=inputs, attention_mask=attention, use_cache=True)
        finished = torch.zeros(inputs.shape[0], dtype=torch.bool, device=self.device)
        tokens, log_probs = [], []
        for _ in range(self.max_new_tokens):
            step = output.logits[:, -1].float().log_softmax(dim=-1)
            token = step.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, eos), token)
            log_probs.append(
                torch.where(
                    finished, torch.zeros_like(step[:, 0]), step.gather(1, token[:, None])[:, 0]
                )
            )
            tokens.append(token)
            finished |= token == eos
            if finished.all():
                break
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            output = self.llm(
                inputs_embeds=self.llm.get_input_embeddings()(token[:, None]),
                attention_mask=attention,
                past_key_values=output.past_key_values,
                use_cache=True,
            )
        tokens = torch.stack(tokens, dim=1)
        texts, lengths = [], []
        for row in tokens.tolist():
            ids = row[: row.index(eos)] if eos in row else row
            lengths.append(max(len(ids), 1))
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        mean_log_prob = torch.stack(log_probs, dim=1).sum(dim=1) / torch.tensor(
            lengths, device=self.device
        )
        return texts, mean_log_prob.exp()

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, Tensor]:
        images = torch.stack([self.prepare_image(x["image"]) for x in batched_inputs])
        features = self.encoder(images)
        all_embeds, all_answers = [], []
        for feature, batched_input in zip(features, batched_inputs):
            instances = batched_input["instances"]
            if len(instances) == 0:
                continue
            keep = torch.randperm(len(instances))[: self.max_masks_per_image]
            masks = instances.gt_masks
            masks = (masks.tensor if hasattr(masks, "tensor") else masks)[keep]
            names = self.class_names[self.dataset_of(batched_input)]
            all_answers += [names[int(c)] for c in instances.gt_classes[keep]]
            all_embeds.append(
                self.maskq_former(feature, self.prepare_masks(masks), self.mode_of(batched_input))
            )
        if not all_embeds:
            # no mask in the batch: a zero loss that still touches every trained parameter, so
            # DistributedDataParallel sees gradients for all of them
            trained = [p for p in self.parameters() if p.requires_grad]
            return {"loss_text": features.sum() * 0.0 + sum(p.sum() for p in trained) * 0.0}
        mask_embeds = torch.cat(all_embeds)
        template_ids = [random.randrange(len(self.templates)) for _ in all_answers]
        inputs, attention, labels = self.build_sequences(mask_embeds, template_ids, all_answers)
        losses = {"loss_text": self.next_token_loss(inputs, attention, labels)}
        if self.contrastive_proj is not None:
            losses["loss_contrastive"] = self.contrastive_weight * self.contrastive_loss(
                mask_embeds, all_answers
            )
        return losses

    def test_masks(self, batched_inputs: List[Dict]) -> List[Tuple[Tensor, Tensor]]:
        """(bool masks [M, H, W] at the input image size, scores [M]) per image."""
        if self.proposal_model is None:
            result = []
            for x in batched_inputs:
                if "instances" not in x:
                    raise KeyError(
                        "OSM with MASK_SOURCE 'ground_truth' needs the inputs' `instances`; set "
                        "TEST.ORACLE.SEGMENTATION True so the test mapper keeps them."
                    )
                masks = x["instances"].gt_masks
                masks = (masks.tensor if hasattr(masks, "tensor") else masks).bool()
                result.append((masks, torch.ones(masks.shape[0])))
            return result
        with torch.no_grad():
            proposals = self.proposal_model(batched_inputs)
        result = []
        for x, output in zip(batched_inputs, proposals):
            instances = output["instances"]
            order = instances.scores.argsort(descending=True)[: self.proposal_topk]
            masks = instances.pred_masks[order].float()
            masks = F.interpolate(
                masks[:, None], size=tuple(x["image"].shape[-2:]), mode="nearest"
            )[:, 0]
            result.append((masks > 0.5, instances.scores[order].float()))
        return result

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = torch.stack([self.prepare_image(x["image"]) for x in batched_inputs])
        features = self.encoder(images)
        results = []
        for feature, batched_input, (masks, scores) in zip(
            features, batched_inputs, self.test_masks(batched_inputs)
        ):
            height = batched_input.get("height", batched_input["image"].shape[-2])
            width = batched_input.get("width", batched_input["image"].shape[-1])
            instances = Instances((height, width))
            texts, confidence = [], torch.zeros(0, device=self.device)
            if masks.shape[0]:
                mask_embeds = self.maskq_former(feature, self.prepare_masks(masks), self.test_mode)
                inputs, attention, _ = self.build_sequences(mask_embeds, [0] * masks.shape[0])
                texts, confidence = self.generate(inputs, attention)
            resized = F.interpolate(
                masks.to(self.device)[:, None].float(), size=(height, width), mode="nearest"
            )
            instances.pred_masks = resized[:, 0] > 0.5
            instances.scores = scores.to(self.device) * confidence
            instances.pred_texts = texts
            results.append({"instances": instances})
        return results


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
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning("OSM proposal model has no PROPOSAL_WEIGHTS: random-initialised masks.")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
