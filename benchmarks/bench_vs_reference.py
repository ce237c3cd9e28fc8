"""openseg's Mask2Former against the released Mask2Former: time and peak memory, one run.

    PYTHONPATH=. python benchmarks/bench_vs_reference.py --reference-root ../shared/reference \
        [--device cpu|cuda] [--sizes 384,512] [--threads 1,2] [--batch 2] [--repeats 5] \
        [--quick] [--check] [--profile]

Both models are built at the released COCO panoptic R50 configuration
(`configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml`: ResNet-50, 6 deformable
encoder layers, 9 masked-attention decoder layers, 100 queries, 133 classes, 12544 points)
and openseg's `configs/coco/maskformer/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml`. openseg gets the
reference's random weights through `openseg.checkpoint.mask2former.reference_to_openseg`, so
both compute the same function (the panoptic outputs are compared as a sanity check).

Per setting (image size x threads) the two models run interleaved, alternating which goes
first, on the same synthetic batch:
  train     one training step: forward, weighted losses, backward, AdamW step with the
            released full-model gradient clipping (each side's own optimizer builder)
  inference eval-mode forward with panoptic post-processing (`--tasks` adds semantic /
            instance), under torch.no_grad
  memory    peak memory above the level before the call, for both phases: on CUDA
            torch.cuda.max_memory_allocated; on CPU the peak of the running sum of tensor
            allocations and frees recorded by the torch profiler
Ratios are openseg / reference, the median over repeats of each interleaved pair (a pair
runs back to back, so load from other processes on the machine affects both sides alike).
`--check` exits with status 1 when any ratio exceeds `--limit` (1.0). `--profile` adds
where openseg's training step and inference spend their time (torch.profiler), next to the
reference's.

The reference is imported from `--reference-root` at run time with stub modules for its
compiled ops (tools/reference_fixtures/_stubs.py); its deformable attention then runs its
pure-PyTorch path on CPU, as openseg's does without the compiled op.
"""
import argparse
import contextlib
import functools
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import Instances
from tabulate import tabulate
from torch import nn

from openseg.checkpoint.mask2former import reference_to_openseg
from openseg.config import load_config
from openseg.engine.optimizer import build_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FOLDER = "facebookresearch__Mask2Former"
REFERENCE_CONFIG = "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
OPENSEG_CONFIG = REPO_ROOT / "configs/coco/maskformer/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
METADATA_NAME = "openseg_bench_vs_reference"
NUM_CLASSES, NUM_THINGS = 133, 80  # COCO panoptic: contiguous ids 0..79 are things
SIDES = ("openseg", "reference")
MEASURES = ("train", "inference", "train_memory", "inference_memory")
_MEASURED = "bench_vs_reference: measured call"


# ------------------------------------------------------------------ pure helpers (tested)
def paired_median_ratio(ours: Sequence[float], reference: Sequence[float]) -> float:
    """Median over repeats of ours[i] / reference[i] (pairs measured back to back)."""
    if len(ours) != len(reference) or not ours:
        raise ValueError(f"need equally many measurements, got {len(ours)} and {len(reference)}")
    return statistics.median(o / r for o, r in zip(ours, reference))


def peak_within(byte_deltas: Iterable[Tuple[int, int]], start: int, end: int) -> int:
    """How far the running sum of allocations (+bytes) and frees (-bytes) rises, during
    [start, end], above its level at `start`; `byte_deltas` are (time, bytes) in any order."""
    base = level = peak = 0
    for when, delta in sorted(byte_deltas):
        if when > end:
            break
        level += delta
        if when < start:
            base = peak = level
        else:
            peak = max(peak, level)
    return peak - base


def ratios_over_limit(ratios: Dict[str, float], limit: float) -> List[str]:
    """'name=ratio' of every ratio above `limit`, for `--check`."""
    return [f"{name}={value:.3f}" for name, value in ratios.items() if value > limit]


# ------------------------------------------------------------------ models
def _register_metadata() -> None:
    """Both models read thing ids from the test dataset's metadata; no dataset is loaded."""
    meta = MetadataCatalog.get(METADATA_NAME)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        meta.set(
            thing_classes=[f"thing{i}" for i in range(NUM_THINGS)],
            stuff_classes=[f"class{i}" for i in range(NUM_CLASSES)],
            thing_dataset_id_to_contiguous_id={i: i for i in range(NUM_THINGS)},
            stuff_dataset_id_to_contiguous_id={i: i for i in range(NUM_CLASSES)},
            ignore_label=255,
            label_divisor=1000,
        )


