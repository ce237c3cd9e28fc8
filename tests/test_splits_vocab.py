"""Class splits and vocabularies on hand-made cases."""

import pytest
from detectron2.data import MetadataCatalog

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.common import register_lazy
from openseg.data.splits import apply_class_splits, known_seen_unseen, seen_unseen_split
from openseg.data.vocab import (
    COCO_PANOPTIC_SYNONYMS,
    PROMPT_TEMPLATES,
    get_vocabulary,
    join_synonyms,
    normalize_name,
    split_synonyms,
    validate_vocabulary,
)


def test_seen_unseen_by_name_overlap():
    train = [["person", "man"], ["bus"], ["grass"], ["berry"], ["ski"]]
    test = [
        ["persons"],  # plural of a train class
        ["buses"],  # -es plural
        ["tree"],  # new
        ["guy", "man"],  # a synonym names a train class
        ["Grass"],  # case
        ["sky"],  # new
        ["berries"],  # -ies plural
        "skis",  # plain string entry
        ["glass"],  # "grass" must not match by accident
    ]
    assert seen_unseen_split(train, test) == {"seen": [0, 1, 3, 4, 6, 7], "unseen": [2, 5, 8]}


def test_seen_unseen_multiword_and_separators():
    train = ["traffic light", "potted_plant"]
    test = ["traffic-lights", "Potted Plant", "light"]
    assert seen_unseen_split(train, test) == {"seen": [0, 1], "unseen": [2]}


def test_known_seen_unseen_validation():
    split = known_seen_unseen([2, 0], [1], [3], num_classes=4)
    assert split == {"known": [0, 2], "seen": [1], "unseen": [3]}
    with pytest.raises(ValueError, match="Class id 1 is in both 'seen' and 'unseen'"):
        known_seen_unseen([0], [1], [1, 2])
    with pytest.raises(ValueError, match=r"Class id 5 in 'unseen' is outside \[0, 4\)"):
        known_seen_unseen([0, 1], [2], [5], num_classes=4)
    with pytest.raises(ValueError, match=r"Class ids \[3\] are in no group"):
        known_seen_unseen([0, 1], [2], [], num_classes=4)
    with pytest.raises(TypeError, match="ids must be ints"):
        known_seen_unseen([0.0], [], [])


def test_apply_class_splits_stores_metadata():
    register_lazy("test_splits_train", list, synonyms=[["cat", "kitten"], ["dog"]])
    register_lazy("test_splits_test", list, stuff_classes=["kittens", "horse", "dogs"])
    split = apply_class_splits("test_splits_test", "test_splits_train")
    assert split == {"seen": [0, 2], "unseen": [1]}
    assert MetadataCatalog.get("test_splits_test").class_splits == split
    register_lazy("test_splits_train2", list, thing_classes=["horse"])
    apply_class_splits("test_splits_test", "test_splits_train2")
    assert MetadataCatalog.get("test_splits_test").class_splits == {"seen": [1], "unseen": [0, 2]}


def test_validate_vocabulary_errors():
    validate_vocabulary(["cat", ["dog", "puppy"], ["table"], ["dining table", "table"]])
    with pytest.raises(ValueError, match=r"entry 2 \('Cat '\) duplicates entry 0"):
        validate_vocabulary(["cat", "dog", "Cat "])
    with pytest.raises(ValueError, match=r"entry 1 .*empty"):
        validate_vocabulary(["cat", "  ", "dog"])
    with pytest.raises(ValueError, match=r"entry 0 .*empty"):
        validate_vocabulary([["cat", ""]])
    with pytest.raises(ValueError, match="entry 1 has no names"):
        validate_vocabulary([["cat"], []])
    with pytest.raises(ValueError, match="empty"):
        validate_vocabulary([])


def test_names_and_templates():
    assert normalize_name("  Traffic_Light-pole ") == "traffic light pole"
    assert split_synonyms("person, man ,, woman") == ["person", "man", "woman"]
    assert split_synonyms(join_synonyms(["a", "b c"])) == ["a", "b c"]
    assert len(PROMPT_TEMPLATES) >= 10
    assert all(template.count("{}") == 1 for template in PROMPT_TEMPLATES)


def test_coco_vocabulary_registered():
    vocabulary = get_vocabulary("openseg_coco_2017_val_panoptic")
    assert len(vocabulary) == 133 == len(COCO_PANOPTIC_SYNONYMS)
    validate_vocabulary(vocabulary)
    assert vocabulary[0][0] == "person" and "woman" in vocabulary[0]
    assert vocabulary[-1][0] == "rug"  # rug-merged, the last COCO panoptic category
    assert len(get_vocabulary("openseg_coco_2017_val_instance")) == 80
    with pytest.raises(KeyError, match="no_such_dataset"):
        get_vocabulary("no_such_dataset")
