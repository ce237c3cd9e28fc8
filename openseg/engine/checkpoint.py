"""The training checkpointer: atomic files, a resume point that is always readable, and the
random-number state needed for an exact resume.

- Every checkpoint is written to a temporary file, fsync'ed and renamed (`openseg.utils.io`);
  `last_checkpoint` is rewritten the same way, only after the checkpoint is complete.
- `--resume` reads the checkpoint named in `last_checkpoint`; if that file cannot be read it
  is reported by name and the newest readable checkpoint of the folder is used instead.
  Checkpoints of diverged weights (`model_diverged*.pth`) are never resume targets.
- `capture_rng_state` / `restore_rng_state` hold Python's, NumPy's and torch's (CPU and
  current CUDA device) generators as plain lists and tensors, so a checkpoint stays loadable
  with `torch.load(weights_only=True)`.
"""
import logging
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..checkpoint import OpenSegCheckpointer
from ..utils.io import atomic_open, atomic_write_text

__all__ = [
    "DIVERGED_PREFIX",
    "TrainingCheckpointer",
    "UnreadableCheckpointError",
    "capture_rng_state",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

DIVERGED_PREFIX = "model_diverged"


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read (truncated, empty, not a checkpoint)."""


class TrainingCheckpointer(OpenSegCheckpointer):
    """`OpenSegCheckpointer` (every released layout, strict loading) with atomic saves and a
    resume that falls back to the newest readable checkpoint."""

    def save(self, name: str, tag_last: bool = True, **kwargs: Any) -> Optional[str]:
        """Write `<save_dir>/<name>.pth` atomically; with `tag_last`, then point
        `last_checkpoint` at it. Returns the path (None when this process does not save)."""
        if not self.save_dir or not self.save_to_disk:
            return None
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
        if tag_last:
            self.tag_last_checkpoint(basename)
        return path

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except Exception as error:  # torch.load's errors differ by the kind of damage
            size = os.path.getsize(filename) if os.path.isfile(filename) else "missing"
            raise UnreadableCheckpointError(
                f"cannot read checkpoint {filename} ({size} bytes): {type(error).__name__}: {error}"
            ) from error

    def last_good_checkpoint(self) -> Optional[str]:
        """The file `last_checkpoint` names, if it exists (for error messages)."""
        if not self.has_checkpoint():
            return None
        path = self.get_checkpoint_file()
        return path if os.path.isfile(path) else None

    def resume_candidates(self) -> List[str]:
        """The file named in `last_checkpoint`, then the folder's other checkpoints, newest
        first; diverged checkpoints and temporary files are left out."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else ""
        others = [
            path
            for path in self.get_all_checkpoint_files()
            if path != tagged and not os.path.basename(path).startswith((DIVERGED_PREFIX, "."))
        ]
        others.sort(key=os.path.getmtime, reverse=True)
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """As DetectionCheckpointer's, but an unreadable resume checkpoint is reported by name
        and the newest readable one is used; raises if none of the folder's is readable."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        failures = []
        for candidate in self.resume_candidates():
            try:
                loaded = self.load(candidate)
            except UnreadableCheckpointError as error:
                self._parsed_url_during_load = None  # DetectionCheckpointer.load left it set
                logger.error("%s; trying the next newest checkpoint", error)
                failures.append(str(error))
                continue
            if failures:
                logger.warning(
                    "resumed from %s because the newer checkpoint(s) could not be read:\n  %s",
                    candidate, "\n  ".join(failures),
                )
            return loaded
        raise UnreadableCheckpointError(
            f"--resume: no readable checkpoint in {self.save_dir}:\n  " + "\n  ".join(failures)
            + "\nremove the broken files (or the OUTPUT_DIR) to start from MODEL.WEIGHTS"
        )


def capture_rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch CPU (and current CUDA device) generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
