"""Config keys of OpenWorldSAM (Xiao et al., "OpenWorldSAM: Extending SAM2 for Universal Image
Segmentation with Language Prompts", 2025). Defaults are the paper's dimensions (Sec. 3)."""
from detectron2.config import CfgNode as CN


def add_openworldsam_config(cfg: CN) -> None:
    """Add cfg.MODEL.OPENWORLDSAM.

    Shared keys it also reads: MODEL.CLIP.{MODEL_NAME, PRETRAINED_PATH} (the open_clip
    late-fusion encoder), MODEL.TEXT_EMBEDDING.* (class-name embeddings and their cache),
    MODEL.MASK_FORMER.TEST.{SEMANTIC_ON, INSTANCE_ON, PANOPTIC_ON, OVERLAP_THRESHOLD,
    DETECTIONS_PER_IMAGE} (which outputs, panoptic overlap rule, max instances).
    """
    node = cfg.MODEL.OPENWORLDSAM = CN()
    # SAM2 architecture: a hydra config name of the installed `sam2` package
    node.SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"
    # local SAM2 checkpoint (the official .pt with a "model" key); "" = random init (logged)
    node.SAM2_CHECKPOINT = ""
    # square input side of SAM2 (1024 in the paper: 64x64 image embeddings); multiple of 32
    node.SAM2_IMAGE_SIZE = 1024
    # frozen vision-language encoder, a name in VL_ENCODER_REGISTRY
    node.VL_ENCODER = "OpenCLIPLateFusionEncoder"
    # two-layer MLP from the fused vision-language vector to SAM2's 256-d prompt space
    node.PROJECTOR_HIDDEN_DIM = 1024
    # K positional tie-breakers: K queries (and K masks) per language prompt
    node.NUM_TIE_BREAKERS = 20
    # soft-prompting transformer: self-attention among the K queries, cross-attention to
    # SAM2's image embeddings, feed-forward
    node.SOFT_PROMPT_LAYERS = 3
    node.NHEADS = 8
    node.DIM_FEEDFORWARD = 1024
    node.DROPOUT = 0.0
    # losses on the Hungarian-matched masks of each prompt (SAM's 20:1 focal:dice)
    node.FOCAL_WEIGHT = 20.0
    node.DICE_WEIGHT = 1.0
    node.FOCAL_ALPHA = 0.25
    node.FOCAL_GAMMA = 2.0
    # points per mask for matching costs and losses (uncertainty-biased, as Mask2Former)
    node.TRAIN_NUM_POINTS = 112 * 112
    node.OVERSAMPLE_RATIO = 3.0
    node.IMPORTANCE_SAMPLE_RATIO = 0.75
    # (prompt, query) pairs per SAM2 mask-decoder call at test time (bounds memory)
    node.DECODER_CHUNK_SIZE = 512

    node.TEST = CN()
    # "global": every class of the test vocabulary is a prompt; "oracle": only the classes in
    # the image's ground truth (segments_info / instances of the test input)
    node.TEST.PROMPTS = "global"
    # instances / panoptic segments need SAM2's predicted IoU >= SCORE_THRESHOLD
    node.TEST.SCORE_THRESHOLD = 0.7
    # class-wise box NMS IoU threshold of the instance output
    node.TEST.NMS_THRESHOLD = 0.5
    # second mask-decoder pass with each first-stage mask as SAM2's dense mask prompt
    node.TEST.TWO_STAGE_REFINEMENT = False
