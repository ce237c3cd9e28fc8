#!/usr/bin/env python
"""The study of "What holds back open-vocabulary segmentation?" (Sec. 4): Tables 1-5 and
Figure 4 for several models side by side.

    python tools/oracle_study.py --output DIR \
        --model FC-CLIP configs/fcclip/fcclip_convnext_large_eval_ade20k.yaml fcclip.pth \
        --model MAFT+ CONFIG WEIGHTS \
        [--vlm all --vlm-root /ckpt/vlms] [--vlm-settings 512,640,800x1333] \
        [--in-domain 300 CONFIG WEIGHTS ...] [-- KEY VALUE ...]

- Table 1: bare CLIP models (`--vlm`, keys of openseg.modeling.vlm_oracle.VLM_MODELS, weights
  under --vlm-root) classify the ground-truth masks (segmentation oracle, Sec. 4.1) at each
  resolution setting.
- Tables 2-4: every `--model` under the oracle settings of openseg.modeling.oracles.PAPER_ROWS
  (classification; selection; selection + no-object dropped; + segmentation / classification),
  one row block per model.
- Table 5: the classes whose recall (TP / (TP + FN)) is below --recall-below for the first
  model and whose TP drop against the in-domain model (the `--in-domain` entry with the most
  training images, with ensembling) is largest; TP / FN_seg / FN_cls of every model.
- Figure 4: PQ of each `--in-domain` model (trained on NUM_IMAGES images of the target
  domain) with and without ensembling (`--no-ensemble-opts`) against the training-set size,
  and each `--model` without oracles as a horizontal line.

Every PQ has seen / unseen columns: the test set's `class_splits`, or the split against the
models' training set (openseg.evaluation.builder.ensure_class_splits). KEY VALUE overrides
(after "--") apply to every config. Writes study.md, study.json, figure4.png and oracles.png to DIR.
"""
import argparse
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

import openseg  # noqa: F401  (registers datasets, architectures, projects' configs)
from openseg.checkpoint import OpenSegCheckpointer
from openseg.config import load_config
from openseg.data.mappers import build_mapper
from openseg.evaluation.builder import ensure_class_splits
from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.modeling.oracles import PAPER_ROWS, OracleSwitches, oracle_variants
from openseg.modeling.vlm_oracle import TABLE1_SETTINGS, VLM_MODELS, evaluate_vlm

logger = logging.getLogger("openseg.oracle_study")
PQ_COLUMNS = ("PQ", "PQ_seen", "PQ_unseen")
NO_ENSEMBLE_OPTS = "MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA 0.0 MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA 0.0"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="folder for study.{md,json} and plots")
    parser.add_argument(
        "--model", action="append", nargs="+", default=[], metavar="NAME CONFIG [WEIGHTS]",
        help="an open-vocabulary model of Tables 2-5 (repeat for several); WEIGHTS defaults "
        "to the config's MODEL.WEIGHTS",
    )
    parser.add_argument(
        "--in-domain", action="append", nargs=3, default=[], metavar=("NUM_IMAGES", "CONFIG", "WEIGHTS"),
        help="a model trained on NUM_IMAGES images of the test domain (Figure 4, Table 5)",
    )
    parser.add_argument(
        "--no-ensemble-opts", default=NO_ENSEMBLE_OPTS,
        help="overrides that turn the CLIP ensemble off (Figure 4, blue)",
    )
    parser.add_argument(
        "--vlm", action="append", default=[],
        help=f"Table 1 model key ({', '.join(VLM_MODELS)}) or 'all'; repeatable",
    )
    parser.add_argument("--vlm-root", default="", help="folder holding one sub-folder per VLM key")
    parser.add_argument(
        "--vlm-settings", default=",".join(TABLE1_SETTINGS),
        help=f"comma-separated resolution settings of Table 1 ({', '.join(TABLE1_SETTINGS)})",
    )
    parser.add_argument("--table5-classes", type=int, default=5)
    parser.add_argument("--recall-below", type=float, default=0.1)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ...: overrides of every config"
    )
    args = parser.parse_args(argv)
    for entry in args.model:
        if len(entry) not in (2, 3):
            parser.error(
                f"--model {' '.join(entry)}: give NAME CONFIG [WEIGHTS]; put config overrides "
                "after '--' (... --model NAME CONFIG -- KEY VALUE)"
            )
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if not args.model and not args.vlm:
        parser.error("nothing to study: give at least one --model or --vlm")
    return args


