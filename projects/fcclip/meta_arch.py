"""FC-CLIP (Yu et al. NeurIPS 2023): a Mask2Former on a single frozen convolutional CLIP.

What is new with respect to `OpenSegMaskFormer` (Sec. 3), computed as the release
(bytedance/fc-clip) computes it where the paper is silent:
- the backbone is a frozen open_clip model (cfg.MODEL.CLIP.*, `build_openclip_backbone`);
- class text: one embedding per class name / synonym (FC-CLIP's synonym lists,
  `openseg/data/vocabularies/fcclip/`), the mean over the 14 ViLD templates as the release
  spells them (`FCCLIP_PROMPT_TEMPLATES`); a class's logit is the maximum over its synonyms;
- in-vocabulary classifier (Sec. 3.2): each query's decoder embedding plus the projected
  (LayerNorm + Linear) mean of the pixel-decoder mask features inside its binarised mask,
  through a 3-layer MLP into CLIP's space, against the text embeddings and a learned void
  embedding, with a learned temperature (replaces the decoder's `class_predictor`; the
  release runs it after every decoder layer, so deep supervision trains it);
- out-of-vocabulary classifier (test time only, Sec. 3.3): each mask bilinearly resized to
  the CLIP res5 grid, > 0; ConvNeXt CLIPs average res5 (after `norm_pre`) inside it, then
  the CLIP image head; ResNet CLIPs run their attention pool restricted to it
  (`OpenCLIPBackbone.embed_masks`); against the same text embeddings with CLIP's logit scale;
- geometric ensemble (Sec. 3.3) weighted by alpha for seen classes and beta for unseen
  ones; seen = the release's exact-synonym overlap with the training vocabulary, which also
  gives the test set's `class_splits` (PQ_seen / PQ_unseen).

Training uses the training dataset's vocabulary, testing the test dataset's
(cfg.DATASETS.TRAIN[0] / TEST[0]), so a new test vocabulary is a config change only.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import Tensor, nn

from openseg.data.splits import exact_synonym_split, seen_unseen_split, store_class_splits
from openseg.data.vocab import FCCLIP_PROMPT_TEMPLATES, Vocabulary, get_vocabulary, release_vocabulary
from openseg.modeling.backbones import OpenCLIPBackbone
from openseg.modeling.mask_decoder import MLP
from openseg.modeling.mask_pooling import binarised_masks, mask_pool
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.modeling.oracles import IMPOSSIBLE_LOGIT
from openseg.modeling.text import (
    OpenCLIPTextEncoder,
    class_embeddings,
    max_over_synonyms,
    synonym_counts,
    templates_from_config,
)

logger = logging.getLogger(__name__)

SEEN_CLASS_RULES = ("fcclip", "name_overlap", "test_class_splits")
# features FC-CLIP's out-of-vocabulary classifier pools (`OpenCLIPBackbone.pooling_features`)
CLIP_POOLING_FEATURES = "clip_pooling_features"


def geometric_ensemble(
    in_vocab_logits: Tensor, out_vocab_logits: Tensor, seen: Tensor, alpha: float, beta: float,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """FC-CLIP's ensemble of the two classifiers (Sec. 3.3).

    For class j of query i, with w = alpha if j was seen in training else beta:
    p_i(j) ∝ p_in,i(j)^(1 - w) * p_out,i(j)^w, renormalised over the K classes, then scaled
    by 1 - p_void,i of the in-vocabulary classifier, whose void probability is kept
    (the release's void filtering).

    Args:
        in_vocab_logits: [..., K+1] (last = void); out_vocab_logits: [..., K];
        seen: bool [K]; valid: optional bool [...] per query, False = keep the in-vocabulary
            probabilities (w = 0; the release's ENSEMBLE_ON_VALID_MASK).
    Returns:
        [..., K+1] log-probabilities: p_i(j) * (1 - p_void,i) for j < K, then p_void,i.
    """
    log_in = in_vocab_logits[..., :-1].float().log_softmax(-1)
    log_out = out_vocab_logits.float().log_softmax(-1)
    device = log_in.device
    weight = torch.where(
        seen.to(device), torch.tensor(alpha, device=device), torch.tensor(beta, device=device)
    )
    if valid is not None:
        weight = weight * valid.to(device)[..., None].float()
    probs = ((1 - weight) * log_in + weight * log_out).softmax(-1)
    void = in_vocab_logits.float().softmax(-1)[..., -1:]
    return torch.log(torch.cat([probs * (1 - void), void], dim=-1) + 1e-8)


class InVocabularyClassifier(nn.Module):
    """FC-CLIP's in-vocabulary head (Sec. 3.2, as released): mask-pooled pixel-decoder
    features -> LayerNorm + Linear, added to the query embedding, -> 3-layer MLP into CLIP's
    space; cosine similarity to every synonym embedding and a learned void embedding, times
    a learned logit scale (clamped at 100, as CLIP); max over each class's synonyms. Its
    vocabulary is set with `use_vocabulary`; it is not saved in checkpoints."""

    uses_masks = True  # the decoder passes (embeds, masks, mask_features)

    def __init__(self, hidden_dim: int, embed_dim: int, logit_scale_init: float):
        super().__init__()
        self.pooling_projection = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.projection = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.void_embedding = nn.Embedding(1, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.synonym_counts: List[int] = []

    def use_vocabulary(self, text_embeddings: Tensor, counts: Sequence[int]) -> None:
        """Classify into these [S, E] L2-normalised synonym embeddings from now on; class k
        owns `counts[k]` consecutive rows."""
        if sum(counts) != text_embeddings.shape[0]:
            raise ValueError(f"{text_embeddings.shape[0]} embeddings for {sum(counts)} synonyms")
        self.text_embeddings = text_embeddings
        self.synonym_counts = list(counts)

    def forward(self, embeds: Tensor, masks: Tensor, mask_features: Tensor) -> Tensor:
        """[B, N, D] query embeddings, [B, N, H, W] mask logits, [B, D, H, W] mask features ->
        [B, N, K+1] logits (last = void)."""
        if self.text_embeddings.shape[0] == 0:
            raise RuntimeError("InVocabularyClassifier: call use_vocabulary() before forward().")
        pooled = self.pooling_projection(mask_pool(mask_features, masks))
        queries = F.normalize(self.projection(pooled + embeds), dim=-1)
        classes = torch.cat(
            [self.text_embeddings.to(queries.dtype), F.normalize(self.void_embedding.weight, dim=-1)]
        )
        logits = self.logit_scale.exp().clamp(max=100.0) * queries @ classes.T
        return max_over_synonyms(logits, self.synonym_counts)


def fcclip_vocabulary(source: str, dataset_name: str) -> Vocabulary:
    """Synonym lists of `dataset_name`: the release's for `source` ("fcclip") when it has
    one, else the dataset's registered vocabulary."""
    if source:
        vocabulary = release_vocabulary(source, dataset_name)
        if vocabulary is not None:
            return vocabulary
        logger.info("No %s class-name file for %s: using its registered synonyms.", source, dataset_name)
    return get_vocabulary(dataset_name)


@META_ARCH_REGISTRY.register()
class FCCLIP(OpenSegMaskFormer):
    """FC-CLIP; inputs and outputs as `OpenSegMaskFormer`. Inference adds the frozen-CLIP
    out-of-vocabulary classifier and ensembles it with the in-vocabulary one."""

    @configurable
    def __init__(
        self,
        *,
        classifier: InVocabularyClassifier,
        train_vocabulary: Vocabulary,
        test_vocabulary: Vocabulary,
        prompt_templates: List[str],
        text_cache_dir: str,
        clip_pretrained_path: str,
        seen_classes: Tensor,
        ensemble_alpha: float,
        ensemble_beta: float,
        ensemble_on_valid_mask: bool = False,
        **kwargs,
    ):
        """
        Args:
            classifier: replaces the transformer decoder's `class_predictor`.
            train_vocabulary, test_vocabulary: synonym lists of the training / test classes.
            prompt_templates, text_cache_dir: how class text is embedded (openseg.modeling.text).
            clip_pretrained_path: checkpoint the CLIP was loaded from ("" = random init).
            seen_classes: bool [K_test], test classes seen in training.
            ensemble_alpha, ensemble_beta: out-of-vocabulary weights for seen / unseen classes.
            ensemble_on_valid_mask: queries with an empty mask on the CLIP grid are not ensembled.
            kwargs: `OpenSegMaskFormer` arguments; the backbone must be an `OpenCLIPBackbone`.
        """
        super().__init__(**kwargs)
        if not isinstance(self.backbone, OpenCLIPBackbone):
            raise TypeError(
                f"FC-CLIP needs a CLIP backbone (cfg.MODEL.BACKBONE.NAME = "
                f"'build_openclip_backbone'), got {type(self.backbone).__name__}."
            )
        for name, value in (("ALPHA", ensemble_alpha), ("BETA", ensemble_beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_{name}={value}: must be in [0, 1].")
        if seen_classes.shape != (len(test_vocabulary),):
            raise ValueError(
                f"seen_classes has shape {tuple(seen_classes.shape)}; expected one flag per "
                f"test class ({len(test_vocabulary)})."
            )
        self.transformer_decoder.class_predictor = classifier
        self.train_vocabulary, self.test_vocabulary = train_vocabulary, test_vocabulary
        self.prompt_templates, self.text_cache_dir = list(prompt_templates), text_cache_dir
        self.clip_pretrained_path = clip_pretrained_path
        self.register_buffer("train_text_embeddings", torch.zeros(0), persistent=False)
        self.register_buffer("test_text_embeddings", torch.zeros(0), persistent=False)
        self.refresh_text_embeddings()
        # a checkpoint may replace the CLIP weights (e.g. a random-init demo CLIP)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_text_embeddings())
        self.register_buffer("seen_classes", seen_classes.bool(), persistent=False)
        self.ensemble_alpha = ensemble_alpha
        self.ensemble_beta = ensemble_beta
        self.ensemble_on_valid_mask = ensemble_on_valid_mask

    def refresh_text_embeddings(self) -> None:
        """(Re)compute the synonym embeddings of both vocabularies from the current text tower
        (cached by openseg.modeling.text under the weights' identity)."""
        encoder = OpenCLIPTextEncoder.from_backbone(self.backbone, self.clip_pretrained_path)
        device = self.pixel_mean.device
        for name, vocabulary in (("train", self.train_vocabulary), ("test", self.test_vocabulary)):
            embeddings = class_embeddings(
                encoder, vocabulary, self.prompt_templates, self.text_cache_dir, device, per_name=True
            )
            setattr(self, f"{name}_text_embeddings", embeddings)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        if not cfg.MODEL.OPEN_VOCABULARY:
            raise ValueError(
                "FC-CLIP classifies with the test dataset's class names: set "
                "cfg.MODEL.OPEN_VOCABULARY True."
            )
        if cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC:
            raise ValueError("FC-CLIP is class-aware: set cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC False.")
        if not cfg.DATASETS.TRAIN:
            raise ValueError("FC-CLIP needs cfg.DATASETS.TRAIN: its vocabulary is the training one.")
        fc_clip = cfg.MODEL.FC_CLIP
        train_name = cfg.DATASETS.TRAIN[0]
        test_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else train_name
        train_vocabulary = fcclip_vocabulary(fc_clip.VOCABULARY, train_name)
        test_vocabulary = fcclip_vocabulary(fc_clip.VOCABULARY, test_name)

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(train_vocabulary)
        args = super().from_config(cfg)
        backbone = args["backbone"]
        if not isinstance(backbone, OpenCLIPBackbone):
            raise TypeError(
                f"FC-CLIP needs cfg.MODEL.BACKBONE.NAME = 'build_openclip_backbone', got "
                f"{cfg.MODEL.BACKBONE.NAME!r}."
            )
        seen_ids = cls.seen_test_classes(fc_clip.SEEN_CLASSES, train_vocabulary, test_vocabulary, test_name)
        seen = torch.zeros(len(test_vocabulary), dtype=torch.bool)
        seen[seen_ids] = True
        logger.info(
            "FC-CLIP: %d training classes (%s), %d test classes (%s), %d of them seen.",
            len(train_vocabulary), train_name, len(test_vocabulary), test_name, int(seen.sum()),
        )
        classifier = InVocabularyClassifier(
            cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            open_clip.get_model_config(cfg.MODEL.CLIP.MODEL_NAME)["embed_dim"],
            fc_clip.LOGIT_SCALE_INIT,
        )
        templates = (
            templates_from_config(cfg) if cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES
            else list(FCCLIP_PROMPT_TEMPLATES)
        )
        return {
            **args,
            "classifier": classifier,
            "train_vocabulary": train_vocabulary,
            "test_vocabulary": test_vocabulary,
            "prompt_templates": templates,
            "text_cache_dir": cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR,
            "clip_pretrained_path": cfg.MODEL.CLIP.PRETRAINED_PATH,
            "seen_classes": seen,
            "ensemble_alpha": fc_clip.GEOMETRIC_ENSEMBLE_ALPHA,
            "ensemble_beta": fc_clip.GEOMETRIC_ENSEMBLE_BETA,
            "ensemble_on_valid_mask": fc_clip.ENSEMBLE_ON_VALID_MASK,
        }

    @staticmethod
    def seen_test_classes(
        rule: str, train_vocabulary: Vocabulary, test_vocabulary: Vocabulary, test_name: str
    ) -> List[int]:
        """Contiguous ids of the test classes seen in training, by cfg.MODEL.FC_CLIP.SEEN_CLASSES.

        Under "fcclip" and "name_overlap" the split also becomes the test set's `class_splits`
        (so PQ_seen / PQ_unseen use the same classes as the ensemble), unless the dataset
        defines its own (e.g. LVIS-OW's known / seen / unseen)."""
        if rule not in SEEN_CLASS_RULES:
            raise ValueError(
                f"cfg.MODEL.FC_CLIP.SEEN_CLASSES={rule!r}: choose one of {SEEN_CLASS_RULES}."
            )
        meta = MetadataCatalog.get(test_name)
        splits = meta.get("class_splits", None)
        if rule == "test_class_splits":
            if splits and "seen" in splits:
                return list(splits["seen"])
            logger.info(
                "%s has no class_splits['seen'] (e.g. a command-line vocabulary): seen classes "
                "by FC-CLIP's synonym overlap instead.", test_name,
            )
            rule = "fcclip"
        split_of = exact_synonym_split if rule == "fcclip" else seen_unseen_split
        split = split_of(train_vocabulary, test_vocabulary)
        if not (splits and "known" in splits):
            store_class_splits(test_name, split, f"FC-CLIP's seen classes ({rule!r} rule)")
        return split["seen"]

    @property
    def classifier(self) -> InVocabularyClassifier:
        return self.transformer_decoder.class_predictor

    def forward_heads(self, features: Dict[str, Tensor]) -> Dict:
        """Decoder outputs with the training or test vocabulary; at test time also the frozen
        CLIP's features the out-of-vocabulary classifier pools (CLIP_POOLING_FEATURES)."""
        if self.training:
            self.classifier.use_vocabulary(self.train_text_embeddings, synonym_counts(self.train_vocabulary))
        else:
            self.classifier.use_vocabulary(self.test_text_embeddings, synonym_counts(self.test_vocabulary))
        outputs = super().forward_heads(features)
        if not self.training:
            outputs[CLIP_POOLING_FEATURES] = self.backbone.pooling_features(features)
        return outputs

    def embedding_logits(self, embeddings: Tensor) -> Tensor:
        """[..., E] CLIP image embeddings -> [..., K_test] logits: cosine similarity to every
        synonym with CLIP's own scale, max over synonyms."""
        embedded = F.normalize(embeddings, dim=-1)
        scale = self.backbone.clip_model.logit_scale.exp().clamp(max=100.0)
        logits = scale * embedded @ self.test_text_embeddings.to(embedded.dtype).T
        return max_over_synonyms(logits, synonym_counts(self.test_vocabulary))

    def clip_logits(self, pooled: Tensor) -> Tensor:
        """[..., C] vectors pooled from the CLIP features -> [..., K_test] logits through the
        CLIP image head (`embed_pooled`)."""
        return self.embedding_logits(self.backbone.embed_pooled(pooled))

    def out_of_vocabulary_logits(self, clip_features: Tensor, mask_logits: Tensor) -> Tensor:
        """[B, C, h, w] CLIP features, [B, Q, H, W] mask logits -> [B, Q, K] logits of each
        mask's region (binarised on the CLIP grid, then `embed_masks`: mean + CLIP head for
        ConvNeXt, the masked attention pool for ResNet)."""
        masks = binarised_masks(mask_logits, clip_features.shape[-2:]).to(clip_features.dtype)
        return self.embedding_logits(self.backbone.embed_masks(clip_features, masks))

    def postprocess(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Replace the class logits by the ensemble of both classifiers, then post-process
        (and apply oracles) as `OpenSegMaskFormer`."""
        clip_features = outputs[CLIP_POOLING_FEATURES]
        out_vocab = self.out_of_vocabulary_logits(clip_features, outputs["pred_masks"])
        valid = None
        if self.ensemble_on_valid_mask:
            resized = F.interpolate(
                outputs["pred_masks"], size=clip_features.shape[-2:], mode="bilinear", align_corners=False
            )
            valid = (resized > 0).flatten(2).any(-1)
        ensembled = geometric_ensemble(
            outputs["pred_logits"], out_vocab, self.seen_classes, self.ensemble_alpha,
            self.ensemble_beta, valid,
        )
        return super().postprocess({**outputs, "pred_logits": ensembled}, batched_inputs, images)

    def classify_masks(
        self, outputs: Dict, image_index: int, masks: Tensor, mask_cls: Tensor,
        mask_pred: Tensor, image_size: Tuple[int, int],
    ) -> Tensor:
        """The CLIP head on given masks (the segmentation oracle's classifier): `embed_masks`
        with each mask's coverage of every feature cell as weights (ConvNeXt: coverage-weighted
        mean, then the CLIP head; ResNet: attention pool weighted by coverage), against the test
        vocabulary. Returns [M, K+1] log-probabilities, no-object impossible."""
        features = outputs[CLIP_POOLING_FEATURES][image_index : image_index + 1]
        coverage = F.interpolate(masks[None].float(), size=features.shape[-2:], mode="area")
        embedded = self.backbone.embed_masks(features, coverage.to(features.dtype))
        logits = self.embedding_logits(embedded)[0].log_softmax(-1)
        void = logits.new_full((logits.shape[0], 1), IMPOSSIBLE_LOGIT)
        return torch.cat([logits, void], dim=-1).to(mask_cls.dtype)
