"""Class text embeddings for open-vocabulary classifiers.

A class is embedded as the mean of the L2-normalised text embeddings of every prompt
"template x synonym", renormalised: the prompt ensemble of CLIP (Radford et al. ICML 2021,
Sec. 3.1.4) and ViLD (Gu et al. ICLR 2022, Sec. 3.2). With ``per_name=True`` each synonym
gets its own embedding (its template mean) instead, and a classifier takes the maximum
logit over a class's synonyms (`max_over_synonyms`): how FC-CLIP's release (Yu et al.
NeurIPS 2023; bytedance/fc-clip `get_classification_logits`, after OpenSeg / ODISE) combines
names, synonyms and templates for its in- and out-of-vocabulary classifiers. Encoding hundreds of classes x
dozens of templates is slow with a large CLIP, and the result only depends on (encoder
weights, vocabulary, templates), so it is cached under that key in memory and, for encoders
whose weights come from a file, on disk.

Any object with `identity` (str), `persistent` (bool), `tokenize(texts)` and
`encode_text(tokens)` (L2-normalised [N, E]) is a text encoder here; `OpenCLIPTextEncoder`
wraps open_clip's, standalone or sharing the model of an `OpenCLIPBackbone`.
"""

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..data.vocab import PROMPT_TEMPLATES, Vocabulary, get_vocabulary, validate_vocabulary
from .backbones.clip import OpenCLIPBackbone, create_clip_model

logger = logging.getLogger(__name__)

VocabularyLike = Sequence[Union[str, Sequence[str]]]
CACHE_FORMAT = "openseg-text-embeddings-v2"


class OpenCLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower.

    Args:
        clip_model: an open_clip model (e.g. `OpenCLIPBackbone.clip_model`).
        tokenizer: open_clip tokenizer of that model.
        identity: names the weights, e.g. "<model name>@<checkpoint path>"; two encoders with
            the same identity must give the same embeddings. "" = a fingerprint of the text
            tower's current weights, recomputed on every access (random-init encoders, whose
            weights may later be replaced by a checkpoint's).
        persistent: whether `identity` stays valid across processes (weights read from a
            file); random-init encoders are not, so they are never cached on disk.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, identity: str, persistent: bool):
        super().__init__()
        self.clip_model = clip_model
        self.tokenizer = tokenizer
        self._identity = identity
        self.persistent = persistent

    @property
    def identity(self) -> str:
        if self._identity:
            return self._identity
        digest = hashlib.sha1()
        for name, param in self.clip_model.named_parameters():
            if not name.startswith("visual."):
                digest.update(param.detach().float().cpu().numpy().tobytes())
        return f"{type(self.clip_model).__name__}@weights:{digest.hexdigest()}"

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained_path: str = "") -> "OpenCLIPTextEncoder":
        """Build open_clip `model_name` and load `pretrained_path` ("" = random init).

        Unknown names and missing files raise naming them (see `create_clip_model`)."""
        import open_clip

        model = create_clip_model(model_name, pretrained_path).eval()
        for param in model.parameters():
            param.requires_grad = False
        return cls(
            model,
            open_clip.get_tokenizer(model_name),
            _weights_identity(model_name, pretrained_path),
            persistent=bool(pretrained_path),
        )

    @classmethod
    def from_backbone(
        cls, backbone: OpenCLIPBackbone, pretrained_path: str = ""
    ) -> "OpenCLIPTextEncoder":
        """Share the text tower of `backbone` (built from cfg.MODEL.CLIP.*); `pretrained_path`
        is the checkpoint it was loaded from ("" = random init)."""
        return cls(
            backbone.clip_model,
            backbone.tokenizer,
            _weights_identity(backbone.model_name, pretrained_path),
            persistent=bool(pretrained_path),
        )

    def tokenize(self, texts: List[str]) -> Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids [N, L] -> L2-normalised embeddings [N, E] on the model's device."""
        device = self.clip_model.logit_scale.device
        return self.clip_model.encode_text(tokens.to(device), normalize=True)


def _weights_identity(model_name: str, pretrained_path: str) -> str:
    """Checkpoints are identified by path, size and modification time; random weights by a
    fingerprint of their values ("", see `OpenCLIPTextEncoder`)."""
    if pretrained_path:
        stat = os.stat(pretrained_path)
        return f"{model_name}@{os.path.abspath(pretrained_path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return ""


def _as_vocabulary(vocabulary: VocabularyLike) -> Vocabulary:
    validate_vocabulary(vocabulary)
    return [[entry] if isinstance(entry, str) else list(entry) for entry in vocabulary]


def _check_templates(templates: Sequence[str]) -> List[str]:
    if len(templates) == 0:
        raise ValueError("Prompt templates are empty: give at least one, e.g. '{}' or 'a photo of a {}.'")
    for index, template in enumerate(templates):
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"Prompt template {index} ({template!r}) must contain exactly one '{{}}' "
                f"where the class name goes."
            )
    return list(templates)


def prompts(vocabulary: VocabularyLike, templates: Sequence[str]) -> Tuple[List[str], List[int]]:
    """All "template x synonym" texts of the vocabulary and the class index of each."""
    templates = _check_templates(templates)
    texts, owners = [], []
    for class_index, names in enumerate(_as_vocabulary(vocabulary)):
        for name in names:
            for template in templates:
                texts.append(template.format(name))
                owners.append(class_index)
    return texts, owners


def synonym_counts(vocabulary: VocabularyLike) -> List[int]:
    """Number of names of each class (the row groups of ``per_name`` embeddings)."""
    return [len(names) for names in _as_vocabulary(vocabulary)]


