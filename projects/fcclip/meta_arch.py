"""FC-CLIP (Yu et al. NeurIPS 2023): a Mask2Former on a single frozen convolutional CLIP.

What is new with respect to `OpenSegMaskFormer` (Sec. 3):
- the backbone is a frozen open_clip model (cfg.MODEL.CLIP.*, `build_openclip_backbone`);
- in-vocabulary classifier: each query's decoder embedding, projected into CLIP's joint
  space, against the class text embeddings plus a learned void embedding, with a learned
  temperature (replaces the decoder's linear `class_predictor`, Sec. 3.2);
- out-of-vocabulary classifier (test time only): the frozen CLIP's dense features pooled
  inside each predicted mask, against the same text embeddings (Sec. 3.3);
- geometric ensemble of the two, weighted by alpha for classes seen in training and beta for
  unseen ones (Sec. 3.3, Eq. for c_hat_i).

Training uses the training dataset's vocabulary, testing the test dataset's
(cfg.DATASETS.TRAIN[0] / TEST[0], openseg.data.vocab.get_vocabulary), so a new test
vocabulary is a config or command-line change only.
"""
import logging
from typing import Dict, List, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import Tensor, nn

from openseg.data.splits import seen_unseen_split
from openseg.data.vocab import Vocabulary, get_vocabulary
from openseg.modeling.backbones import OpenCLIPBackbone
from openseg.modeling.mask_decoder import MLP
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.modeling.oracles import IMPOSSIBLE_LOGIT
from openseg.modeling.text import OpenCLIPTextEncoder, class_embeddings, templates_from_config

logger = logging.getLogger(__name__)

SEEN_CLASS_RULES = ("name_overlap", "test_class_splits")


