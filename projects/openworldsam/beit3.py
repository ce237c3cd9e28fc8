"""BEiT-3 early-fusion encoder of OpenWorldSAM (Xiao et al. 2025, Sec. 3.1 "Multi-modal encoder").

Tokens of the prompt and patch embeddings of the image downsampled to 224 x 224 are
concatenated and run through BEiT-3's multiway transformer; the first output token (the image
[CLS] token, which attended to every text token in all layers) is the prompt's vector
p_lang. The model is torchscale's `BEiT3` in the released sizes (BEiT-3-Large: 1024-d, 24
layers, 16 heads, FFN 4096, vocabulary 64010), its weights from the official checkpoint
(`torch.save({"model": ...})`, keys `beit3.*`, or `mm_extractor.beit3.*` inside EVF-SAM /
OpenWorldSAM checkpoints), its tokenizer the sentencepiece model `beit3.spm` with XLM-R's
fairseq id layout (<s>=0, <pad>=1, </s>=2, <unk>=3, piece id + 1), as the release's
`AutoTokenizer` (XLMRobertaTokenizer) does. Image preprocessing as the release's
`beit3_preprocess`: bicubic resize to 224 (tensor path, no antialiasing), then (x / 255 - 0.5) / 0.5.
"""
import logging
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vl_encoder import VL_ENCODER_REGISTRY, VisionLanguageEncoder

logger = logging.getLogger(__name__)

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1
# suffixes the release strips from COCO class names before prompting ("wall-other" -> "wall")
CLASS_NAME_SUFFIXES = ("-other", "-merged", "-stuff")


def class_prompt(name: str) -> str:
    """The release's class prompt: the class name without COCO's '-other' / '-merged' /
    '-stuff' suffixes."""
    for suffix in CLASS_NAME_SUFFIXES:
        name = name.replace(suffix, "")
    return name


