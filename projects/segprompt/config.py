"""Config keys of SegPrompt (Zhu et al. ICCV 2023), under cfg.MODEL.SEGPROMPT.

Defaults are the paper's main setting and, where the paper is silent, the release's
(`configs/lvis_ow/segprompt_lvisow.yaml` over `mask2former/config.py`); the ablation switches
reproduce Tables 5-7 and are listed in projects/segprompt/README.md.
"""

from detectron2.config import CfgNode as CN

# Table 5: "None", "Vanilla M2F", "Ours" (= segprompt)
AUXILIARY_MODES = ("segprompt", "vanilla_m2f", "none")
# classes the random negative prompt groups are drawn from (Sec. 3.4)
NEGATIVE_POOLS = ("all", "known")
# Table 7, rows 1-4
PROMPT_ATTENTIONS = (
    "SelfAttn",
    "SelfAttn_independent",
    "RefAttn_inter_class_visible",
    "RefAttn_inter_class_invisible",
)


def add_segprompt_config(cfg: CN) -> None:
    """Add cfg.MODEL.SEGPROMPT (read by `SegPromptMaskFormer.from_config`)."""
    sp = cfg.MODEL.SEGPROMPT = CN()
    # "segprompt": prompt-extraction + prompt-based prediction branches (the method);
    # "vanilla_m2f": a parallel class-aware Mask2Former branch sharing every weight but its
    # class head (Table 5 "Vanilla M2F"); "none": the class-agnostic baseline (Table 5 "None")
    sp.AUXILIARY = "segprompt"
    # prompt-extraction branch (Sec. 3.3): at most 5 example queries per image
    sp.MAX_EXAMPLES_PER_IMAGE = 5
    # example supervision (Sec. 3.3): every example query's class ("object") and mask against
    # its own ground truth at every decoder level, baseline loss weights; False = Table 5 "Ours*"
    sp.EXAMPLE_SUPERVISION = True
    # prompt cache momentum m (Eq. 5)
    sp.CACHE_MOMENTUM = 0.9
    # prompt-based prediction branch (Sec. 3.4, Sec. 5.3): C_max = 30 classes per image,
    # K = 10 queries per class (the release's NUM_OPEN_QUERIES 300 / QUERY_REPEAT 10)
    sp.MAX_PROMPT_CLASSES = 30
    sp.QUERIES_PER_CLASS = 10
    # random negative classes (Sec. 3.4, "uniformly selected from all negative classes"):
    # "all" = every class of the training set's vocabulary absent from the image (release:
    # `in_voc_id_set | out_voc_id_set`, all 1203 LVIS classes on LVIS-OW, most of them not
    # known, with prompt-cache rows that stay zero); "known" = the known classes only
    sp.NEGATIVE_POOL = "all"
    # multipliers of the class / mask / dice weights for the prompt-based (and vanilla_m2f)
    # branch's losses (release OPEN_BRANCH_WEIGHT)
    sp.PROMPT_BRANCH_WEIGHT = [1.0, 1.0, 1.0]
    # known instances whose mask has at most this many pixels (at the training input size) are
    # left out of the example queries, the positive classes and the baseline's targets; the
    # prompt branch's matching and loss still see them, as released (release MIN_MASK_AREA)
    sp.MIN_MASK_AREA = 100
    # Eq. 6, v_ck = p_c + r_k + s_c: False drops p_c ("w/o p") or s_c ("w/o s"), Table 6
    sp.USE_PROMPT = True
    sp.USE_CLASS_EMBEDDING = True
    # p_c enters Eq. 6 as is (release EXAMPLE_QUERY_PROJ False); True: a linear layer each for
    # content and positional embedding
    sp.PROMPT_PROJECTION = False
    # r_k of Eq. 6: "baseline_queries" = the baseline's learnable queries at K random distinct
    # indices per class group (release default); "learned" = K embeddings of its own
    # (release ADDTIONAL_QUERY)
    sp.RANK_EMBEDDING = "baseline_queries"
    # self-attention of the prompt queries, Table 7 rows 1-4 (see README); the default is RefAttn
    sp.PROMPT_ATTENTION = "RefAttn_inter_class_invisible"
