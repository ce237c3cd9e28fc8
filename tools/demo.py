#!/usr/bin/env python
"""Run a trained model on images and write visualised PNGs.

    python tools/demo.py --config-file CFG --input img1.jpg dir/ --output out/ \
        [--thing-classes "cat,dog|puppy" --stuff-classes "sky,grass"] MODEL.WEIGHTS model.pth

The vocabulary defaults to the config's first test dataset; --thing-classes / --stuff-classes
replace it (synonyms separated by "|"). A closed-vocabulary model needs as many classes as
it was trained with; open-vocabulary models take any list.

Each input `name.ext` is drawn to `<output>/name.png` (`name_ext.png` when two inputs share a
name); unreadable images are skipped with a warning naming them, and a summary (written /
skipped) ends the run.
"""
import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import torch
import tqdm
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import openseg  # noqa: F401  (registers datasets and architectures)
from openseg.checkpoint import OpenSegCheckpointer
from openseg.config import load_config
from openseg.data.mappers import DataFileError, read_file
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


def list_images(inputs: List[str]) -> Tuple[List[Path], List[Path]]:
    """(images found, inputs that do not exist); raises when there is no image at all."""
    images, missing = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            images += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            images.append(item)
        else:
            logger.warning("skipped --input %s: no such file or folder", item)
            missing.append(item)
    if not images:
        raise FileNotFoundError(f"--input {inputs}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, missing


def output_names(images: List[Path]) -> Dict[Path, str]:
    """`name.png` per input; inputs sharing a name get `name_ext.png`, and a number when
    even that repeats (the same file name in several folders)."""
    stems = Counter(p.stem for p in images)
    names = {p: f"{p.stem}.png" if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}.png" for p in images}
    repeated = Counter(names.values())
    seen: Counter = Counter()
    for path in images:
        name = names[path]
        if repeated[name] > 1:
            seen[name] += 1
            names[path] = f"{Path(name).stem}_{seen[name]}.png"
    return names


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

    images, skipped = list_images(args.input)
    if args.max_images:
        images = images[: args.max_images]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(images)
    written = []
    for path in tqdm.tqdm(images, desc="demo"):
        try:
            image = read_file(str(path), cfg.INPUT.FORMAT)
        except DataFileError as error:
            logger.warning("skipped %s", error)
            skipped.append(path)
            continue
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.transpose(2, 0, 1).copy())
        with torch.no_grad():
            prediction = model([{"image": tensor, "height": height, "width": width}])[0]
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        drawn = draw_prediction(rgb, prediction, metadata, args.score_threshold)
        target = out_dir / names[path]
        if not cv2.imwrite(str(target), drawn[:, :, ::-1]):
            raise OSError(f"could not write {target}")
        written.append(target)
    logger.info(
        "demo: %d written to %s, %d skipped%s", len(written), out_dir, len(skipped),
        "".join(f"\n  skipped {p}" for p in skipped),
    )
    return written


if __name__ == "__main__":
    main()
