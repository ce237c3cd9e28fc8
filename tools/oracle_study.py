#!/usr/bin/env python
"""The oracle study of "What holds back open-vocabulary segmentation?" for one config.

    python tools/oracle_study.py --config-file CFG --output DIR \
        [--vlm-models convnext_large_d_320=/ckpt/convnext_l.bin,RN50] [--vlm-resolutions 320,640] \
        [--top-classes 10] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Writes to DIR:
- oracles: PQ / PQ_seen / PQ_unseen (and SQ, RQ, FN_seg, FN_cls) of the model under every
  oracle combination (openseg.modeling.oracles.oracle_combinations), evaluated only;
- vlm_gt_masks: zero-shot PQ of bare open_clip models classifying the ground-truth masks
  (dense CLIP features mask-pooled, against the test vocabulary's text embeddings), for each
  model x input resolution (shorter image side);
- worst_classes: per-class TP / FN_seg / FN_cls of the classes with the most false negatives
  without oracles (FN_seg: no prediction overlaps the segment with IoU > 0.5; FN_cls: one
  does, with the wrong class);
as study.md (Markdown tables), study.json and study.png (bar plot of the oracle variants).
The test dataset (cfg.DATASETS.TEST[0]) must have panoptic ground truth.
"""
import argparse
import json
import logging
import math
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate
from torch import Tensor

import openseg  # noqa: F401  (registers datasets, architectures, projects' configs)
from openseg.checkpoint import OpenSegCheckpointer
from openseg.config import load_config
from openseg.data.mappers import build_mapper
from openseg.data.vocab import get_vocabulary
from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.modeling.oracles import OracleSwitches, ground_truth_of_input, oracle_combinations
from openseg.modeling.text import OpenCLIPTextEncoder, class_embeddings, templates_from_config
from openseg.projects.fcclip import mask_pool

logger = logging.getLogger("openseg.oracle_study")
METRICS = ("PQ", "PQ_seen", "PQ_unseen", "SQ", "RQ", "FN_seg", "FN_cls")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for study.{md,json,png}")
    parser.add_argument(
        "--vlm-models", default=None,
        help="comma-separated open_clip models for the ground-truth-mask study, NAME or "
        "NAME=CHECKPOINT; "
        "default: the config's MODEL.CLIP.MODEL_NAME=PRETRAINED_PATH when its backbone is "
        "CLIP; 'none': skip",
    )
    parser.add_argument(
        "--vlm-resolutions", default=None,
        help="comma-separated shorter image sides for the VLM study (default: INPUT.MIN_SIZE_TEST)",
    )
    parser.add_argument("--top-classes", type=int, default=10)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def with_oracles(cfg: CfgNode, switches: OracleSwitches) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    for key in ("segmentation", "classification", "mask_selection", "drop_no_object"):
        cfg.TEST.ORACLE[key.upper()] = getattr(switches, key)
    cfg.freeze()
    return cfg


def panoptic_metrics(results: Dict, evaluator_dir: str) -> Tuple[Dict, List[Dict]]:
    """(summary, per-class rows) from the evaluator's results and the metrics JSON it wrote."""
    summary = dict(results["panoptic_seg"])
    with open(os.path.join(evaluator_dir, "panoptic_seg_metrics.json")) as f:
        per_class = json.load(f)["per_class"]
    return summary, per_class


def evaluate_oracles(cfg: CfgNode, output_dir: str) -> Tuple[List[Dict], List[Dict]]:
    """Every oracle combination on cfg.DATASETS.TEST[0]: one row of metrics per variant and
    the per-class rows of the variant without oracles."""
    dataset = cfg.DATASETS.TEST[0]
    model = build_model(cfg).eval()
    OpenSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    if not hasattr(model, "oracles"):
        raise TypeError(
            f"{type(model).__name__} has no `oracles`: the study needs an OpenSegMaskFormer "
            "(sub)class (cfg.MODEL.META_ARCHITECTURE)."
        )
    rows, baseline_classes = [], []
    for switches in oracle_combinations():
        variant_cfg = with_oracles(cfg, switches)
        model.oracles = switches
        loader = build_detection_test_loader(
            variant_cfg, dataset, mapper=build_mapper(variant_cfg, is_train=False)
        )
        evaluator_dir = os.path.join(output_dir, "oracles", switches.name)
        evaluator = PanopticEvaluator(dataset, evaluator_dir, distributed=False)
        with torch.no_grad():
            results = inference_on_dataset(model, loader, evaluator)
        summary, per_class = panoptic_metrics(results, evaluator_dir)
        rows.append({"variant": switches.name, **{m: summary.get(m, math.nan) for m in METRICS}})
        if not switches.enabled:
            baseline_classes = per_class
        logger.info("oracle %s: PQ %.2f", switches.name, summary["PQ"])
    return rows, baseline_classes


