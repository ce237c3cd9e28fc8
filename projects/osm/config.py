"""Config keys of OSM (Yu, Shen and Chen, "Towards Open-Ended Visual Recognition with Large
Language Model", ECCV 2024): cfg.MODEL.OSM. Defaults are the paper's final model (Sec. 4,
"Settings for Final Models") or, where the paper is silent, the release's."""

from detectron2.config import CfgNode as CN

from .omniscient import RELEASE_MODES


def add_osm_config(cfg: CN) -> None:
    """Add cfg.MODEL.OSM (model, modes, templates, decoding, mask sources, OPAL)."""
    osm = cfg.MODEL.OSM = CN()
    # local InstructBLIP directory in the Hugging Face layout (config, weights,
    # preprocessor_config.json, LLM tokenizer, qformer_tokenizer/); never a hub name.
    # The paper: InstructBLIP with EVA-ViT-g/224 + Vicuna-7B (Sec. 4).
    osm.BASE_MODEL = ""
    # a released OSM checkpoint (osm_final.pt, ...: {"model_state_dict": ...}); "" = none.
    # openseg's own checkpoints load through MODEL.WEIGHTS.
    osm.CHECKPOINT = ""
    # square padded input: 1120 final model, 896 ablations (Sec. 4); windows are the ViT's
    # own input size (224), stride = window by default (Tab. 2b)
    osm.INPUT_SIZE = 1120
    osm.WINDOW_STRIDE = 0  # 0 = the ViT's input size
    # context queries see the mask's box enlarged by this ratio per side (Tab. 2d; final
    # model 0.5); a negative value = the whole image (the ablations' default)
    osm.CONTEXT_RATIO = 0.5
    # mode queries (Sec. 3.2): names in the release's order; AGNOSTIC_MODE ("any") is the
    # vocabulary-agnostic one; DATASET_MODES maps training datasets to their own mode as
    # "dataset_name:mode" strings; TEST_MODE picks the mode at test
    osm.MODES = list(RELEASE_MODES)
    osm.AGNOSTIC_MODE = "any"
    osm.DATASET_MODES = []
    osm.TEST_MODE = "any"
    # instruction templates (Table 4); training samples one, testing uses TEST_TEMPLATE
    osm.INSTRUCTION_TEMPLATES = []  # [] = the 19 of Table 4 (projects/osm/templates.py)
    osm.TEST_TEMPLATE = 0
    osm.MAX_TEXT_TOKENS = 32  # training text truncation (release train/data.py max_tokens)
    osm.MAX_NEW_TOKENS = 12  # greedy decoding (release test/generate_pred.py)
    osm.MIN_TRAIN_MASK_AREA = 100  # training masks need more pixels at INPUT_SIZE (release)
    osm.TEST_MASKS_PER_BATCH = 16  # masks decoded together (memory bound only)
    # where test masks come from: "ground_truth" (TEST.ORACLE.SEGMENTATION keeps them),
    # "proposals" (a class-agnostic meta-architecture: PROPOSAL_CONFIG + PROPOSAL_WEIGHTS,
    # e.g. openseg's class-agnostic MaskFormer; the paper uses kMaX-DeepLab, Sec. 4.2) or
    # "sam2" (SAM2's automatic mask generator, the paper's "segment anything" setting)
    osm.MASK_SOURCE = "ground_truth"
    osm.PROPOSAL_CONFIG = ""
    osm.PROPOSAL_WEIGHTS = ""
    osm.PROPOSAL_TOPK = 50
    osm.SAM2 = CN()
    osm.SAM2.CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"
    osm.SAM2.CHECKPOINT = ""  # "" = random init (logged)
    osm.SAM2.IMAGE_SIZE = 1024
    # automatic mask generator settings of the release's demo_with_sam.py
    osm.SAM2.POINTS_PER_SIDE = 32
    osm.SAM2.PRED_IOU_THRESH = 0.95
    osm.SAM2.STABILITY_SCORE_THRESH = 0.95
    osm.SAM2.MIN_MASK_REGION_AREA = 800
    # training mixture (Sec. 3.3; projects/osm/data.py): sampling ratio of each of
    # DATASETS.TRAIN ([] = in proportion to their sizes; the paper's per-dataset batch sizes
    # COCO 32, LVIS 64, A-847 16, PC-459 8, ADE20K 16, Cityscapes 8 as ratios) and the mapper
    # of each (panoptic / instance / semantic ...; [] = INPUT.DATASET_MAPPER_NAME for all)
    osm.DATASET_RATIOS = []
    osm.DATASET_MAPPERS = []
    # OPAL (Benchmarking Open-Ended Segmentation, App. B): see projects/osm/opal.py
    osm.OPAL = CN()
    osm.OPAL.ENABLED = False
    osm.OPAL.WEIGHT = 1.0
    osm.OPAL.TEMPERATURE = 0.07
    osm.OPAL.LORA_RANK = 8
    osm.OPAL.LORA_ALPHA = 16
    osm.OPAL.LORA_DROPOUT = 0.05
    osm.OPAL.LORA_TARGET_MODULES = ["q_proj", "v_proj"]
