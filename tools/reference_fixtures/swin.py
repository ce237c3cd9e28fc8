"""Reference fixtures of Mask2Former's Swin backbone (`D2SwinTransformer`).

Two tiny random Swins (embed 8, depths 2/2/2/2, window 3; one with absolute position
embedding and patch norm, one without either) run in eval mode on a non-square input whose
size is a multiple of neither the patch nor the window, so the padding, the shifted-window
mask, odd-size patch merging and the bicubic APE resize all matter. Saved per variant:
the reference state dict (its own names), the MODEL.SWIN values, the input and res2..res5.
Also saved, for the checkpoint-loader tests: the same weights laid out as ImageNet
classification weights pickled by Mask2Former's `tools/convert-pretrained-swin-model-to-d2.py`
(with `head` / `norm`, without the detection-only `norm0..3`), and the state dict of a whole
tiny reference `MaskFormer` with that Swin as a model-zoo `.pkl` (numpy arrays under "model"),
with the config values that build it.
"""
import pickle
from pathlib import Path

import torch

from ._stubs import add_reference_to_path

VARIANTS = {
    "ape": dict(EMBED_DIM=8, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[1, 2, 2, 4], WINDOW_SIZE=3,
                APE=True, PATCH_NORM=True, PRETRAIN_IMG_SIZE=32, DROP_PATH_RATE=0.3),
    "plain": dict(EMBED_DIM=8, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[2, 2, 4, 4], WINDOW_SIZE=4,
                  APE=False, PATCH_NORM=False, PRETRAIN_IMG_SIZE=224, DROP_PATH_RATE=0.1),
}
INPUT_HW = (50, 77)
# a whole tiny Mask2Former on the "plain" Swin; the same keys exist in openseg's config
MASKFORMER_OPTIONS = {
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 4,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 32,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 32,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 5,
    "MODEL.MASK_FORMER.NHEADS": 4,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 64,
    "MODEL.MASK_FORMER.DEC_LAYERS": 3,
}


def generate(reference_root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    add_reference_to_path(reference_root, "facebookresearch__Mask2Former")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from mask2former import add_maskformer2_config
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former.modeling.backbone.swin import D2SwinTransformer

    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        cfg = get_cfg()
        add_maskformer2_config(cfg)
        for key, value in options.items():
            setattr(cfg.MODEL.SWIN, key, value)
        model = D2SwinTransformer(cfg, ShapeSpec(channels=3))
        model.eval()  # the release's train() returns None
        with torch.no_grad():  # non-trivial weights: biases, norms and APE away from their init
            for param_name, param in model.named_parameters():
                if param_name.endswith("weight") and param.dim() == 1:
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                else:
                    param.copy_(0.3 * torch.randn_like(param) / max(1, param.shape[-1]) ** 0.25)
        image = torch.randn(2, 3, *INPUT_HW)
        with torch.no_grad():
            outputs = model(image)
        torch.save({
            "options": options,
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "input": image,
            "outputs": outputs,
        }, out_dir / f"swin_{name}.pt")

    # the convert script pickles the torch tensors of the release's {"model": ...} as they are
    imagenet = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    dim = model.num_features[-1]
    imagenet["norm.weight"] = torch.ones(dim)
    imagenet["norm.bias"] = torch.zeros(dim)
    imagenet["head.weight"] = torch.zeros(10, dim)
    imagenet["head.bias"] = torch.zeros(10)
    imagenet["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    with open(out_dir / "swin_plain_imagenet.pkl", "wb") as f:
        pickle.dump({"model": imagenet, "__author__": "third_party", "matching_heuristics": True}, f)

    torch.manual_seed(1)
    cfg = get_cfg()
    add_deeplab_config(cfg)  # as the release's train_net.py sets up
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(reference_root / "facebookresearch__Mask2Former" / "configs" / "coco"
                            / "panoptic-segmentation" / "maskformer2_R50_bs16_50ep.yaml"))
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.DEVICE = "cpu"
    for key, value in VARIANTS["plain"].items():
        setattr(cfg.MODEL.SWIN, key, value)
    cfg.merge_from_list([item for pair in MASKFORMER_OPTIONS.items() for item in pair])
    maskformer = build_model(cfg)
    state = {k: v.numpy() for k, v in maskformer.state_dict().items()}
    with open(out_dir / "mask2former_swin_tiny.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "Mask2Former"}, f)
    torch.save({"swin": VARIANTS["plain"], "options": MASKFORMER_OPTIONS},
               out_dir / "mask2former_swin_tiny_config.pt")
