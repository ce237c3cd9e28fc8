"""Config keys of FC-CLIP (Yu et al. NeurIPS 2023)."""
import math

from detectron2.config import CfgNode as CN


def add_fcclip_config(cfg: CN) -> None:
    """cfg.MODEL.FC_CLIP: the classifiers and their geometric ensemble (Sec. 3.3)."""
    cfg.MODEL.FC_CLIP = CN()
    # weight of the out-of-vocabulary (frozen CLIP) classifier for classes seen / unseen in
    # training: p = p_in^(1 - alpha) * p_out^alpha (seen), p_in^(1 - beta) * p_out^beta (unseen)
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA = 0.4
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA = 0.8
    # how a test class counts as seen: "name_overlap" (one of its names matches a training
    # class name, openseg.data.splits.seen_unseen_split) or "test_class_splits" (the test
    # dataset's metadata `class_splits["seen"]`, e.g. the demo data whose training vocabulary
    # names classes that never occur in training images; name overlap for test sets without one)
    cfg.MODEL.FC_CLIP.SEEN_CLASSES = "name_overlap"
    # initial temperature of the in-vocabulary classifier (CLIP's initial logit scale)
    cfg.MODEL.FC_CLIP.LOGIT_SCALE_INIT = math.log(1 / 0.07)
