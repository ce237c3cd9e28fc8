"""Run a test's worker on several gloo processes through detectron2's `launch`, as
`tools/train_net.py --num-gpus N` does, and leave without tearing gloo down.

A worker process that returns normally runs the interpreter's and the C++ runtime's exit
teardown while the other rank may still hold the TCP store and gloo pairs; that teardown
aborted a rank now and then in CI ("terminate called without an active exception",
SIGABRT), even after `destroy_process_group`. Every rank therefore meets the others at a
barrier once its work is done and ends with `os._exit(0)`. A failing worker still raises
in its process, and `launch` reports it as before.

Import it into a test module with ``from ddp_utils import launch_on_cpu_ranks``.
"""

import os
import sys
from typing import Any, Callable, Sequence

from detectron2.engine import launch
from detectron2.utils import comm


def _work_then_exit(worker: Callable[..., Any], args: Sequence[Any]) -> None:
    worker(*args)
    comm.synchronize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_on_cpu_ranks(worker: Callable[..., Any], args: Sequence[Any], world_size: int = 2) -> None:
    """Run `worker(*args)` on `world_size` processes of one machine (gloo on CPU)."""
    launch(_work_then_exit, world_size, dist_url="auto", args=(worker, tuple(args)))
