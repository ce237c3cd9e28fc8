"""Installs `openseg` and every method under `projects/` as `openseg.projects.<name>`."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def project_packages() -> dict:
    """Map `openseg.projects.<name>[.sub]` onto `projects/<name>[/sub]` folders that hold code."""
    mapping = {"openseg.projects": "projects"}
    for init in sorted((ROOT / "projects").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / "projects")
        mapping[".".join(("openseg", "projects", *rel.parts))] = str(init.parent.relative_to(ROOT))
    return mapping


packages = project_packages()
setup(
    name="openseg",
    version="0.1.0",
    description="Open-vocabulary, open-world and open-ended segmentation on detectron2",
    python_requires=">=3.10",
    packages=find_packages(include=["openseg", "openseg.*"]) + list(packages),
    package_dir=packages,
    package_data={"openseg": ["py.typed", "data/vocabularies/*/*.txt"]},
)
