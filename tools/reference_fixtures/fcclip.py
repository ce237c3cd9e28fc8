"""Fixtures of the released FC-CLIP (`bytedance__fc-clip`) for `tests/test_reference_fcclip.py`.

The release's `FCCLIP` meta-architecture is built from its own config system
(`add_maskformer2_config` + `add_fcclip_config` + its `fcclip_convnext_large_eval_ade20k.yaml`)
at a small size: a tiny random open_clip ConvNeXt (openseg's
`projects/fcclip/open_clip_configs/openseg-fcclip-tiny-convnext.json` registered under a name
the release recognises as a ConvNeXt, nothing downloaded), 2 deformable encoder layers,
5 decoder predictions, 8 queries, mask / hidden width 64 (the release's in-vocabulary head
needs them equal), non-square images of two sizes. Training and test vocabularies differ and
are written as the release expects them (``"name,synonym"`` strings in `stuff_classes`):
classes with several synonyms, test classes seen through a synonym only ("kitten"), unseen
ones, and one ("hound,dogs") that only an inexact, plural-aware rule would call seen, so the
seen / unseen rule, the synonym max and alpha vs beta all change the outputs.
alpha = 0.25 and beta = 0.75 are not the defaults, so a swapped pair or a default cannot pass.

Two stubs besides the compiled ops: the backbone's channel list (the release hard-codes it by
model name; here a subclass supplies the tiny ConvNeXt's) and its `encode_text`, written for
open_clip 2.x whose text transformer took (length, batch, width); with the installed
batch-first open_clip it calls open_clip's own `encode_text`, which computes the same.

Saved (`fixtures.pt`): the state dict (release names), vocabularies, images / output sizes /
ground truth; per decoder prediction the in-vocabulary logits and masks; the
out-of-vocabulary logits; the ensembled log-probabilities handed to post-processing (also
with ENSEMBLE_ON_VALID_MASK, some queries having no mask on the CLIP grid); the
semantic / panoptic / instance results; and for a training step started from a fixed seed
at the criterion: the weighted losses, the `torch.rand` draws and the gradients. The
generator refuses weights whose results could flip under rounding noise.
"""
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ._stubs import add_reference_to_path
from .mask2former import (
    _check_assignment_stable,
    _Unstable,
    check_stable_under_noise,
    postprocessing_decisions,
)

SEED = 1089
CRITERION_SEED = 4321
ALPHA, BETA = 0.25, 0.75
TRAIN_NAME, TEST_NAME = "fcclip_fixture_train", "fcclip_fixture_test"
# release format: one "name,synonym,..." string per class, things first
TRAIN_CLASSES = ["cat,kitten", "dog,puppy", "car,automobile", "sky", "grass,lawn"]
TRAIN_THINGS = 3
# "hound,dogs" is unseen under the release's exact-string rule, seen under a plural-aware one
TEST_CLASSES = ["kitten,cat", "hound,dogs", "automobile", "truck,lorry", "sky,clouds", "road,street"]
TEST_THINGS = 4
OPEN_CLIP_NAME = "fixture_convnext_tiny"  # contains "convnext_", as the release requires
TINY_CONFIG = Path(__file__).resolve().parents[2] / "projects/fcclip/open_clip_configs/openseg-fcclip-tiny-convnext.json"
IMAGE_SHAPES = [((3, 60, 100), (70, 110)), ((3, 90, 116), (90, 116))]
PADDED = (96, 128)
MARGIN = 2e-5
# relative gap between the two best (score x mask probability) of a pixel: float32 rounding of
# the two implementations differs by a few 1e-7
PANOPTIC_MARGIN = 2e-6

SETTINGS = {
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": len(TRAIN_CLASSES),
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 64,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 2,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 64,
    "MODEL.MASK_FORMER.NHEADS": 4,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 8,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 96,
    "MODEL.MASK_FORMER.DEC_LAYERS": 5,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 300,
    "MODEL.FC_CLIP.CLIP_MODEL_NAME": OPEN_CLIP_NAME,
    "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS": "",
    "MODEL.FC_CLIP.EMBED_DIM": 64,
    "MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA": ALPHA,
    "MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA": BETA,
    "TEST.DETECTIONS_PER_IMAGE": 12,
}


