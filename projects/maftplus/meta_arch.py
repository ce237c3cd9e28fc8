"""MAFT+ (Jiao et al. ECCV 2024): FC-CLIP whose CLIP image encoder is fine-tuned, with
per-image text embeddings, and classified by CLIP alone at test time.

The MAFT+ paper is not among openseg's papers, so the released code (jiaosiyu1999/MAFT-Plus,
`maft/maft_plus.py`, built on FC-CLIP's release) is the specification. What is new with
respect to `FCCLIP` (projects/fcclip):
- the ConvNeXt trunk of the CLIP (stem, stages, norm_pre) is trained; the pixel decoder and
  mask decoder see its features detached, so only the CLIP classifier's losses reach it. A
  frozen copy of the CLIP (`frozen_backbone`, initialised with the same weights) gives the
  features the representation-compensation loss keeps the trained ones close to;
- content-dependent transfer (`ContentDependentTransfer`): the class text embeddings and the
  void embedding attend to the image's dense CLIP embeddings; the result classifies the
  CLIP-pooled masks (train and test);
- training adds the mask-aware loss (CLIP class probabilities follow the proposals' IoU with
  the ground truth) and the representation-compensation loss to FC-CLIP's set criterion;
- inference uses the CLIP classifier only (no geometric ensemble with the in-vocabulary
  classifier), whose no-object probability still comes from the in-vocabulary classifier:
  p(c) = softmax_CLIP(c) * (1 - p_void), p(void) = p_void.

As released, masks are pooled on the trunk features (before the CLIP head) and the head is
applied to the pooled vectors; the transfer attends to the head applied per pixel.
"""
import logging
from typing import Dict, List, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import Tensor

from openseg.modeling.backbones.clip import OpenCLIPConvNeXtBackbone
from openseg.modeling.mask_pooling import mask_pool, weighted_mask_pool
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.modeling.oracles import IMPOSSIBLE_LOGIT
from openseg.modeling.text import max_over_synonyms, synonym_counts
from openseg.projects.fcclip import FCCLIP
from openseg.projects.fcclip.meta_arch import CLIP_POOLING_FEATURES

from .modules import ContentDependentTransfer, mask_aware_loss, representation_compensation_loss

logger = logging.getLogger(__name__)

# parts of the CLIP image tower MAFT+ trains (the release's `_freeze`); the rest stays frozen
TRAINED_CLIP_PARTS = ("visual.trunk.stem.", "visual.trunk.stages.", "visual.trunk.norm_pre.")