def _test_switches(tasks: Sequence[str]) -> List[Tuple[str, bool]]:
    return [(f"{task.upper()}_ON", task in tasks) for task in ("semantic", "instance", "panoptic")]


@contextlib.contextmanager
def _registered_aside(registry, names: Sequence[str]) -> Iterator[None]:
    """Let the release register its own classes under names openseg already uses (its Swin
    backbone is also `D2SwinTransformer`); openseg's entries are restored afterwards, and the
    benchmark's configuration builds neither by that name."""
    saved = {name: registry._obj_map.pop(name) for name in names if name in registry}
    try:
        yield
    finally:
        registry._obj_map.update(saved)


def build_reference(reference_root: Path, device: str, tasks: Sequence[str]):
    """The released MaskFormer (random weights) and its train_net optimizer."""
    sys.path.insert(0, str(REPO_ROOT / "tools" / "reference_fixtures"))
    from _stubs import add_reference_to_path

    folder = add_reference_to_path(reference_root, REFERENCE_FOLDER)
    from detectron2.projects.deeplab import add_deeplab_config

    with _registered_aside(BACKBONE_REGISTRY, ["D2SwinTransformer"]):
        from mask2former import add_maskformer2_config
        from train_net import Trainer as ReferenceTrainer

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(folder / REFERENCE_CONFIG))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TEST = (METADATA_NAME,)
    for key, value in _test_switches(tasks):
        cfg.MODEL.MASK_FORMER.TEST[key] = value
    model = build_model(cfg)
    return model, ReferenceTrainer.build_optimizer(cfg, model)


def build_openseg(device: str, tasks: Sequence[str]):
    """openseg's MaskFormer at the same configuration, and openseg's optimizer."""
    opts = ["MODEL.DEVICE", device, "DATASETS.TEST", f"('{METADATA_NAME}',)"]
    for key, value in _test_switches(tasks):
        opts += [f"MODEL.MASK_FORMER.TEST.{key}", str(value)]
    cfg = load_config(str(OPENSEG_CONFIG), opts)
    model = build_model(cfg)
    return model, build_optimizer(cfg, model)


def share_weights(reference: nn.Module, openseg: nn.Module, logit_scale: float) -> None:
    """Scale the reference's class head (so that, as in a trained model, some queries pass the
    0.8 panoptic confidence threshold) and load the same weights into openseg."""
    with torch.no_grad():
        reference.sem_seg_head.predictor.class_embed.weight.mul_(logit_scale)
    state = {k: v.detach().cpu() for k, v in reference.state_dict().items()}
    openseg.load_state_dict(reference_to_openseg(state), strict=True)


