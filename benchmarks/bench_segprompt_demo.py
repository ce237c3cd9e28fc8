"""SegPrompt's direction on the demo open-world split (Zhu et al. ICCV 2023, Table 2 / Table 5).

The paper's claim is AR_unseen(SegPrompt) > AR_unseen(class-agnostic) > AR_unseen(class-aware).
For each seed this trains and scores with the open-world class-wise AR (`--val` to change the
test set) on one of two demo splits (`--dataset`):
- `ow`: openseg_demo_ow_train (2 known shapes, 1 seen), tested on openseg_demo_ow_val_large
  (320 images, 232 unseen crosses); configs/demo/segprompt_R18{_class_aware,_baseline,}.yaml;
- `ow_shapes`: openseg_demo_ow_shapes_train (7 known, 2 seen, 3 unseen shapes in random
  colours), tested on openseg_demo_ow_shapes_val (400 images, 236 unseen shapes);
  configs/demo/segprompt_R18_shapes{_class_aware,_baseline,}.yaml.

protocol "scratch" (equal budget, every model from scratch for `--iters`):
- class-aware Mask2Former (*_class_aware.yaml),
- class-agnostic Mask2Former (*_baseline.yaml, SegPrompt's branches off),
- SegPrompt;

protocol "finetune" (the release's, configs/lvis_ow/segprompt_R50.yaml: SegPrompt fine-tunes the
trained class-agnostic baseline with the backbone frozen; here at equal total budget):
- class-agnostic baseline for iters/2 (its AR is printed as "class-agnostic, stage 1"),
- from that checkpoint, backbone frozen (FREEZE_AT 5), iters/2 more with LR drops at 2/3 and 8/9
  (the release's 60k / 80k of 90k) of either the class-agnostic model (control) or SegPrompt.
  The two fine-tunes differ only in SegPrompt's training-only branches.

Each model is trained by tools/train_net.py in its own process (one thread each), `--jobs` of
them at a time; the table gives mean ± sample std over the seeds, then the paired per-seed
differences of AR_unseen and AR_known (SegPrompt minus its control).

    PYTHONPATH=. python benchmarks/bench_segprompt_demo.py --iters 500 --seeds 0 1 2 --jobs 3
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_segprompt_demo.py --dataset ow_shapes \
        --iters 1000 --seeds 0 1 2 --jobs 1 --protocols scratch
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
# --dataset: the three configs (class-aware, class-agnostic, SegPrompt) and the test set
DATASETS = {
    "ow": (
        "configs/demo/segprompt_R18_class_aware.yaml",
        "configs/demo/segprompt_R18_baseline.yaml",
        "configs/demo/segprompt_R18.yaml",
        "openseg_demo_ow_val_large",
    ),
    "ow_shapes": (
        "configs/demo/segprompt_R18_shapes_class_aware.yaml",
        "configs/demo/segprompt_R18_shapes_baseline.yaml",
        "configs/demo/segprompt_R18_shapes.yaml",
        "openseg_demo_ow_shapes_val",
    ),
}
SCRATCH = ["class-aware M2F", "class-agnostic M2F", "SegPrompt"]
FINETUNE = ["class-agnostic M2F, fine-tuned", "SegPrompt, fine-tuned"]
STAGE1 = "class-agnostic M2F, stage 1"
# SegPrompt's modules absent from the baseline checkpoint (as configs/lvis_ow/segprompt_R50.yaml)
NEW_MODULES = ("prompt_cache.", "query_builder.")
KEYS = ["AR_unseen", "AR_seen", "AR_known", "AR_all", "AR@100"]
COPYPASTE = re.compile(r"copypaste: (.*)$")


def schedule_opts(
    iters: int, batch: int, seed: int, val: str, drops: Tuple[float, float]
) -> List[str]:
    """Training options for `iters` iterations with multi-step LR drops at fractions `drops`."""
    second = min(iters - 1, max(2, round(iters * drops[1])))
    steps = (min(second - 1, max(1, round(iters * drops[0]))), second)
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        str(steps),
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.CHECKPOINT_PERIOD",
        str(10 * iters),
        "SOLVER.WARMUP_ITERS",
        str(min(20, iters // 10)),
        "DATALOADER.NUM_WORKERS",
        "1",
        "TEST.EVAL_PERIOD",
        "0",
        "DATASETS.TEST",
        f"('{val}',)",
        "SEED",
        str(seed),
    ]


# Mask2Former's 327778 / 355092 of 368750 (from scratch); the release's SegPrompt fine-tune
# drops at 60000 / 80000 of 90000 (configs/lvis_ow/segprompt_lvisow.yaml).
SCRATCH_DROPS = (327778 / 368750, 355092 / 368750)
FINETUNE_DROPS = (60000 / 90000, 80000 / 90000)


def train_and_evaluate(config: str, opts: List[str], output_dir: Path) -> Dict[str, float]:
    """Run tools/train_net.py; parse the evaluator's copypaste lines (names, then values)."""
    command = [
        sys.executable,
        str(ROOT / "tools" / "train_net.py"),
        "--config-file",
        str(ROOT / config),
        *opts,
        "OUTPUT_DIR",
        str(output_dir),
    ]
    log = output_dir.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(log, "w") as handle:
        status = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    print(f"{output_dir.name}: trained and evaluated in {time.time() - start:.0f} s", flush=True)
    if status.returncode:
        raise RuntimeError(f"{config}: train_net.py failed, see {log}")
    lines = [m.group(1) for m in map(COPYPASTE.search, log.read_text().splitlines()) if m]
    names, values = lines[-2].split(","), lines[-1].split(",")
    return {name: float(value) for name, value in zip(names, values)}