@META_ARCH_REGISTRY.register()
class MAFTPlus(FCCLIP):
    """MAFT+; inputs and outputs as `OpenSegMaskFormer`. Training losses: FC-CLIP's set
    criterion plus ``loss_mask_aware`` and ``loss_rc``."""

    @configurable
    def __init__(
        self,
        *,
        frozen_backbone: OpenCLIPConvNeXtBackbone,
        transfer: ContentDependentTransfer,
        rc_loss_weight: float,
        rc_pool_scales: Sequence[int],
        ma_loss_weight: float,
        release_pixel_layout: bool = True,
        **kwargs,
    ):
        """
        Args:
            frozen_backbone: a second CLIP of the same architecture; it takes the fine-tuned
                CLIP's initial weights and never trains.
            transfer: the content-dependent transfer (width = CLIP embedding width).
            rc_loss_weight, rc_pool_scales: representation-compensation weight and scales.
            ma_loss_weight: mask-aware loss weight.
            release_pixel_layout: see `transfer_image_embeddings`.
            kwargs: `FCCLIP` arguments (its ensemble weights are not used).
        """
        super().__init__(**kwargs)
        for name, module in (("backbone", self.backbone), ("frozen_backbone", frozen_backbone)):
            if not isinstance(module, OpenCLIPConvNeXtBackbone):
                raise TypeError(
                    f"MAFT+ needs a ConvNeXt CLIP (cfg.MODEL.CLIP.MODEL_NAME, e.g. "
                    f"convnext_large_d_320) as its {name}, got {type(module).__name__}."
                )
        frozen_backbone.load_state_dict(self.backbone.state_dict())
        for param in frozen_backbone.parameters():
            param.requires_grad = False
        for name, param in self.backbone.clip_model.named_parameters():
            param.requires_grad = name.startswith(TRAINED_CLIP_PARTS)
        self.frozen_backbone = frozen_backbone
        self.transfer = transfer
        self.rc_loss_weight = rc_loss_weight
        self.rc_pool_scales = list(rc_pool_scales)
        self.ma_loss_weight = ma_loss_weight
        self.release_pixel_layout = release_pixel_layout

    @classmethod
    def from_config(cls, cfg) -> Dict:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.CLIP.FROZEN = False  # the fine-tuned CLIP
        args = super().from_config(cfg)
        cfg.MODEL.CLIP.FROZEN = True
        maft = cfg.MODEL.MAFT_PLUS
        embed_dim = open_clip.get_model_config(cfg.MODEL.CLIP.MODEL_NAME)["embed_dim"]
        if embed_dim % maft.CDT_NUM_HEADS:
            raise ValueError(
                f"cfg.MODEL.MAFT_PLUS.CDT_NUM_HEADS={maft.CDT_NUM_HEADS} must divide the CLIP "
                f"embedding width {embed_dim} of {cfg.MODEL.CLIP.MODEL_NAME}."
            )
        return {
            **args,
            "frozen_backbone": build_backbone(cfg),
            "transfer": ContentDependentTransfer(embed_dim, maft.CDT_NUM_HEADS, maft.CDT_NORM_ON_UPDATE),
            "rc_loss_weight": maft.RC_LOSS_WEIGHT,
            "rc_pool_scales": list(maft.RC_POOL_SCALES),
            "ma_loss_weight": maft.MA_LOSS_WEIGHT,
            "release_pixel_layout": maft.CDT_RELEASE_PIXEL_LAYOUT,
        }

    def train(self, mode: bool = True) -> "MAFTPlus":
        super().train(mode)
        self.frozen_backbone.eval()
        return self

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_images(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.forward_heads(features)
        if self.training:
            with torch.no_grad():
                frozen = self.frozen_backbone.pooling_features(self.frozen_backbone(images.tensor))
            outputs["frozen_" + CLIP_POOLING_FEATURES] = frozen
            targets = self.prepare_targets(batched_inputs, images)
            return self.losses(outputs, targets)
        return self.postprocess(outputs, batched_inputs, images)

    def forward_heads(self, features: Dict[str, Tensor]) -> Dict:
        """FC-CLIP's decoders on the detached CLIP features, then MAFT+'s CLIP classifier:
        CLIP_POOLING_FEATURES [B, C, h, w] (the trunk output, with gradient when training),
        ``transferred_text`` [B, S+1, E] (synonym and void embeddings after the transfer)
        and ``clip_logits`` [B, Q, K+1] of the CLIP-pooled predicted masks."""
        outputs = super().forward_heads({k: v.detach() for k, v in features.items()})
        pooling_features = self.backbone.pooling_features(features)
        text = torch.cat([
            self.classifier.text_embeddings,
            F.normalize(self.classifier.void_embedding.weight, dim=-1),
        ])
        transferred = self.transfer(self.transfer_image_embeddings(pooling_features), text)
        pooled = mask_pool(pooling_features, outputs["pred_masks"])
        outputs[CLIP_POOLING_FEATURES] = pooling_features
        outputs["transferred_text"] = transferred
        outputs["clip_logits"] = self.transferred_logits(pooled, transferred)
        return outputs

    def transfer_image_embeddings(self, pooling_features: Tensor) -> Tensor:
        """[B, C, h, w] CLIP features -> [B, E, h, w] image embeddings the transfer attends to.

        The release (`visual_prediction_forward_convnext` of `maft_plus.py`) reshapes the
        [B, C, h, w] map to [B*h*w, C] without moving the channels last, so each "pixel" it
        embeds is C consecutive values of the channel-major buffer (channel c, rows of the
        grid), not one position's channel vector. Released checkpoints were trained on that
        layout, so it is the default (cfg.MODEL.MAFT_PLUS.CDT_RELEASE_PIXEL_LAYOUT); False
        embeds each position's own channel vector."""
        batch, channels, height, width = pooling_features.shape
        if self.release_pixel_layout:
            vectors = pooling_features.reshape(batch, height * width, channels)
        else:
            vectors = pooling_features.flatten(2).transpose(1, 2)
        embedded = self.backbone.embed_pooled(vectors)
        return embedded.reshape(batch, height, width, -1).permute(0, 3, 1, 2)

    def transferred_logits(self, pooled: Tensor, transferred: Tensor) -> Tensor:
        """[B, M, C] CLIP features pooled in masks, [B, S(+1), E] per-image synonym (and void)
        embeddings -> [B, M, K(+1)] logits: CLIP image head on the pooled vectors, cosine
        against the (unnormalised, as released) transferred text times CLIP's logit scale
        (clamped at 100), maximum over each class's synonyms."""
        embedded = F.normalize(self.backbone.embed_pooled(pooled), dim=-1)
        scale = self.backbone.clip_model.logit_scale.exp().clamp(max=100.0)
        logits = scale * embedded @ transferred.transpose(1, 2).to(embedded.dtype)
        return max_over_synonyms(logits, self.classifier.synonym_counts)

    def losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """FC-CLIP's weighted set-criterion losses plus the mask-aware and
        representation-compensation terms (weighted by cfg.MODEL.MAFT_PLUS)."""
        losses = super().losses(outputs, targets)
        losses["loss_mask_aware"] = self.ma_loss_weight * mask_aware_loss(
            outputs["clip_logits"], outputs["pred_masks"], targets
        )
        losses["loss_rc"] = self.rc_loss_weight * representation_compensation_loss(
            outputs[CLIP_POOLING_FEATURES], outputs["frozen_" + CLIP_POOLING_FEATURES], self.rc_pool_scales
        )
        return losses

    def postprocess(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """CLIP-only class log-probabilities, the in-vocabulary classifier giving only the
        no-object probability; then post-processing and oracles as `OpenSegMaskFormer`."""
        void = outputs["pred_logits"].softmax(-1)[..., -1:]
        probs = outputs["clip_logits"][..., :-1].softmax(-1)
        log_probs = torch.log(torch.cat([probs * (1.0 - void), void], dim=-1) + 1e-8)
        return OpenSegMaskFormer.postprocess(self, {**outputs, "pred_logits": log_probs}, batched_inputs, images)

    def classify_masks(
        self, outputs: Dict, image_index: int, masks: Tensor, mask_cls: Tensor,
        mask_pred: Tensor, image_size: Tuple[int, int],
    ) -> Tensor:
        """MAFT+'s CLIP classifier on given bool masks [M, H_pad, W_pad] (the segmentation
        oracle's classifier): CLIP features averaged with each mask's coverage of every
        feature cell, CLIP head, against this image's transferred synonym embeddings.
        Returns [M, K+1] log-probabilities, no-object impossible."""
        features = outputs[CLIP_POOLING_FEATURES][image_index : image_index + 1]
        coverage = F.interpolate(masks[None].float(), size=features.shape[-2:], mode="area")
        transferred = outputs["transferred_text"][image_index : image_index + 1, :-1]
        pooled = weighted_mask_pool(features, coverage)
        logits = self.transferred_logits(pooled, transferred)[0].log_softmax(-1)
        void = logits.new_full((logits.shape[0], 1), IMPOSSIBLE_LOGIT)
        return torch.cat([logits, void], dim=-1).to(mask_cls.dtype)
