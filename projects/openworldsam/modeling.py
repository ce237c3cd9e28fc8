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
    weights from the local `checkpoint` ("" = random init, logged): the official SAM2 /
    SAM2.1 checkpoints (`{"model": state_dict}`, e.g. sam2_hiera_large.pt as the release
    uses, or sam2.1_hiera_large.pt with a sam2.1 config). Every parameter is frozen; gradients
    still flow through the mask decoder to the prompt tokens. As in the release the module
    follows the model's train / eval mode: SAM2's mask decoder returns its single-mask token
    in training and picks it by stability ("dynamic multimask") at inference.
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
                apply_postprocessing=True,
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
        prompt_tokens: Optional[Tensor],
        mask_prompts: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Masks of N prompts of one image.

        Args:
            features: `image_features` output; `image_index` selects the image.
            prompt_tokens: [N, T, C] sparse prompt embeddings (T tokens per mask), or None for
                no sparse prompt (the release's second stage uses the mask prompt alone).
            mask_prompts: optional [N, 1, S/4, S/4] mask logits used as dense prompts.
        Returns:
            mask logits [N, S/4, S/4] and predicted IoU [N] (single-mask output).
        """
        if prompt_tokens is None:
            prompt_tokens = mask_prompts.new_zeros((mask_prompts.shape[0], 0, self.embed_dim))
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
            sparse_prompt_embeddings=prompt_tokens,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=high_res or None,
        )
        return masks[:, 0].float(), iou[:, 0].float()


class SoftPromptLayer(nn.Module):
    """One layer of the soft-prompting transformer (Sec. 3.3, Fig. 4c), pre-norm as released:
    self-attention among the queries, cross-attention from the queries to SAM2's level-3 image
    embeddings (keys and values are the embeddings themselves, no positional encoding, as the
    release), then a GELU MLP; each sub-layer is residual."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(dim_feedforward, dim), nn.Dropout(dropout),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, image_tokens: Tensor) -> Tensor:
        """queries [B, N, C]; image_tokens [B, HW, C]."""
        x = self.norm_self(queries)
        queries = queries + self.dropout(self.self_attn(x, x, x, need_weights=False)[0])
        x = self.norm_cross(queries)
        attended = self.cross_attn(x, image_tokens, image_tokens, need_weights=False)[0]
        queries = queries + self.dropout(attended)
        return queries + self.ffn(self.norm_ffn(queries))


class LanguagePromptAdapter(nn.Module):
    """The trainable part of OpenWorldSAM (~4.5 M parameters at the released sizes).

    * projector (Sec. 3.1, "Prompt projection"): Linear(D, hidden) - ReLU - Linear(hidden, 256)
      on the BEiT-3 vector p_lang (the release uses hidden = D = 1024);
    * K positional tie-breakers t_k (Sec. 3.2, Eq. 1), N(0, 1)-initialised: q_k = u + t_k;
    * soft-prompting transformer (Sec. 3.3): `num_layers` SoftPromptLayers giving T(q). As
      released, the self-attention runs over the K queries of *every* prompt of the image in
      one sequence (P x K tokens), so queries of different prompts see each other.

    ``forward(prompt_vectors [P, D], image_embed [C, h, w])`` -> ``(queries, refined)``, both
    [P, K, C]: q and T(q). How they become SAM2 prompt tokens (q + T(q) per query as the
    paper, or the release's broadcast) is `sparse_prompt_tokens`.
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
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, prompt_dim)
        )
        self.tie_breakers = nn.Parameter(torch.randn(num_tie_breakers, prompt_dim))
        self.layers = nn.ModuleList(
            SoftPromptLayer(prompt_dim, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )

    @property
    def num_tie_breakers(self) -> int:
        return self.tie_breakers.shape[0]

    def initial_queries(self, prompt_vectors: Tensor) -> Tensor:
        """[P, K, C]: the projected prompt plus each of the K tie-breakers (Eq. 1)."""
        projected = self.projector(prompt_vectors)
        return projected[:, None, :] + self.tie_breakers[None]

    def forward(self, prompt_vectors: Tensor, image_embed: Tensor) -> Tuple[Tensor, Tensor]:
        queries = self.initial_queries(prompt_vectors)
        num_prompts, num_queries, dim = queries.shape
        refined = queries.reshape(1, num_prompts * num_queries, dim)
        image_tokens = image_embed.flatten(1).transpose(0, 1)[None]
        for layer in self.layers:
            refined = layer(refined, image_tokens)
        return queries, refined.view(num_prompts, num_queries, dim)


PROMPT_TOKEN_LAYOUTS = ("released", "per_query")


def sparse_prompt_tokens(queries: Tensor, refined: Tensor, rows: slice, layout: str) -> Tensor:
    """SAM2 sparse prompt tokens [n, T, C] of the masks `rows` of the N = P x K queries.

    * "per_query" (paper, Sec. 3.3): mask i is decoded from the single token q_i + T(q)_i.
    * "released": the release adds the transformer output [N, C] to the queries kept as
      [N, 1, C]; broadcasting gives [N, N, C], so mask i is decoded from the N tokens
      q_i + T(q)_j (j over every query of the image). The released weights were trained
      (and the published numbers obtained) this way, hence the default.

    Args:
        queries, refined: [N, C] q and T(q) of one image (flattened over prompts and K).
    """
    if layout == "per_query":
        return (queries[rows] + refined[rows])[:, None]
    return queries[rows][:, None] + refined[None]
