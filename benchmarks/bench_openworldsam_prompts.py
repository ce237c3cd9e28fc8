"""OpenWorldSAM inference cost as the number of language prompts grows (1, 10, 100).

    PYTHONPATH=. python benchmarks/bench_openworldsam_prompts.py [--image-size 256 --images 3]

SAM2's image encoder must run once per image whatever the number of prompts. BEiT-3 fuses
the image with each prompt (early fusion, Sec. 3.1), so its cost grows with the prompts (one
call per BEIT3.PROMPTS_PER_BATCH prompts); the adapter and SAM2's mask decoder scale with
prompts x K (and, with the release's token layout, every mask carries prompts x K tokens).
For each prompt count the table gives the time per image, the encoder calls per image
(forward hooks), the time inside SAM2's image encoder and inside BEiT-3, and compares with the
naive reference that prompts one class at a time (SAM2 re-encodes per prompt: measured up to
--naive-max-prompts, extrapolated linearly beyond). Defaults: SAM2-tiny at 256, BEiT-3-base
(`--beit3 large` for the paper's size), the test fixture's sentencepiece model, random
weights (the cost does not depend on the weights).
"""
import argparse
import logging
import os
import time
from typing import Dict, List

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from tabulate import tabulate

from openseg.config import add_openseg_config
from openseg.projects.openworldsam import add_openworldsam_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (embed dim, layers, heads) of the release's BEiT-3 configs, and a tiny one for smoke runs
BEIT3_SIZES = {"large": (1024, 24, 16), "base": (768, 12, 12), "tiny": (64, 2, 4)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--images", type=int, default=3, help="timed images per prompt count")
    parser.add_argument("--image-size", type=int, default=256, help="SAM2 input side")
    parser.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--beit3", choices=sorted(BEIT3_SIZES), default="base")
    parser.add_argument("--tokenizer", default=os.path.join(
        REPO, "tests", "fixtures", "reference", "openworldsam", "beit3_tiny.spm"))
    parser.add_argument("--prompt-tokens", choices=["released", "per_query"], default="released")
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
    cfg = get_cfg()
    add_openseg_config(cfg)
    add_openworldsam_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "openworldsam", "Base-OpenWorldSAM.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    dim, layers, heads = BEIT3_SIZES[args.beit3]
    beit3 = cfg.MODEL.OPENWORLDSAM.BEIT3
    beit3.EMBED_DIM, beit3.LAYERS, beit3.HEADS, beit3.FFN_DIM = dim, layers, heads, 4 * dim
    beit3.TOKENIZER = args.tokenizer
    cfg.MODEL.OPENWORLDSAM.PROJECTOR_HIDDEN_DIM = dim
    cfg.MODEL.OPENWORLDSAM.PROMPT_TOKENS = args.prompt_tokens
    cfg.MODEL.OPENWORLDSAM.TEST.PROMPTS = "global"
    cfg.MODEL.OPENWORLDSAM.SAM2_CONFIG = args.sam2_config
    cfg.MODEL.OPENWORLDSAM.SAM2_IMAGE_SIZE = args.image_size
    cfg.MODEL.OPENWORLDSAM.NUM_TIE_BREAKERS = args.tie_breakers
    cfg.DATASETS.TEST = (register_vocabulary(max(args.prompts)),)
    return build_model(cfg).eval()


class EncoderMeter:
    """Counts and times the forward calls of SAM2's image encoder and of BEiT-3."""

    def __init__(self, model):
        self.calls = {"sam2": 0, "beit3": 0}
        self.seconds = {"sam2": 0.0, "beit3": 0.0}
        self._start: Dict[str, float] = {}
        modules = {"sam2": model.sam2.image_encoder, "beit3": model.vl_encoder.beit3}
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
            self.seconds[key] += time.perf_counter() - self._start[key]
        return hook

    def reset(self) -> None:
        self.calls = {key: 0 for key in self.calls}
        self.seconds = {key: 0.0 for key in self.seconds}


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
        seconds = {key: value / len(images) for key, value in meter.seconds.items()}
        baseline = baseline or per_image
        if prompts <= args.naive_max_prompts:
            naive = sum(run(model, images[:1], single) for _ in range(prompts))
            naive_note = "measured"
        else:
            naive = prompts * baseline
            naive_note = "extrapolated"
        rest = per_image - seconds["sam2"] - seconds["beit3"]
        rows.append([
            prompts, prompts * args.tie_breakers, 1000 * per_image, calls["sam2"],
            calls["beit3"], 1000 * seconds["sam2"], 1000 * seconds["beit3"], 1000 * rest,
            per_image / baseline, 1000 * naive, naive_note, naive / per_image,
        ])
    print(f"BEiT-3 {args.beit3}, SAM2 {args.sam2_config} at {args.image_size}, "
          f"K = {args.tie_breakers}, prompt tokens: {args.prompt_tokens}")
    print(tabulate(
        rows,
        headers=["prompts", "masks", "ms/image", "SAM2 enc calls/img", "BEiT-3 calls/img",
                 "SAM2 enc ms/img", "BEiT-3 ms/img", "adapter+decoder+post ms/img",
                 "x time vs 1 prompt", "naive ms/img", "naive", "speed-up vs naive"],
        tablefmt="pipe", floatfmt=".2f",
    ))
    assert all(row[3] == 1 for row in rows), "SAM2's image encoder ran more than once per image"


if __name__ == "__main__":
    main()
