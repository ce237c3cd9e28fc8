"""Training-loop guards: stop on SIGTERM / SIGUSR1 with a checkpoint, exact-resume
checkpoints, and a stop on non-finite losses.

SIGTERM is what SLURM, `timeout` and `kill` send; SIGUSR1 is SLURM's pre-emption warning
(`--signal=USR1@T`). The handler only records the signal; at the end of the running iteration
all ranks agree (one tiny all-reduce), the main process writes `model_interrupted.pth` and
every rank leaves the loop, so `--resume` continues from the last finished iteration.
"""
import logging
import multiprocessing
import os
import signal
import statistics
from collections import deque
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from .checkpoint import capture_rng_state

__all__ = [
    "STOP_SIGNALS",
    "NonFiniteError",
    "ResumableCheckpointHook",
    "StopSignal",
    "TrainingStopped",
    "first_non_finite_module",
    "forward_stop_signals_to_children",
    "loss_guard",
    "non_finite_parameters",
]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(BaseException):
    """Raised on every rank after the checkpoint of a stop signal (not an error: a
    BaseException so the training loop does not log it as a crash)."""

    def __init__(self, signum: int, iteration: int):
        super().__init__(signum, iteration)
        self.signum, self.iteration = signum, iteration


class NonFiniteError(FloatingPointError):
    """Non-finite losses, outputs or weights; `iteration` and `what` describe them."""

    def __init__(self, iteration: int, what: str, advice: str = ""):
        super().__init__(f"training diverged at iteration {iteration}: {what}" + (f". {advice}" if advice else ""))
        self.iteration, self.what = iteration, what


class StopSignal:
    """Records SIGTERM / SIGUSR1 while installed (`with StopSignal() as stop:`); `stop.signum`
    is the first signal received (0 = none). Outside the main thread nothing is installed."""

    def __init__(self):
        self.signum = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            logger.warning("received %s: stopping after the current iteration", signal.Signals(signum).name)
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignal":
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def forward_stop_signals_to_children() -> Callable[[], int]:
    """In a launcher that spawned one process per rank: pass SIGTERM / SIGUSR1 on to the
    children (which checkpoint and exit), instead of dying and orphaning them. Returns a
    function giving the signal received (0 = none)."""
    received = [0]

    def forward(signum, frame):
        received[0] = received[0] or signum
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    return lambda: received[0]


def _agree(value: int, device: torch.device) -> int:
    """The maximum of `value` over all ranks (collective when distributed)."""
    if comm.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class ResumableCheckpointHook(HookBase):
    """Replaces detectron2's PeriodicCheckpointer and runs on every rank.

    After each iteration it records this rank's RNG and data-loader state (the state of the
    last finished iteration, also used when a crash is checkpointed); at a checkpoint
    iteration (every `period`, the last one, or after a stop signal) all ranks' states are
    gathered into the main process's checkpoint (`resume_state`), with the config it was
    trained with (`config`, used to detect values a resume would not apply).
    """

    def __init__(self, period: int, stop: StopSignal):
        self._period = period
        self._stop = stop

    def after_step(self) -> None:
        trainer = self.trainer
        iteration = trainer.iter
        trainer.committed = (iteration, {"rng": capture_rng_state(), "data": trainer.data_loader.state_dict()})
        signum = _agree(self._stop.signum, trainer.device)
        if iteration + 1 >= trainer.max_iter:
            name = "model_final"
        elif signum:
            name = "model_interrupted"
        elif self._period > 0 and (iteration + 1) % self._period == 0:
            name = f"model_{iteration:07d}"
        else:
            return
        states = comm.gather(trainer.committed[1], dst=0)
        if comm.is_main_process():
            trainer.checkpointer.save(
                name, iteration=iteration, resume_state=states, config=trainer.cfg.dump()
            )
        if signum and name != "model_final":
            raise TrainingStopped(signum, iteration)

    def after_train(self) -> None:
        # training is over (model_final or model_interrupted is saved): a stop signal during
        # the final evaluation ends the process at once, as it would without this hook
        self._stop.__exit__(None, None, None)


def loss_guard(trainer, max_spike: float, window: int = 20) -> Callable:
    """A forward hook for the training model: raises NonFiniteError on every rank (before
    backward, so no NaN gradient reaches the weights) when any rank's loss dict holds a
    non-finite term; with `max_spike` > 0, warns when the total loss exceeds `max_spike`
    times the median of the previous `window` iterations."""
    history: deque = deque(maxlen=window)

    def hook(module, inputs, output) -> None:
        if not module.training or not isinstance(output, dict) or not output:
            return
        values = torch.stack([v.detach().float().sum() for v in output.values()])
        finite = torch.isfinite(values)
        if _agree(int(not bool(finite.all())), values.device):
            local = [f"{k}={v:g}" for k, v, ok in zip(output, values.tolist(), finite.tolist()) if not ok]
            per_rank = comm.all_gather(local)
            described = "; ".join(
                f"rank {rank}: {', '.join(terms)}" for rank, terms in enumerate(per_rank) if terms
            )
            raise NonFiniteError(trainer.iter, f"non-finite loss terms ({described})")
        if max_spike > 0:
            total = float(values.sum())
            if len(history) == window and total > max_spike * statistics.median(history):
                logger.warning(
                    "iteration %d: total loss %.4g is more than SOLVER.MAX_LOSS_SPIKE=%g times the "
                    "median %.4g of the previous %d iterations (training may be diverging)",
                    trainer.iter, total, max_spike, statistics.median(history), window,
                )
            history.append(total)

    return hook


def non_finite_parameters(model: torch.nn.Module) -> List[str]:
    """Names of parameters holding NaN or Inf."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def first_non_finite_module(model: torch.nn.Module, batch) -> Optional[str]:
    """Run `model(batch)` without gradients and return the name of the first module (in call
    order) whose output holds NaN or Inf, or None. Used only after a step failed."""
    found: List[str] = []

    def non_finite(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.is_floating_point() and not bool(torch.isfinite(value).all())
        if isinstance(value, dict):
            return any(non_finite(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(non_finite(v) for v in value)
        return False

    def make_hook(name):
        def hook(module, inputs, output):
            if not found and non_finite(output):
                found.append(name)
        return hook

    handles = [m.register_forward_hook(make_hook(n or "model")) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(batch)
    except Exception:  # the failure being diagnosed; the hooks have seen what came before it
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None

