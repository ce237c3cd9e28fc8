"""Test session set-up.

- The tests exercise the checkout they are in: if `openseg` or an `openseg.projects.*`
  package would be imported from elsewhere (the environment's editable install points at
  another clone), the session stops before collecting, naming both paths.
- Datasets live in a throw-away root, so the suite never writes into a user's
  $OPENSEG_DATASETS or the checkout, and the demo data is generated fresh.
"""
import importlib.util
import os
import pkgutil
import shutil
import tempfile
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS_ROOT = tempfile.mkdtemp(prefix="openseg-test-datasets-")
os.environ["OPENSEG_DATASETS"] = DATASETS_ROOT
torch.set_num_threads(min(2, os.cpu_count() or 1))


def foreign_packages(root: Path) -> List[Tuple[str, str]]:
    """(package, location) of `openseg` and every `openseg.projects.<name>` (those of this
    checkout's projects/ and those the environment provides) that would be imported from
    outside `root`; found with `find_spec`, so no project is imported."""
    spec = importlib.util.find_spec("openseg")
    if spec is None:
        return [("openseg", "not installed")]
    found = [("openseg", spec.origin)]
    projects = importlib.util.find_spec("openseg.projects")
    names = {p.parent.name for p in (root / "projects").glob("*/__init__.py")}
    if projects is not None:
        found += [("openseg.projects", path) for path in projects.submodule_search_locations]
        names |= {m.name for m in pkgutil.iter_modules(projects.submodule_search_locations)}
    for name in sorted(names):
        sub = importlib.util.find_spec(f"openseg.projects.{name}")
        found.append((f"openseg.projects.{name}", sub.origin if sub else "not installed"))
    return [(name, str(path)) for name, path in found if not Path(str(path)).resolve().is_relative_to(root)]


def pytest_configure(config):
    foreign = foreign_packages(ROOT)
    if foreign:
        listing = "\n".join(f"  {name} -> {path}" for name, path in foreign)
        raise pytest.UsageError(
            f"the tests in {ROOT} would exercise code from elsewhere:\n{listing}\n"
            f"the Python environment's editable install points at another checkout. "
            f"Run the tests with `bash tools/run.sh test` from {ROOT} (it reinstalls this checkout)."
        )


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATASETS_ROOT, ignore_errors=True)
