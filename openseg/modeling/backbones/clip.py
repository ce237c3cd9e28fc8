"""Frozen open_clip image/text encoders as a detectron2 backbone.

ConvNeXt CLIPs give res2-res5 straight from the timm trunk stages (as FC-CLIP, Yu et al.
NeurIPS 2023, Sec. 3); OpenAI's ModifiedResNet CLIPs (RN50, RN101, RN50x4/x16/x64) from
their four residual layers (FC-CLIP's ResNet-CLIP variants, Sec. 4). ViT CLIPs give one
stride-16 token map, turned into a simple feature pyramid (ViTDet, Li et al. ECCV 2022,
Sec. 3) by small trainable (de)convolutions.

`dense_clip_features` keeps CLIP's joint image-text space per pixel so masks can be
classified against text embeddings: the ConvNeXt head (norm + projection) is applied to
every res5 pixel instead of the pooled vector; for ViTs the last block is replaced by its
value path (MaskCLIP, Zhou et al. ECCV 2022, Sec. 3.2), which keeps each patch local.
`embed_masks` embeds masked regions: the mean inside each mask through `embed_pooled`
(ConvNeXt), or the ResNet's attention pool restricted to each mask (FC-CLIP's release).

The architecture comes from open_clip's model configs; weights are only ever read from
cfg.MODEL.CLIP.PRETRAINED_PATH, never downloaded.
"""

import difflib
import logging
import math
import os
from abc import abstractmethod
from typing import Dict, List, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

from openseg.modeling.mask_pooling import weighted_mask_pool

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


def load_tokenizer(model_name: str, tokenizer_path: str = ""):
    """open_clip's tokenizer of `model_name`, never from a hub: CLIP's BPE tokenizer ships with
    open_clip; models with a Hugging Face tokenizer (SigLIP / SigLIP 2: `hf_tokenizer_name`
    in their open_clip config) read it from the local directory `tokenizer_path`
    (cfg.MODEL.CLIP.TOKENIZER_PATH, e.g. a download of that Hugging Face repository)."""
    text_cfg = open_clip.get_model_config(model_name).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name", "")
    if not hub_name:
        return open_clip.get_tokenizer(model_name)
    if not tokenizer_path or not os.path.isdir(tokenizer_path):
        raise FileNotFoundError(
            f"CLIP {model_name} tokenizes with the Hugging Face tokenizer {hub_name!r}, read "
            f"only from a local directory: cfg.MODEL.CLIP.TOKENIZER_PATH={tokenizer_path!r} is "
            "not one; download that repository's tokenizer files (tokenizer.json, "
            "tokenizer_config.json, ...) and point the key to their folder."
        )
    return open_clip.tokenizer.HFTokenizer(
        tokenizer_path,
        context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
        **text_cfg.get("tokenizer_kwargs", {}),
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
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str],
        tokenizer_path: str = "",
    ):
        super().__init__()
        unknown = [name for name in out_features if name not in PYRAMID_LEVELS]
        if unknown or not out_features:
            raise ValueError(
                f"cfg.MODEL.CLIP.OUT_FEATURES={list(out_features)}: must be a non-empty subset of {PYRAMID_LEVELS}"
            )
        self.model_name = model_name
        self.clip_model = create_clip_model(model_name, pretrained_path)
        self.tokenizer = load_tokenizer(model_name, tokenizer_path)
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

    def embed_masks(self, pooling_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of masked regions: [B, C, h, w] `pooling_features`, [B, Q, h, w]
        non-negative mask weights on that grid (binary for FC-CLIP's out-of-vocabulary
        classifier, cell coverage for ground-truth masks) -> [B, Q, E]. Default: the weighted
        mean inside each mask through `embed_pooled` (FC-CLIP pools before the head)."""
        return self.embed_pooled(weighted_mask_pool(pooling_features, weights))


class OpenCLIPConvNeXtBackbone(OpenCLIPBackbone):
    """CLIP with a timm ConvNeXt trunk: res2-res5 are the outputs of its four stages."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str],
        tokenizer_path: str = "",
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features, tokenizer_path)
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


