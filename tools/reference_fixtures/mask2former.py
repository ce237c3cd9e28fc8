"""Fixtures of the released Mask2Former (`facebookresearch__Mask2Former`) for
`tests/test_reference_mask2former.py`.

The release's `MaskFormer` meta-architecture is built from its own config system
(`add_maskformer2_config` + its COCO panoptic R50 YAML) at a small size that still runs every
code path: a narrow detectron2 ResNet-50 with FrozenBN, 3 deformable encoder layers on
non-square levels (pixel-decoder width 32, so its 1x1 input projections into the 64-wide
decoder exist), 4 masked-attention layers (the level cycle wraps), 8 queries, 5 classes
(3 things, 2 stuff). Every parameter and FrozenBN statistic is moved away from its
initial value; in particular the deformable sampling offsets depend on the query (their
weight is non-zero), so normalising an offset by (H, W) instead of (W, H) changes the output.

Saved (`fixtures.pt`): the state dict (release names), the two padded-size-differing input
images with their output sizes and ground truth, the raw outputs of every decoder layer
(aux first to last, then final), the boolean attention mask every cross-attention layer
used (True = blocked, as the release passes it to `nn.MultiheadAttention`), the semantic /
panoptic / instance results, and for a training step started from a fixed seed at the
criterion: the weighted losses, the shapes of every `torch.rand` draw in order and the
gradient of every parameter.

The panoptic overlap threshold is set to exactly the visible-area ratio of one segment, so
the release's `<` keeps it and `<=` would drop it. The generator refuses weights whose
results could flip under rounding noise (mask logits, panoptic argmax, score thresholds,
top-k boundary and Hungarian matchings all keep a margin).
"""
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._stubs import add_reference_to_path

SEED = 7
CRITERION_SEED = 1234
NUM_CLASSES = 5
THING_IDS = {11: 0, 12: 1, 13: 2}  # dataset id -> contiguous id; classes 3, 4 are stuff
METADATA_NAME = "openseg_reference_mask2former_fixture"
# (C, H, W) of the two images and their (height, width) output size
IMAGE_SHAPES = [((3, 60, 100), (70, 110)), ((3, 90, 116), (90, 116))]
# decisions (mask logit signs, argmaxes, thresholds) keep this distance from flipping
MARGIN = 2e-5
# float32 outputs of one model differ between CPUs (ATen's AVX2 vs AVX-512 kernels, MKL's code
# paths) by ~1e-6 of a tensor's scale (measured 4e-7 to 9e-7 on the FC-CLIP fixtures): discrete
# results must survive uniform noise of CROSS_CPU_NOISE x the tensor's largest magnitude
CROSS_CPU_NOISE = 2e-6

# settings the openseg side needs to build the same model (applied by the test to its config)
SETTINGS = {
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 4,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": NUM_CLASSES,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 48,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 3,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 64,
    "MODEL.MASK_FORMER.NHEADS": 4,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 8,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 96,
    "MODEL.MASK_FORMER.DEC_LAYERS": 5,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 300,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": True,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
    "TEST.DETECTIONS_PER_IMAGE": 12,
}