def max_over_synonyms(logits: Tensor, counts: Sequence[int]) -> Tensor:
    """[..., S (+ extra)] logits of every synonym -> [..., K (+ extra)]: the maximum over each
    class's `counts[k]` consecutive synonyms; columns after the S synonyms (e.g. a void
    logit) are kept as they are (FC-CLIP's release, `get_classification_logits`)."""
    total = sum(counts)
    if logits.shape[-1] < total:
        raise ValueError(f"{logits.shape[-1]} logit columns for {total} synonyms")
    groups = torch.split(logits[..., :total], list(counts), dim=-1)
    per_class = [group.max(dim=-1).values for group in groups]
    return torch.cat([torch.stack(per_class, dim=-1), logits[..., total:]], dim=-1)


def encode_vocabulary(
    encoder,
    vocabulary: VocabularyLike,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    per_name: bool = False,
) -> Tensor:
    """[K, E] class embeddings: mean of the normalised prompt embeddings of each class over
    its synonyms and templates, L2-normalised; with `per_name`, [S, E]: one such mean per
    synonym, over the templates only (no cache; see `ClassEmbeddingCache`)."""
    texts, owners = prompts(vocabulary, templates)
    if per_name:
        owners = [index // len(templates) for index in range(len(texts))]
    chunks = [
        encoder.encode_text(encoder.tokenize(texts[start : start + batch_size])).float()
        for start in range(0, len(texts), batch_size)
    ]
    embeddings = torch.cat(chunks)
    owner_index = torch.as_tensor(owners, device=embeddings.device)
    num_classes = int(owner_index.max()) + 1
    sums = embeddings.new_zeros(num_classes, embeddings.shape[1]).index_add_(0, owner_index, embeddings)
    return nn.functional.normalize(sums, dim=-1)


class ClassEmbeddingCache:
    """Class embeddings keyed by (encoder identity, vocabulary, templates).

    Args:
        cache_dir: folder for `<sha256 of the key>.pt` files shared between runs
            (cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR); "" keeps the cache in memory only. Only
            encoders with `persistent` identities are written to disk.
    """

    def __init__(self, cache_dir: str = ""):
        self.cache_dir = cache_dir
        self._memory: Dict[str, Tensor] = {}

    @staticmethod
    def key(encoder, vocabulary: VocabularyLike, templates: Sequence[str], per_name: bool = False) -> str:
        """A canonical JSON string of everything the embeddings depend on."""
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "encoder": encoder.identity,
                "vocabulary": _as_vocabulary(vocabulary),
                "templates": _check_templates(templates),
                "per_name": bool(per_name),
            },
            sort_keys=True,
        )

    def _path(self, key: str) -> str:
        return os.path.join(self.cache_dir, hashlib.sha256(key.encode()).hexdigest() + ".pt")

    def get(
        self,
        encoder,
        vocabulary: VocabularyLike,
        templates: Sequence[str] = PROMPT_TEMPLATES,
        device: Optional[torch.device] = None,
        per_name: bool = False,
    ) -> Tensor:
        """[K, E] (or [S, E] with `per_name`) float embeddings of `vocabulary` on `device`
        (default: CPU), computed once."""
        key = self.key(encoder, vocabulary, templates, per_name)
        embeddings = self._memory.get(key)
        use_disk = bool(self.cache_dir) and encoder.persistent
        if embeddings is None and use_disk:
            embeddings = self._load(key)
        if embeddings is None:
            embeddings = encode_vocabulary(encoder, vocabulary, templates, per_name=per_name).cpu()
            if use_disk:
                self._save(key, embeddings)
        self._memory[key] = embeddings
        return embeddings.to(device) if device is not None else embeddings.clone()

    def _load(self, key: str) -> Optional[Tensor]:
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or stored.get("key") != key:
            logger.warning("Ignoring text-embedding cache %s: written for a different key.", path)
            return None
        logger.info("Read class text embeddings from %s", path)
        return stored["embeddings"]

    def _save(self, key: str, embeddings: Tensor) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        path = self._path(key)
        temporary = f"{path}.{os.getpid()}.tmp"
        torch.save({"key": key, "embeddings": embeddings}, temporary)
        os.replace(temporary, path)  # atomic: concurrent workers never read half a file
        logger.info("Wrote class text embeddings to %s", path)


_SHARED_CACHES: Dict[str, ClassEmbeddingCache] = {}


def shared_cache(cache_dir: str = "") -> ClassEmbeddingCache:
    """The process-wide cache for `cache_dir`, so every model in a process shares embeddings."""
    if cache_dir not in _SHARED_CACHES:
        _SHARED_CACHES[cache_dir] = ClassEmbeddingCache(cache_dir)
    return _SHARED_CACHES[cache_dir]


def templates_from_config(cfg) -> List[str]:
    """cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES, or the shared `PROMPT_TEMPLATES` when empty."""
    configured = list(cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES)
    return _check_templates(configured) if configured else list(PROMPT_TEMPLATES)


def class_embeddings(
    encoder,
    vocabulary: VocabularyLike,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    cache_dir: str = "",
    device: Optional[torch.device] = None,
    per_name: bool = False,
) -> Tensor:
    """[K, E] embeddings of `vocabulary` (class names or synonym lists) through the shared
    cache for `cache_dir` ([S, E], one per synonym, with `per_name`). Duplicate or empty
    class names raise naming the entry."""
    return shared_cache(cache_dir).get(encoder, vocabulary, templates, device, per_name)


def dataset_class_embeddings(
    encoder,
    dataset_name: str,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    cache_dir: str = "",
    device: Optional[torch.device] = None,
) -> Tensor:
    """[K, E] embeddings of the registered vocabulary (`get_vocabulary`) of `dataset_name`."""
    return class_embeddings(encoder, get_vocabulary(dataset_name), templates, cache_dir, device)