def _register_stubs():
    """The release's backbone with the tiny ConvNeXt's channels and a batch-first encode_text."""
    import open_clip
    from detectron2.modeling import BACKBONE_REGISTRY
    from fcclip.modeling.backbone.clip import CLIP

    folder = Path(tempfile.mkdtemp())
    (folder / f"{OPEN_CLIP_NAME}.json").write_text(TINY_CONFIG.read_text())
    open_clip.add_model_config(str(folder))
    if json.loads(TINY_CONFIG.read_text())["vision_cfg"]["timm_model_name"] != "convnext_atto":
        raise ValueError(f"{TINY_CONFIG}: FixtureCLIP's channel list is convnext_atto's")

    class FixtureCLIP(CLIP):
        output_channels = [40, 40, 80, 160, 320]  # convnext_atto: stem, res2..res5

        def encode_text(self, text, normalize: bool = False):
            return self.clip_model.encode_text(text, normalize=normalize)

    if "FixtureCLIP" not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(FixtureCLIP)


def _reference_cfg(reference: Path):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from fcclip import add_fcclip_config, add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_fcclip_config(cfg)
    cfg.merge_from_file(
        str(reference / "configs/coco/panoptic-segmentation/fcclip/fcclip_convnext_large_eval_ade20k.yaml")
    )
    for key, value in SETTINGS.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    cfg.MODEL.BACKBONE.NAME = "FixtureCLIP"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (TRAIN_NAME,)
    cfg.DATASETS.TEST = (TEST_NAME,)
    cfg.freeze()
    return cfg


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every weight off its initial value (deterministically), CLIP included."""

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator) * scale

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or name.startswith("criterion") or name in ("pixel_mean", "pixel_std"):
                continue
            if name.endswith("logit_scale"):
                tensor.add_(noise(tensor, 0.1))
            elif name.endswith("attn_mask"):
                continue
            elif ".norm" in name or "norm." in name or "ln_" in name or name.endswith("norm.weight"):
                tensor.copy_((1.0 + noise(tensor, 0.2)) if name.endswith("weight") else noise(tensor, 0.1))
            elif "sampling_offsets.weight" in name:
                tensor.copy_(noise(tensor, 0.06))
            elif "sampling_offsets.bias" in name:
                tensor.add_(noise(tensor, 0.3))
            elif "attention_weights" in name:
                tensor.copy_(noise(tensor, 0.08))
            elif "mask_embed.layers.2" in name:
                tensor.mul_(6.0)  # mask logits of a few units: few pixels sit near the 0 boundary
            elif tensor.dim() == 1:
                tensor.add_(noise(tensor, 0.05))
            else:
                tensor.add_(noise(tensor, 0.1 * float(tensor.std()) + 1e-3))


def _compact(model: torch.nn.Module, class_strings: List[str]) -> torch.Tensor:
    """Round every float weight to float16 precision and zero the token embeddings no prompt
    uses (see the module docstring); returns the ids of the rows kept."""
    from fcclip.fcclip import VILD_PROMPT

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # configuration-derived buffers (no-object weight, pixel statistics) stay exact
            if tensor.is_floating_point() and not name.startswith(("criterion.", "pixel_")):
                tensor.copy_(tensor.half().float())
        names = [name for entry in class_strings for name in entry.split(",")]
        tokens = model.backbone.tokenize_text([t.format(n) for n in names for t in VILD_PROMPT])
        rows = torch.unique(tokens)
        table = model.backbone.clip_model.token_embedding.weight
        unused = torch.ones(table.shape[0], dtype=torch.bool)
        unused[rows] = False
        table[unused] = 0.0
    return rows


def _saved_state(model: torch.nn.Module, rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key == TOKEN_TABLE:
            value = value[rows]
        compact = value.is_floating_point() and not key.startswith(("criterion.", "pixel_"))
        state[key] = value.half() if compact else value
    return state


TOKEN_TABLE = "backbone.clip_model.token_embedding.weight"


def _images(generator: torch.Generator) -> List[torch.Tensor]:
    images = []
    for (channels, height, width), _ in IMAGE_SHAPES:
        coarse = torch.rand((1, channels, height // 10 + 2, width // 10 + 2), generator=generator)
        image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        images.append((image * 255).round().to(torch.uint8))
    return images


def _ground_truth(generator: torch.Generator) -> List[Dict[str, torch.Tensor]]:
    """Per image a stuff band and three ellipses of training classes, at the image size."""
    targets = []
    for index, ((_, height, width), _) in enumerate(IMAGE_SHAPES):
        ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
        masks = [ys > height * (0.6 + 0.1 * index)]
        labels = [TRAIN_THINGS + index]
        for _ in range(3):
            cy, cx = float(torch.rand(1, generator=generator)) * height, float(torch.rand(1, generator=generator)) * width
            ry, rx = 8 + float(torch.rand(1, generator=generator)) * height / 4, 8 + float(torch.rand(1, generator=generator)) * width / 4
            masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1)
            labels.append(int(torch.randint(0, TRAIN_THINGS, (1,), generator=generator)))
        targets.append({"labels": torch.tensor(labels, dtype=torch.int64), "masks": torch.stack(masks)})
    return targets


def _batched_inputs(images, targets=None):
    from detectron2.structures import Instances

    inputs = []
    for i, (image, (_, (height, width))) in enumerate(zip(images, IMAGE_SHAPES)):
        record = {"image": image, "height": height, "width": width}
        if targets is not None:
            instances = Instances(tuple(image.shape[-2:]))
            instances.gt_classes = targets[i]["labels"]
            instances.gt_masks = targets[i]["masks"]
            record["instances"] = instances
        inputs.append(record)
    return inputs


def _check_margins(model, layers, clip_feature_size, ensembled) -> None:
    """Raise if any binarisation, argmax, threshold or top-k is within rounding noise."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    for index, layer in enumerate(layers):
        if layer["pred_masks"].abs().min() < MARGIN:
            raise _Unstable(f"prediction {index}: a mask logit (pooled in-vocabulary) is near 0")
    final = layers[-1]["pred_masks"]
    at_clip = F.interpolate(final, size=clip_feature_size, mode="bilinear", align_corners=False)
    if at_clip.abs().min() < MARGIN:
        raise _Unstable("a mask logit on the CLIP grid is near 0")
    if not 0.1 < float((at_clip > 0).float().mean()) < 0.9:
        raise _Unstable("masks on the CLIP grid are (nearly) all empty or full")
    masks = F.interpolate(final, size=PADDED, mode="bilinear", align_corners=False)
    num_classes = len(TEST_CLASSES)
    for b, ((shape, (height, width)), mask_cls) in enumerate(zip(IMAGE_SHAPES, ensembled)):
        mask_pred = sem_seg_postprocess(masks[b], tuple(shape[1:]), height, width)
        if mask_pred.abs().min() < MARGIN:
            raise _Unstable(f"image {b}: a mask logit is within {MARGIN} of 0")
        probs = mask_cls.softmax(-1)
        top2 = probs.topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min() < MARGIN:
            raise _Unstable("a query's class argmax is a near-tie")
        scores, labels = probs.max(-1)
        keep = labels.ne(num_classes) & (scores > model.object_mask_threshold)
        weighted = scores[keep][:, None, None] * mask_pred[keep].sigmoid()
        if weighted.shape[0] > 1:
            best = weighted.topk(2, dim=0).values
            if ((best[0] - best[1]) / best[0]).min() < PANOPTIC_MARGIN:
                raise _Unstable(f"image {b}: a panoptic argmax is a near-tie")
            owner = weighted.argmax(0)
            for k in range(weighted.shape[0]):
                own = int((mask_pred[keep][k].sigmoid() >= 0.5).sum())
                if own and abs(int((owner == k).sum()) / own - model.overlap_threshold) < 1e-3:
                    raise _Unstable("a segment sits at the overlap threshold")
        flat = probs[:, :-1].flatten().sort(descending=True).values
        k = min(model.test_topk_per_image, flat.numel() - 1)
        if flat[k - 1] - flat[k] < MARGIN or (flat[:-1] - flat[1:]).min() < 1e-7:
            raise _Unstable("instance top-k scores nearly tie")
        check_stable_under_noise(
            lambda noise: postprocessing_decisions(
                model.panoptic_inference, model.instance_inference, noise(mask_cls), noise(mask_pred)
            ),
            f"image {b}: post-processing",
        )


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
            print(f"[fcclip] seed {seed} rejected: {why}", file=sys.stderr)
            continue
        torch.save(fixture, out_dir / "fixtures.pt")
        return
    raise RuntimeError("no stable seed found in 600 attempts")