class BEiT3Tokenizer:
    """sentencepiece `beit3.spm` with XLM-R's fairseq ids; <s> text </s>, truncated (with a
    warning) to `max_length` tokens as the release truncates to the tokenizer's limit."""

    def __init__(self, model_file: str, max_length: int, config_key: str = "TOKENIZER"):
        import sentencepiece

        if not model_file or not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"cfg.MODEL.OPENWORLDSAM.BEIT3.{config_key}={model_file!r} does not exist: point "
                "it to BEiT-3's sentencepiece model (beit3.spm from the BEiT-3 release, "
                "https://github.com/microsoft/unilm/tree/master/beit3)."
            )
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.max_length = max_length

    def encode(self, text: str) -> List[int]:
        ids = [p + FAIRSEQ_OFFSET if p != self.sp.unk_id() else UNK for p in self.sp.encode(text)]
        ids = [BOS] + ids + [EOS]
        if len(ids) > self.max_length:
            logger.warning(
                f"BEiT-3 prompt of {len(ids)} tokens truncated to {self.max_length} "
                f"(cfg.MODEL.OPENWORLDSAM.BEIT3.MAX_TEXT_LENGTH): {text[:80]!r}"
            )
            ids = ids[: self.max_length]
        return ids

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """[P, L] ids padded with <pad> (=1) to the longest prompt."""
        encoded = [self.encode(t) for t in texts]
        length = max((len(e) for e in encoded), default=1)
        ids = torch.full((len(encoded), length), PAD, dtype=torch.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.as_tensor(e, dtype=torch.int64)
        return ids


def beit3_state_dict(checkpoint: str) -> dict:
    """BEiT-3 weights of a local checkpoint with the `beit3.` / `mm_extractor.beit3.` prefix
    removed (official BEiT-3, EVF-SAM and OpenWorldSAM checkpoints all nest it so)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    weights = {}
    for prefix in ("mm_extractor.beit3.", "beit3."):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            break
    return weights


@VL_ENCODER_REGISTRY.register()
class BEiT3EarlyFusionEncoder(VisionLanguageEncoder):
    """The paper's encoder: BEiT-3 over [image patches ; prompt tokens], pooled [CLS].

    `image_context` is the preprocessed 224 x 224 image, `vocabulary_features` /
    `text_features` are padded token ids (image independent, so the vocabulary is tokenized
    once), and `fuse` runs BEiT-3 on the image with each prompt, `prompts_per_batch` at a time.
    """

    def __init__(
        self,
        beit3: nn.Module,
        tokenizer: BEiT3Tokenizer,
        image_size: int,
        prompts_per_batch: int,
    ):
        super().__init__()
        self.beit3 = beit3
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.prompts_per_batch = prompts_per_batch
        self.output_dim = beit3.args.encoder_embed_dim
        self._vocabulary_cache: dict = {}

    @staticmethod
    def build_beit3(cfg) -> nn.Module:
        """torchscale BEiT-3 with the release's encoder settings (multiway, no embedding
        layer norm, normalised output, no output layer) at the sizes of cfg BEIT3.*."""
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

        node = cfg.MODEL.OPENWORLDSAM.BEIT3
        args = EncoderConfig(
            img_size=node.IMAGE_SIZE, patch_size=node.PATCH_SIZE, vocab_size=node.VOCAB_SIZE,
            multiway=True, layernorm_embedding=False, normalize_output=True,
            no_output_layer=True, drop_path_rate=0.0, encoder_embed_dim=node.EMBED_DIM,
            encoder_attention_heads=node.HEADS, encoder_ffn_embed_dim=node.FFN_DIM,
            encoder_layers=node.LAYERS,
        )
        return BEiT3(args)

    @classmethod
    def from_config(cls, cfg) -> "BEiT3EarlyFusionEncoder":
        node = cfg.MODEL.OPENWORLDSAM.BEIT3
        beit3 = cls.build_beit3(cfg)
        if node.CHECKPOINT:
            if not os.path.isfile(node.CHECKPOINT):
                raise FileNotFoundError(
                    f"cfg.MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT={node.CHECKPOINT!r} does not exist: "
                    "point it to a local BEiT-3 checkpoint (e.g. beit3_large_patch16_224.pth) "
                    "or set it to '' for random initialisation."
                )
            weights = beit3_state_dict(node.CHECKPOINT)
            missing = sorted(set(beit3.state_dict()) - set(weights))
            if missing:
                raise KeyError(
                    f"cfg.MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT={node.CHECKPOINT!r} lacks "
                    f"{len(missing)} BEiT-3 weights (e.g. {missing[:3]}); check that its size "
                    "matches cfg.MODEL.OPENWORLDSAM.BEIT3.{EMBED_DIM, LAYERS, HEADS, FFN_DIM}."
                )
            beit3.load_state_dict({k: weights[k] for k in beit3.state_dict()})
            logger.info(f"Loaded BEiT-3 weights from {node.CHECKPOINT}")
        else:
            logger.warning(
                "BEiT-3 is randomly initialised: cfg.MODEL.OPENWORLDSAM.BEIT3.CHECKPOINT is empty"
            )
        max_length = min(node.MAX_TEXT_LENGTH, beit3.args.max_source_positions - 2)
        tokenizer = BEiT3Tokenizer(node.TOKENIZER, max_length)
        return cls(beit3, tokenizer, node.IMAGE_SIZE, node.PROMPTS_PER_BATCH)

    @property
    def device(self) -> torch.device:
        return self.beit3.text_embed.weight.device

    @torch.no_grad()
    def image_context(self, image: Tensor) -> Tensor:
        """[3, S, S]: bicubic resize of the 0-255 RGB image, scaled to [-1, 1]. No
        antialiasing: the release's torchvision `Resize(antialias=None)` on a tensor."""
        image = image.to(self.device, torch.float32)[None] / 255.0
        image = F.interpolate(
            image, size=(self.image_size, self.image_size), mode="bicubic",
            align_corners=False, antialias=False,
        )
        return ((image - 0.5) / 0.5)[0]

    def vocabulary_features(self, vocabulary: Sequence[Sequence[str]]) -> Tensor:
        """[C, L] token ids of each class's first name (suffixes stripped), cached."""
        names = tuple(class_prompt(synonyms[0]) for synonyms in vocabulary)
        if names not in self._vocabulary_cache:
            self._vocabulary_cache[names] = self.tokenizer(names)
        return self._vocabulary_cache[names].to(self.device)

    def text_features(self, texts: List[str]) -> Tensor:
        return self.tokenizer(texts).to(self.device)

    def trim(self, token_ids: Tensor) -> Tensor:
        """Drop columns that are padding in every row (prompts picked from a vocabulary)."""
        used = token_ids.ne(PAD).any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        return token_ids[:, :length]

    @torch.no_grad()
    def fuse(self, context: Tensor, prompt_features: Tensor) -> Tensor:
        """[P, D] BEiT-3 first-token outputs of the image with each of P tokenized prompts."""
        token_ids = self.trim(prompt_features)
        outputs = []
        for start in range(0, token_ids.shape[0], self.prompts_per_batch):
            ids = token_ids[start : start + self.prompts_per_batch]
            out = self.beit3(
                textual_tokens=ids,
                visual_tokens=context[None].expand(ids.shape[0], -1, -1, -1),
                text_padding_position=ids.eq(PAD),
            )
            outputs.append(out["encoder_out"][:, 0])
        if not outputs:
            return context.new_zeros((0, self.output_dim))
        return torch.cat(outputs).float()