def mask_pool(features: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of features inside each mask: [B, C, h, w], [B, Q, h, w] -> [B, Q, C].

    FC-CLIP pools with binary masks (weights 1 inside, 0 outside, Sec. 3.3); fractional
    weights (mask coverage of each feature cell) give area-weighted means. A mask with no
    weight pools to the zero vector."""
    total = weights.sum(dim=(-2, -1))
    pooled = torch.einsum("bchw,bqhw->bqc", features, weights.to(features.dtype))
    return pooled / (total[..., None].to(features.dtype) + 1e-8)


def geometric_ensemble(
    in_vocab_logits: Tensor, out_vocab_logits: Tensor, seen: Tensor, alpha: float, beta: float
) -> Tensor:
    """FC-CLIP's ensemble of the two classifiers (Sec. 3.3).

    For class j of query i, with w = alpha if j was seen in training else beta:
    p_i(j) ∝ p_in,i(j)^(1 - w) * p_out,i(j)^w, renormalised over the K classes; the no-object
    probability of the in-vocabulary classifier is kept.

    Args:
        in_vocab_logits: [..., K+1] (last = void); out_vocab_logits: [..., K];
        seen: bool [K].
    Returns:
        [..., K+1] log-probabilities: p_i(j) * (1 - p_void,i) for j < K, then p_void,i.
    """
    log_in = in_vocab_logits[..., :-1].float().log_softmax(-1)
    log_out = out_vocab_logits.float().log_softmax(-1)
    weight = torch.where(
        seen.to(log_in.device),
        torch.tensor(alpha, device=log_in.device),
        torch.tensor(beta, device=log_in.device),
    )
    probs = ((1 - weight) * log_in + weight * log_out).softmax(-1)
    void = in_vocab_logits.float().softmax(-1)[..., -1:]
    return torch.log(torch.cat([probs * (1 - void), void], dim=-1) + 1e-8)


class InVocabularyClassifier(nn.Module):
    """Decoder embedding -> CLIP space (3-layer MLP), cosine similarity to the class text
    embeddings and a learned void embedding, times a learned logit scale (clamped at 100, as
    CLIP). Its classes are set with `use_vocabulary`; they are not saved in checkpoints."""

    def __init__(self, hidden_dim: int, embed_dim: int, logit_scale_init: float):
        super().__init__()
        self.projection = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.void_embedding = nn.Embedding(1, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)

    def use_vocabulary(self, text_embeddings: Tensor) -> None:
        """Classify into these [K, E] L2-normalised class embeddings from now on."""
        self.text_embeddings = text_embeddings

    def forward(self, embeds: Tensor) -> Tensor:
        """[B, N, D] query embeddings -> [B, N, K+1] logits (last = void)."""
        if self.text_embeddings.shape[0] == 0:
            raise RuntimeError("InVocabularyClassifier: call use_vocabulary() before forward().")
        queries = F.normalize(self.projection(embeds), dim=-1)
        classes = torch.cat(
            [self.text_embeddings.to(queries.dtype), F.normalize(self.void_embedding.weight, dim=-1)]
        )
        return self.logit_scale.exp().clamp(max=100.0) * queries @ classes.T


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

    def refresh_text_embeddings(self) -> None:
        """(Re)compute the class embeddings of both vocabularies from the current text tower
        (cached by openseg.modeling.text under the weights' identity)."""
        encoder = OpenCLIPTextEncoder.from_backbone(self.backbone, self.clip_pretrained_path)
        device = self.pixel_mean.device
        for name, vocabulary in (("train", self.train_vocabulary), ("test", self.test_vocabulary)):
            embeddings = class_embeddings(
                encoder, vocabulary, self.prompt_templates, self.text_cache_dir, device
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
        train_vocabulary, test_vocabulary = get_vocabulary(train_name), get_vocabulary(test_name)

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
        seen = torch.zeros(len(test_vocabulary), dtype=torch.bool)
        seen[cls.seen_test_classes(fc_clip.SEEN_CLASSES, train_vocabulary, test_vocabulary, test_name)] = True
        logger.info(
            "FC-CLIP: %d training classes (%s), %d test classes (%s), %d of them seen.",
            len(train_vocabulary), train_name, len(test_vocabulary), test_name, int(seen.sum()),
        )
        classifier = InVocabularyClassifier(
            cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            open_clip.get_model_config(cfg.MODEL.CLIP.MODEL_NAME)["embed_dim"],
            fc_clip.LOGIT_SCALE_INIT,
        )
        return {
            **args,
            "classifier": classifier,
            "train_vocabulary": train_vocabulary,
            "test_vocabulary": test_vocabulary,
            "prompt_templates": templates_from_config(cfg),
            "text_cache_dir": cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR,
            "clip_pretrained_path": cfg.MODEL.CLIP.PRETRAINED_PATH,
            "seen_classes": seen,
            "ensemble_alpha": fc_clip.GEOMETRIC_ENSEMBLE_ALPHA,
            "ensemble_beta": fc_clip.GEOMETRIC_ENSEMBLE_BETA,
        }

    @staticmethod
    def seen_test_classes(rule: str, train_vocabulary, test_vocabulary, test_name: str) -> List[int]:
        """Contiguous ids of the test classes seen in training, by cfg.MODEL.FC_CLIP.SEEN_CLASSES:
        class-name overlap, or the test set's `class_splits["seen"]` when it has one."""
        if rule not in SEEN_CLASS_RULES:
            raise ValueError(
                f"cfg.MODEL.FC_CLIP.SEEN_CLASSES={rule!r}: choose one of {SEEN_CLASS_RULES}."
            )
        splits = MetadataCatalog.get(test_name).get("class_splits", None)
        if rule == "test_class_splits" and splits and "seen" in splits:
            return list(splits["seen"])
        if rule == "test_class_splits":
            logger.info(
                "%s has no class_splits['seen'] (e.g. a command-line vocabulary): seen classes "
                "by class-name overlap instead.", test_name,
            )
        return seen_unseen_split(train_vocabulary, test_vocabulary)["seen"]

    @property
    def classifier(self) -> InVocabularyClassifier:
        return self.transformer_decoder.class_predictor

    def forward_heads(self, features: Dict[str, Tensor]) -> Dict:
        """Decoder outputs with the training or test vocabulary; at test time also the frozen
        CLIP's dense features (``clip_dense_features`` [B, E, h, w])."""
        self.classifier.use_vocabulary(
            self.train_text_embeddings if self.training else self.test_text_embeddings
        )
        outputs = super().forward_heads(features)
        if not self.training:
            outputs["clip_dense_features"] = self.backbone.dense_clip_features(features)
        return outputs

    def clip_logits(self, pooled: Tensor) -> Tensor:
        """[..., E] pooled CLIP features -> [..., K_test] logits with CLIP's own scale."""
        scale = self.backbone.clip_model.logit_scale.exp().clamp(max=100.0)
        return scale * F.normalize(pooled.float(), dim=-1) @ self.test_text_embeddings.T

    def out_of_vocabulary_logits(self, dense_features: Tensor, mask_logits: Tensor) -> Tensor:
        """[B, E, h, w] CLIP features, [B, Q, H, W] mask logits -> [B, Q, K] logits of the
        features averaged inside each binarised mask (resized to the feature grid)."""
        resized = F.interpolate(
            mask_logits, size=dense_features.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.clip_logits(mask_pool(dense_features, (resized > 0).to(dense_features.dtype)))

    def postprocess(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Replace the class logits by the ensemble of both classifiers, then post-process
        (and apply oracles) as `OpenSegMaskFormer`."""
        out_vocab = self.out_of_vocabulary_logits(outputs["clip_dense_features"], outputs["pred_masks"])
        ensembled = geometric_ensemble(
            outputs["pred_logits"], out_vocab, self.seen_classes, self.ensemble_alpha,
            self.ensemble_beta,
        )
        return super().postprocess({**outputs, "pred_logits": ensembled}, batched_inputs, images)

    def classify_masks(
        self, outputs: Dict, image_index: int, masks: Tensor, mask_cls: Tensor,
        mask_pred: Tensor, image_size: Tuple[int, int],
    ) -> Tensor:
        """The CLIP head on given masks (the segmentation oracle's classifier): dense CLIP
        features averaged with each mask's coverage of every feature cell, against the test
        vocabulary. Returns [M, K+1] log-probabilities, no-object impossible."""
        dense = outputs["clip_dense_features"][image_index : image_index + 1]
        coverage = F.interpolate(masks[None].float(), size=dense.shape[-2:], mode="area")
        logits = self.clip_logits(mask_pool(dense, coverage))[0].log_softmax(-1)
        void = logits.new_full((logits.shape[0], 1), IMPOSSIBLE_LOGIT)
        return torch.cat([logits, void], dim=-1).to(mask_cls.dtype)
