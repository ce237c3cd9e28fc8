"""Config keys of FC-CLIP (Yu et al. NeurIPS 2023)."""
import math

from detectron2.config import CfgNode as CN


def add_fcclip_config(cfg: CN) -> None:
    """cfg.MODEL.FC_CLIP: the classifiers and their geometric ensemble (Sec. 3.3); defaults
    are the release's (bytedance/fc-clip `add_fcclip_config` and its configs)."""
    cfg.MODEL.FC_CLIP = CN()
    # weight of the out-of-vocabulary (frozen CLIP) classifier for classes seen / unseen in
    # training: p = p_in^(1 - alpha) * p_out^alpha (seen), p_in^(1 - beta) * p_out^beta (unseen)
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA = 0.4
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA = 0.8
    # the release's ENSEMBLE_ON_VALID_MASK: queries whose mask is empty on the CLIP feature
    # grid keep the in-vocabulary probabilities (alpha = beta = 0); True in its ResNet-CLIP configs
    cfg.MODEL.FC_CLIP.ENSEMBLE_ON_VALID_MASK = False
    # class names and synonyms: "fcclip" = the release's lists where it has one for the dataset
    # (openseg/data/vocabularies/fcclip/, else the dataset's own synonyms); "" = always the
    # dataset's registered synonyms (openseg.data.vocab.get_vocabulary)
    cfg.MODEL.FC_CLIP.VOCABULARY = "fcclip"
    # how a test class counts as seen: "fcclip" (the release: one of its synonyms is, as an
    # exact string, a synonym of a training class; openseg.data.splits.exact_synonym_split),
    # "name_overlap" (openseg's normalised, plural-aware overlap, seen_unseen_split) or
    # "test_class_splits" (the test dataset's metadata `class_splits["seen"]`, e.g. the demo
    # data; the "fcclip" rule for test sets without one)
    cfg.MODEL.FC_CLIP.SEEN_CLASSES = "fcclip"
    # initial temperature of the in-vocabulary classifier (CLIP's initial logit scale)
    cfg.MODEL.FC_CLIP.LOGIT_SCALE_INIT = math.log(1 / 0.07)
