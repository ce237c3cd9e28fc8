"""Frozen open_clip image/text encoders as a detectron2 backbone.

ConvNeXt CLIPs give res2-res5 straight from the timm trunk stages (as FC-CLIP, Yu et al.
NeurIPS 2023, Sec. 3). ViT CLIPs give one stride-16 token map, turned into a simple
feature pyramid (ViTDet, Li et al. ECCV 2022, Sec. 3) by small trainable (de)convolutions.

`dense_clip_features` keeps CLIP's joint image-text space per pixel so masks can be
classified against text embeddings: the ConvNeXt head (norm + projection) is applied to
every res5 pixel instead of the pooled vector; for ViTs the last block is replaced by its
value path (MaskCLIP, Zhou et al. ECCV 2022, Sec. 3.2), which keeps each patch local.

The architecture comes from open_clip's model configs; weights are only ever read from
cfg.MODEL.CLIP.PRETRAINED_PATH, never downloaded.
"""

import difflib
import logging
import os
from abc import abstractmethod
from typing import Dict, List, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

logger = logging.getLogger(__name__)

PYRAMID_LEVELS = ("res2", "res3", "res4", "res5")
PYRAMID_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# forward() also returns the tensor `dense_clip_features` starts from under this key
CLIP_DENSE_INPUT = "clip_dense_input"


def check_clip_model_name(model_name: str) -> None:
    """Raise with the closest open_clip config names when `model_name` is unknown."""
    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=8, cutoff=0.4)
        raise ValueError(
            f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r} is not an open_clip model config; "
            f"close matches: {close or 'none'} (all names: open_clip.list_models())"
        )


def create_clip_model(model_name: str, pretrained_path: str) -> nn.Module:
    """Build the open_clip model `model_name` and load `pretrained_path` (empty = random init)."""
    check_clip_model_name(model_name)
    if pretrained_path and not os.path.isfile(pretrained_path):
        raise FileNotFoundError(
            f"cfg.MODEL.CLIP.PRETRAINED_PATH={pretrained_path!r} does not exist; point it to a local "
            "open_clip checkpoint or set it to '' for random initialisation"
        )
    model = open_clip.create_model(
        model_name,
        pretrained=None,
        pretrained_image=False,
        pretrained_text=False,
        load_weights=False,
    )
    if pretrained_path:
        open_clip.load_checkpoint(model, pretrained_path, strict=True)
        logger.info(f"Loaded CLIP {model_name} weights from {pretrained_path}")
    else:
        logger.warning(
            f"CLIP {model_name} is randomly initialised: cfg.MODEL.CLIP.PRETRAINED_PATH is empty"
        )
    return model


