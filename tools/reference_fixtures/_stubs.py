"""Make a released detectron2-based code base importable on CPU without its compiled ops.

`MultiScaleDeformableAttention` (Mask2Former's CUDA op) and `detectron2._C` are replaced by
stub modules before the import; the reference falls back to its pure-PyTorch paths."""
import sys
import types
from pathlib import Path


def install_compiled_op_stubs() -> None:
    for name in ("MultiScaleDeformableAttention", "detectron2._C"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)


def add_reference_to_path(reference_root: Path, folder: str) -> Path:
    """Put one released code base first on sys.path (after installing the stubs)."""
    install_compiled_op_stubs()
    path = (reference_root / folder).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: --reference-root must hold {folder}")
    sys.path.insert(0, str(path))
    return path
