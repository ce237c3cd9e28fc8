"""Config keys of OSM (Yang et al., "Open-ended Semantic Segmentation with MLLMs"): cfg.MODEL.OSM."""

from detectron2.config import CfgNode as CN


def add_osm_config(cfg: CN) -> None:
    """Add cfg.MODEL.OSM: sliding-window CLIP, MaskQ-Former, frozen LLM and mask source."""
    osm = cfg.MODEL.OSM = CN()
    # local Hugging Face causal-LM directory (weights + tokenizer); nothing is downloaded
    osm.LLM_PATH = ""
    # high-resolution input: the longer side is resized to IMAGE_SIZE and padded to a square,
    # tiled by WINDOW_SIZE x WINDOW_SIZE windows, each at CLIP's native resolution
    osm.IMAGE_SIZE = 1024
    osm.WINDOW_SIZE = 256
    # MaskQ-Former (Sec. 3.2): shared weights for mask, context and mode queries
    osm.HIDDEN_DIM = 768
    osm.NUM_LAYERS = 6
    osm.NUM_HEADS = 8
    osm.DIM_FEEDFORWARD = 2048
    osm.NUM_MASK_QUERIES = 16
    osm.NUM_CONTEXT_QUERIES = 16
    osm.CONTEXT_RATIO = 0.5  # context queries see the mask's box enlarged by this ratio
    # mode query: one per training dataset (vocabulary-specific) plus a vocabulary-agnostic one
    osm.VOCABULARY_SPECIFIC = True
    # training: probability of the vocabulary-agnostic mode query instead of the dataset's own
    osm.AGNOSTIC_MODE_PROB = 0.5
    osm.TEST_MODE = ""  # a training dataset's name for its mode query at test; "" = agnostic
    # OPAL-style contrastive loss between mask embeddings and the LLM's class-name embedding
    osm.CONTRASTIVE_WEIGHT = 0.0
    osm.CONTRASTIVE_TEMPERATURE = 0.07
    osm.MAX_MASKS_PER_IMAGE = 32  # training: masks sampled per image
    osm.MAX_NEW_TOKENS = 8  # greedy decoding length limit
    # where test masks come from: "ground_truth" (needs TEST.ORACLE.SEGMENTATION so the mapper
    # keeps them) or "proposals" from a class-agnostic meta-architecture in the registry
    osm.MASK_SOURCE = "ground_truth"
    osm.PROPOSAL_CONFIG = ""  # YAML of the proposal model (e.g. class-agnostic MaskFormer)
    osm.PROPOSAL_WEIGHTS = ""
    osm.PROPOSAL_TOPK = 50
    # instruction templates with one "{mask}" each (training samples one per mask, testing uses
    # the first); empty = the 19 of projects/osm/templates.py
    osm.INSTRUCTION_TEMPLATES = []
