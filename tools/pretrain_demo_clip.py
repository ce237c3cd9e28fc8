#!/usr/bin/env python
"""Pre-train a demo config's tiny CLIP on rendered demo scenes, so it knows the demo's eight
classes (including the unseen "cross" and "sand") as a real CLIP knows web concepts
(openseg.modeling.demo_clip), and write an open_clip state dict for MODEL.CLIP.PRETRAINED_PATH.

    python tools/pretrain_demo_clip.py --config-file configs/demo/fcclip_tiny_convnext.yaml \
        --output output/demo_clip/fcclip_tiny_convnext.pt
    python tools/pretrain_demo_clip.py --model-name openseg-maftplus-pico-convnext_base \
        --output clip.pt -- MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES "['{}']"

The CLIP (cfg.MODEL.CLIP.MODEL_NAME, or --model-name) starts from a seeded random init; the
prompt templates are the config's (FC-CLIP's when empty). Prints the zero-shot accuracy per
class on held-out renders at the end, seen and unseen classes separately.
"""
import argparse
import logging
import os
import time
from typing import Dict, List, Optional

import torch
from detectron2.utils.logger import setup_logger

import openseg  # noqa: F401  (registers datasets and every project's CLIP configs)
from openseg.config import load_config
from openseg.data.datasets.demo import ALL_CLASSES, UNSEEN_CLASSES
from openseg.data.vocab import FCCLIP_PROMPT_TEMPLATES
from openseg.modeling.backbones.clip import build_openclip_backbone
from openseg.modeling.demo_clip import pretrain, zero_shot_accuracy

logger = logging.getLogger("openseg.pretrain_demo_clip")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", help="a demo config; its MODEL.CLIP.MODEL_NAME and templates")
    source.add_argument("--model-name", help="an open_clip model name (default config otherwise)")
    parser.add_argument("--output", required=True, help="path of the state dict (.pt)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="rendered images per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the CLIP's random init")
    parser.add_argument("--held-out-images", type=int, default=256)
    parser.add_argument("--log-period", type=int, default=50)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ...: config overrides")
    return parser.parse_args(argv)


def format_accuracy(accuracy: Dict[str, float]) -> str:
    """One line per class, then the mean of the seen and of the unseen classes."""
    lines = [
        f"{name:>10} ({'unseen' if name in UNSEEN_CLASSES else 'seen'}): {100 * accuracy[name]:5.1f}"
        for name in ALL_CLASSES
    ]
    for group, names in (
        ("seen", [n for n in ALL_CLASSES if n not in UNSEEN_CLASSES]),
        ("unseen", list(UNSEEN_CLASSES)),
    ):
        lines.append(f"{'mean ' + group:>19}: {100 * sum(accuracy[n] for n in names) / len(names):5.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    setup_logger(name="openseg")
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    cfg = load_config(args.config_file, opts)
    if args.model_name:
        cfg.MODEL.CLIP.MODEL_NAME = args.model_name
    cfg.MODEL.CLIP.PRETRAINED_PATH = ""
    cfg.MODEL.CLIP.FROZEN = False
    templates = list(cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES) or list(FCCLIP_PROMPT_TEMPLATES)
    torch.manual_seed(args.seed)
    backbone = build_openclip_backbone(cfg, None)
    logger.info("Pre-training %s on demo renders, templates %s", cfg.MODEL.CLIP.MODEL_NAME, templates)
    start = time.perf_counter()
    pretrain(backbone, templates, args.steps, args.batch_size, args.lr, args.log_period)
    logger.info("Pre-training took %.0f s", time.perf_counter() - start)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(backbone.clip_model.state_dict(), args.output)
    logger.info("Wrote %s (MODEL.CLIP.PRETRAINED_PATH)", args.output)
    accuracy = zero_shot_accuracy(backbone, templates, args.held_out_images)
    print(f"Zero-shot accuracy on {args.held_out_images} held-out renders (segments):")
    print(format_accuracy(accuracy))
    return accuracy


if __name__ == "__main__":
    main()
