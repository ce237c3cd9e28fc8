"""Record the hyper-parameters of Mask2Former's released configs (COCO / ADE20K / Cityscapes
panoptic, instance and semantic segmentation), for `tests/test_mask2former_configs.py`.

Each released YAML is merged as the release's `train_net.py` does (detectron2 defaults +
`add_deeplab_config` + `add_maskformer2_config`) and every key of the merged config (so also
the defaults a YAML relies on, e.g. COCO's multi-step LR) is written to `configs.json` as
``{"<dataset>/<task folder>/[swin/]<file>": {"MODEL.X": value, ...}}``, keyed by the path the
released MODEL_ZOO.md links (relative to the release's configs/).
"""
import json
from pathlib import Path

from ._stubs import add_reference_to_path

DATASETS = ("coco", "ade20k", "cityscapes")
TASKS = ("panoptic-segmentation", "instance-segmentation", "semantic-segmentation")


def _flatten(node, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def generate(reference_root: Path, out_dir: Path) -> None:
    release = add_reference_to_path(reference_root, "facebookresearch__Mask2Former")
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    recorded = {}
    for dataset in DATASETS:
        for task in TASKS:
            folder = release / "configs" / dataset / task
            for path in sorted(folder.rglob("*.yaml")):
                if path.name.startswith("Base-"):
                    continue
                cfg = get_cfg()
                add_deeplab_config(cfg)
                add_maskformer2_config(cfg)
                cfg.merge_from_file(str(path))
                recorded[str(path.relative_to(release / "configs"))] = _flatten(cfg)
    with open(out_dir / "configs.json", "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
