"""build_evaluator: families from config or metadata, errors naming what is missing."""

import importlib.util

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from openseg.config import add_openseg_config
from openseg.evaluation import builder
from openseg.evaluation.builder import (
    EVALUATOR_FAMILIES,
    build_evaluator,
    register_evaluator_family,
)
from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.evaluation.semantic import SemanticEvaluator


def _cfg(evaluators=()):
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.TEST.EVALUATORS = list(evaluators)
    return cfg


@pytest.fixture
def dataset():
    name = "test_builder_dataset"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        stuff_classes=["a", "b", "c"],
        thing_classes=["a", "b", "c"],
        thing_dataset_id_to_contiguous_id={1: 0},
        ignore_label=255,
        label_divisor=1000,
        class_splits={"seen": [0, 1], "unseen": [2]},
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_families_from_metadata(dataset, tmp_path):
    MetadataCatalog.get(dataset).set(evaluators=["semantic", "panoptic"])
    evaluators = build_evaluator(_cfg(), dataset, str(tmp_path))._evaluators
    assert [type(e) for e in evaluators] == [SemanticEvaluator, PanopticEvaluator]


def test_config_overrides_metadata(dataset):
    MetadataCatalog.get(dataset).set(evaluators=["semantic", "panoptic"])
    evaluators = build_evaluator(_cfg(["panoptic"]), dataset)._evaluators
    assert [type(e) for e in evaluators] == [PanopticEvaluator]


def test_unknown_family_lists_known_ones(dataset):
    with pytest.raises(ValueError, match="'bogus'.*open_world_ar.*panoptic.*semantic"):
        build_evaluator(_cfg(["panoptic", "bogus"]), dataset)


def test_dataset_without_evaluators_names_dataset_and_key(dataset):
    with pytest.raises(ValueError, match="test_builder_dataset.*`evaluators`"):
        build_evaluator(_cfg(), dataset)


def test_registered_family_is_built(dataset, monkeypatch):
    class CountingEvaluator(DatasetEvaluator):
        def __init__(self, dataset_name, output_dir=None, distributed=True):
            self.args = (dataset_name, output_dir, distributed)

    monkeypatch.setitem(builder.EVALUATOR_FAMILIES, "counting", CountingEvaluator)
    with pytest.raises(ValueError, match="already registered"):
        register_evaluator_family("counting", CountingEvaluator)
    (evaluator,) = build_evaluator(_cfg(["counting"]), dataset, "out")._evaluators
    assert evaluator.args == (dataset, "out", True)


def test_lazy_families_point_at_existing_names():
    for family, target in EVALUATOR_FAMILIES.items():
        module, attr = target.split(":")
        assert importlib.util.find_spec(module) is not None, target
        assert hasattr(importlib.import_module(module), attr), target


def _register_vocabulary_only(name, synonyms):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        stuff_classes=[s[0] for s in synonyms], synonyms=synonyms, ignore_label=255,
        evaluators=["semantic"],
    )


def test_test_set_without_split_gets_seen_unseen_against_train_vocabulary(dataset):
    _register_vocabulary_only("test_builder_train_vocab", [["cat"], ["dog", "puppy"], ["sky"]])
    _register_vocabulary_only("test_builder_test_vocab", [["puppies"], ["bird"], ["sky"], ["tree"]])
    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("test_builder_train_vocab",)
    build_evaluator(cfg, "test_builder_test_vocab")
    # hand-computed: "puppies" is a plural of the train synonym "puppy"; "sky" is shared
    assert MetadataCatalog.get("test_builder_test_vocab").class_splits == {"seen": [0, 2], "unseen": [1, 3]}
    # a dataset that defines its own split keeps it
    MetadataCatalog.get(dataset).set(evaluators=["semantic"])
    build_evaluator(cfg, dataset)
    assert MetadataCatalog.get(dataset).class_splits == {"seen": [0, 1], "unseen": [2]}