def parse_vlm_model(spec: str) -> Tuple[str, str]:
    name, _, path = spec.partition("=")
    return name, path


def vlm_gt_mask_predictions(
    backbone, text_embeddings: Tensor, batched_input: Dict, pixel_mean: Tensor, pixel_std: Tensor
) -> Dict:
    """Panoptic prediction that keeps every ground-truth segment and gives it the class whose
    text embedding is closest to the mask-pooled dense CLIP features (area-weighted)."""
    image = batched_input["image"].float().to(pixel_mean.device)
    height, width = image.shape[-2:]
    divisor = backbone.size_divisibility
    padded = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
    normalised = F.pad((image - pixel_mean) / pixel_std, (0, padded[1] - width, 0, padded[0] - height))
    labels, masks = ground_truth_of_input(batched_input, padded, pixel_mean.device)
    dense = backbone.dense_clip_features(backbone(normalised[None]))
    coverage = F.interpolate(masks[None].float(), size=dense.shape[-2:], mode="area")
    pooled = F.normalize(mask_pool(dense, coverage)[0], dim=-1)
    predicted = (pooled @ text_embeddings.T).argmax(-1) if len(labels) else labels
    id_map = torch.zeros(padded, dtype=torch.int32, device=masks.device)
    segments = []
    for index, (mask, category) in enumerate(zip(masks, predicted.tolist())):
        id_map[mask] = index + 1
        segments.append({"id": index + 1, "category_id": int(category)})
    id_map = id_map[:height, :width]
    out_hw = (batched_input.get("height", height), batched_input.get("width", width))
    if tuple(out_hw) != (height, width):
        id_map = F.interpolate(id_map[None, None].float(), size=out_hw, mode="nearest")[0, 0].int()
    return {"panoptic_seg": (id_map, segments)}


def evaluate_vlms(
    cfg: CfgNode, models: Sequence[str], resolutions: Sequence[int], output_dir: str
) -> List[Dict]:
    """Zero-shot PQ of each open_clip model x resolution classifying ground-truth masks."""
    dataset = cfg.DATASETS.TEST[0]
    vocabulary = get_vocabulary(dataset)
    rows = []
    for spec in models:
        name, path = parse_vlm_model(spec)
        model_cfg = cfg.clone()
        model_cfg.defrost()
        model_cfg.MODEL.BACKBONE.NAME = "build_openclip_backbone"
        model_cfg.MODEL.CLIP.MODEL_NAME = name
        model_cfg.MODEL.CLIP.PRETRAINED_PATH = path
        backbone = build_backbone(model_cfg).to(cfg.MODEL.DEVICE).eval()
        encoder = OpenCLIPTextEncoder.from_backbone(backbone, path)
        text = class_embeddings(
            encoder, vocabulary, templates_from_config(cfg), cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR,
            device=torch.device(cfg.MODEL.DEVICE),
        )
        mean = torch.tensor(backbone.pixel_mean, device=text.device).view(-1, 1, 1)
        std = torch.tensor(backbone.pixel_std, device=text.device).view(-1, 1, 1)
        for resolution in resolutions:
            run_cfg = with_oracles(model_cfg, OracleSwitches(segmentation=True))
            run_cfg.defrost()
            run_cfg.INPUT.MIN_SIZE_TEST = resolution
            run_cfg.INPUT.MAX_SIZE_TEST = max(cfg.INPUT.MAX_SIZE_TEST, resolution)
            run_cfg.INPUT.FORMAT = "RGB"  # CLIP statistics are RGB
            run_cfg.freeze()
            loader = build_detection_test_loader(
                run_cfg, dataset, mapper=build_mapper(run_cfg, is_train=False)
            )
            evaluator = PanopticEvaluator(
                dataset, os.path.join(output_dir, "vlm", f"{name}_{resolution}"), distributed=False
            )
            evaluator.reset()
            with torch.no_grad():
                for batch in loader:
                    outputs = [vlm_gt_mask_predictions(backbone, text, x, mean, std) for x in batch]
                    evaluator.process(batch, outputs)
            summary = evaluator.evaluate()["panoptic_seg"]
            rows.append(
                {"model": name, "checkpoint": path or "random-init", "resolution": resolution,
                 **{m: summary.get(m, math.nan) for m in ("PQ", "PQ_seen", "PQ_unseen", "FN_cls")}}
            )
            logger.info("VLM %s @ %d: PQ %.2f", name, resolution, summary["PQ"])
    return rows