# ------------------------------------------------------------------ data
def synthetic_batch(batch: int, size: int, segments: int, seed: int) -> List[Dict]:
    """Images with non-overlapping panoptic-like segments (a Voronoi partition of random
    seeds with random classes), in the input format of both models' training and inference."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(batch):
        image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
        centres = torch.rand(segments, 2, generator=generator) * size
        distance = (ys[None] - centres[:, 0, None, None]) ** 2 + (
            xs[None] - centres[:, 1, None, None]
        ) ** 2
        owner = distance.argmin(0)
        masks = torch.stack([owner == k for k in range(segments)])
        instances = Instances((size, size))
        instances.gt_classes = torch.randperm(NUM_CLASSES, generator=generator)[:segments]
        instances.gt_masks = masks
        inputs.append({"image": image, "height": size, "width": size, "instances": instances})
    return inputs


# ------------------------------------------------------------------ steps
class Runner:
    """One model with its optimizer: a training step and an inference call on a batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: str, amp: bool):
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.scaler = torch.amp.GradScaler("cuda") if amp else None

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def train_step(self, inputs: List[Dict]) -> None:
        """detectron2's SimpleTrainer / AMPTrainer step."""
        self.model.train()
        with torch.profiler.record_function("forward+loss"), self._autocast():
            loss = sum(self.model(inputs).values())
        self.optimizer.zero_grad()
        with torch.profiler.record_function("backward"):
            (self.scaler.scale(loss) if self.amp else loss).backward()
        with torch.profiler.record_function("optimizer"):
            if self.amp:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()

    def inference(self, inputs: List[Dict]) -> List[Dict]:
        self.model.eval()
        with torch.no_grad():
            return self.model(inputs)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory `fn` needs above what is allocated when it starts."""
    if device.startswith("cuda"):
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # The profiler drops the frees of blocks allocated before it started, so a first call
    # is recorded too: the measured call then frees only blocks whose allocation is known.
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
        with torch.profiler.record_function(_MEASURED):
            fn()
    events = prof.profiler.kineto_results.events()
    measured = next(e for e in events if e.name() == _MEASURED)
    deltas = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
    return peak_within(deltas, measured.start_ns(), measured.end_ns())


def panoptic_agreement(ours: List[Dict], reference: List[Dict]) -> str:
    """Fraction of pixels with the same segment id and the segment counts of both sides."""
    same = total = 0
    counts = []
    for mine, theirs in zip(ours, reference):
        same += int((mine["panoptic_seg"][0].cpu() == theirs["panoptic_seg"][0].cpu()).sum())
        total += mine["panoptic_seg"][0].numel()
        counts.append(f"{len(mine['panoptic_seg'][1])}/{len(theirs['panoptic_seg'][1])}")
    return f"{same / total:.4f} of pixels equal, segments openseg/reference {' '.join(counts)}"


def measure(
    runners: Dict[str, Runner], inputs: List[Dict], repeats: int, warmup: int, device: str
) -> Dict[str, Dict[str, List[float]]]:
    """Interleaved timings and one memory measurement per side and phase."""
    results = {side: {m: [] for m in MEASURES} for side in SIDES}
    for phase in ("train", "inference"):
        method = "train_step" if phase == "train" else "inference"
        calls = {
            side: functools.partial(getattr(runner, method), inputs)
            for side, runner in runners.items()
        }
        for _ in range(warmup):  # first calls allocate optimizer state and caches
            for side in SIDES:
                calls[side]()
        for repeat in range(repeats):
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                results[side][phase].append(seconds(calls[side], device))
        for side in SIDES:
            results[side][f"{phase}_memory"].append(peak_bytes(calls[side], device))
    return results


# ------------------------------------------------------------------ profile
# label -> (path of a submodule, attribute, whether the attribute is a global of the Python
# module defining that submodule's class, e.g. a function it calls) for each side
_Part = Tuple[str, str, bool]
_PARTS: Dict[str, Dict[str, _Part]] = {
    "backbone": {"openseg": ("backbone", "forward", False),
                 "reference": ("backbone", "forward", False)},
    "pixel decoder": {"openseg": ("pixel_decoder", "forward_features", False),
                      "reference": ("sem_seg_head.pixel_decoder", "forward_features", False)},
    "transformer decoder": {"openseg": ("transformer_decoder", "forward", False),
                            "reference": ("sem_seg_head.predictor", "forward", False)},
    "criterion (incl. matcher)": {"openseg": ("criterion", "forward", False),
                                  "reference": ("criterion", "forward", False)},
    "matcher": {"openseg": ("criterion.matcher", "forward", False),
                "reference": ("criterion.matcher", "forward", False)},
    "point sampling (matcher)": {"openseg": ("criterion.matcher", "point_sample", True),
                                 "reference": ("criterion.matcher", "point_sample", True)},
    "point sampling (loss)": {
        "openseg": ("criterion", "get_uncertain_point_coords_with_randomness", True),
        "reference": ("criterion", "get_uncertain_point_coords_with_randomness", True),
    },
    "panoptic rule": {"openseg": ("", "panoptic_inference", True),
                      "reference": ("", "panoptic_inference", False)},
}
_STEP_PARTS = ("forward+loss", "backward", "optimizer")


@contextlib.contextmanager
def _labelled(target: object, attribute: str, label: str) -> Iterator[None]:
    """Wrap target.attribute in a torch.profiler.record_function(label) range."""
    original = getattr(target, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    had_own = attribute in vars(target)
    setattr(target, attribute, wrapper)
    try:
        yield
    finally:
        if had_own:
            setattr(target, attribute, original)
        else:
            delattr(target, attribute)


def _part_labels(model: nn.Module, side: str) -> contextlib.ExitStack:
    """Label every part of `_PARTS` that this side's model has."""
    stack = contextlib.ExitStack()
    for label, sides in _PARTS.items():
        path, attribute, module_global = sides[side]
        target = model.get_submodule(path)
        if module_global:
            target = sys.modules[type(target).__module__]
        if hasattr(target, attribute):
            stack.enter_context(_labelled(target, attribute, label))
    return stack