class OpenCLIPBackbone(Backbone):
    """Common part of the CLIP backbones: creation, freezing, text encoder, normalisation."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str]
    ):
        super().__init__()
        unknown = [name for name in out_features if name not in PYRAMID_LEVELS]
        if unknown or not out_features:
            raise ValueError(
                f"cfg.MODEL.CLIP.OUT_FEATURES={list(out_features)}: must be a non-empty subset of {PYRAMID_LEVELS}"
            )
        self.model_name = model_name
        self.clip_model = create_clip_model(model_name, pretrained_path)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.frozen = frozen
        if frozen:
            for param in self.clip_model.parameters():
                param.requires_grad = False
            self.clip_model.eval()
        self._out_features = list(out_features)
        self._out_feature_strides = {name: PYRAMID_STRIDES[name] for name in out_features}
        preprocess = open_clip.get_model_preprocess_cfg(self.clip_model)
        # detectron2 images are 0-255 RGB; CLIP's statistics are for 0-1 images
        self.pixel_mean = [255.0 * m for m in preprocess["mean"]]
        self.pixel_std = [255.0 * s for s in preprocess["std"]]

    def train(self, mode: bool = True) -> "OpenCLIPBackbone":
        """Keep a frozen CLIP in eval mode (no dropout, fixed norm statistics) while training."""
        super().train(mode)
        if self.frozen:
            self.clip_model.eval()
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def tokenize(self, texts: List[str]) -> torch.Tensor:
        """Texts -> [N, context_length] token ids for `encode_text`."""
        return self.tokenizer(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> L2-normalised text embeddings [N, E] in CLIP's joint space."""
        device = self.clip_model.logit_scale.device
        return self.clip_model.encode_text(tokens.to(device), normalize=True)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: [B, 3, H, W] normalised with pixel_mean/pixel_std.

        Returns the OUT_FEATURES maps plus CLIP_DENSE_INPUT (input of `dense_clip_features`).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"OpenCLIPBackbone expects [B, 3, H, W] images, got {tuple(images.shape)}"
            )
        features = self._pyramid(images)
        outputs = {name: features[name] for name in self._out_features}
        outputs[CLIP_DENSE_INPUT] = features[CLIP_DENSE_INPUT]
        return outputs

    @abstractmethod
    def _pyramid(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """At least the OUT_FEATURES maps, plus CLIP_DENSE_INPUT."""

    @abstractmethod
    def dense_clip_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-pixel CLIP image embeddings [B, E, h, w] from the output of `forward`."""

    def pooling_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The map a mask classifier pools [B, C, h, w]; `embed_pooled` turns pooled vectors
        into CLIP image embeddings. Default: the dense CLIP embeddings (pool after the head)."""
        return self.dense_clip_features(features)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[..., C] vectors pooled from `pooling_features` -> [..., E] CLIP image embeddings."""
        return pooled


class OpenCLIPConvNeXtBackbone(OpenCLIPBackbone):
    """CLIP with a timm ConvNeXt trunk: res2-res5 are the outputs of its four stages."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str]
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features)
        visual = self.clip_model.visual
        if not isinstance(visual, TimmModel):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r} does not have a timm image tower"
            )
        trunk = visual.trunk
        if not (hasattr(trunk, "stem") and hasattr(trunk, "stages") and len(trunk.stages) == 4):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: timm trunk {type(trunk).__name__} is not a "
                "4-stage ConvNeXt-like network (needs .stem and 4 .stages)"
            )
        reductions = [info["reduction"] for info in trunk.feature_info]
        if reductions != [4, 8, 16, 32]:
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: trunk stage strides {reductions} are not [4, 8, 16, 32]"
            )
        if "pool" in dict(visual.head.named_children()):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: attention-pooling heads cannot be applied per pixel"
            )
        self._out_feature_channels = {
            name: info["num_chs"] for name, info in zip(PYRAMID_LEVELS, trunk.feature_info)
        }

    def _pyramid(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        trunk = self.clip_model.visual.trunk
        features = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = trunk.stem(images)
            for name, stage in zip(PYRAMID_LEVELS, trunk.stages):
                x = stage(x)
                features[name] = x
        features[CLIP_DENSE_INPUT] = features["res5"]
        return features

    def pooling_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """res5 after the trunk's `norm_pre` [B, C5, h, w]: FC-CLIP pools here, before the
        image head (its release, `clip_vis_dense`; Yu et al. NeurIPS 2023, Sec. 3.3)."""
        return self.clip_model.visual.trunk.norm_pre(features[CLIP_DENSE_INPUT])

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[..., C5] pooled vectors through the timm head (as a 1 x 1 map: pooling, norm, MLP)
        and open_clip's projection head -> [..., E], as the image tower treats its pooled
        vector (FC-CLIP's release, `visual_prediction_forward_convnext`)."""
        visual = self.clip_model.visual
        leading = pooled.shape[:-1]
        x = visual.trunk.head(pooled.reshape(-1, pooled.shape[-1], 1, 1))
        return visual.head(x).reshape(*leading, -1)

    def dense_clip_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Head norm + projection of the CLIP image tower applied to every res5 pixel: [B, E, h, w]."""
        visual = self.clip_model.visual
        timm_head = visual.trunk.head
        x = visual.trunk.norm_pre(features[CLIP_DENSE_INPUT])
        if hasattr(timm_head, "norm"):
            x = timm_head.norm(x)
        x = x.permute(0, 2, 3, 1)
        for name in ("pre_logits", "drop", "fc"):
            if hasattr(timm_head, name):
                x = getattr(timm_head, name)(x)
        return visual.head(x).permute(0, 3, 1, 2)


class OpenCLIPViTBackbone(OpenCLIPBackbone):
    """CLIP ViT: last-layer patch tokens resampled to a 4/8/16/32 simple feature pyramid."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str]
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features)
        visual = self.clip_model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: image tower {type(visual).__name__} is neither "
                "a timm ConvNeXt nor an open_clip VisionTransformer"
            )
        if not visual.transformer.batch_first:
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: only batch-first ViTs are supported"
            )
        if visual.attn_pool is not None:
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: ViTs with attentional pooling have no per-token projection"
            )
        last_attn = visual.transformer.resblocks[-1].attn
        if not isinstance(last_attn, nn.MultiheadAttention):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: the MaskCLIP value path needs standard "
                f"nn.MultiheadAttention blocks, found {type(last_attn).__name__}"
            )
        width = visual.transformer.width
        self._out_feature_channels = {
            "res2": width // 4,
            "res3": width // 2,
            "res4": width,
            "res5": width,
        }
        # simple feature pyramid from the stride-16 map; only the requested levels are built so
        # that no parameter goes unused (DistributedDataParallel rejects unused parameters)
        levels = {
            "res2": lambda: nn.Sequential(
                nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2),
                nn.GroupNorm(1, width // 2),
                nn.GELU(),
                nn.ConvTranspose2d(width // 2, width // 4, kernel_size=2, stride=2),
            ),
            "res3": lambda: nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2),
            "res4": nn.Identity,
            "res5": lambda: nn.MaxPool2d(kernel_size=2, stride=2),
        }
        self.pyramid_layers = nn.ModuleDict({name: levels[name]() for name in self._out_features})

    def _positional_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Class + patch position embeddings, the patch part bicubically resized to `grid`."""
        visual = self.clip_model.visual
        pos = visual.positional_embedding
        if tuple(grid) == tuple(visual.grid_size):
            return pos
        patch_pos = pos[1:].reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], patch_pos.flatten(2)[0].transpose(0, 1)], dim=0)

    def vit_tokens(
        self, images: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """Run the ViT on any image size. Returns (input of the last block, output of the last
        block), both [B, 1 + h*w, width] with the class token first, and the patch grid (h, w)."""
        visual = self.clip_model.visual
        x = visual.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        return x, blocks[-1](x), grid

    @staticmethod
    def _patch_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """[B, 1 + h*w, C] tokens -> [B, C, h, w] map of the patch tokens."""
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def _pyramid(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            penultimate, last, grid = self.vit_tokens(images)
        stride16 = self._patch_map(last, grid)
        target = (images.shape[-2] // 16, images.shape[-1] // 16)
        if tuple(stride16.shape[-2:]) != target:
            # patch sizes other than 16 (e.g. ViT-L/14): resample the token grid to stride 16
            stride16 = F.interpolate(stride16, size=target, mode="bilinear", align_corners=False)
        features = {name: layer(stride16) for name, layer in self.pyramid_layers.items()}
        features[CLIP_DENSE_INPUT] = self._patch_map(penultimate, grid)
        return features

    def dense_clip_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """MaskCLIP: last block's value path (ln_1 -> v-proj -> out-proj, no q/k), then ln_post
        and proj, on every patch token. Returns [B, E, h, w] at the patch grid."""
        visual = self.clip_model.visual
        block = visual.transformer.resblocks[-1]
        tokens = features[CLIP_DENSE_INPUT]
        batch, width, height, grid_width = tokens.shape
        x = block.ln_1(tokens.flatten(2).transpose(1, 2))
        attn = block.attn
        value = F.linear(x, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
        x = attn.out_proj(value)
        x = visual.ln_post(x) @ visual.proj
        return x.transpose(1, 2).reshape(batch, -1, height, grid_width)


@BACKBONE_REGISTRY.register()
def build_openclip_backbone(cfg, input_shape: ShapeSpec) -> OpenCLIPBackbone:
    """Frozen open_clip backbone chosen by cfg.MODEL.CLIP.MODEL_NAME (ConvNeXt or ViT tower)."""
    clip_cfg = cfg.MODEL.CLIP
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ValueError(
            f"build_openclip_backbone: CLIP needs 3 input channels, got {input_shape.channels}"
        )
    check_clip_model_name(clip_cfg.MODEL_NAME)
    vision_cfg = open_clip.get_model_config(clip_cfg.MODEL_NAME)["vision_cfg"]
    args = (
        clip_cfg.MODEL_NAME,
        clip_cfg.PRETRAINED_PATH,
        clip_cfg.FROZEN,
        list(clip_cfg.OUT_FEATURES),
    )
    if "timm_model_name" in vision_cfg:
        return OpenCLIPConvNeXtBackbone(*args)
    if "hf_model_name" in vision_cfg:
        raise ValueError(
            f"cfg.MODEL.CLIP.MODEL_NAME={clip_cfg.MODEL_NAME!r}: Hugging Face vision towers are not supported"
        )
    return OpenCLIPViTBackbone(*args)
