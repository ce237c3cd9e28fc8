#!/usr/bin/env python
"""Pre-train a demo config's tiny CLIP on rendered demo scenes, so it knows the demo's eight
classes (including the unseen "cross" and "sand") as a real CLIP knows web concepts
(openseg.modeling.demo_clip), and write an open_clip state dict for MODEL.CLIP.PRETRAINED_PATH.
`--scenes shapes` pre-trains on the open-vocabulary shapes scenes instead (its 16 classes,
the unseen ones included; `openseg_demo_ov_shapes_*`).

    python tools/pretrain_demo_clip.py --config-file configs/demo/fcclip_tiny_convnext.yaml \
        --output output/demo_clip/fcclip_tiny_convnext.pt
    python tools/pretrain_demo_clip.py --config-file configs/demo/fcclip_tiny_convnext.yaml \
        --scenes shapes --output output/demo_clip/fcclip_tiny_convnext_shapes.pt
    python tools/pretrain_demo_clip.py --model-name openseg-maftplus-pico-convnext_base \
        --output clip.pt -- MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES "['{}']"

The CLIP (cfg.MODEL.CLIP.MODEL_NAME, or --model-name) starts from a seeded random init; the
prompt templates are the config's (FC-CLIP's when empty), and the renders are resized to the
config's test input size (INPUT.MIN_SIZE_TEST), the size the segmentation model sees. Prints the zero-shot accuracy per
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
from openseg.data.datasets.demo import SCENES, DemoScenes
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
    parser.add_argument(
        "--scenes", choices=sorted(SCENES), default="demo",
        help="the rendered scenes: the demo's, or the open-vocabulary shapes'",
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="rendered images per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the CLIP's random init")
    parser.add_argument("--held-out-images", type=int, default=256)
    parser.add_argument("--log-period", type=int, default=50)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ...: config overrides")
    return parser.parse_args(argv)


def format_accuracy(accuracy: Dict[str, float], scenes: DemoScenes = SCENES["demo"]) -> str:
    """One line per class, then the mean of the seen and of the unseen classes."""
    unseen = scenes.unseen_classes
    lines = [
        f"{name:>10} ({'unseen' if name in unseen else 'seen'}): {100 * accuracy[name]:5.1f}"
        for name in scenes.classes
    ]
    for group, names in (("seen", scenes.seen_classes), ("unseen", unseen)):
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
    scenes, input_size = SCENES[args.scenes], cfg.INPUT.MIN_SIZE_TEST
    logger.info(
        "Pre-training %s on %s renders at %d px, templates %s", cfg.MODEL.CLIP.MODEL_NAME,
        args.scenes, input_size, templates,
    )
    start = time.perf_counter()
    pretrain(
        backbone, templates, args.steps, args.batch_size, args.lr, args.log_period, scenes, input_size
    )
    logger.info("Pre-training took %.0f s", time.perf_counter() - start)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(backbone.clip_model.state_dict(), args.output)
    logger.info("Wrote %s (MODEL.CLIP.PRETRAINED_PATH)", args.output)
    accuracy = zero_shot_accuracy(
        backbone, templates, args.held_out_images, scenes=scenes, input_size=input_size
    )
    print(f"Zero-shot accuracy on {args.held_out_images} held-out {args.scenes} renders (segments):")
    print(format_accuracy(accuracy, scenes))
    return accuracy


if __name__ == "__main__":
    main()
