"""The OmniScient Model core on transformers' InstructBLIP (Yu, Shen and Chen, "Towards
Open-Ended Visual Recognition with Large Language Model", ECCV 2024, Sec. 3.2, Fig. 3-4).

`OmniScient` wraps an `InstructBlipForConditionalGeneration` (EVA-ViT-g/224 + Q-Former +
Vicuna-7B in the paper, Sec. 4 "Default Settings") and adds what OSM trains on top of it:

- high-resolution features from the frozen ViT run in sliding windows of its pre-training
  size, plus a learned global position embedding over the whole window grid ("Adaptation to
  Higher Input Resolution", Sec. 3.2; the release also keeps every window's class token,
  prepended, each with its own position embedding);
- the MaskQ-Former: InstructBLIP's Q-Former with mask queries (masked cross-attention to the
  mask's feature cells), context queries (cross-attention to the mask's box enlarged by a
  ratio; Tab. 2d) and a mode query appended to the context queries (Fig. 4). The mask queries
  start as a copy of InstructBLIP's query tokens; the context queries *are* InstructBLIP's
  query tokens (as released);
- the mode query on the LLM side (Fig. 3: "two separate Mode Query for MaskQ-Former and
  LLM"): one vocabulary-specific query per training dataset and the vocabulary-agnostic
  "any" ("Mode Query", Sec. 3.2);
- only the mask-query outputs (projected) and the LLM mode query prefix the instruction.

Parameter names equal the release's (`window_pos_embed`, `mask_query`, `context_query`,
`qformer_mode_query.<mode>`, `mode_query.<mode>`, `base_model.*`), so its checkpoints
(`osm_final.pt`, ...) load with `load_released_checkpoint`.
"""

import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RELEASE_MODES",
    "OmniScient",
    "context_box_mask",
    "load_base_model",
    "load_released_checkpoint",
    "tokenize_padded",
    "window_starts",
]

logger = logging.getLogger(__name__)

# the mode queries of the released model, in its order (modeling/osm.py `all_datasets`): the
# vocabulary-specific ones of its training datasets, and the vocabulary-agnostic "any"
RELEASE_MODES: Tuple[str, ...] = (
    "coco", "lvis", "v3det", "a847", "pc459", "partimagenet", "pascal_part", "ade20k",
    "cityscapes", "any",
)


def window_starts(input_size: int, window: int, stride: int) -> List[int]:
    """Top (or left) coordinates of the sliding windows along one side: every `stride`
    pixels, the last window shifted back to end at the border (as released)."""
    count = max(input_size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, input_size) - window, 0) for i in range(count)]


def context_box_mask(mask: Tensor, ratio: float) -> Tensor:
    """The region the context queries attend to (Sec. 3.2, Tab. 2d): the mask's bounding
    box enlarged by `ratio` of its height / width on each side, clipped to the image; a
    negative ratio means the whole image ("Global" in Tab. 2d). mask: [H, W] (any dtype)."""
    if ratio < 0:
        return torch.ones_like(mask)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("OSM got an empty mask: every mask needs at least one pixel.")
    height, width = mask.shape
    top, bottom = int(rows.min()), int(rows.max())
    left, right = int(cols.min()), int(cols.max())
    box_h, box_w = bottom - top + 1, right - left + 1
    top, bottom = max(0, int(top - box_h * ratio)), min(height - 1, int(bottom + box_h * ratio))
    left, right = max(0, int(left - box_w * ratio)), min(width - 1, int(right + box_w * ratio))
    out = torch.zeros_like(mask)
    out[top : bottom + 1, left : right + 1] = 1
    return out