def worst_classes(per_class: List[Dict], top: int) -> List[Dict]:
    """The `top` classes with the most false negatives (ties: lower PQ first)."""
    ranked = sorted(per_class, key=lambda row: (-row["FN"], row["PQ"]))
    return [
        {"class": row["name"], "split": "/".join(row["splits"]), "PQ": 100 * row["PQ"],
         "TP": row["TP"], "FN_seg": row["FN_seg"], "FN_cls": row["FN_cls"]}
        for row in ranked[:top]
    ]


def markdown_table(rows: List[Dict]) -> str:
    if not rows:
        return "(none)\n"
    return tabulate(
        [list(row.values()) for row in rows], headers=list(rows[0]), tablefmt="github",
        floatfmt=".2f",
    ) + "\n"


def bar_plot(rows: List[Dict], path: str, title: str) -> None:
    """Grouped bars of PQ / PQ_seen / PQ_unseen per oracle variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("PQ", "PQ_seen", "PQ_unseen")
    width = 0.27
    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.2))
    for offset, metric in enumerate(metrics):
        values = [0.0 if math.isnan(row[metric]) else row[metric] for row in rows]
        positions = [i + (offset - 1) * width for i in range(len(rows))]
        bars = axis.bar(positions, values, width, label=metric)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([row["variant"].replace("+", "\n+") for row in rows], fontsize=8)
    axis.set_ylabel("PQ")
    axis.set_ylim(0, 105)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    setup_logger(name="openseg")
    cfg = load_config(args.config_file, args.opts)
    if not cfg.DATASETS.TEST:
        raise ValueError(f"{args.config_file}: DATASETS.TEST is empty; name the dataset to study.")
    dataset = cfg.DATASETS.TEST[0]
    if MetadataCatalog.get(dataset).get("thing_dataset_id_to_contiguous_id", None) is None:
        raise ValueError(
            f"Dataset {dataset!r} has no panoptic metadata; the oracle study reports PQ and "
            "needs a panoptic test set (cfg.DATASETS.TEST)."
        )
    cfg.freeze()
    os.makedirs(args.output, exist_ok=True)

    oracle_rows, per_class = evaluate_oracles(cfg, args.output)
    models = args.vlm_models.split(",") if args.vlm_models else None
    if models is None and cfg.MODEL.BACKBONE.NAME == "build_openclip_backbone":
        models = [f"{cfg.MODEL.CLIP.MODEL_NAME}={cfg.MODEL.CLIP.PRETRAINED_PATH}".rstrip("=")]
    models = models or []
    models = [m for m in models if m.lower() != "none"]
    resolutions = (
        [int(r) for r in args.vlm_resolutions.split(",")] if args.vlm_resolutions
        else [cfg.INPUT.MIN_SIZE_TEST]
    )
    vlm_rows = evaluate_vlms(cfg, models, resolutions, args.output) if models else []
    worst = worst_classes(per_class, args.top_classes)

    study = {
        "config": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "oracles": oracle_rows,
        "vlm_gt_masks": vlm_rows,
        "worst_classes": worst,
    }
    with open(os.path.join(args.output, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    markdown = (
        f"# Oracle study: {os.path.basename(args.config_file)} on {dataset}\n\n"
        f"Weights: `{cfg.MODEL.WEIGHTS or 'random init'}`\n\n"
        "## Oracle variants\n\n" + markdown_table(oracle_rows)
        + "\n## VLM zero-shot classification of ground-truth masks\n\n" + markdown_table(vlm_rows)
        + f"\n## Classes with the most false negatives (no oracle, top {args.top_classes})\n\n"
        + markdown_table(worst)
    )
    with open(os.path.join(args.output, "study.md"), "w") as f:
        f.write(markdown)
    bar_plot(oracle_rows, os.path.join(args.output, "study.png"), f"Oracles on {dataset}")
    logger.info("wrote %s/study.{md,json,png}", args.output)
    return study


if __name__ == "__main__":
    main()
