"""Frozen vision-language encoders that turn (image, language prompt) into one vector per prompt.

OpenWorldSAM (Xiao et al. 2025, Sec. 3.1) conditions SAM2 on a pooled vision-language
embedding of each prompt. The default is the paper's BEiT-3 early fusion (`beit3.py`); the
open_clip late-fusion encoder here is the Table 4 ablation (the CLIP text embedding of the
prompt concatenated with the CLIP embedding of the whole image).

An encoder splits its work so that the image side runs once per image whatever the number of
prompts: `image_context` (once per image), `vocabulary_features` / `text_features` (image
independent, cacheable), `fuse` (cheap, per prompt).
"""
from abc import ABC, abstractmethod
from typing import List, Sequence

import open_clip
import torch
import torch.nn.functional as F
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from openseg.modeling.text import OpenCLIPTextEncoder, class_embeddings, templates_from_config

VL_ENCODER_REGISTRY = Registry("OPENWORLDSAM_VL_ENCODER")
VL_ENCODER_REGISTRY.__doc__ = """Frozen vision-language encoders `cls.from_config(cfg)` for
OpenWorldSAM, selected by cfg.MODEL.OPENWORLDSAM.VL_ENCODER."""


class VisionLanguageEncoder(nn.Module, ABC):
    """Interface: one fused `output_dim` vector per (image, prompt)."""

    output_dim: int

    @abstractmethod
    def image_context(self, image: Tensor) -> Tensor:
        """Image-side state of one RGB image [3, H, W] (0-255), computed once per image."""

    @abstractmethod
    def vocabulary_features(self, vocabulary: Sequence[Sequence[str]]) -> Tensor:
        """[C, *] image-independent features of class prompts (a list of synonyms per class)."""

    @abstractmethod
    def text_features(self, texts: List[str]) -> Tensor:
        """[P, *] image-independent features of free-form prompts (referring expressions)."""

    @abstractmethod
    def fuse(self, context: Tensor, prompt_features: Tensor) -> Tensor:
        """[P, output_dim] pooled vision-language vectors of P prompts in one image."""

    def train(self, mode: bool = True) -> "VisionLanguageEncoder":
        """Frozen: always in eval mode (no dropout / norm statistics updates)."""
        return super().train(False)


@VL_ENCODER_REGISTRY.register()
class OpenCLIPLateFusionEncoder(VisionLanguageEncoder):
    """CLIP late fusion: [text embedding ; image embedding], both L2-normalised.

    Class prompts are embedded with the shared prompt-template ensemble of
    `openseg.modeling.text` (cached by encoder and vocabulary); expressions are embedded as is.
    """

    def __init__(self, text_encoder: OpenCLIPTextEncoder, templates: Sequence[str], cache_dir: str):
        super().__init__()
        self.text_encoder = text_encoder
        self.templates = list(templates)
        self.cache_dir = cache_dir
        visual = text_encoder.clip_model.visual
        size = visual.image_size
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(3, 1, 1) * 255.0, False)
        self.register_buffer("pixel_std", torch.tensor(std).view(3, 1, 1) * 255.0, False)
        embed_dim = text_encoder.encode_text(text_encoder.tokenize([""])).shape[-1]
        self.output_dim = 2 * embed_dim

    @classmethod
    def from_config(cls, cfg) -> "OpenCLIPLateFusionEncoder":
        text_encoder = OpenCLIPTextEncoder.from_pretrained(
            cfg.MODEL.CLIP.MODEL_NAME, cfg.MODEL.CLIP.PRETRAINED_PATH
        )
        return cls(text_encoder, templates_from_config(cfg), cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR)

    @torch.no_grad()
    def image_context(self, image: Tensor) -> Tensor:
        """[E] normalised CLIP embedding of the whole image resized to CLIP's input size."""
        image = image.to(self.pixel_mean.device, torch.float32)
        image = F.interpolate(
            image[None], size=self.input_size, mode="bilinear", align_corners=False
        )
        image = (image - self.pixel_mean) / self.pixel_std
        return self.text_encoder.clip_model.encode_image(image, normalize=True)[0].float()

    def vocabulary_features(self, vocabulary: Sequence[Sequence[str]]) -> Tensor:
        return class_embeddings(
            self.text_encoder, vocabulary, self.templates, self.cache_dir, self.pixel_mean.device
        )

    @torch.no_grad()
    def text_features(self, texts: List[str]) -> Tensor:
        return self.text_encoder.encode_text(self.text_encoder.tokenize(list(texts))).float()

    def fuse(self, context: Tensor, prompt_features: Tensor) -> Tensor:
        return torch.cat([prompt_features, context.expand(prompt_features.shape[0], -1)], dim=1)


def build_vl_encoder(cfg) -> VisionLanguageEncoder:
    """The frozen encoder named by cfg.MODEL.OPENWORLDSAM.VL_ENCODER."""
    name = cfg.MODEL.OPENWORLDSAM.VL_ENCODER
    if name not in VL_ENCODER_REGISTRY:
        raise KeyError(
            f"cfg.MODEL.OPENWORLDSAM.VL_ENCODER={name!r} is not registered; available: "
            f"{sorted(n for n, _ in VL_ENCODER_REGISTRY)}."
        )
    encoder = VL_ENCODER_REGISTRY.get(name).from_config(cfg)
    for param in encoder.parameters():
        param.requires_grad = False
    return encoder.eval()
