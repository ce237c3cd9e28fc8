#!/usr/bin/env python
"""The one training / evaluation entry point of openseg, for every registered meta-architecture.

    python tools/train_net.py --config-file configs/demo/maskformer_R18.yaml
    python tools/train_net.py --config-file CFG --num-gpus 8 [--num-machines N --machine-rank R
        --dist-url tcp://HOST:PORT] [--resume] [--eval-only MODEL.WEIGHTS path.pth] [KEY VALUE ...]

Evaluators come from the test dataset's metadata (`evaluators`) unless TEST.EVALUATORS is set.
`--num-gpus N MODEL.DEVICE cpu` runs N CPU processes (gloo). SIGTERM / SIGUSR1 save the last
finished iteration as model_interrupted.pth and exit with status 128 + signal number.
"""
import logging
import os
import sys

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import openseg  # noqa: F401  (registers datasets, architectures and evaluators)
from openseg.config import load_config
from openseg.engine import Trainer
from openseg.engine.hooks import forward_stop_signals_to_children

STOPPED_BY = 0  # the stop signal that ended training in this process (0 = none)


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # openseg's and the methods' own log lines (class splits, random-init warnings, ...)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="openseg")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.resume and trainer.start_iter >= cfg.SOLVER.MAX_ITER:
        logging.getLogger("openseg").info(
            "checkpoint in %s already reached SOLVER.MAX_ITER=%d; evaluating it",
            cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER,
        )
        return Trainer.test(cfg, trainer.model)
    results = trainer.train()
    global STOPPED_BY
    STOPPED_BY = trainer.stop_signal
    return results


def cli(argv=None) -> None:
    """The command line: parse, launch one process per GPU (or CPU process), exit 128 + signal
    number when a stop signal ended training."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    stopped_by = lambda: STOPPED_BY  # noqa: E731
    if args.num_gpus * args.num_machines > 1:
        if load_config(args.config_file, args.opts).MODEL.DEVICE == "cpu":
            # detectron2's launch picks NCCL whenever CUDA is visible; CPU processes need gloo
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        stopped_by = forward_stop_signals_to_children()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    if stopped_by():
        sys.exit(128 + stopped_by())


if __name__ == "__main__":
    cli()