class OmniScient(nn.Module):
    """OSM on an InstructBLIP `base_model` (see the module docstring).

    Args:
        base_model: `InstructBlipForConditionalGeneration` (decoder-only language model).
        input_size: side of the square padded input (1120 final model, 896 ablations; Sec. 4).
        window_stride: sliding-window stride (= the ViT's input size by default; Tab. 2b).
        modes: names of the mode queries; the last one used at test by default is "any".
    """

    def __init__(
        self,
        base_model: nn.Module,
        input_size: int = 1120,
        window_stride: Optional[int] = None,
        modes: Sequence[str] = RELEASE_MODES,
    ):
        super().__init__()
        config = base_model.config
        if not config.use_decoder_only_language_model:
            raise ValueError("OSM needs an InstructBLIP with a decoder-only LLM (Vicuna in the paper).")
        vision = config.vision_config
        self.base_model = base_model
        self.input_size = input_size
        self.window = vision.image_size  # each window at the ViT's pre-training size (Sec. 3.2)
        self.patch = vision.patch_size
        self.window_stride = window_stride or self.window
        if input_size % self.patch or self.window_stride % self.patch:
            raise ValueError(
                f"OSM input size {input_size} and window stride {self.window_stride} must be "
                f"multiples of the ViT patch size {self.patch}."
            )
        self.starts = window_starts(input_size, self.window, self.window_stride)
        self.grid = input_size // self.patch
        self.num_windows = len(self.starts) ** 2
        width = vision.hidden_size
        self.window_pos_embed = nn.Parameter(torch.randn(1, self.num_windows + self.grid**2, width))
        self.mask_query = nn.Parameter(base_model.query_tokens.detach().clone())
        self.context_query = base_model.query_tokens
        self.modes = list(modes)
        qformer_dim = config.qformer_config.hidden_size
        llm_dim = config.text_config.hidden_size
        self.qformer_mode_query = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(1, 1, qformer_dim)) for m in self.modes}
        )
        self.mode_query = nn.ParameterDict({m: nn.Parameter(torch.empty(1, 1, llm_dim)) for m in self.modes})
        for parameter in list(self.qformer_mode_query.values()) + list(self.mode_query.values()):
            nn.init.trunc_normal_(parameter, std=0.02)
        self.freeze()

    def freeze(self) -> None:
        """Train what the release trains: window position embedding, mask / context / mode
        queries, the Q-Former and the language projection; the ViT and the LLM stay frozen."""
        self.requires_grad_(False)
        for module in (self.base_model.qformer, self.base_model.language_projection):
            module.requires_grad_(True)
        for parameter in (self.window_pos_embed, self.mask_query, self.context_query):
            parameter.requires_grad_(True)
        self.qformer_mode_query.requires_grad_(True)
        self.mode_query.requires_grad_(True)

    @property
    def language_model(self) -> nn.Module:
        return self.base_model.language_model

    def mode_indices(self, modes: Sequence[str], device: torch.device) -> Tensor:
        unknown = sorted(set(modes) - set(self.modes))
        if unknown:
            raise KeyError(f"OSM has no mode query {unknown}; its modes are {self.modes}.")
        return torch.tensor([self.modes.index(m) for m in modes], device=device)

    # ------------------------------------------------------------------ image features
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] normalised pixels -> [B, windows + (S/patch)^2, width]: the frozen ViT
        on every window (no gradient), overlapping cells averaged, the windows' class tokens
        first, then the global window position embedding added (Sec. 3.2)."""
        batch, grid, patch, window = pixel_values.shape[0], self.grid, self.patch, self.window
        cells = window // patch
        boxes = [(y, x) for y in self.starts for x in self.starts]
        tiles = torch.cat([pixel_values[..., y : y + window, x : x + window] for y, x in boxes])
        vision = self.base_model.vision_model
        with torch.no_grad():
            tokens = vision.post_layernorm(
                vision.encoder(inputs_embeds=vision.embeddings(tiles))[0]
            ).view(len(boxes), batch, 1 + cells * cells, -1)
            width = tokens.shape[-1]
            features = tokens.new_zeros(batch, grid, grid, width)
            counts = tokens.new_zeros(1, grid, grid, 1)
            for (y, x), window_tokens in zip(boxes, tokens):
                cy, cx = y // patch, x // patch
                features[:, cy : cy + cells, cx : cx + cells] += window_tokens[:, 1:].view(batch, cells, cells, width)
                counts[:, cy : cy + cells, cx : cx + cells] += 1
            features = torch.cat([tokens[:, :, 0].transpose(0, 1), (features / counts).flatten(1, 2)], dim=1)
        return features + self.window_pos_embed

    def token_masks(self, masks: Tensor, context_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Pixel masks [B, S, S] -> which image tokens the mask / context queries may attend
        to ([B, windows + cells], 1 = attend): nearest resize to the feature grid; every
        window's class token is always visible (as released)."""
        size = (self.grid, self.grid)

        def tokens(m: Tensor) -> Tensor:
            cells = F.interpolate(m[:, None].float(), size=size, mode="nearest").flatten(1).long()
            return torch.cat([cells.new_ones(cells.shape[0], self.num_windows), cells], dim=1)

        return tokens(masks), tokens(context_masks)

    # ------------------------------------------------------------------ MaskQ-Former + LLM
    def maskq_former(
        self,
        image_embeds: Tensor,
        mask_tokens: Tensor,
        context_tokens: Tensor,
        modes: Tensor,
        qformer_input_ids: Tensor,
        qformer_attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Mask queries cross-attend to `mask_tokens`, context + mode queries to
        `context_tokens`; all of them and the instruction's Q-Former tokens share the
        self-attention (Fig. 4). Returns the mask-query outputs [B, Qm, C]."""
        batch = image_embeds.shape[0]
        mode_query = torch.cat([self.qformer_mode_query[m] for m in self.modes])[modes]
        queries = torch.cat(
            [self.mask_query.expand(batch, -1, -1), self.context_query.expand(batch, -1, -1), mode_query],
            dim=1,
        )
        num_mask = self.mask_query.shape[1]
        visible = torch.cat(
            [
                mask_tokens[:, None].expand(-1, num_mask, -1),
                context_tokens[:, None].expand(-1, queries.shape[1] - num_mask, -1),
            ],
            dim=1,
        )
        # additive per-query cross-attention bias (what InstructBLIP's Q-Former builds from a
        # 3-D encoder mask)
        cross_bias = (1.0 - visible[:, None].to(image_embeds.dtype)) * torch.finfo(image_embeds.dtype).min
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        attention = torch.cat([qformer_attention_mask.new_ones(queries.shape[:2]), qformer_attention_mask], dim=1)
        output = self.base_model.qformer(
            input_ids=qformer_input_ids,
            attention_mask=attention,
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=cross_bias,
        )[0]
        return output[:, :num_mask]

    def llm_inputs(
        self, mask_outputs: Tensor, modes: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """LLM input: projected mask-query outputs, the LLM mode query, then the text."""
        mode_query = torch.cat([self.mode_query[m] for m in self.modes])[modes]
        prefix = torch.cat([self.base_model.language_projection(mask_outputs), mode_query], dim=1)
        text = self.language_model.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        return torch.cat([prefix, text.to(prefix.dtype)], dim=1), attention

    def prefix_inputs(
        self,
        image_embeds: Tensor,
        masks: Tensor,
        context_masks: Tensor,
        modes: Tensor,
        qformer_input_ids: Tensor,
        qformer_attention_mask: Optional[Tensor],
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """LLM inputs_embeds + attention for pixel masks / context masks [B, S, S], mode
        indices [B], the instruction's Q-Former tokens and the LLM text tokens."""
        mask_tokens, context_tokens = self.token_masks(masks, context_masks)
        outputs = self.maskq_former(
            image_embeds, mask_tokens, context_tokens, modes, qformer_input_ids, qformer_attention_mask
        )
        return self.llm_inputs(outputs, modes, input_ids, attention_mask)

    def forward(self, *inputs: Optional[Tensor]):
        """The LLM's output (logits over prefix + text), one mask per row; `inputs` are
        those of `prefix_inputs`."""
        inputs_embeds, attention = self.prefix_inputs(*inputs)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention)

    @staticmethod
    def text_loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy over the text positions (the prefix carries no label),
        mean over the labelled tokens (-100 = ignored), as released."""
        logits = logits[:, -labels.shape[1] :]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention: Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: Optional[int],
    ) -> Tuple[Tensor, Tensor]:
        """Greedy decoding (Sec. 3.3, "greedy search decoding for testing") after the LLM
        inputs of `prefix_inputs`. Returns the new tokens [B, T] and per-step logits [B, T, V]."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id if pad_token_id is None else pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        output = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention, generation_config=config
        )
        return output.sequences[:, -len(output.scores) :], torch.stack(output.scores, dim=1)