def _set_metadata() -> None:
    from detectron2.data import MetadataCatalog

    for name, classes, things in ((TRAIN_NAME, TRAIN_CLASSES, TRAIN_THINGS), (TEST_NAME, TEST_CLASSES, TEST_THINGS)):
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(
            stuff_classes=list(classes),
            thing_classes=list(classes[:things]),
            thing_dataset_id_to_contiguous_id={i: i for i in range(things)},
            stuff_dataset_id_to_contiguous_id={i: i for i in range(len(classes))},
        )


def _attempt(reference: Path, seed: int) -> dict:
    from detectron2.modeling import build_model
    import fcclip.fcclip as reference_meta_arch
    import fcclip.modeling.matcher as reference_matcher

    _set_metadata()
    cfg = _reference_cfg(reference)
    torch.manual_seed(seed)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    _randomise(model, generator)
    token_rows = _compact(model, TRAIN_CLASSES + TEST_CLASSES)
    images = _images(generator)
    targets = _ground_truth(generator)
    seen = model.category_overlapping_mask.tolist()
    if not (0 < sum(seen) < len(seen)):
        raise RuntimeError(f"the fixture vocabularies need seen and unseen classes, got {seen}")

    # ---------------------------------------------------------------- inference
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
    layers.append({"pred_logits": outputs["pred_logits"].clone(), "pred_masks": outputs["pred_masks"].clone()})
    clip_size = tuple(captured["clip"][-1].shape[-2:])
    ensembled = list(captured["ensembled"])
    _check_margins(model, layers, clip_size, ensembled)
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
    # the same inference with the release's ENSEMBLE_ON_VALID_MASK (queries whose mask misses
    # every CLIP cell keep the in-vocabulary probabilities)
    at_clip = F.interpolate(outputs["pred_masks"], size=clip_size, mode="bilinear", align_corners=False)
    empty = ~(at_clip > 0).flatten(2).any(-1)
    if not bool(empty.any()) or bool(empty.all()):
        raise _Unstable("need queries with and without mask on the CLIP grid")
    captured["ensembled"].clear()
    model.ensemble_on_valid_mask = True
    model.panoptic_inference = recording_panoptic
    try:
        with torch.no_grad():
            model(_batched_inputs(images))
    finally:
        model.ensemble_on_valid_mask = False
        del model.panoptic_inference
    ensembled_valid_mask = [e.clone() for e in captured["ensembled"]]

    instances = []
    for r in results:
        inst = r["instances"]
        instances.append({
            "pred_masks": inst.pred_masks.bool().clone(),
            "scores": inst.scores.clone(),
            "pred_classes": inst.pred_classes.clone(),
        })

    # ---------------------------------------------------------------- training step
    model.train()
    rand_shapes: List[tuple] = []
    real_rand = torch.rand

    def recording_rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
        rand_shapes.append(shape)
        return real_rand(*size, **kwargs)

    def seed_and_record(module, args):
        torch.manual_seed(CRITERION_SEED)
        torch.rand = recording_rand

    real_lsa = reference_matcher.linear_sum_assignment

    def checked_lsa(cost):
        _check_assignment_stable(np.asarray(cost), real_lsa)
        return real_lsa(cost)

    reference_matcher.linear_sum_assignment = checked_lsa
    pre = model.criterion.register_forward_pre_hook(seed_and_record)
    post = model.criterion.register_forward_hook(lambda *a: setattr(torch, "rand", real_rand))
    try:
        losses = model(_batched_inputs(images, targets))
    finally:
        torch.rand = real_rand
        reference_matcher.linear_sum_assignment = real_lsa
        pre.remove()
        post.remove()
    model.zero_grad()
    sum(losses.values()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

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
        "overlap_threshold": float(model.overlap_threshold),
        "object_mask_threshold": float(model.object_mask_threshold),
        "state_dict": _saved_state(model, token_rows),
        "token_rows": token_rows,
        "token_table_shape": tuple(model.state_dict()[TOKEN_TABLE].shape),
        "images": images,
        "output_sizes": [size for _, size in IMAGE_SHAPES],
        "targets": targets,
        "layers": layers,
        "out_vocab_logits": captured["out_vocab"][-1],
        "ensembled": [e.clone() for e in ensembled],
        "ensembled_valid_mask": ensembled_valid_mask,
        "sem_seg": [r["sem_seg"].clone() for r in results],
        "panoptic": panoptic,
        "instances": instances,
        "criterion_seed": CRITERION_SEED,
        "rand_shapes": rand_shapes,
        "losses": {k: v.detach().clone() for k, v in losses.items()},
        "gradients": gradients,
    }
    print(f"[fcclip] seed {seed}: seen {seen}, panoptic things/stuff {things}/{stuff}, "
          f"{len(rand_shapes)} rand draws, {len(losses)} losses, {len(gradients)} gradients", file=sys.stderr)
    return fixture