def mean_std(values: List[float]) -> str:
    """'mean ± sample std' (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=500, help="training budget of each model")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", default=["scratch", "finetune"])
    parser.add_argument(
        "--scratch-models", nargs="+", default=SCRATCH, choices=SCRATCH,
        help="the models of protocol scratch",
    )
    parser.add_argument(
        "--dataset", default="ow", choices=list(DATASETS),
        help="ow: openseg_demo_ow_* (2 known shapes); ow_shapes: openseg_demo_ow_shapes_* (7 known)",
    )
    parser.add_argument("--val", default=None, help="test dataset (default: the --dataset's)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at the same time")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    class_aware, baseline, segprompt, default_val = DATASETS[args.dataset]
    args.val = args.val or default_val
    configs = dict(zip(SCRATCH, (class_aware, baseline, segprompt)))
    configs.update(zip(FINETUNE, (baseline, segprompt)))
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="bench_segprompt_"))
    out.mkdir(parents=True, exist_ok=True)
    half = args.iters // 2
    futures: Dict[Tuple[str, int], Future] = {}
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=args.jobs)

    def directory(name: str, seed: int) -> Path:
        return out / f"{name.replace(' ', '_').replace(',', '')}_seed{seed}"

    def run(name: str, seed: int, config: str, opts: List[str]) -> None:
        future = pool.submit(train_and_evaluate, config, opts, directory(name, seed))
        with lock:
            futures[(name, seed)] = future

    def stage1_then_finetune(seed: int) -> Dict[str, float]:
        """Train stage 1, then queue both fine-tunes of its checkpoint (before this future
        ends, so the wait loop below sees them)."""
        opts = schedule_opts(half, args.batch, seed, args.val, SCRATCH_DROPS)
        metrics = train_and_evaluate(baseline, opts, directory(STAGE1, seed))
        opts = schedule_opts(half, args.batch, seed, args.val, FINETUNE_DROPS)
        weights = directory(STAGE1, seed) / "model_final.pth"
        opts += ["MODEL.WEIGHTS", str(weights), "MODEL.BACKBONE.FREEZE_AT", "5"]
        opts += ["MODEL.WEIGHTS_ALLOW_MISSING", str(list(NEW_MODULES))]
        for name in FINETUNE:
            run(name, seed, configs[name], opts)
        return metrics

    for seed in args.seeds:  # stage 1 first, so the fine-tunes can start early
        if "finetune" in args.protocols:
            with lock:
                futures[(STAGE1, seed)] = pool.submit(stage1_then_finetune, seed)
    for seed in args.seeds:
        if "scratch" in args.protocols:
            opts = schedule_opts(args.iters, args.batch, seed, args.val, SCRATCH_DROPS)
            for name in args.scratch_models:
                run(name, seed, configs[name], opts)
    while True:  # fine-tunes are submitted as their stage 1 ends
        with lock:
            pending = [f for f in futures.values() if not f.done()]
        if not pending:
            break
        pending[0].result()
    pool.shutdown()
    results = {key: future.result() for key, future in futures.items()}

    names = [n for n in [*SCRATCH, STAGE1, *FINETUNE] if any(k[0] == n for k in results)]
    finetune = f" (fine-tune: {half} + {half})" if "finetune" in args.protocols else ""
    print(
        f"\n{args.iters} iterations x {args.batch} images{finetune}, seeds {args.seeds}, "
        f"trained on --dataset {args.dataset}, tested on {args.val}; mean ± std over seeds "
        f"(logs in {out})"
    )
    print("| model | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name in names:
        cells = [mean_std([results[(name, s)][k] for s in args.seeds]) for k in KEYS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nAR_unseen per seed: " + "; ".join(
        f"{name}: " + ", ".join(f"{results[(name, s)]['AR_unseen']:.1f}" for s in args.seeds)
        for name in names
    ))
    comparisons = [
        ("SegPrompt", "class-agnostic M2F"),
        ("SegPrompt", "class-aware M2F"),
        ("SegPrompt, fine-tuned", "class-agnostic M2F, fine-tuned"),
        ("class-agnostic M2F", "class-aware M2F"),
    ]
    for key in ("AR_unseen", "AR_known"):  # paired over seeds
        for a, b in comparisons:
            if a in names and b in names:
                diffs = [results[(a, s)][key] - results[(b, s)][key] for s in args.seeds]
                print(
                    f"{key} {a} - {b}: {mean_std(diffs)} "
                    f"(per seed {', '.join(f'{d:+.1f}' for d in diffs)})"
                )


if __name__ == "__main__":
    main()
