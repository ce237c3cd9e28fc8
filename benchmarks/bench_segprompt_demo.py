"""SegPrompt's direction on the demo open-world split (Zhu et al. ICCV 2023, Table 2 / Table 5).

Trains the three demo models for the same iterations, batch, seed and multi-step schedule and
prints the open-world class-wise AR of each on openseg_demo_ow_val:

- class-aware Mask2Former (configs/demo/segprompt_R18_class_aware.yaml),
- class-agnostic Mask2Former (configs/demo/segprompt_R18_baseline.yaml, SegPrompt's branches off),
- SegPrompt (configs/demo/segprompt_R18.yaml).

The paper's claim is AR_unseen(SegPrompt) > AR_unseen(class-agnostic) > AR_unseen(class-aware).
Each model is trained by tools/train_net.py in its own process (one thread each), `--jobs` of
them at a time.

    PYTHONPATH=. python benchmarks/bench_segprompt_demo.py --iters 150 --batch 4 --jobs 1
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "class-aware M2F": "configs/demo/segprompt_R18_class_aware.yaml",
    "class-agnostic M2F": "configs/demo/segprompt_R18_baseline.yaml",
    "SegPrompt": "configs/demo/segprompt_R18.yaml",
}
COPYPASTE = re.compile(r"copypaste: (.*)$")


def schedule_opts(iters: int, batch: int, seed: int) -> List[str]:
    """The demo schedule scaled to `iters`: LR drops at 8/9 and 26/27 of the budget, as
    Mask2Former's 327778 / 355092 of 368750."""
    steps = (max(1, round(iters * 327778 / 368750)), max(2, round(iters * 355092 / 368750)))
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
        "SEED",
        str(seed),
    ]


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
    print(f"{config}: trained and evaluated in {time.time() - start:.0f} s", flush=True)
    if status.returncode:
        raise RuntimeError(f"{config}: train_net.py failed, see {log}")
    lines = [m.group(1) for m in map(COPYPASTE.search, log.read_text().splitlines()) if m]
    names, values = lines[-2].split(","), lines[-1].split(",")
    return {name: float(value) for name, value in zip(names, values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=150, help="training iterations, each model")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="models trained at the same time")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="bench_segprompt_"))
    out.mkdir(parents=True, exist_ok=True)
    opts = schedule_opts(args.iters, args.batch, args.seed)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(train_and_evaluate, config, opts, out / name.replace(" ", "_"))
            for name, config in MODELS.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    keys = ["AR_unseen", "AR_seen", "AR_known", "AR_all", "AR@100"]
    print(f"\n{args.iters} iterations x {args.batch} images, seed {args.seed} (logs in {out})")
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, metrics in results.items():
        print(
            f"| {name} | " + " | ".join(f"{metrics.get(k, float('nan')):.1f}" for k in keys) + " |"
        )
    unseen = {name: metrics["AR_unseen"] for name, metrics in results.items()}
    best_baseline = max(unseen["class-aware M2F"], unseen["class-agnostic M2F"])
    print(f"\nSegPrompt AR_unseen - best baseline: {unseen['SegPrompt'] - best_baseline:+.1f}")


if __name__ == "__main__":
    main()
