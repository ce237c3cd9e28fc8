"""Fixtures of the released FC-CLIP with a ResNet CLIP, for `tests/test_reference_fcclip_rn.py`.

The release's `FCCLIP` is built from its own config system and its ResNet-CLIP config
(`fcclip_convnext_large_eval_ade20k_r50.yaml`: ENSEMBLE_ON_VALID_MASK True) at the sizes of
the ConvNeXt fixtures (`fcclip.py`: 2 deformable encoder layers, 5 decoder predictions,
8 queries, the same vocabularies, alpha 0.25 / beta 0.75, non-square images), but with a tiny
random open_clip ModifiedResNet (openseg's `projects/fcclip/open_clip_configs/
openseg-fcclip-tiny-rn.json`: layers 1-1-1-1, width 8, eight attention-pool heads of 32,
position grid 3 x 3 resized to the 3 x 4 res5 grid; registered under a name the release
treats as a ResNet, nothing downloaded). The batch-norm statistics and scales of the
ResNet are moved off their initial values as well.

Stubs as in `fcclip.py`: the backbone's channel list (the release hard-codes it by model
name) and the batch-first `encode_text`.

Saved (`fixtures.pt`, inference only: the frozen CLIP only feeds features to training, whose
step the ConvNeXt fixtures check):
the state dict (release names, float16 values), vocabularies, images / output sizes; the
last decoder prediction; the out-of-vocabulary logits (the attention pool on each mask);
the ensembled log-probabilities handed to post-processing (with the release's
ENSEMBLE_ON_VALID_MASK); the release's attention pool (`visual_prediction_forward`) on
hand-made masks (an empty, a full and a one-cell mask besides the predicted ones: the tiny
model's queries rarely miss the 3 x 4 CLIP grid); the semantic / panoptic / instance results.
The generator refuses weights whose results could flip under rounding noise.
"""
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

from ._stubs import add_reference_to_path
from .fcclip import (
    ALPHA,
    BETA,
    SETTINGS as CONVNEXT_SETTINGS,
    TEST_CLASSES,
    TEST_THINGS,
    TRAIN_CLASSES,
    TRAIN_THINGS,
    IMAGE_SHAPES,
    TOKEN_TABLE,
    _Unstable,
    _batched_inputs,
    _check_margins,
    _compact,
    _images,
    _randomise,
    _saved_state,
    _set_metadata,
)

SEED = 2522
OPEN_CLIP_NAME = "fixture_rn_tiny"  # contains "rn" and no "convnext": the release's ResNet path
TINY_CONFIG = Path(__file__).resolve().parents[2] / "projects/fcclip/open_clip_configs/openseg-fcclip-tiny-rn.json"
RELEASE_CONFIG = "configs/coco/panoptic-segmentation/fcclip/fcclip_convnext_large_eval_ade20k_r50.yaml"
SETTINGS = {**CONVNEXT_SETTINGS, "MODEL.FC_CLIP.CLIP_MODEL_NAME": OPEN_CLIP_NAME}


def _register_stubs():
    """The release's backbone with the tiny ResNet's channels and a batch-first encode_text."""
    import open_clip
    from detectron2.modeling import BACKBONE_REGISTRY
    from fcclip.modeling.backbone.clip import CLIP

    folder = Path(tempfile.mkdtemp())
    (folder / f"{OPEN_CLIP_NAME}.json").write_text(TINY_CONFIG.read_text())
    open_clip.add_model_config(str(folder))
    width = json.loads(TINY_CONFIG.read_text())["vision_cfg"]["width"]

    class FixtureResNetCLIP(CLIP):
        output_channels = [width] + [4 * width * 2 ** i for i in range(4)]  # stem, res2..res5

        def encode_text(self, text, normalize: bool = False):
            return self.clip_model.encode_text(text, normalize=normalize)

    if "FixtureResNetCLIP" not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(FixtureResNetCLIP)


def _reference_cfg(reference: Path):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from fcclip import add_fcclip_config, add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_fcclip_config(cfg)
    cfg.merge_from_file(str(reference / RELEASE_CONFIG))
    if not cfg.MODEL.FC_CLIP.ENSEMBLE_ON_VALID_MASK:
        raise ValueError(f"{RELEASE_CONFIG}: expected ENSEMBLE_ON_VALID_MASK True")
    for key, value in SETTINGS.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    cfg.MODEL.BACKBONE.NAME = "FixtureResNetCLIP"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("fcclip_fixture_train",)
    cfg.DATASETS.TEST = ("fcclip_fixture_test",)
    cfg.freeze()
    return cfg


