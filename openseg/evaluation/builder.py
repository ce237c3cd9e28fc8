"""`build_evaluator`: the evaluators of a test set, chosen by config or by dataset metadata.

Metric families map to evaluator classes through `EVALUATOR_FAMILIES` ("module:Class"
strings imported on first use, so one family's heavy or missing dependencies never break the
others); a new family registers itself with `register_evaluator_family`.
"""
import importlib
from typing import Callable, Dict, List, Optional, Union

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators

from openseg.data.splits import apply_class_splits

__all__ = [
    "EVALUATOR_FAMILIES",
    "build_evaluator",
    "ensure_class_splits",
    "evaluator_families",
    "register_evaluator_family",
]

EvaluatorFactory = Callable[..., DatasetEvaluator]

EVALUATOR_FAMILIES: Dict[str, Union[str, EvaluatorFactory]] = {
    "panoptic": "openseg.evaluation.panoptic:PanopticEvaluator",
    "semantic": "openseg.evaluation.semantic:SemanticEvaluator",
    "instance": "openseg.evaluation.instance:InstanceSegEvaluator",
    "cityscapes_instance": "openseg.evaluation.cityscapes_instance:CityscapesInstanceEvaluator",
    "open_world_ar": "openseg.evaluation.open_world:OpenWorldAREvaluator",
    "referring": "openseg.evaluation.referring:ReferringEvaluator",
    "open_ended": "openseg.evaluation.open_ended:OpenEndedAccuracyEvaluator",
    "lac": "openseg.evaluation.lac:LexicalAlignmentEvaluator",
    "sbert_mapping": "openseg.evaluation.sbert_mapping:SBERTMappingEvaluator",
}


def register_evaluator_family(name: str, factory: Union[str, EvaluatorFactory]) -> None:
    """Add metric family `name`: an evaluator class / factory, or its "module:attr" path.

    The factory is called as `factory(dataset_name, output_dir=..., distributed=True)`.
    """
    if name in EVALUATOR_FAMILIES:
        raise ValueError(f"Evaluator family '{name}' is already registered.")
    EVALUATOR_FAMILIES[name] = factory


def _resolve(family: str) -> EvaluatorFactory:
    factory = EVALUATOR_FAMILIES[family]
    if isinstance(factory, str):
        module_name, attr = factory.split(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory


def evaluator_families(cfg: CfgNode, dataset_name: str) -> List[str]:
    """`cfg.TEST.EVALUATORS` if non-empty, else the dataset metadata's `evaluators`."""
    families = list(cfg.TEST.get("EVALUATORS", None) or [])
    if not families:
        families = list(MetadataCatalog.get(dataset_name).get("evaluators", None) or [])
    if not families:
        raise ValueError(
            f"No evaluators for dataset '{dataset_name}': its metadata has no `evaluators` key "
            "(e.g. ['panoptic', 'semantic']) and cfg.TEST.EVALUATORS is empty; set one of them."
        )
    unknown = [family for family in families if family not in EVALUATOR_FAMILIES]
    if unknown:
        raise ValueError(
            f"Unknown evaluator families {unknown} for dataset '{dataset_name}'; known "
            f"families: {sorted(EVALUATOR_FAMILIES)}."
        )
    return families


def ensure_class_splits(cfg: CfgNode, dataset_name: str) -> None:
    """Give a test set without its own `class_splits` the seen/unseen split against the
    training vocabulary (cfg.DATASETS.TRAIN[0]) by class-name overlap, as open-vocabulary
    papers report COCO -> X; splits a dataset defines itself (LVIS-OW, demo) are kept."""
    if MetadataCatalog.get(dataset_name).get("class_splits") is not None or not cfg.DATASETS.TRAIN:
        return
    apply_class_splits(dataset_name, cfg.DATASETS.TRAIN[0])


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None
) -> DatasetEvaluators:
    """One evaluator per metric family of `dataset_name` (see `evaluator_families`), each
    writing its raw results and metrics JSON under `output_dir`.

    A family whose evaluator reads config keys (e.g. cfg.TEST.OPEN_ENDED.*) provides a
    classmethod `from_config(cfg, dataset_name, output_dir)` returning the evaluator; the
    others are called as `factory(dataset_name, output_dir=..., distributed=True)`."""
    ensure_class_splits(cfg, dataset_name)
    evaluators = []
    for family in evaluator_families(cfg, dataset_name):
        factory = _resolve(family)
        if hasattr(factory, "from_config"):
            evaluators.append(factory.from_config(cfg, dataset_name, output_dir))
        else:
            evaluators.append(factory(dataset_name, output_dir=output_dir, distributed=True))
    return DatasetEvaluators(evaluators)