def model_config(config_file: str, weights: Optional[str], opts: Sequence[str]) -> CfgNode:
    cfg = load_config(config_file, list(opts) + (["MODEL.WEIGHTS", weights] if weights else []))
    if not cfg.DATASETS.TEST:
        raise ValueError(f"{config_file}: DATASETS.TEST is empty; name the dataset to study.")
    return cfg


def check_test_set(cfg: CfgNode, source: str) -> str:
    """The panoptic test set of `cfg`, given seen / unseen `class_splits`; fails naming what
    is missing (panoptic ground truth, a training set to split against)."""
    dataset = cfg.DATASETS.TEST[0]
    records = DatasetCatalog.get(dataset)
    if not records or any("pan_seg_file_name" not in r or "segments_info" not in r for r in records[:1]):
        raise ValueError(
            f"{source}: test set {dataset!r} has no panoptic ground truth (pan_seg_file_name / "
            "segments_info); the oracles and PQ need a panoptic test set (DATASETS.TEST)."
        )
    ensure_class_splits(cfg, dataset)
    splits = MetadataCatalog.get(dataset).get("class_splits", None) or {}
    if "seen" not in splits or "unseen" not in splits:
        raise ValueError(
            f"{source}: test set {dataset!r} has no seen / unseen class_splits and the config "
            "names no DATASETS.TRAIN to split against."
        )
    return dataset


def evaluator_for(dataset: str, output_dir: str) -> PanopticEvaluator:
    return PanopticEvaluator(dataset, output_dir, distributed=False)


def evaluate_model(
    cfg: CfgNode, variants: Sequence[OracleSwitches], output_dir: str
) -> Dict[str, Dict]:
    """{variant name: {"summary", "per_class"}} of one model under each oracle setting."""
    dataset = cfg.DATASETS.TEST[0]
    model = build_model(cfg).eval()
    if not isinstance(model, OpenSegMaskFormer):
        raise TypeError(
            f"{type(model).__name__} (MODEL.META_ARCHITECTURE) is not an OpenSegMaskFormer: the "
            "oracles need its per-query class and mask outputs."
        )
    OpenSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    results = {}
    for switches in variants:
        model.oracles = switches
        variant_cfg = load_config_with(cfg, switches.config_opts())
        loader = build_detection_test_loader(
            variant_cfg, dataset, mapper=build_mapper(variant_cfg, is_train=False)
        )
        out = os.path.join(output_dir, switches.name)
        with torch.no_grad():
            summary = inference_on_dataset(model, loader, evaluator_for(dataset, out))["panoptic_seg"]
        with open(os.path.join(out, "panoptic_seg_metrics.json")) as f:
            per_class = json.load(f)["per_class"]
        results[switches.name] = {"summary": dict(summary), "per_class": per_class}
        logger.info("%s / %s: PQ %.2f", output_dir, switches.name, summary["PQ"])
    return results


def load_config_with(cfg: CfgNode, opts: Sequence[str]) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def pq_cells(summary: Dict) -> List[float]:
    return [summary.get(column, math.nan) for column in PQ_COLUMNS]


def oracle_tables(results: Dict[str, Dict[str, Dict]]) -> Dict[int, List[Dict]]:
    """Rows of Tables 2-4: per model the rows of PAPER_ROWS, in table order."""
    tables: Dict[int, List[Dict]] = {2: [], 3: [], 4: []}
    for model_name, variants in results.items():
        for (table, row), (label, switches) in PAPER_ROWS.items():
            summary = variants[switches.name]["summary"]
            entry = {"model": model_name, "row": row, "setting": label,
                     "oracles": switches.name}
            if table == 4:
                entry["+ oracle seg."] = "✓" if switches.segmentation else "-"
                entry["+ oracle cls."] = "✓" if switches.classification else "-"
            entry.update(zip(PQ_COLUMNS, pq_cells(summary)))
            tables[table].append(entry)
    return tables


def recall(row: Dict) -> float:
    total = row["TP"] + row["FN"]
    return row["TP"] / total if total else math.nan