class OpenCLIPResNetBackbone(OpenCLIPBackbone):
    """CLIP with OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64).

    As FC-CLIP's release (`extract_features_resnet`): the three-convolution stem and its
    average pool give the stride-4 input of `layer1`; res2-res5 are the outputs of
    layer1-layer4 (channels 4 x width x 1, 2, 4, 8: 256-2048 for RN50 / RN101, 320-2560
    RN50x4, 384-3072 RN50x16, 512-4096 RN50x64). The out-of-vocabulary classifier reads res5,
    the attention pool's input, and embeds masked regions with that attention pool
    (`embed_masks`)."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str],
        tokenizer_path: str = "",
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features, tokenizer_path)
        visual = self.clip_model.visual
        if not isinstance(visual, ModifiedResNet):
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: image tower {type(visual).__name__} is "
                "not open_clip's ModifiedResNet"
            )
        layers = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
        self._out_feature_channels = {
            name: layer[-1].bn3.num_features for name, layer in zip(PYRAMID_LEVELS, layers)
        }

    def _pyramid(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        visual = self.clip_model.visual
        features = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = visual.stem(images)
            layers = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
            for name, layer in zip(PYRAMID_LEVELS, layers):
                x = layer(x)
                features[name] = x
        features[CLIP_DENSE_INPUT] = features["res5"]
        return features

    def pooling_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """res5 [B, C5, h, w], the attention pool's input (the release's `clip_vis_dense`)."""
        return features[CLIP_DENSE_INPUT]

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[..., C5] -> [..., E]: the attention pool's value path alone (value projection, then
        output projection), what the pool returns when it attends to a single token; MaskCLIP's
        rule for ResNet CLIPs (Zhou et al. ECCV 2022, Sec. 3.2)."""
        pool = self.clip_model.visual.attnpool
        return pool.c_proj(pool.v_proj(pooled))

    def dense_clip_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """`embed_pooled` on every res5 pixel: [B, E, h, w]."""
        x = features[CLIP_DENSE_INPUT].permute(0, 2, 3, 1)
        return self.embed_pooled(x).permute(0, 3, 1, 2)

    def _spatial_position(self, height: int, width: int) -> torch.Tensor:
        """The attention pool's spatial position embeddings bilinearly resized to (height,
        width) (align_corners False, as the release): [height * width, C5]."""
        position = self.clip_model.visual.attnpool.positional_embedding[1:]
        grid = int(round(math.sqrt(position.shape[0])))
        position = position.T.reshape(1, -1, grid, grid)
        if (grid, grid) != (height, width):
            position = F.interpolate(position, size=(height, width), mode="bilinear", align_corners=False)
        return position.flatten(2)[0].T

    def embed_masks(self, pooling_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """FC-CLIP's out-of-vocabulary embedding for ResNet CLIPs (its release,
        `visual_prediction_forward_resnet`; the paper is silent): one attention-pool query per
        mask, the mean of all res5 tokens plus the pool's first position embedding, attends
        only to the tokens inside the mask (keys and values: token + resized spatial position
        embedding), then the output projection. Attention to token j is proportional to
        weights_j * exp(score_j), so binary weights are the release's masked attention; an
        empty mask attends to nothing and embeds to the output projection's bias (what the
        installed PyTorch's fully masked attention gives the release; older versions give NaN,
        which its ENSEMBLE_ON_VALID_MASK then ignores).

        [B, C5, h, w] res5, [B, Q, h, w] weights -> [B, Q, E]."""
        pool = self.clip_model.visual.attnpool
        batch, channels, height, width = pooling_features.shape
        heads = pool.num_heads
        tokens = pooling_features.flatten(2).transpose(1, 2)  # [B, hw, C]
        position = pool.positional_embedding.to(tokens.dtype)
        keys = tokens + self._spatial_position(height, width).to(tokens.dtype)
        query = tokens.mean(1, keepdim=True) + position[:1]  # [B, 1, C]

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], heads, channels // heads).transpose(1, 2)

        q = split_heads(pool.q_proj(query))  # [B, heads, 1, d]
        k = split_heads(pool.k_proj(keys))  # [B, heads, hw, d]
        v = split_heads(pool.v_proj(keys))
        scores = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)  # [B, heads, 1, hw]
        weights = weights.to(tokens.dtype).flatten(2)[:, None]  # [B, 1, Q, hw]
        attention = (scores + weights.log()).softmax(-1)  # [B, heads, Q, hw]
        empty = (weights > 0).sum(-1, keepdim=True) == 0
        attention = attention.masked_fill(empty, 0.0)
        attended = (attention @ v).transpose(1, 2).reshape(batch, -1, channels)  # [B, Q, C]
        return pool.c_proj(attended)