def tokenize_padded(tokenizer, texts: Sequence[str], device: torch.device,
                    max_length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Right-padded ids + attention mask [len(texts), longest] (the tokenizer's special
    tokens added, as the release's InstructBlipProcessor does)."""
    encoded = [tokenizer(t, truncation=max_length is not None, max_length=max_length)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(e) for e in encoded)
    ids = torch.full((len(texts), length), pad, dtype=torch.long)
    attention = torch.zeros((len(texts), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        attention[row, : len(e)] = 1
    return ids.to(device), attention.to(device)


# ---------------------------------------------------------------------- loading
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def check_base_model_dir(path: str) -> None:
    """Fail naming every missing file of a local InstructBLIP directory in the Hugging Face
    layout (as `InstructBlipProcessor.save_pretrained` + `save_pretrained` write it)."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(
            f"cfg.MODEL.OSM.BASE_MODEL={path!r} is not a local directory; point it to an "
            "InstructBLIP folder in the Hugging Face layout (e.g. a local copy of "
            "Salesforce/instructblip-vicuna-7b). Nothing is downloaded."
        )
    missing = [f for f in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
               if not os.path.isfile(os.path.join(path, f))]
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not os.path.isfile(os.path.join(path, "qformer_tokenizer", "tokenizer_config.json")):
        missing.append("qformer_tokenizer/tokenizer_config.json")
    if missing:
        raise FileNotFoundError(
            f"cfg.MODEL.OSM.BASE_MODEL={path!r} lacks {missing}; it must hold the InstructBLIP "
            "config, weights, image-processor config, LLM tokenizer and the Q-Former tokenizer "
            "(subfolder qformer_tokenizer/)."
        )


def load_base_model(path: str):
    """(InstructBlipForConditionalGeneration, LLM tokenizer, Q-Former tokenizer, image
    processor config dict) from a local directory; never a hub name."""
    import json

    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

    check_base_model_dir(path)
    model = InstructBlipForConditionalGeneration.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    qformer_tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "qformer_tokenizer"), local_files_only=True)
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        image_processor = json.load(f)
    for key in ("image_mean", "image_std"):
        if key not in image_processor:
            raise KeyError(f"{path}/preprocessor_config.json has no {key!r}.")
    return model, tokenizer, qformer_tokenizer, image_processor


def _trained_names(model: nn.Module) -> Iterable[str]:
    """State-dict keys of what OSM trains (the release saves these, plus buffers)."""
    seen = {id(p) for p in model.parameters() if p.requires_grad}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            yield name


def load_released_checkpoint(model: OmniScient, path: str) -> Dict[str, List[str]]:
    """Load a released OSM checkpoint (`{"model_state_dict": {"module.<name>": tensor}}`,
    only the trained parameters and buffers, as `train/train.py` saves it) into `model`.

    Fails naming the keys when a trained parameter is missing or when a shape differs (a
    checkpoint of another base model, e.g. another ViT or LLM size). Keys the model does not
    have (buffers such as Q-Former `position_ids`) are ignored, as the release's
    `load_state_dict(..., False)` does. Returns the ignored keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cfg.MODEL.OSM.CHECKPOINT={path!r} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise KeyError(
            f"{path} is not a released OSM checkpoint: expected a dict with 'model_state_dict' "
            "(train/train.py's format); openseg checkpoints go to MODEL.WEIGHTS instead."
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["model_state_dict"].items()}
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{path} was trained on another base model than cfg.MODEL.OSM.BASE_MODEL (or with "
            f"another MODEL.OSM.INPUT_SIZE / WINDOW_STRIDE): shapes differ for {mismatched[:8]}"
            f"{' ...' if len(mismatched) > 8 else ''}."
        )
    missing = [k for k in _trained_names(model) if k not in state]
    if missing:
        raise KeyError(
            f"{path} lacks trained OSM parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f" ({len(missing)} in all); is it an OSM checkpoint with the modes {model.modes}?"
        )
    ignored = sorted(k for k in state if k not in own)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    logger.info(f"Loaded the released OSM checkpoint {path} ({len(ignored)} unused keys: {ignored[:5]})")
    return {"ignored": ignored}
