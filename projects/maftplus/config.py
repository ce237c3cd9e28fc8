"""Config keys of MAFT+ (Jiao et al. ECCV 2024). Defaults are the released values
(jiaosiyu1999/MAFT-Plus, `maft/config.py` and `configs/`); the paper is not in openseg's
paper set, so the release is the specification."""
from detectron2.config import CfgNode as CN


def add_maftplus_config(cfg: CN) -> None:
    """cfg.MODEL.MAFT_PLUS: content-dependent transfer and the two extra training losses."""
    cfg.MODEL.MAFT_PLUS = CN()
    # heads of the content-dependent transfer's cross-attention (release: cdt_params[1]); its
    # width is the CLIP embedding width (release: cdt_params[0], 768 for ConvNeXt-L)
    cfg.MODEL.MAFT_PLUS.CDT_NUM_HEADS = 8
    # residual form of the transfer: False = norm(t + W a), True = t + norm(W a) with W
    # zero-initialised. The release ties it to MODEL.MASK_FORMER.TEST.PANOPTIC_ON at build
    # time (its panoptic checkpoint uses True, its semantic ones False)
    cfg.MODEL.MAFT_PLUS.CDT_NORM_ON_UPDATE = False
    # the image embeddings the transfer attends to: True = as released, the [B, C, h, w] CLIP
    # map reshaped to [B*h*w, C] without moving channels last (each "pixel" is C consecutive
    # values of the channel-major buffer); False = each position's own channel vector
    cfg.MODEL.MAFT_PLUS.CDT_RELEASE_PIXEL_LAYOUT = True
    # weight of the representation-compensation loss (release: MODEL.rc_weights, 0.1 in every
    # released config)
    cfg.MODEL.MAFT_PLUS.RC_LOSS_WEIGHT = 0.1
    # pooling scales of its spatial descriptor (release: Representation_Compensation default)
    cfg.MODEL.MAFT_PLUS.RC_POOL_SCALES = [1, 2, 4]
    # weight of the mask-aware loss (release: added unweighted)
    cfg.MODEL.MAFT_PLUS.MA_LOSS_WEIGHT = 1.0