def simple_pyramid_channels(width: int) -> Dict[str, int]:
    return {"res2": width // 4, "res3": width // 2, "res4": width, "res5": width}


def simple_pyramid(width: int, out_features: List[str]) -> nn.ModuleDict:
    """Simple feature pyramid (ViTDet) from a stride-16 map of `width` channels; only the
    requested levels are built so that no parameter goes unused (DistributedDataParallel
    rejects unused parameters)."""
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
    return nn.ModuleDict({name: levels[name]() for name in out_features})


class OpenCLIPViTBackbone(OpenCLIPBackbone):
    """CLIP ViT: last-layer patch tokens resampled to a 4/8/16/32 simple feature pyramid."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str],
        tokenizer_path: str = "",
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features, tokenizer_path)
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
        self._out_feature_channels = simple_pyramid_channels(width)
        self.pyramid_layers = simple_pyramid(width, self._out_features)

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


class OpenCLIPTimmViTBackbone(OpenCLIPBackbone):
    """CLIP whose image tower is a timm ViT with attention-pooling head (SigLIP / SigLIP 2,
    "map" pooling): last-layer patch tokens as a simple feature pyramid, as the ViT backbone.

    `dense_clip_features` applies MaskCLIP's rule (Zhou et al. ECCV 2022, Sec. 3.2) to the
    pooling head: each patch token goes through the head's value path alone (kv value part ->
    out-projection, no query / key), then the head's residual MLP and the tower's projection,
    i.e. what the head returns for a sequence of that single token. Position embeddings are
    resampled to the input's patch grid ("interpolate the ViT positional embeddings to match
    the input resolution", "What holds back open-vocabulary segmentation?" Sec. 4.1)."""

    def __init__(
        self, model_name: str, pretrained_path: str, frozen: bool, out_features: List[str],
        tokenizer_path: str = "",
    ):
        super().__init__(model_name, pretrained_path, frozen, out_features, tokenizer_path)
        trunk = getattr(self.clip_model.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "patch_embed") or getattr(trunk, "attn_pool", None) is None:
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: the timm image tower is neither a "
                "4-stage ConvNeXt nor a ViT with an attention-pooling ('map') head"
            )
        if trunk.num_prefix_tokens and trunk.no_embed_class:
            raise ValueError(
                f"cfg.MODEL.CLIP.MODEL_NAME={model_name!r}: prefix tokens without position "
                "embeddings are not supported"
            )
        width = trunk.embed_dim
        self._out_feature_channels = simple_pyramid_channels(width)
        self.pyramid_layers = simple_pyramid(width, self._out_features)

    def trunk_tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Final-norm patch tokens [B, h*w, C] of any image size, and the grid (h, w)."""
        trunk = self.clip_model.visual.trunk
        x = trunk.patch_embed.proj(images)
        grid = tuple(x.shape[-2:])
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [
            token.expand(x.shape[0], -1, -1)
            for token in (trunk.cls_token, trunk.reg_token) if token is not None
        ]
        position = resample_abs_pos_embed(
            trunk.pos_embed, new_size=grid, old_size=trunk.patch_embed.grid_size,
            num_prefix_tokens=trunk.num_prefix_tokens,
        )
        x = trunk.pos_drop(torch.cat(prefix + [x], dim=1) + position)
        x = trunk.norm(trunk.blocks(trunk.norm_pre(trunk.patch_drop(x))))
        return x[:, trunk.num_prefix_tokens :], grid

    def _pyramid(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens, grid = self.trunk_tokens(images)
        patch_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        stride16 = patch_map
        target = (images.shape[-2] // 16, images.shape[-1] // 16)
        if tuple(stride16.shape[-2:]) != target:
            stride16 = F.interpolate(stride16, size=target, mode="bilinear", align_corners=False)
        features = {name: layer(stride16) for name, layer in self.pyramid_layers.items()}
        features[CLIP_DENSE_INPUT] = patch_map
        return features

    def dense_clip_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token output of the attention-pooling head's value path: [B, E, h, w]."""
        visual = self.clip_model.visual
        trunk = visual.trunk
        pool = trunk.attn_pool
        patch_map = features[CLIP_DENSE_INPUT]
        batch, width, height, grid_width = patch_map.shape
        x = patch_map.flatten(2).transpose(1, 2)
        if pool.pos_embed is not None:
            raise ValueError("attention pooling with its own position embedding is not supported")
        value = F.linear(x, pool.kv.weight[width:], pool.kv.bias[width:] if pool.kv.bias is not None else None)
        x = pool.proj(value)
        if pool.mlp is not None:
            x = x + pool.mlp(pool.norm(x))
        x = visual.head(trunk.head(trunk.fc_norm(x)))
        return x.transpose(1, 2).reshape(batch, -1, height, grid_width)


@BACKBONE_REGISTRY.register()
def build_openclip_backbone(cfg, input_shape: ShapeSpec) -> OpenCLIPBackbone:
    """Frozen open_clip backbone chosen by cfg.MODEL.CLIP.MODEL_NAME (ConvNeXt, ModifiedResNet
    or ViT tower)."""
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
        clip_cfg.TOKENIZER_PATH,
    )
    if "timm_model_name" in vision_cfg and vision_cfg.get("timm_pool") == "map":
        return OpenCLIPTimmViTBackbone(*args)
    if "timm_model_name" in vision_cfg:
        return OpenCLIPConvNeXtBackbone(*args)
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        return OpenCLIPResNetBackbone(*args)
    if "hf_model_name" in vision_cfg:
        raise ValueError(
            f"cfg.MODEL.CLIP.MODEL_NAME={clip_cfg.MODEL_NAME!r}: Hugging Face vision towers are not supported"
        )
    return OpenCLIPViTBackbone(*args)