def _randomise_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Scales near 1 (open_clip zeroes each block's last one), shifted running statistics."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(1.0 + 0.2 * torch.randn(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(1.0 + 0.3 * torch.rand(size, generator=generator))


def generate(reference_root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    reference = add_reference_to_path(reference_root, "bytedance__fc-clip")
    os.chdir(reference)  # the release reads its class-name files by relative path at import
    import fcclip  # noqa: F401  (registers FCCLIP, FCCLIPHead, the decoder, the backbone)

    _register_stubs()
    for seed in range(SEED, SEED + 600):
        try:
            fixture = _attempt(reference, seed)
        except _Unstable as why:
            print(f"[fcclip_rn] seed {seed} rejected: {why}", file=sys.stderr)
            continue
        torch.save(fixture, out_dir / "fixtures.pt")
        return
    raise RuntimeError("no stable seed found in 600 attempts")


def _attempt(reference: Path, seed: int) -> dict:
    from detectron2.modeling import build_model
    import fcclip.fcclip as reference_meta_arch

    _set_metadata()
    cfg = _reference_cfg(reference)
    torch.manual_seed(seed)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    _randomise(model, generator)
    _randomise_batch_norms(model.backbone, generator)
    token_rows = _compact(model, TRAIN_CLASSES + TEST_CLASSES)
    images = _images(generator)
    seen = model.category_overlapping_mask.tolist()
    if not (0 < sum(seen) < len(seen)):
        raise RuntimeError(f"the fixture vocabularies need seen and unseen classes, got {seen}")

    model.eval()
    captured: Dict[str, list] = {"head": [], "out_vocab": [], "ensembled": [], "clip": []}
    real_logits = reference_meta_arch.get_classification_logits

    def recording_logits(*args, **kwargs):
        result = real_logits(*args, **kwargs)
        captured["out_vocab"].append(result.clone())
        return result

    reference_meta_arch.get_classification_logits = recording_logits
    real_panoptic = model.panoptic_inference

    def recording_panoptic(mask_cls, mask_pred):
        captured["ensembled"].append(mask_cls.clone())
        return real_panoptic(mask_cls, mask_pred)

    model.panoptic_inference = recording_panoptic
    hook = model.sem_seg_head.register_forward_hook(lambda m, a, out: captured["head"].append(out))
    clip_hook = model.backbone.register_forward_hook(lambda m, a, out: captured["clip"].append(out["clip_vis_dense"]))
    try:
        with torch.no_grad():
            results = model(_batched_inputs(images))
    finally:
        reference_meta_arch.get_classification_logits = real_logits
        hook.remove()
        clip_hook.remove()
        del model.panoptic_inference
    outputs = captured["head"][-1]
    layers = [{"pred_logits": o["pred_logits"].clone(), "pred_masks": o["pred_masks"].clone()}
              for o in outputs["aux_outputs"]]
    last = {"pred_logits": outputs["pred_logits"].clone(), "pred_masks": outputs["pred_masks"].clone()}
    layers.append(last)
    clip_size = tuple(captured["clip"][-1].shape[-2:])
    ensembled = list(captured["ensembled"])
    _check_margins(model, layers, clip_size, ensembled)
    at_clip = F.interpolate(last["pred_masks"], size=clip_size, mode="bilinear", align_corners=False)
    empty = ~(at_clip > 0).flatten(2).any(-1)
    if bool(empty.all()):
        raise _Unstable("every query misses the CLIP grid")
    out_vocab = captured["out_vocab"][-1]
    if not torch.isfinite(out_vocab).all():
        raise RuntimeError("the release's out-of-vocabulary logits are not finite")
    panoptic = []
    for r in results:
        segment_map, segments = r["panoptic_seg"]
        panoptic.append({"segment_map": segment_map.clone(), "segments_info": [dict(s) for s in segments]})
    things = sum(s["isthing"] for p in panoptic for s in p["segments_info"])
    stuff = sum(not s["isthing"] for p in panoptic for s in p["segments_info"])
    if things < 1 or things + stuff < 3:
        raise _Unstable(f"panoptic results need things and 3 segments (got {things}, {stuff})")
    predicted = {s["category_id"] for p in panoptic for s in p["segments_info"]}
    if not any(seen[c] for c in predicted) or all(seen[c] for c in predicted):
        raise _Unstable(f"panoptic classes {sorted(predicted)} must include seen and unseen ones")
    # the release's masked attention pool on hand-made masks as well: the final masks on the
    # CLIP grid with one empty and one full mask and one single cell
    clip_feature = captured["clip"][-1]
    pool_masks = (at_clip > 0).to(at_clip.dtype)
    pool_masks[0, 0] = 0.0
    pool_masks[0, 1] = 1.0
    pool_masks[1, 0] = 0.0
    pool_masks[1, 0, 1, 2] = 1.0
    with torch.no_grad():
        pool_embeddings = model.backbone.visual_prediction_forward(clip_feature, pool_masks)
    instances = []
    for r in results:
        inst = r["instances"]
        instances.append({
            "pred_masks": inst.pred_masks.bool().clone(),
            "scores": inst.scores.clone(),
            "pred_classes": inst.pred_classes.clone(),
        })
    fixture = {
        "seed": seed,
        "reference_config_yaml": cfg.dump(),
        "settings": dict(SETTINGS),
        "alpha": ALPHA,
        "beta": BETA,
        "train_classes": list(TRAIN_CLASSES),
        "train_things": TRAIN_THINGS,
        "test_classes": list(TEST_CLASSES),
        "test_things": TEST_THINGS,
        "seen": seen,
        "open_clip_config": json.loads(TINY_CONFIG.read_text()),
        "state_dict": _saved_state(model, token_rows),
        "token_rows": token_rows,
        "token_table_shape": tuple(model.state_dict()[TOKEN_TABLE].shape),
        "images": images,
        "output_sizes": [size for _, size in IMAGE_SHAPES],
        "last_layer": last,
        "clip_size": clip_size,
        "out_vocab_logits": out_vocab,
        "pool_masks": pool_masks,
        "pool_embeddings": pool_embeddings,
        "ensembled": [e.clone() for e in ensembled],
        "sem_seg": [r["sem_seg"].clone() for r in results],
        "panoptic": panoptic,
        "instances": instances,
    }
    print(f"[fcclip_rn] seed {seed}: seen {seen}, panoptic things/stuff {things}/{stuff}, "
          f"{int(empty.sum())} of {empty.numel()} queries without a CLIP-grid mask", file=sys.stderr)
    return fixture
