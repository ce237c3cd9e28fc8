"""OpenWorldSAM's parts: the frozen SAM2 wrapper and the trainable language adapter.

OpenWorldSAM (Xiao et al. 2025, Sec. 3): a pooled vision-language vector per prompt is
projected to SAM2's prompt space by a two-layer MLP (Sec. 3.1), K learnable positional
tie-breakers turn it into K distinct queries (Sec. 3.2, "multi-instance"), a soft-prompting
transformer refines them against SAM2's image embeddings (Sec. 3.3), and each query enters
SAM2's mask decoder as a sparse prompt token, giving one mask and one IoU estimate per query.
"""
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class FrozenSAM2(nn.Module):
    """SAM2 image encoder + prompt encoder + mask decoder from the installed `sam2` package.

    Built from a sam2 hydra config (`config_name`) with the input side set to `image_size`;
    weights from the local `checkpoint` ("" = random init, logged). Every parameter is frozen
    and the module stays in eval mode; gradients still flow through the mask decoder to the
    prompt tokens.
    """

    def __init__(self, config_name: str, checkpoint: str = "", image_size: int = 1024):
        super().__init__()
        from sam2.build_sam import build_sam2

        if image_size <= 0 or image_size % 32:
            raise ValueError(
                f"cfg.MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE={image_size}: must be a positive "
                "multiple of 32 (SAM2's Hiera windows tile its stride-4 grid)."
            )
        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"cfg.MODEL.OPENWORLDSAM.SAM2_CHECKPOINT={checkpoint!r} does not exist; point it "
                "to a local SAM2 checkpoint (e.g. sam2.1_hiera_large.pt) or set it to '' for "
                "random initialisation."
            )
        try:
            sam2 = build_sam2(
                config_name,
                ckpt_path=checkpoint or None,
                device="cpu",
                apply_postprocessing=False,
                hydra_overrides_extra=[f"++model.image_size={image_size}"],
            )
        except Exception as error:
            if type(error).__name__ in ("MissingConfigException", "ConfigCompositionException"):
                raise ValueError(
                    f"cfg.MODEL.OPENWORLDSAM.SAM2_CONFIG={config_name!r} is not a config of the "
                    "installed sam2 package (e.g. configs/sam2.1/sam2.1_hiera_t.yaml)."
                ) from error
            raise
        if checkpoint:
            logger.info(f"Loaded SAM2 weights from {checkpoint}")
        else:
            logger.warning(
                "SAM2 is randomly initialised: cfg.MODEL.OPENWORLDSAM.SAM2_CHECKPOINT is empty"
            )
        self.image_encoder = sam2.image_encoder
        self.prompt_encoder = sam2.sam_prompt_encoder
        self.mask_decoder = sam2.sam_mask_decoder
        self.no_mem_embed = sam2.no_mem_embed
        self.directly_add_no_mem_embed = sam2.directly_add_no_mem_embed
        self.use_high_res_features = sam2.use_high_res_features_in_sam
        self.num_feature_levels = sam2.num_feature_levels
        self.image_size = image_size
        self.embed_dim = sam2.hidden_dim
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def train(self, mode: bool = True) -> "FrozenSAM2":
        return super().train(False)

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Dict[str, Tensor]:
        """Image embeddings of normalised [B, 3, S, S] images, as SAM2's image predictor.

        Returns ``image_embed`` [B, C, S/16, S/16] (lowest level + the no-memory embedding),
        ``image_pe`` [1, C, S/16, S/16] (the prompt encoder's dense positional encoding) and
        ``high_res_features`` (the two finer levels projected for the mask decoder).
        """
        backbone_out = self.image_encoder(images)
        levels = backbone_out["backbone_fpn"][-self.num_feature_levels :]
        image_embed = levels[-1]
        if self.directly_add_no_mem_embed:
            image_embed = image_embed + self.no_mem_embed.view(1, -1, 1, 1)
        high_res: List[Tensor] = []
        if self.use_high_res_features:
            high_res = [
                self.mask_decoder.conv_s0(levels[0]),
                self.mask_decoder.conv_s1(levels[1]),
            ]
        return {
            "image_embed": image_embed,
            "image_pe": self.prompt_encoder.get_dense_pe(),
            "high_res_features": high_res,
        }

    def decode(
        self,
        features: Dict[str, Tensor],
        image_index: int,
        prompt_tokens: Tensor,
        mask_prompts: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Masks of N prompts of one image, one sparse token each.

        Args:
            features: `image_features` output; `image_index` selects the image.
            prompt_tokens: [N, C] sparse prompt embeddings.
            mask_prompts: optional [N, 1, S/4, S/4] mask logits used as dense prompts.
        Returns:
            mask logits [N, S/4, S/4] and predicted IoU [N] (single-mask output).
        """
        image_embed = features["image_embed"][image_index : image_index + 1]
        high_res = [level[image_index : image_index + 1] for level in features["high_res_features"]]
        if mask_prompts is None:
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                prompt_tokens.shape[0], -1, *image_embed.shape[-2:]
            )
        else:
            dense = self.prompt_encoder._embed_masks(mask_prompts)
        masks, iou, _, _ = self.mask_decoder(
            image_embeddings=image_embed,
            image_pe=features["image_pe"],
            sparse_prompt_embeddings=prompt_tokens[:, None],
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=high_res or None,
        )
        return masks[:, 0].float(), iou[:, 0].float()


class SoftPromptLayer(nn.Module):
    """Self-attention among a prompt's K queries, cross-attention from the queries to the
    image embeddings only (keys carry SAM2's positional encoding), feed-forward; post-norm."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(dim_feedforward, dim),
        )
        self.norm_self = nn.LayerNorm(dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, image_tokens: Tensor, image_pos: Tensor) -> Tensor:
        """queries [P, K, C]; image_tokens, image_pos [P or 1, HW, C]."""
        attended, _ = self.self_attn(queries, queries, queries, need_weights=False)
        queries = self.norm_self(queries + self.dropout(attended))
        keys = (image_tokens + image_pos).expand(queries.shape[0], -1, -1)
        values = image_tokens.expand(queries.shape[0], -1, -1)
        attended, _ = self.cross_attn(queries, keys, values, need_weights=False)
        queries = self.norm_cross(queries + self.dropout(attended))
        return self.norm_ffn(queries + self.dropout(self.ffn(queries)))


class LanguagePromptAdapter(nn.Module):
    """The trainable part of OpenWorldSAM: projector, tie-breakers, soft-prompting transformer.

    ``forward(prompt_vectors [P, D_in], image_embed [C, h, w], image_pe [C, h, w])`` ->
    queries [P, K, C]: MLP(prompt) + tie-breaker_k for k < K, refined by `num_layers`
    SoftPromptLayers attending to the image embeddings of the prompt's image.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        prompt_dim: int,
        num_tie_breakers: int,
        num_layers: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
    ):
        super().__init__()
        if num_tie_breakers < 1:
            raise ValueError(
                f"cfg.MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS={num_tie_breakers}: need at least 1."
            )
        if prompt_dim % nheads:
            raise ValueError(
                f"cfg.MODEL.OPENWORLDSAM.NHEADS={nheads} must divide SAM2's prompt dimension "
                f"{prompt_dim}."
            )
        self.projector = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, prompt_dim)
        )
        self.tie_breakers = nn.Embedding(num_tie_breakers, prompt_dim)
        self.layers = nn.ModuleList(
            SoftPromptLayer(prompt_dim, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )

    @property
    def num_tie_breakers(self) -> int:
        return self.tie_breakers.num_embeddings

    def initial_queries(self, prompt_vectors: Tensor) -> Tensor:
        """[P, K, C]: the projected prompt plus each of the K tie-breakers (Sec. 3.2)."""
        projected = self.projector(prompt_vectors)
        return projected[:, None, :] + self.tie_breakers.weight[None]

    def forward(self, prompt_vectors: Tensor, image_embed: Tensor, image_pe: Tensor) -> Tensor:
        queries = self.initial_queries(prompt_vectors)
        image_tokens = image_embed.flatten(1).transpose(0, 1)[None]
        image_pos = image_pe.flatten(1).transpose(0, 1)[None]
        for layer in self.layers:
            queries = layer(queries, image_tokens, image_pos)
        return queries
