#!/usr/bin/env python
"""Run a trained model on images and write visualised PNGs.

    python tools/demo.py --config-file CFG --input img1.jpg dir/ --output out/ \
        [--thing-classes "cat,dog|puppy" --stuff-classes "sky,grass"] MODEL.WEIGHTS model.pth

The vocabulary defaults to the config's first test dataset; --thing-classes / --stuff-classes
replace it (synonyms separated by "|"). A closed-vocabulary model needs as many classes as
it was trained with; open-vocabulary models take any list.
"""
import argparse
import logging
from pathlib import Path
from typing import List

import cv2
import torch
import tqdm
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import openseg  # noqa: F401  (registers datasets and architectures)
from openseg.checkpoint import OpenSegCheckpointer
from openseg.config import load_config
from openseg.data.vocab import register_vocabulary
from openseg.utils.visualization import draw_prediction

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
logger = logging.getLogger("openseg.demo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="folder for the visualised PNGs")
    parser.add_argument("--thing-classes", default=None, help='comma-separated, synonyms "a|b"')
    parser.add_argument("--stuff-classes", default="", help="comma-separated stuff classes")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-images", type=int, default=0, help="0 = all")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def list_images(inputs: List[str]) -> List[Path]:
    images = []
    for item in map(Path, inputs):
        if item.is_dir():
            images += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not images:
        raise FileNotFoundError(f"--input {inputs}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def parse_classes(text: str) -> List[List[str]]:
    return [[name.strip() for name in entry.split("|")] for entry in text.split(",") if entry.strip()]


def main(argv=None) -> List[Path]:
    args = parse_args(argv)
    setup_logger(name="openseg")
    cfg = load_config(args.config_file, args.opts)
    if args.thing_classes is not None:
        things, stuff = parse_classes(args.thing_classes), parse_classes(args.stuff_classes)
        num_classes = len(things) + len(stuff)
        if not cfg.MODEL.OPEN_VOCABULARY and num_classes != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            raise ValueError(
                f"{args.config_file}: a closed-vocabulary model with MODEL.SEM_SEG_HEAD.NUM_CLASSES="
                f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} cannot take {num_classes} classes from "
                f"--thing-classes/--stuff-classes; give exactly that many (renaming) or use an "
                f"open-vocabulary model"
            )
        cfg.DATASETS.TEST = (register_vocabulary("openseg_demo_cli_vocabulary", things, stuff),)
    cfg.freeze()

    model = build_model(cfg).eval()
    OpenSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC:
        metadata = Metadata(thing_classes=["object"])
    else:
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)

    images = list_images(args.input)
    if args.max_images:
        images = images[: args.max_images]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm.tqdm(images, desc="demo"):
        image = read_image(str(path), format=cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.transpose(2, 0, 1).copy())
        with torch.no_grad():
            prediction = model([{"image": tensor, "height": height, "width": width}])[0]
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        drawn = draw_prediction(rgb, prediction, metadata, args.score_threshold)
        target = out_dir / f"{path.stem}.png"
        cv2.imwrite(str(target), drawn[:, :, ::-1])
        written.append(target)
    logger.info("wrote %d visualisations to %s", len(written), out_dir)
    return written


if __name__ == "__main__":
    main()
