"""Open-ended evaluation on the demo validation set with ground-truth masks as predictions:
Acc / NIV against hand-counted values, and the Lexical Alignment Curve (levels, monotonicity,
exact PQ / mIoU / AP / MapAcc per level, area, plot) through the evaluator builder."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances
from PIL import Image

from openseg.config import load_config
from openseg.evaluation import build_evaluator
from openseg.evaluation.lac import LexicalAlignmentEvaluator, curve_area
from openseg.evaluation.lexical import LexicalMapper, RelationTable
from openseg.evaluation.open_ended import OpenEndedAccuracyEvaluator
from openseg.evaluation.panoptic import rgb_to_segment_ids

DATASET = "openseg_demo_val"
# demo classes: circle square triangle cross | sky grass water sand (things are ids 0-3)


def _ground_truth_outputs(record, text_of_class):
    """Model output naming every non-crowd ground-truth segment with text_of_class(class, k)."""
    id_map = rgb_to_segment_ids(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    masks, texts = [], []
    for k, segment in enumerate(record["segments_info"]):
        masks.append(torch.from_numpy(id_map == segment["id"]))
        texts.append(text_of_class(segment["category_id"], k))
    instances = Instances((record["height"], record["width"]))
    instances.pred_masks = torch.stack(masks)
    instances.scores = torch.linspace(1.0, 0.5, len(masks))
    instances.pred_texts = texts
    return {"instances": instances}


def _run(evaluator, text_of_class, extra_mask=False):
    evaluator.reset()
    for record in DatasetCatalog.get(DATASET):
        output = _ground_truth_outputs(record, text_of_class)
        if extra_mask:  # a prediction overlapping nothing well: unmatched
            instances = output["instances"]
            stray = torch.zeros((1,) + tuple(instances.pred_masks.shape[1:]), dtype=torch.bool)
            stray[0, :2, :2] = True
            merged = Instances(instances.image_size)
            merged.pred_masks = torch.cat([instances.pred_masks, stray])
            merged.scores = torch.cat([instances.scores, torch.tensor([0.1])])
            merged.pred_texts = instances.pred_texts + ["blob"]
            output = {"instances": merged}
        evaluator.process([record], [output])
    return evaluator.evaluate()


def _segment_classes():
    return [s["category_id"] for r in DatasetCatalog.get(DATASET) for s in r["segments_info"]]


def test_accuracy_and_not_in_vocabulary(tmp_path):
    torch.manual_seed(0)
    # per class: the k-th segment's name alternates among these (text, correct, in vocabulary)
    answers = {
        0: [("Circles", True, True), ("Discs.", True, True), ("square", False, True)],
        # an exact match is required (OSM Sec. 4): "the box" is not the name "box"
        1: [("BOXES", True, True), ("cube", False, False), ("the box", False, False)],
        2: [("triangle", True, True), ("a triangle", False, False)],
        3: [("plus signs", True, True), ("star", False, False), ("circle", False, True)],
        4: [("Sky", True, True), ("clouds", False, False)],
        5: [("lawn", True, True), ("meadows", True, True)],
        6: [("sea", True, True), ("ocean", False, False)],
        7: [("grass", False, True)],
    }
    records = DatasetCatalog.get(DATASET)
    flags = [
        answers[s["category_id"]][k % len(answers[s["category_id"]])]
        for r in records
        for k, s in enumerate(r["segments_info"])
    ]
    classes = _segment_classes()
    expected_acc = 100 * np.mean([correct for _, correct, _ in flags])
    expected_niv = 100 * np.mean([not in_vocab for _, _, in_vocab in flags])
    per_class = [
        np.mean([f[1] for f, c in zip(flags, classes) if c == class_id]) for class_id in range(8)
    ]
    unseen = [f for f, c in zip(flags, classes) if c in (3, 7)]

    evaluator = OpenEndedAccuracyEvaluator(DATASET, output_dir=str(tmp_path), distributed=False)
    result = _run(evaluator, lambda c, k: answers[c][k % len(answers[c])][0], extra_mask=True)[
        "open_ended"
    ]
    assert result["Acc"] == pytest.approx(expected_acc)
    assert result["NIV"] == pytest.approx(expected_niv)
    assert result["mAcc"] == pytest.approx(100 * np.mean(per_class))
    assert result["Acc_unseen"] == pytest.approx(100 * np.mean([f[1] for f in unseen]))
    assert result["num_masks"] == len(classes)
    assert result["num_unmatched"] == len(records)
    assert os.path.isfile(tmp_path / "open_ended_metrics.json")


# a hand-written table: each class's descriptions relate to it at one level only
DESCRIPTION = {
    0: "red discs",  # synonym (dataset synonym "disc")
    1: "a square",  # exact
    2: "an isosceles triangle",  # hyponym
    3: "crossbar",  # meronym
    4: "clouds",  # meronym
    5: "lawn",  # synonym (dataset synonym)
    6: "the ocean",  # hyponym
    7: "potato",  # no relation: background at every level
}
LEVEL_OF_CLASS = {0: 1, 1: 0, 2: 2, 3: 3, 4: 3, 5: 1, 6: 2}
HAND_TABLE = {
    "isosceles triangle": {"hyponyms": ["triangle"]},
    "crossbar": {"meronyms": ["cross"]},
    "cloud": {"meronyms": ["sky"]},
    "ocean": {"hyponyms": ["water"]},
}


def test_lexical_alignment_curve(tmp_path):
    torch.manual_seed(0)
    from openseg.data.vocab import get_vocabulary

    table = RelationTable.from_vocabulary(get_vocabulary(DATASET))
    table.update(HAND_TABLE)
    evaluator = LexicalAlignmentEvaluator(
        DATASET, output_dir=str(tmp_path), distributed=False, mapper=LexicalMapper(table)
    )
    result = _run(evaluator, lambda c, k: DESCRIPTION[c])["lac"]

    classes = np.array(_segment_classes())
    present = sorted(set(classes.tolist()))
    things_present = [c for c in present if c < 4]
    curves = {"PQ": [], "mIoU": [], "AP": [], "MapAcc": []}
    for level, name in enumerate(("exact", "synonym", "hyponym", "meronym")):
        mapped = [c for c in present if LEVEL_OF_CLASS.get(c, 99) <= level]
        # ground-truth masks: a mapped class is perfect (PQ = IoU = AP = 1), an unmapped one
        # has only misses (0), and no prediction lands on a wrong class
        expected_pq = 100 * len(mapped) / len(present)
        expected_ap = 100 * len([c for c in mapped if c < 4]) / len(things_present)
        expected_acc = 100 * np.isin(classes, mapped).mean()
        assert result[f"PQ@{name}"] == pytest.approx(expected_pq)
        assert result[f"mIoU@{name}"] == pytest.approx(expected_pq)
        assert result[f"AP@{name}"] == pytest.approx(expected_ap)
        assert result[f"MapAcc@{name}"] == pytest.approx(expected_acc)
        for key in curves:
            curves[key].append(result[f"{key}@{name}"])
    for key, values in curves.items():
        assert all(b >= a for a, b in zip(values, values[1:])), (key, values)
        trapezoid = sum((a + b) / 2 / 3 for a, b in zip(values, values[1:]))
        assert result[f"{key}_LAC_area"] == pytest.approx(trapezoid)
    assert os.path.getsize(tmp_path / "lac.png") > 0
    assert curve_area([10.0, 20.0]) == pytest.approx(15.0)


def test_builder_families_and_unseen_ground_truth_class(tmp_path):
    """The registered families build from config; a description relating to a class other than
    the ground truth makes a false positive (PQ can drop while MapAcc cannot)."""
    cfg = load_config(opts=["TEST.EVALUATORS", "['open_ended']"])
    evaluators = build_evaluator(cfg, DATASET, str(tmp_path))
    assert isinstance(evaluators._evaluators[0], OpenEndedAccuracyEvaluator)

    from openseg.data.vocab import get_vocabulary

    table = RelationTable.from_vocabulary(get_vocabulary(DATASET))
    table.update({"puddle": {"meronyms": ["water"]}})
    evaluator = LexicalAlignmentEvaluator(
        DATASET, distributed=False, mapper=LexicalMapper(table), families=["panoptic"]
    )
    names = {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "sky", 5: "grass", 6: "water"}
    result = _run(evaluator, lambda c, k: names.get(c, "puddle"))["lac"]
    assert result["MapAcc@meronym"] == pytest.approx(result["MapAcc@exact"])
    assert result["PQ@meronym"] < result["PQ@exact"]
    assert not math.isnan(result["PQ_LAC_area"])


def test_sbert_mapping_evaluator():
    """Sentence-BERT maps class names and close paraphrases onto their class: perfect PQ with
    ground-truth masks; one class named by an unrelated word lands elsewhere (a miss)."""
    from openseg.evaluation.sbert_mapping import SBERTMappingEvaluator, default_sbert_model_path

    torch.manual_seed(0)
    names = {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "sky", 5: "grass", 6: "water"}
    evaluator = SBERTMappingEvaluator(
        DATASET, distributed=False, model_path=default_sbert_model_path(), families=["panoptic"]
    )
    result = _run(evaluator, lambda c, k: names.get(c, "sand"))["sbert_mapping"]
    assert result["PQ@sbert"] == pytest.approx(100.0)
    assert result["MapAcc@sbert"] == pytest.approx(100.0)


def test_relation_table_from_config(tmp_path):
    """cfg.TEST.OPEN_ENDED.RELATION_TABLE / RELATION_OVERRIDES load files in the documented
    format into the LAC evaluator; a table for another vocabulary or with an unknown class
    fails naming the file and the key."""
    import json

    from openseg.data.vocab import get_vocabulary

    classes = [names[0] for names in get_vocabulary(DATASET)]
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"classes": classes, "relations": HAND_TABLE}))
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"ocean": {"synonyms": ["water"]}, "crossbar": {}}))
    cfg = load_config(
        opts=[
            "TEST.EVALUATORS",
            "['lac']",
            "TEST.OPEN_ENDED.RELATION_TABLE",
            str(table_file),
            "TEST.OPEN_ENDED.RELATION_OVERRIDES",
            f"['{override}']",
            "TEST.OPEN_ENDED.METRICS",
            "['panoptic']",
        ]
    )
    evaluator = build_evaluator(cfg, DATASET, str(tmp_path))._evaluators[0]
    table = evaluator.lexical_mapper.table
    assert table.relations("isosceles triangle") == [(2, 2)]
    assert table.relations("ocean") == [(6, 1)]
    assert table.relations("crossbar") == []
    assert table.relations("sky") == [(4, 0)]
    # only the file's relations: the dataset synonyms are not added to a loaded table
    assert table.relations("lawn") == []

    table_file.write_text(json.dumps({"classes": classes[::-1], "relations": {}}))
    with pytest.raises(ValueError, match="table.json: the table's 'classes'"):
        build_evaluator(cfg, DATASET, str(tmp_path))
    table_file.write_text(
        json.dumps({"classes": classes, "relations": {"ocean": {"hyponyms": ["sea"]}}})
    )
    with pytest.raises(
        ValueError, match=r"table.json: relations\['ocean'\]\['hyponyms'\] names 'sea'"
    ):
        build_evaluator(cfg, DATASET, str(tmp_path))
    table_file.write_text(json.dumps({"classes": classes, "relations": {}}))
    cfg.TEST.OPEN_ENDED.SPACY_PIPELINE = str(tmp_path / "no_pipeline")
    with pytest.raises(OSError, match="no_pipeline.*SPACY_PIPELINE"):
        build_evaluator(cfg, DATASET, str(tmp_path))
