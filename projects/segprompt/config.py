"""Config keys of SegPrompt (Zhu et al. ICCV 2023), under cfg.MODEL.SEGPROMPT.

Defaults follow the paper's main setting (Sec. 3-4); the ablation switches reproduce the
component, query-initialisation and attention ablations (Tables 5-7) and are documented
key by key in projects/segprompt/README.md.
"""

from detectron2.config import CfgNode as CN

AUXILIARY_MODES = ("segprompt", "vanilla", "none")
PROMPT_ATTENTIONS = ("reference", "self", "shared")


def add_segprompt_config(cfg: CN) -> None:
    """Add cfg.MODEL.SEGPROMPT (read by `SegPromptMaskFormer.from_config`)."""
    sp = cfg.MODEL.SEGPROMPT = CN()
    # "segprompt": prompt-extraction + prompt-based prediction branches (the method);
    # "vanilla": a class-aware Mask2Former classification head on the baseline queries as the
    # only auxiliary task (Table 5, "vanilla M2F auxiliary"); "none": the class-agnostic baseline
    sp.AUXILIARY = "segprompt"
    # prompt-extraction branch (Sec. 3.2): example queries per image, distinct classes first
    sp.MAX_EXAMPLES_PER_IMAGE = 5
    # weight of the example supervision: each example query's mask against its own ground
    # truth (BCE + dice, scaled by MASK_WEIGHT / DICE_WEIGHT); 0 disables it (Table 5)
    sp.EXAMPLE_MASK_WEIGHT = 1.0
    # prompt cache: one vector per known class, p_c <- m * p_c + (1 - m) * mean example feature
    sp.CACHE_MOMENTUM = 0.9
    # prompt-based prediction branch (Sec. 3.3): C_max classes per image (positives first,
    # negatives sampled uniformly among absent known classes), K queries per class; 30 x 10
    # = the 300 prompt queries of the authors' released LVIS-OW config
    sp.MAX_PROMPT_CLASSES = 30
    sp.QUERIES_PER_CLASS = 10
    # weight of the whole prompt-based prediction branch's losses
    sp.PROMPT_BRANCH_WEIGHT = 1.0
    # query initialisation p_c + r_k + s_c (Table 6): False drops the cached prompt p_c
    # ("w/o p") or the learnable class embedding s_c ("w/o s")
    sp.USE_PROMPT = True
    sp.USE_CLASS_EMBEDDING = True
    # self-attention of a class group (Table 7): "reference" = baseline queries + its own
    # group; "self" = its own group only; "shared" = one group for all classes (classes see
    # each other, the "SelfAttn" variant)
    sp.PROMPT_ATTENTION = "reference"
    # intra-class matching: "many_to_one" (every query of a present class is matched, each
    # ground truth at least once) or "one_to_one" (Hungarian inside each class)
    sp.MATCHING = "many_to_one"