def profile_shares(
    runner: Runner, side: str, inputs: List[Dict], device: str
) -> Tuple[Dict[str, float], str]:
    """Share of each labelled part in one training step and one inference call, and the
    top operators (self time) of the training step."""
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    shares, top_ops = {}, ""
    with _part_labels(runner.model, side):
        for phase in ("train", "inference"):
            call = runner.train_step if phase == "train" else runner.inference
            with torch.profiler.profile(activities=activities) as prof:
                with torch.profiler.record_function("total"):
                    call(inputs)
                _synchronize(device)
            averages = prof.key_averages()
            times = {e.key: e.device_time_total if cuda else e.cpu_time_total for e in averages}
            labels = [*(_STEP_PARTS if phase == "train" else ()), *_PARTS]
            for label in labels:
                if label in times:
                    shares[f"{phase}: {label}"] = times[label] / times["total"]
            if phase == "train":
                top_ops = averages.table(
                    sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                    row_limit=15,
                )
    return shares, top_ops


# ------------------------------------------------------------------ main
def _parse_ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-root", type=Path, required=True,
                        help=f"folder holding {REFERENCE_FOLDER}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=_parse_ints, default=[384, 512],
                        help="square image sizes (comma-separated), multiples of 32")
    parser.add_argument("--threads", type=_parse_ints, default=[1, 2],
                        help="torch intra-op threads (comma-separated)")
    parser.add_argument("--batch", type=int, default=2,
                        help="images per step (released: 2 per GPU)")
    parser.add_argument("--segments", type=int, default=12, help="ground-truth segments per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tasks", default="panoptic",
                        help="post-processing at inference: panoptic[,semantic][,instance]")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed-precision training step (default: on for CUDA, as released)")
    parser.add_argument("--logit-scale", type=float, default=20.0,
                        help="class-head weight scale so that some queries are confident")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one size (256), one thread setting, 2 repeats, batch 1")
    parser.add_argument("--profile", action="store_true",
                        help="also print where each side's time goes (torch.profiler)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a ratio exceeds --limit")
    parser.add_argument("--limit", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.threads, args.repeats, args.batch = [256], args.threads[:1], 2, 1
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(args.tasks) - {"panoptic", "semantic", "instance"}
    if unknown or "panoptic" not in args.tasks:
        parser.error(f"--tasks {','.join(args.tasks)}: panoptic[,semantic][,instance]")
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs --device cuda (detectron2's AMPTrainer is CUDA-only)")
    bad = [s for s in args.sizes if s % 32]
    if bad:
        parser.error(f"--sizes {bad}: use multiples of 32 (SIZE_DIVISIBILITY), so neither pads")
    return args


def _format_bytes(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def _format_seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _register_metadata()
    torch.manual_seed(0)
    reference_model, reference_optimizer = build_reference(
        args.reference_root, args.device, args.tasks
    )
    openseg_model, openseg_optimizer = build_openseg(args.device, args.tasks)
    share_weights(reference_model, openseg_model, args.logit_scale)
    runners = {
        "openseg": Runner(openseg_model, openseg_optimizer, args.device, args.amp),
        "reference": Runner(reference_model, reference_optimizer, args.device, args.amp),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, batch {args.batch}, {args.segments} segments/image, "
          f"{args.repeats} repeats, amp {args.amp}, tasks {','.join(args.tasks)}, "
          f"load average {load:.2f} on {os.cpu_count()} CPUs")

    rows, failures = [], []
    headers = ["size", "threads", "measure", "openseg", "reference", "ratio (openseg/ref)"]
    for size in args.sizes:
        inputs = synthetic_batch(args.batch, size, args.segments, seed=size)
        agreement = panoptic_agreement(runners["openseg"].inference(inputs),
                                       runners["reference"].inference(inputs))
        print(f"{size}px panoptic outputs: {agreement}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            results = measure(runners, inputs, args.repeats, args.warmup, args.device)
            for m in MEASURES:
                ratio = paired_median_ratio(results["openseg"][m], results["reference"][m])
                failures += ratios_over_limit({f"{m}@{size}px/{threads}t": ratio}, args.limit)
                ours, theirs = (statistics.median(results[side][m]) for side in SIDES)
                shown = _format_bytes if m.endswith("memory") else _format_seconds
                rows.append([size, threads, m, shown(ours), shown(theirs), f"{ratio:.3f}"])
            print(tabulate(rows[-len(MEASURES):], headers=headers), flush=True)
        if args.profile:
            torch.set_num_threads(args.threads[0])
            for side in SIDES:
                shares, top_ops = profile_shares(runners[side], side, inputs, args.device)
                print(f"\n{side} at {size}px, {torch.get_num_threads()} threads: share of total")
                print(tabulate([[k, f"{100 * v:.1f} %"] for k, v in shares.items()],
                               headers=["part", "share"]))
                if side == "openseg":
                    print(top_ops, flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nall settings (load average at the end {load_after:.2f}):")
    print(tabulate(rows, headers=headers))
    if args.check and failures:
        print(f"CHECK FAILED: ratios above {args.limit}: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