def table5(
    per_class: Dict[str, List[Dict]], in_domain: Optional[List[Dict]], top: int,
    recall_below: float,
) -> List[Dict]:
    """Sec. 4.4: classes where the first model's recall is below `recall_below` and whose TP
    drop against the in-domain model is largest (without an in-domain model: the most ground
    truth segments missed); TP / FN_seg / FN_cls of every model."""
    names = list(per_class)
    reference = per_class[names[0]]
    candidates = [i for i, row in enumerate(reference) if recall(row) < recall_below]
    if in_domain is not None:
        key = lambda i: (-(in_domain[i]["TP"] - reference[i]["TP"]), -reference[i]["FN"])  # noqa: E731
    else:
        key = lambda i: (-reference[i]["FN"], i)  # noqa: E731
    rows = []
    for i in sorted(candidates, key=key)[:top]:
        row = {"class": reference[i]["name"]}
        if in_domain is not None:
            row["TP in-domain"] = in_domain[i]["TP"]
        for name in names:
            stats = per_class[name][i]
            row.update({f"{name} FN_seg": stats["FN_seg"], f"{name} FN_cls": stats["FN_cls"],
                        f"{name} TP": stats["TP"]})
        rows.append(row)
    return rows


def markdown_table(rows: List[Dict]) -> str:
    if not rows:
        return "(none)\n"
    return tabulate(
        [list(row.values()) for row in rows], headers=list(rows[0]), tablefmt="github",
        floatfmt=".1f",
    ) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def oracle_plot(tables: Dict[int, List[Dict]], path: str) -> None:
    """Grouped bars: PQ of every distinct oracle setting per model."""
    plt = _pyplot()
    models = list(dict.fromkeys(row["model"] for rows in tables.values() for row in rows))
    settings = list(dict.fromkeys(row["oracles"] for rows in tables.values() for row in rows))
    value = {(row["model"], row["oracles"]): row["PQ"] for rows in tables.values() for row in rows}
    width = 0.8 / max(1, len(models))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.4 * len(settings)), 4.2))
    for m, model in enumerate(models):
        positions = [i + (m - (len(models) - 1) / 2) * width for i in range(len(settings))]
        bars = axis.bar(positions, [value[model, s] for s in settings], width, label=model)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.set_xticks(range(len(settings)))
    axis.set_xticklabels([s.replace("+", "\n+") for s in settings], fontsize=7)
    axis.set_ylabel("PQ")
    axis.set_ylim(0, 105)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def figure4(in_domain: List[Dict], open_vocabulary: Dict[str, float], path: str) -> None:
    """PQ against the number of in-domain training images, with (yellow) and without (blue)
    ensembling; open-vocabulary models as horizontal lines (Figure 4)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.0, 4.2))
    if in_domain:
        xs = [row["images"] for row in in_domain]
        axis.plot(xs, [row["PQ ensemble"] for row in in_domain], "o-", color="goldenrod",
                  label="in-domain, with ensembling")
        axis.plot(xs, [row["PQ no ensemble"] for row in in_domain], "o-", color="tab:blue",
                  label="in-domain, without ensembling")
        axis.set_xscale("log")
    colors = ["tab:red", "tab:green", "tab:purple", "tab:brown"]
    for i, (name, pq) in enumerate(open_vocabulary.items()):
        axis.axhline(pq, color=colors[i % len(colors)], linestyle="--", label=name)
    axis.set_xlabel("in-domain training images")
    axis.set_ylabel("PQ")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def vlm_keys(requested: Sequence[str]) -> List[str]:
    keys: List[str] = []
    for key in requested:
        for item in (VLM_MODELS if key == "all" else [key]):
            if item not in VLM_MODELS:
                raise ValueError(f"--vlm {item!r}: unknown; choose from {list(VLM_MODELS)} or 'all'.")
            if item not in keys:
                keys.append(item)
    return keys


def table1(
    cfg: CfgNode, keys: Sequence[str], root: str, settings: Sequence[str], output_dir: str
) -> List[Dict]:
    rows = []
    for key in keys:
        spec = VLM_MODELS[key]
        row = {"model": spec.family, "architecture": spec.architecture, "pre-training": spec.data}
        for setting in settings:
            if setting not in TABLE1_SETTINGS:
                raise ValueError(f"--vlm-settings {setting!r}: choose from {list(TABLE1_SETTINGS)}.")
            summary = evaluate_vlm(cfg, key, root, setting, os.path.join(output_dir, key, setting))
            row.update({f"{setting} {c}": v for c, v in zip(PQ_COLUMNS, pq_cells(summary))})
            logger.info("Table 1 %s @ %s: PQ %.2f", key, setting, summary["PQ"])
        rows.append(row)
    return rows


def main(argv=None) -> Dict:
    args = parse_args(argv)
    setup_logger(name="openseg")
    os.makedirs(args.output, exist_ok=True)
    models = {entry[0]: model_config(entry[1], entry[2] if len(entry) == 3 else None, args.opts)
              for entry in args.model}
    datasets = {name: check_test_set(cfg, f"--model {name}") for name, cfg in models.items()}
    if len(set(datasets.values())) > 1:
        raise ValueError(f"--model entries are evaluated on different test sets {datasets}; "
                         "override DATASETS.TEST for all of them.")
    variants = oracle_variants()
    results = {name: evaluate_model(cfg, variants, os.path.join(args.output, "models", name))
               for name, cfg in models.items()}
    tables = oracle_tables(results)

    in_domain_rows, in_domain_classes = [], None
    for images, config_file, weights in sorted(args.in_domain, key=lambda e: int(e[0])):
        cfg = model_config(config_file, weights, args.opts)
        check_test_set(cfg, f"--in-domain {images}")
        out = os.path.join(args.output, "in_domain", images)
        with_ensemble = evaluate_model(cfg, [OracleSwitches()], os.path.join(out, "ensemble"))["none"]
        without = evaluate_model(
            load_config_with(cfg, args.no_ensemble_opts.split()), [OracleSwitches()],
            os.path.join(out, "no_ensemble"),
        )["none"]
        in_domain_rows.append({"images": int(images), "PQ ensemble": with_ensemble["summary"]["PQ"],
                               "PQ no ensemble": without["summary"]["PQ"]})
        in_domain_classes = with_ensemble["per_class"]
    per_class = {name: variants_["none"]["per_class"] for name, variants_ in results.items()}
    worst = table5(per_class, in_domain_classes, args.table5_classes, args.recall_below) if per_class else []

    reference_cfg = next(iter(models.values()), None)
    vlm_rows: List[Dict] = []
    if args.vlm:
        if reference_cfg is None:
            reference_cfg = model_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                      "fcclip", "Base-FCCLIP.yaml"), None, args.opts)
        check_test_set(reference_cfg, "Table 1")
        vlm_rows = table1(reference_cfg, vlm_keys(args.vlm), args.vlm_root,
                          args.vlm_settings.split(","), os.path.join(args.output, "vlm"))

    open_vocabulary = {name: r["none"]["summary"]["PQ"] for name, r in results.items()}
    study = {
        "models": {name: {"config": [e for e in args.model if e[0] == name][0][1:],
                          "dataset": datasets[name]} for name in models},
        "table1": vlm_rows, "table2": tables[2], "table3": tables[3], "table4": tables[4],
        "table5": worst, "figure4": {"in_domain": in_domain_rows, "open_vocabulary": open_vocabulary},
        "oracles": {name: {v: r["summary"] for v, r in variants_.items()}
                    for name, variants_ in results.items()},
    }
    with open(os.path.join(args.output, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    dataset = next(iter(datasets.values()), reference_cfg.DATASETS.TEST[0] if reference_cfg else "")
    markdown = (
        f"# What holds back open-vocabulary segmentation? Study on {dataset}\n\n"
        "## Table 1: zero-shot VLMs on ground-truth masks (segmentation oracle)\n\n"
        + markdown_table(vlm_rows)
        + "\n## Table 2: oracle classification\n\n" + markdown_table(tables[2])
        + "\n## Table 3: oracle mask selection\n\n" + markdown_table(tables[3])
        + "\n## Table 4: oracle mask selection + segmentation / classification\n\n"
        + markdown_table(tables[4])
        + f"\n## Table 5: classes with recall < {100 * args.recall_below:.0f} % and the largest "
        "TP drop against the in-domain model\n\n" + markdown_table(worst)
        + "\n## Figure 4: in-domain models (figure4.png)\n\n" + markdown_table(in_domain_rows)
        + "\nOpen-vocabulary models (PQ): "
        + ", ".join(f"{name} {pq:.1f}" for name, pq in open_vocabulary.items()) + "\n"
    )
    with open(os.path.join(args.output, "study.md"), "w") as f:
        f.write(markdown)
    if results:
        oracle_plot(tables, os.path.join(args.output, "oracles.png"))
    figure4(in_domain_rows, open_vocabulary, os.path.join(args.output, "figure4.png"))
    logger.info("wrote %s/study.{md,json}, oracles.png, figure4.png", args.output)
    return study


if __name__ == "__main__":
    main()
