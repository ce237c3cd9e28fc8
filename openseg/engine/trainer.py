"""The one Trainer every openseg method trains and evaluates with."""
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data.mappers import build_mapper
from ..evaluation import build_evaluator
from .checkpoint import DIVERGED_PREFIX, TrainingCheckpointer, capture_rng_state, restore_rng_state
from .data import build_resumable_train_loader
from .hooks import (
    NonFiniteError,
    ResumableCheckpointHook,
    StopSignal,
    TrainingStopped,
    first_non_finite_module,
    loss_guard,
    non_finite_parameters,
)
from .optimizer import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """DistributedDataParallel when there is more than one process: pinned to the local GPU
    on CUDA, without device ids on CPU (gloo), where detectron2's version fails."""
    if comm.get_world_size() == 1:
        return model
    if torch.device(device).type == "cuda":
        return DistributedDataParallel(model, device_ids=[comm.get_local_rank()], broadcast_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def config_differences(saved: CfgNode, current: CfgNode, prefix: str = "") -> List[str]:
    """`KEY: saved -> current` for every value that differs (nested keys dotted)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, CfgNode) and isinstance(new, CfgNode):
            changes += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with openseg's mappers, evaluators (chosen from dataset
    metadata), optimizer and poly schedule, plus what keeps a run from losing work:

    - checkpoints are atomic and hold every rank's RNG and data-loader state, so `--resume`
      continues exactly where an uninterrupted run would be (`ResumableCheckpointHook`);
    - SIGTERM / SIGUSR1 checkpoint the last finished iteration and end training on all ranks;
    - a crash or Ctrl-C saves `model_interrupted.pth` (the last finished iteration);
    - non-finite losses stop training before backward with an error naming the iteration,
      the terms and the last good checkpoint; such weights go to `model_diverged_<iter>.pth`,
      never the resume target; a failing step with non-finite weights or outputs says so;
    - config values that differ from the checkpoint's are listed on resume; SOLVER ones
      (learning rates, schedule, optimizer hyper-parameters) are applied.
    """

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, cfg.MODEL.DEVICE)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.committed: Optional[tuple] = None  # (iteration, this rank's RNG + data state)
        self.stop_signal = 0
        self._stop = StopSignal()
        self._last_batch = None
        me = weakref.proxy(self)
        model.register_forward_pre_hook(lambda module, args: setattr(me, "_last_batch", args[0] if args else None))
        model.register_forward_hook(loss_guard(me, cfg.SOLVER.MAX_LOSS_SPIKE))
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_checkpointer(cls, cfg, model: torch.nn.Module, **checkpointables) -> TrainingCheckpointer:
        """The one place a checkpointer is made (training, resuming and --eval-only)."""
        return TrainingCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR, **checkpointables)

    @classmethod
    def build_train_loader(cls, cfg):
        # a meta-architecture may bring its own training loader (e.g. OSM's dataset mixture)
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if hasattr(meta_arch, "build_train_loader"):
            return meta_arch.build_train_loader(cfg)
        return build_resumable_train_loader(cfg, build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder: Optional[str] = None) -> DatasetEvaluators:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> OrderedDict:
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and not results:
            logger.warning("evaluation produced no metrics: check DATASETS.TEST and TEST.EVALUATORS")
        return results

    def build_hooks(self) -> List[hooks.HookBase]:
        """detectron2's hooks with `ResumableCheckpointHook` (on every rank) in place of the
        main-process PeriodicCheckpointer, and evaluation that leaves the RNG states as they
        were, so a run with periodic evaluation resumes exactly too."""
        result = []
        for hook in super().build_hooks():
            if isinstance(hook, hooks.PeriodicCheckpointer):
                continue
            if isinstance(hook, hooks.EvalHook):
                result.append(ResumableCheckpointHook(self.cfg.SOLVER.CHECKPOINT_PERIOD, self._stop))
                hook = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate_keeping_rng)
            result.append(hook)
        return result

    def _evaluate_keeping_rng(self) -> OrderedDict:
        state = capture_rng_state()
        try:
            self._last_eval_results = self.test(self.cfg, self.model)
        finally:
            restore_rng_state(state)
        return self._last_eval_results

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume: bool = True) -> None:
        """Load `MODEL.WEIGHTS`, or with `resume` the newest readable checkpoint of OUTPUT_DIR
        with optimizer, scheduler, RNG and data-loader state. Config values that differ from
        the checkpoint's are listed; learning rates, schedule and optimizer hyper-parameters
        are taken from the config (resuming must not silently keep the old ones)."""
        loaded = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        self.start_iter = self.iter + 1
        self._apply_config_over_checkpoint(loaded.get("config"))
        self._restore_resume_state(loaded.get("resume_state"))

    def _apply_config_over_checkpoint(self, saved_yaml: Optional[str]) -> None:
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        fresh = self.build_optimizer(self.cfg, model)
        if len(fresh.param_groups) != len(self.optimizer.param_groups):
            raise ValueError(
                f"--resume: the checkpoint's optimizer has {len(self.optimizer.param_groups)} parameter "
                f"groups, the config gives {len(fresh.param_groups)} (SOLVER.* or frozen modules "
                f"changed); start a new OUTPUT_DIR with MODEL.WEIGHTS pointing at the checkpoint"
            )
        # the fresh optimizer holds the config's hyper-parameters; its `lr` is the base LR
        for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
            group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        if saved_yaml is None:
            return
        ignored = {"OUTPUT_DIR", "MODEL.WEIGHTS"}
        changes = [
            c for c in config_differences(CfgNode.load_cfg(saved_yaml), CfgNode.load_cfg(self.cfg.dump()))
            if c.split(":")[0] not in ignored
        ]
        if changes and comm.is_main_process():
            logger.warning(
                "resuming at iteration %d with config values that differ from the checkpoint's:\n  %s\n"
                "SOLVER values (learning rates, schedule, optimizer) are applied from now on; values a "
                "model keeps in its state (buffers) are the checkpoint's",
                self.start_iter, "\n  ".join(changes),
            )

    def _restore_resume_state(self, states: Optional[List[Dict[str, Any]]]) -> None:
        rank, world = comm.get_rank(), comm.get_world_size()
        if states is not None and len(states) == world:
            restore_rng_state(states[rank]["rng"])
            self.data_loader.load_state_dict(states[rank]["data"])
            self.committed = (self.iter, states[rank])
            return
        per_rank = self.cfg.SOLVER.IMS_PER_BATCH // world
        state = self.data_loader.state_dict()
        state["images_consumed"] = self.start_iter * per_rank
        self.data_loader.load_state_dict(state)
        logger.warning(
            "the checkpoint holds the data-loader and RNG state of %s process(es), this run has %d: "
            "data continue after %d images per process, random streams restart (not an exact resume)",
            "no" if states is None else len(states), world, state["images_consumed"],
        )

    # ------------------------------------------------------------------ training
    def run_step(self) -> None:
        self._trainer.iter = self.iter
        try:
            self._trainer.run_step()
        except NonFiniteError:
            raise
        except Exception as error:
            model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
            bad = non_finite_parameters(model)
            if bad:
                raise NonFiniteError(
                    self.iter, f"non-finite weights in {len(bad)} tensors ({', '.join(bad[:3])}, ...)"
                ) from error
            module = first_non_finite_module(model, self._last_batch) if self._last_batch else None
            if module is not None:
                raise NonFiniteError(
                    self.iter, f"non-finite outputs, first from module '{module}' "
                    f"(then {type(error).__name__}: {error})"
                ) from error
            raise

    def train(self) -> Optional[OrderedDict]:
        """Train and return the final evaluation's metrics (None when there was none, or when
        a stop signal ended training early; `stop_signal` then holds the signal number)."""
        with self._stop:
            try:
                super().train()
                return getattr(self, "_last_eval_results", None)
            except TrainingStopped as stop:
                self.stop_signal = stop.signum
                logger.warning(
                    "training stopped by signal %d after iteration %d; saved %s; continue with --resume",
                    stop.signum, stop.iteration, os.path.join(self.cfg.OUTPUT_DIR, "model_interrupted.pth"),
                )
                return None
            except NonFiniteError as error:
                raise NonFiniteError(error.iteration, error.what, self._diverged(error)) from None
            except BaseException:
                self._save_interrupted()
                raise

    def _diverged(self, error: NonFiniteError) -> str:
        """Save the diverged weights under a name --resume skips; return what to do next."""
        last_good = self.checkpointer.last_good_checkpoint()
        message = ""
        if comm.is_main_process():
            path = self.checkpointer.save(f"{DIVERGED_PREFIX}_{error.iteration:07d}", tag_last=False)
            message += f"The weights that produced them are in {path} (never used by --resume). "
        if last_good:
            message += f"Last good checkpoint: {last_good}; continue from it with --resume "
        else:
            message += "No checkpoint was written before; start again "
        return message + "with a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS.ENABLED True"

    def _save_interrupted(self) -> None:
        """After a crash or Ctrl-C: checkpoint the last finished iteration (main process)."""
        if not comm.is_main_process() or self.committed is None or self.committed[0] < self.start_iter:
            return
        failed_iter = self.iter
        iteration, state = self.committed
        self.iter = iteration
        try:
            self.checkpointer.save(
                "model_interrupted", iteration=iteration, resume_state=[state] if comm.get_world_size() == 1 else None,
                config=self.cfg.dump(),
            )
        finally:
            self.iter = failed_iter
        logger.error(
            "training stopped at iteration %d; saved %s (iteration %d), continue with --resume",
            failed_iter, os.path.join(self.cfg.OUTPUT_DIR, "model_interrupted.pth"), iteration,
        )
