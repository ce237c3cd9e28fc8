"""Import a repository script (tools/*.py, datasets/prepare_*.py): they are not a package.

Import it into a test module with ``from script_utils import load_script``.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The module of `REPO/relative_path`, registered under its file stem (dataclasses and
    pickling look modules up in sys.modules)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
