"""Config keys of OpenWorldSAM (Xiao et al., "OpenWorldSAM: Extending SAM2 for Universal Image
Segmentation with Language Prompts", NeurIPS 2025). Defaults are the paper's / release's
values (Sec. 3, App. A; the release's `configs/coco/panoptic-segmentation/
Open-World-SAM2-CrossAttention.yaml`)."""
from detectron2.config import CfgNode as CN


def add_openworldsam_config(cfg: CN) -> None:
    """Add cfg.MODEL.OPENWORLDSAM.

    Shared keys it also reads: MODEL.CLIP.{MODEL_NAME, PRETRAINED_PATH} and
    MODEL.TEXT_EMBEDDING.* (only for the optional open_clip late-fusion encoder),
    MODEL.MASK_FORMER.TEST.{SEMANTIC_ON, INSTANCE_ON, PANOPTIC_ON} (which outputs).
    """
    node = cfg.MODEL.OPENWORLDSAM = CN()
    # SAM2 architecture: a hydra config name of the installed `sam2` package. The release
    # uses SAM2 (not 2.1) Hiera-L: sam2_hiera_large.pt
    node.SAM2_CONFIG = "configs/sam2/sam2_hiera_l.yaml"
    # local SAM2 / SAM2.1 checkpoint (the official .pt with a "model" key); "" = random init
    node.SAM2_CHECKPOINT = ""
    # square input side of SAM2 (1024 in the paper: 64x64 image embeddings); multiple of 32
    node.SAM2_IMAGE_SIZE = 1024
    # frozen vision-language encoder, a name in VL_ENCODER_REGISTRY (BEiT-3 early fusion as
    # the paper; "OpenCLIPLateFusionEncoder" is the Table 4 CLIP late-fusion ablation)
    node.VL_ENCODER = "BEiT3EarlyFusionEncoder"

    node.BEIT3 = CN()
    # local BEiT-3 checkpoint ({"model": {"beit3.*": ...}}, e.g. beit3_large_patch16_224.pth);
    # "" = random init (logged)
    node.BEIT3.CHECKPOINT = ""
    # BEiT-3's sentencepiece model (beit3.spm); required
    node.BEIT3.TOKENIZER = ""
    # BEiT-3-Large (the release's `_get_large_config`)
    node.BEIT3.EMBED_DIM = 1024
    node.BEIT3.LAYERS = 24
    node.BEIT3.HEADS = 16
    node.BEIT3.FFN_DIM = 4096
    node.BEIT3.VOCAB_SIZE = 64010
    node.BEIT3.PATCH_SIZE = 16
    # image side seen by BEiT-3 (224 in the paper, Sec. 4 "Implementation")
    node.BEIT3.IMAGE_SIZE = 224
    # longest prompt in tokens incl. <s> and </s> (XLM-R tokenizer limit); longer prompts are
    # truncated with a warning
    node.BEIT3.MAX_TEXT_LENGTH = 512
    # (image, prompt) pairs per BEiT-3 call (bounds memory for large vocabularies)
    node.BEIT3.PROMPTS_PER_BATCH = 64

    # two-layer MLP from p_lang to SAM2's 256-d prompt space (hidden = BEiT-3-L width)
    node.PROJECTOR_HIDDEN_DIM = 1024
    # K positional tie-breakers: K queries (and K masks) per language prompt
    node.NUM_TIE_BREAKERS = 20
    # soft-prompting transformer (3 pre-norm layers, 8 heads, MLP 4 x 256, dropout 0.1)
    node.SOFT_PROMPT_LAYERS = 3
    node.NHEADS = 8
    node.DIM_FEEDFORWARD = 1024
    node.DROPOUT = 0.1
    # SAM2 sparse tokens of each mask: "released" (the release's broadcast: mask i sees
    # q_i + T(q)_j for every query j of the image) or "per_query" (paper: q_i + T(q)_i)
    node.PROMPT_TOKENS = "released"
    # at most this many classes of an image are prompted per training step (release: 6)
    node.MAX_TRAIN_PROMPTS = 6
    # loss and matching cost weights (release: focal x 20, dice x 0; App. A.1 "focal loss")
    node.MASK_WEIGHT = 20.0
    node.DICE_WEIGHT = 0.0
    node.FOCAL_ALPHA = 0.25
    node.FOCAL_GAMMA = 2.0
    # sparse prompt tokens per SAM2 mask-decoder call (bounds memory; a call decodes at least
    # one mask; with PROMPT_TOKENS "released" every mask carries P x K tokens)
    node.DECODER_CHUNK_SIZE = 512

    node.TEST = CN()
    # "oracle" (Oracle-Prompts, the paper's default, Sec. 4.1): the classes in the image's
    # ground truth; "global" (Global-Matching): every class of the test vocabulary
    node.TEST.PROMPTS = "oracle"
    # masks need SAM2's estimated IoU >= SCORE_THRESHOLD (instance), > (panoptic) (App. A.2)
    node.TEST.SCORE_THRESHOLD = 0.7
    # NMS IoU threshold of the instance (box) and panoptic (mask, per class) outputs (App. A.2)
    node.TEST.NMS_THRESHOLD = 0.5
    # instance output: keep only the TOPK highest-scoring masks before thresholding (0 = off,
    # the release's TOP_K_ON False)
    node.TEST.TOPK = 0
    # panoptic: a mask keeps its pixels only if they are >= this fraction of its own mask
    node.TEST.OVERLAP_THRESHOLD = 0.5
    # second mask-decoder pass with each first-stage mask (score >= SCORE_THRESHOLD) as
    # SAM2's dense mask prompt ("+ two-stage inference", Table 1)
    node.TEST.TWO_STAGE_REFINEMENT = False
