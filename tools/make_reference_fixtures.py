#!/usr/bin/env python
"""Generate the small reference fixtures the equivalence tests read.

    python tools/make_reference_fixtures.py --reference-root ../shared/reference [--only NAME ...]

Each module `tools/reference_fixtures/<name>.py` builds one released implementation (from
`--reference-root`, never at test time) with random weights at a small size, runs it on a
fixed input and saves its state dict, inputs and outputs under `tests/fixtures/reference/<name>/`.
Modules run in separate processes: the released code bases share package names
(`mask2former` in Mask2Former and SegPrompt) and patch `sys.modules` with stubs.
A module defines `generate(reference_root: Path, out_dir: Path) -> None`.
"""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE_MODULES = HERE / "reference_fixtures"
DEFAULT_OUT = HERE.parent / "tests" / "fixtures" / "reference"


def available() -> list:
    return sorted(p.stem for p in FIXTURE_MODULES.glob("*.py") if not p.stem.startswith("_"))


def run_one(name: str, reference_root: Path, out_root: Path) -> None:
    """Generate the fixtures of one module in this process."""
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(f"reference_fixtures.{name}")
    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    module.generate(reference_root, out_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-root", type=Path, required=True,
                        help="folder holding the released implementations (../shared/reference)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {available()}")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.reference_root.resolve()
    if not root.is_dir():
        parser.error(f"--reference-root {root} is not a folder (expected ../shared/reference)")
    names = args.only or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown fixture module(s) {unknown}; available: {available()}")
    if args.in_process:
        for name in names:
            run_one(name, root, args.output.resolve())
        return 0
    failed = []
    for name in names:
        print(f"[fixtures] {name}", flush=True)
        cmd = [sys.executable, __file__, "--reference-root", str(root), "--output",
               str(args.output.resolve()), "--only", name, "--in-process"]
        if subprocess.call(cmd) != 0:
            failed.append(name)
    if failed:
        print(f"[fixtures] failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