def _reference_cfg(reference: Path):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(
        str(reference / "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    )
    for key, value in SETTINGS.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = (METADATA_NAME,)
    cfg.DATASETS.TEST = (METADATA_NAME,)
    cfg.freeze()
    return cfg


class _Unstable(Exception):
    """The drawn weights put some decision within rounding noise of flipping."""


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every weight and FrozenBN statistic off its initial value (deterministically)."""

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator) * scale

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or name.startswith("criterion") or name in ("pixel_mean", "pixel_std"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(noise(tensor, 0.1))
            elif ".norm" in name or "norm." in name or name.endswith("norm.weight"):
                tensor.copy_((1.0 + noise(tensor, 0.2)) if name.endswith("weight") else noise(tensor, 0.1))
            elif "sampling_offsets.weight" in name:
                tensor.copy_(noise(tensor, 0.06))  # query-dependent offsets of ~1-2 pixels
            elif "sampling_offsets.bias" in name:
                tensor.add_(noise(tensor, 0.3))
            elif "attention_weights" in name:
                tensor.copy_(noise(tensor, 0.08))  # softmax away from uniform, far from saturated
            elif "mask_embed.layers.2" in name:
                tensor.mul_(20.0)  # mask logits of std ~10: few pixels sit near the 0 boundary
            elif "class_embed.weight" in name:
                tensor.copy_(noise(tensor, 0.6))  # confident classes for some queries
            elif tensor.dim() == 1:
                tensor.add_(noise(tensor, 0.05))
            else:
                tensor.add_(noise(tensor, 0.1 * float(tensor.std()) + 1e-3))


def smooth_images(generator: torch.Generator) -> List[torch.Tensor]:
    """Smooth uint8 images of IMAGE_SHAPES (bilinearly upsampled noise), so masks have structure."""
    images = []
    for (channels, height, width), _ in IMAGE_SHAPES:
        coarse = torch.rand((1, channels, height // 10 + 2, width // 10 + 2), generator=generator)
        image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        images.append((image * 255).round().to(torch.uint8))
    return images


def ellipse_ground_truth(generator: torch.Generator, min_width_radius: float = 8) -> List[Dict[str, torch.Tensor]]:
    """Per image of IMAGE_SHAPES a few ellipse / band segments (things and stuff) at the image
    size; ellipses are at least `min_width_radius` pixels wide on either side of the centre."""
    targets = []
    for index, ((_, height, width), _) in enumerate(IMAGE_SHAPES):
        ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
        masks, labels = [], []
        stuff = ys > height * (0.6 + 0.1 * index)  # a bottom band of stuff
        masks.append(stuff)
        labels.append(3 + index)
        for _ in range(3):
            cy, cx = float(torch.rand(1, generator=generator)) * height, float(torch.rand(1, generator=generator)) * width
            ry, rx = 8 + float(torch.rand(1, generator=generator)) * height / 4, min_width_radius + float(torch.rand(1, generator=generator)) * width / 4
            masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1)
            labels.append(int(torch.randint(0, 3, (1,), generator=generator)))
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


def perturbed(tensor: torch.Tensor, generator: torch.Generator, level: float = CROSS_CPU_NOISE) -> torch.Tensor:
    """`tensor` plus uniform noise of up to `level` x its largest magnitude."""
    scale = float(tensor.abs().max()) if tensor.numel() else 0.0
    return tensor + level * scale * (2 * torch.rand(tensor.shape, generator=generator) - 1)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_stable_under_noise(decide: Callable[[Callable[[torch.Tensor], torch.Tensor]], Any], what: str,
                             level: float = CROSS_CPU_NOISE, draws: int = 4) -> None:
    """Raise `_Unstable` unless the discrete results `decide(noise)` (a list of tensors, lists,
    dicts) are the same with `noise` the identity and with `noise` = `perturbed` at `level`,
    applied by `decide` to the outputs its decisions read: a fixture whose segment map or
    top-k flips under float32 differences between CPUs would fail on another machine."""
    expected = decide(lambda tensor: tensor)
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        result = decide(lambda tensor: perturbed(tensor, generator, level))
        changed = [i for i, (mine, theirs) in enumerate(zip(result, expected)) if not _same(mine, theirs)]
        if changed:
            raise _Unstable(f"{what} changes under noise (results {changed})")


def postprocessing_decisions(panoptic_inference: Callable, instance_inference: Callable,
                             mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> list:
    """The discrete results the equivalence tests compare exactly: the panoptic segment map and
    segments, the instances' classes and binary masks in descending score order."""
    segment_map, segments = panoptic_inference(mask_cls, mask_pred)
    instances = instance_inference(mask_cls, mask_pred)
    order = instances.scores.argsort(descending=True)
    return [segment_map, segments, instances.pred_classes[order], instances.pred_masks[order] > 0]


def _check_assignment_stable(cost: np.ndarray, linear_sum_assignment) -> None:
    rows, cols = linear_sum_assignment(cost)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r2, c2 = linear_sum_assignment(cost + rng.uniform(-MARGIN, MARGIN, cost.shape))
        if not (np.array_equal(rows, r2) and np.array_equal(cols, c2)):
            raise _Unstable("Hungarian matching is not stable under 1e-4 noise")


def recorded_training_step(
    model: torch.nn.Module, batched_inputs: List[dict], criterion_seed: int, matcher_module: ModuleType
) -> Tuple[Dict[str, torch.Tensor], List[tuple]]:
    """One forward pass of a release's model in training mode: torch is seeded with
    `criterion_seed` when its criterion starts (so openseg's test can seed its own criterion
    alike), the shape of every `torch.rand` draw inside the criterion is recorded (the point
    sampling the test must reproduce), and every Hungarian assignment made through
    `matcher_module.linear_sum_assignment` must be stable under noise. Returns (losses, shapes)."""
    rand_shapes: List[tuple] = []
    real_rand = torch.rand

    def recording_rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
        rand_shapes.append(shape)
        return real_rand(*size, **kwargs)

    def seed_and_record(module, args):
        torch.manual_seed(criterion_seed)
        torch.rand = recording_rand

    real_lsa = matcher_module.linear_sum_assignment

    def checked_lsa(cost):
        _check_assignment_stable(np.asarray(cost), real_lsa)
        return real_lsa(cost)

    matcher_module.linear_sum_assignment = checked_lsa
    pre = model.criterion.register_forward_pre_hook(seed_and_record)
    post = model.criterion.register_forward_hook(lambda *a: setattr(torch, "rand", real_rand))
    try:
        losses = model(batched_inputs)
    finally:
        torch.rand = real_rand
        matcher_module.linear_sum_assignment = real_lsa
        pre.remove()
        post.remove()
    return losses, rand_shapes


def _panoptic_ratios(model, mask_cls, mask_pred):
    """(query, visible / own area, score) of the queries the release's panoptic rule examines."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(NUM_CLASSES) & (scores > model.object_mask_threshold)
    probs = mask_pred[keep].sigmoid()
    if probs.shape[0] == 0:
        return [], scores, keep
    owner = (scores[keep][:, None, None] * probs).argmax(0)
    ratios = []
    for k in range(probs.shape[0]):
        won = int((owner == k).sum())
        own = int((probs[k] >= 0.5).sum())
        visible = int(((owner == k) & (probs[k] >= 0.5)).sum())
        if won and own and visible:
            ratios.append((k, won / own, float(scores[keep][k])))
    return ratios, scores, keep


def _check_margins(model, outputs, images_tensor_size, image_sizes) -> None:
    """Raise if any decision of inference is within rounding noise of flipping."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    masks = F.interpolate(outputs["pred_masks"], size=images_tensor_size, mode="bilinear", align_corners=False)
    for b, (image_size, (_, (height, width))) in enumerate(zip(image_sizes, IMAGE_SHAPES)):
        mask_pred = sem_seg_postprocess(masks[b], image_size, height, width)
        mask_cls = outputs["pred_logits"][b]
        if mask_pred.abs().min() < MARGIN:
            raise _Unstable(f"image {b}: a mask logit is within {MARGIN} of 0")
        probs = mask_cls.softmax(-1)
        scores = probs.max(-1).values
        if (scores - model.object_mask_threshold).abs().min() < MARGIN:
            raise _Unstable("a query score is at the object-mask threshold")
        keep = probs.argmax(-1).ne(NUM_CLASSES) & (scores > model.object_mask_threshold)
        weighted = scores[keep][:, None, None] * mask_pred[keep].sigmoid()
        if weighted.shape[0] > 1:
            top2 = weighted.topk(2, dim=0).values
            # where every mask probability is tiny the contest is decided by ratios: relative gap
            gap = (top2[0] - top2[1]) / top2[0]
            if gap.min() < MARGIN / 2:
                raise _Unstable(f"image {b}: a panoptic argmax is a near-tie")
        flat = probs[:, :-1].flatten().sort(descending=True).values
        k = min(model.test_topk_per_image, flat.numel() - 1)
        if flat[k - 1] - flat[k] < MARGIN or (flat[:-1] - flat[1:]).min() < 1e-7:
            raise _Unstable("instance top-k scores nearly tie")


def generate(reference_root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    reference = add_reference_to_path(reference_root, "facebookresearch__Mask2Former")
    for seed in range(SEED, SEED + 300):
        try:
            fixture = _attempt(reference, seed)
        except _Unstable as why:
            print(f"[mask2former] seed {seed} rejected: {why}", file=sys.stderr)
            continue
        torch.save(fixture, out_dir / "fixtures.pt")
        return
    raise RuntimeError("no stable seed found in 300 attempts")


def _attempt(reference: Path, seed: int) -> dict:
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model
    import mask2former.modeling.matcher as reference_matcher

    MetadataCatalog.get(METADATA_NAME).set(
        thing_dataset_id_to_contiguous_id=dict(THING_IDS),
        stuff_classes=[f"class{i}" for i in range(NUM_CLASSES)],
        thing_classes=[f"class{i}" for i in range(3)],
    )
    cfg = _reference_cfg(reference)
    torch.manual_seed(seed)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    _randomise(model, generator)
    images = smooth_images(generator)
    targets = ellipse_ground_truth(generator)

    # ---------------------------------------------------------------- inference
    model.eval()
    captured: Dict[str, list] = {"attn_masks": [], "head": []}
    decoder = model.sem_seg_head.predictor
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: captured["attn_masks"].append(kwargs["memory_mask"].clone()),
            with_kwargs=True,
        )
        for layer in decoder.transformer_cross_attention_layers
    ]
    hooks.append(model.sem_seg_head.register_forward_hook(
        lambda module, args, output: captured["head"].append(output)
    ))
    with torch.no_grad():
        results = model(_batched_inputs(images))
    outputs = captured["head"][-1]
    padded = (96, 128)
    image_sizes = [tuple(shape[1:]) for (shape, _) in IMAGE_SHAPES]
    _check_margins(model, outputs, padded, image_sizes)

    # overlap threshold exactly at one segment's visible ratio (the release keeps it: `<`)
    masks = F.interpolate(outputs["pred_masks"], size=padded, mode="bilinear", align_corners=False)
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    per_image = [
        _panoptic_ratios(model, outputs["pred_logits"][b],
                         sem_seg_postprocess(masks[b], image_sizes[b], *IMAGE_SHAPES[b][1]))[0]
        for b in range(2)
    ]
    all_ratios = sorted(r for ratios in per_image for _, r, _ in ratios)
    partial = [r for r in all_ratios if 0.3 < r < 1.0]
    if not partial:
        raise _Unstable(f"no partially occluded panoptic segment (ratios {all_ratios})")
    threshold = partial[len(partial) // 2]
    if sum(abs(r - threshold) < 1e-6 for r in all_ratios) != 1:
        raise _Unstable("two segments share the chosen overlap ratio")
    model.overlap_threshold = threshold
    captured["attn_masks"].clear()
    with torch.no_grad():
        results = model(_batched_inputs(images))
    for hook in hooks:
        hook.remove()
    layers = [{"pred_logits": o["pred_logits"].clone(), "pred_masks": o["pred_masks"].clone()}
              for o in outputs["aux_outputs"]]
    layers.append({"pred_logits": outputs["pred_logits"].clone(), "pred_masks": outputs["pred_masks"].clone()})
    # multi-scale levels (lowest resolution first) of the 96 x 128 padded batch: strides 32, 16, 8
    level_sizes = [(padded[0] // s, padded[1] // s) for s in (32, 16, 8)]
    num_layers = len(decoder.transformer_cross_attention_layers)
    heads = decoder.num_heads
    attn_masks = []
    for layer, mask in enumerate(captured["attn_masks"][-num_layers:]):
        per_head = mask.view(2, heads, mask.shape[1], mask.shape[2])
        if not bool((per_head == per_head[:, :1]).all()):
            raise _Unstable("release attention masks differ between heads")
        attn_masks.append(per_head[:, 0].clone())
    for layer, mask in enumerate(attn_masks):
        logits_at_level = F.interpolate(layers[layer]["pred_masks"], size=level_sizes[layer % 3],
                                        mode="bilinear", align_corners=False)
        if logits_at_level.abs().min() < MARGIN:
            raise _Unstable(f"layer {layer}: an attention-mask logit is within {MARGIN} of 0")
        blocked = mask.float().mean()
        if not 0.05 < blocked < 0.95:
            raise _Unstable(f"layer {layer}: {blocked:.2f} of the attention is blocked")
    panoptic = []
    for r in results:
        segment_map, segments = r["panoptic_seg"]
        panoptic.append({"segment_map": segment_map.clone(), "segments_info": [dict(s) for s in segments]})
    kept_at_threshold = sum(
        1 for ratios in per_image for _, r, _ in ratios if r == threshold
    )
    assert kept_at_threshold == 1
    things = sum(s["isthing"] for p in panoptic for s in p["segments_info"])
    stuff = sum(not s["isthing"] for p in panoptic for s in p["segments_info"])
    if things < 2 or stuff < 2:
        raise _Unstable(f"panoptic results need things and stuff (got {things}, {stuff})")

    # ---------------------------------------------------------------- training step
    model.train()
    losses, rand_shapes = recorded_training_step(
        model, _batched_inputs(images, targets), CRITERION_SEED, reference_matcher
    )
    model.zero_grad()
    sum(losses.values()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    without_grad = sorted(name for name, p in model.named_parameters() if p.grad is None)

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
        "overlap_threshold": threshold,
        "object_mask_threshold": float(model.object_mask_threshold),
        "thing_dataset_id_to_contiguous_id": dict(THING_IDS),
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "images": images,
        "output_sizes": [size for _, size in IMAGE_SHAPES],
        "targets": targets,
        "layers": layers,
        "attn_masks": attn_masks,
        "sem_seg": [r["sem_seg"].clone() for r in results],
        "panoptic": panoptic,
        "instances": instances,
        "criterion_seed": CRITERION_SEED,
        "rand_shapes": rand_shapes,
        "losses": {k: v.detach().clone() for k, v in losses.items()},
        "gradients": gradients,
        "parameters_without_gradient": without_grad,
    }
    print(f"[mask2former] seed {seed}: overlap threshold {threshold}, panoptic things/stuff {things}/{stuff}, "
          f"{len(rand_shapes)} rand draws, {len(losses)} losses, {len(gradients)} gradients, "
          f"{len(without_grad)} parameters without gradient", file=sys.stderr)
    return fixture
