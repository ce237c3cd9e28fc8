"""The tiny SegPrompt model the SegPrompt tests build (`tests/test_segprompt.py`,
`tests/test_reference_segprompt.py`): a ResNet-18 (BN) backbone, a one-layer deformable
pixel decoder and a class-agnostic Mask2Former decoder, with the sizes each test chooses."""
from typing import Sequence

from detectron2.config import CfgNode

from openseg.config import load_config

RESNET_FEATURES = "['res2', 'res3', 'res4', 'res5']"


def tiny_segprompt_cfg(
    dataset: str,
    *,
    hidden: int,
    nheads: int,
    dim_feedforward: int,
    dec_layers: int,
    num_queries: int,
    num_points: int,
    max_examples: int,
    max_prompt_classes: int,
    queries_per_class: int,
    opts: Sequence[str] = (),
) -> CfgNode:
    """`SegPromptMaskFormer` on CPU, trained and tested on `dataset`; `opts` (key, value
    pairs as on the command line) set anything else."""
    return load_config(
        opts=[
            "MODEL.DEVICE", "cpu",
            "MODEL.META_ARCHITECTURE", "SegPromptMaskFormer",
            "MODEL.BACKBONE.NAME", "build_resnet_backbone",
            "MODEL.RESNETS.OUT_FEATURES", RESNET_FEATURES,
            "MODEL.SEM_SEG_HEAD.IN_FEATURES", RESNET_FEATURES,
            "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
            "MODEL.RESNETS.NORM", "BN",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", str(hidden),
            "MODEL.SEM_SEG_HEAD.MASK_DIM", str(hidden),
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", "4",
            "MODEL.MASK_FORMER.HIDDEN_DIM", str(hidden),
            "MODEL.MASK_FORMER.NHEADS", str(nheads),
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD", str(dim_feedforward),
            "MODEL.MASK_FORMER.DEC_LAYERS", str(dec_layers),
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(num_queries),
            "MODEL.MASK_FORMER.CLASS_AGNOSTIC", "True",
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", str(num_points),
            "MODEL.SEGPROMPT.MAX_EXAMPLES_PER_IMAGE", str(max_examples),
            "MODEL.SEGPROMPT.MAX_PROMPT_CLASSES", str(max_prompt_classes),
            "MODEL.SEGPROMPT.QUERIES_PER_CLASS", str(queries_per_class),
            "DATASETS.TRAIN", f"('{dataset}',)",
            "DATASETS.TEST", f"('{dataset}',)",
            *opts,
        ]
    )
