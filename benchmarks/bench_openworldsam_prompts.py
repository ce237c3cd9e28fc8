"""OpenWorldSAM inference cost as the number of language prompts grows (1, 10, 100).

    PYTHONPATH=. python benchmarks/bench_openworldsam_prompts.py [--image-size 256 --images 3]

The image encoders (SAM2 and the vision-language encoder's image tower) must run once per
image whatever the number of prompts; only the adapter and SAM2's mask decoder scale with
prompts x K. For each prompt count the table gives the measured time per image, the encoder
calls per image (counted with forward hooks) and the time spent inside them, and compares
with the naive reference that prompts SAM2 one class at a time (encoders re-run per prompt:
measured for 1 and 10 prompts, extrapolated linearly for more). Defaults: SAM2-tiny and the
tiny open_clip test model, random weights (the cost does not depend on the weights).
"""
import argparse
import logging
import os
import time
from typing import Dict, List

import open_clip
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from tabulate import tabulate

from openseg.config import add_openseg_config
from openseg.projects.openworldsam import add_openworldsam_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--images", type=int, default=3, help="timed images per prompt count")
    parser.add_argument("--image-size", type=int, default=256, help="SAM2 input side")
    parser.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--clip-model", default="openseg-test-convnext")
    parser.add_argument("--tie-breakers", type=int, default=20)
    parser.add_argument("--naive-max-prompts", type=int, default=10,
                        help="largest prompt count for which the naive reference is measured")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def register_vocabulary(num_classes: int) -> str:
    name = f"openworldsam_bench_{num_classes}_classes"
    if name not in MetadataCatalog.list():
        names = [f"thing number {i}" for i in range(num_classes)]
        MetadataCatalog.get(name).set(
            thing_classes=names, stuff_classes=names,
            thing_dataset_id_to_contiguous_id={i: i for i in range(num_classes)},
        )
    return name


def build(args: argparse.Namespace):
    open_clip.add_model_config(os.path.join(REPO, "tests", "data", "open_clip"))
    cfg = get_cfg()
    add_openseg_config(cfg)
    add_openworldsam_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "openworldsam", "Base-OpenWorldSAM.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CLIP.MODEL_NAME = args.clip_model
    cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES = ["{}"]
    cfg.MODEL.OPENWORLDSAM.SAM2_CONFIG = args.sam2_config
    cfg.MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE = args.image_size
    cfg.MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS = args.tie_breakers
    cfg.DATASETS.TEST = (register_vocabulary(max(args.prompts)),)
    return build_model(cfg).eval()


class EncoderMeter:
    """Counts and times the forward calls of the two image encoders."""

    def __init__(self, model):
        self.calls = {"sam2": 0, "vl_image": 0}
        self.seconds = 0.0
        self._start: Dict[str, float] = {}
        modules = {
            "sam2": model.sam2.image_encoder,
            "vl_image": model.vl_encoder.text_encoder.clip_model.visual,
        }
        self.handles = []
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(key)))
            self.handles.append(module.register_forward_hook(self._post(key)))

    def _pre(self, key):
        def hook(*_):
            self._start[key] = time.perf_counter()
        return hook

    def _post(self, key):
        def hook(*_):
            self.calls[key] += 1
            self.seconds += time.perf_counter() - self._start[key]
        return hook

    def reset(self) -> None:
        self.calls = {key: 0 for key in self.calls}
        self.seconds = 0.0


def run(model, images: List[Dict], dataset: str) -> float:
    model.test_dataset = dataset
    start = time.perf_counter()
    with torch.no_grad():
        for image in images:
            model([image])
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model = build(args)
    print(model.parameter_report())
    images = [
        {"image": torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8), "height": 480,
         "width": 640}
        for _ in range(args.images)
    ]
    meter = EncoderMeter(model)
    single = register_vocabulary(1)
    run(model, images[:1], single)  # warm-up and text-embedding cache
    rows, baseline = [], None
    for prompts in args.prompts:
        dataset = register_vocabulary(prompts)
        run(model, images[:1], dataset)  # text embeddings of this vocabulary, cached
        meter.reset()
        per_image = run(model, images, dataset) / len(images)
        calls = {key: value / len(images) for key, value in meter.calls.items()}
        encoder_seconds = meter.seconds / len(images)
        baseline = baseline or per_image
        if prompts <= args.naive_max_prompts:
            naive = sum(run(model, images[:1], single) for _ in range(prompts))
            naive_note = "measured"
        else:
            naive = prompts * baseline
            naive_note = "extrapolated"
        rows.append([
            prompts, prompts * args.tie_breakers, 1000 * per_image, calls["sam2"],
            calls["vl_image"], 1000 * encoder_seconds, per_image / baseline,
            1000 * naive, naive_note, naive / per_image,
        ])
    print(tabulate(
        rows,
        headers=["prompts", "masks", "ms/image", "SAM2 enc calls/img", "VL image calls/img",
                 "encoders ms/img", "x time vs 1 prompt", "naive ms/img", "naive",
                 "speed-up vs naive"],
        tablefmt="pipe", floatfmt=".2f",
    ))
    assert all(row[3] == 1 and row[4] == 1 for row in rows), "encoders ran more than once"


if __name__ == "__main__":
    main()
