"""Lexical mapping of free-form mask descriptions onto a test vocabulary, for the open-ended
evaluation protocol (OSM, Yang et al.; "Benchmarking open-ended segmentation").

An open-ended model names each mask freely ("two brown puppies on the grass"). To score it
with the closed-vocabulary metrics, the description is reduced to its subject noun in the
singular ("puppy") and related to every class of the test vocabulary through a relation table
with four cumulative levels (`LEVELS`):

* exact    - the noun is the class name;
* synonym  - the noun is a synonym of the class (dataset synonyms, WordNet lemmas of the
             class's synsets);
* hyponym  - the noun is a kind of the class ("puppy" -> "dog");
* meronym  - the noun is a part of the class ("wheel" -> "car").

At level L a relation counts when its level is <= L. The mask takes the ground-truth class if
the noun relates to it at L (ground-truth priority), else the class of the strongest relation
(table order: lowest level first, then the builder's tie-break), else background (-1).

The table is built offline from WordNet 3.0 (Princeton WordNet as shipped by Debian's
`wordnet-base` package, read by nltk; see tools/setup_wordnet.sh and
tools/build_lexical_vocab.py), stored as JSON, and can be overridden entry by entry by another
JSON file (e.g. relations written by an LLM, as the benchmark paper does).
"""

import json
import logging
import os
import re
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from openseg.data.vocab import normalize_name

__all__ = [
    "BACKGROUND",
    "LEVELS",
    "LexicalMapper",
    "RelationTable",
    "build_relation_table",
    "build_wordnet_relation_table",
    "extract_subject_noun",
    "load_wordnet",
    "normalize_description",
    "rule_singularize",
    "wordnet_singularize",
]

logger = logging.getLogger(__name__)

LEVELS: Tuple[str, ...] = ("exact", "synonym", "hyponym", "meronym")
BACKGROUND = -1

# Words that end the noun phrase naming the subject: prepositions, conjunctions, relative
# pronouns, auxiliaries and the participles most common in region captions.
_PHRASE_BREAKS = frozenset(
    """on in at with near by under over behind beside besides next from for to into onto above
    below between inside outside against along across around through without within among
    atop beneath underneath upon toward towards off of and or but that which who whose where
    while is are was were be been being has have had can could will would should may might
    sitting standing lying laying walking running riding holding wearing playing eating flying
    parked covered filled made hanging swimming grazing looking carrying using taking waiting
    driving leaning resting crossing sleeping growing floating showing reading talking watching
    jumping surfing skiing pulling pushing cutting moving going coming doing having""".split()
)
# Heads of partitive / collective phrases: the subject of "a group of people" is "people".
_PARTITIVE_HEADS = frozenset(
    """group pair piece slice bunch pile stack herd flock crowd couple row cluster collection
    number lot kind type sort patch set team handful""".split()
)
_DETERMINERS = frozenset(
    """a an the this that these those some any many several few his her their its my our your
    one two three four five six seven eight nine ten""".split()
)
# Irregular plurals the suffix rules below get wrong.
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
    """Singular of the last word of `phrase` by irregular forms and English suffix rules
    (used when WordNet is not installed; `wordnet_singularize` is more accurate)."""
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
        if words and (words[-1] in _IRREGULAR_PLURALS or words[-1] in exceptions):
            return (
                rule_singularize(phrase)
                if words[-1] in _IRREGULAR_PLURALS
                else " ".join(words[:-1] + [exceptions[words[-1]][0]])
            )
        compound = phrase.replace(" ", "_")
        lemma = wordnet.morphy(compound, wordnet.NOUN)
        if lemma is not None:
            return lemma.replace("_", " ")
        if not words:
            return phrase
        lemma = wordnet.morphy(words[-1], wordnet.NOUN)
        if lemma is None:
            return rule_singularize(phrase)
        return " ".join(words[:-1] + [lemma])

    return singularize


def extract_subject_noun(
    text: str,
    is_noun: Callable[[str], bool],
    singularize: Callable[[str], str] = rule_singularize,
    max_words: int = 4,
) -> str:
    """The singular subject noun (possibly a compound such as "traffic light") of `text`.

    Heuristic noun-phrase chunking: the phrase ends at the first preposition, conjunction,
    auxiliary or common participle (`_PHRASE_BREAKS`); "a group of X" continues into X. The
    head is the longest run of up to `max_words` words ending the phrase that `is_noun`
    accepts (tried as written and singularised), else the phrase's last word singularised.
    Returns "" for a description without words.
    """
    words = normalize_description(text).split()
    phrase: List[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == "of" and phrase and phrase[-1] in _PARTITIVE_HEADS:
            phrase = []
        elif word in _PHRASE_BREAKS and any(w not in _DETERMINERS for w in phrase):
            break
        elif word not in _PHRASE_BREAKS:
            phrase.append(word)
        index += 1
    while phrase and phrase[0] in _DETERMINERS:
        phrase = phrase[1:]
    if not phrase:
        return ""
    for length in range(min(max_words, len(phrase)), 0, -1):
        candidate = " ".join(phrase[-length:])
        singular = singularize(candidate)
        for form in (singular, candidate):
            if is_noun(form):
                return singular if is_noun(singular) else form
    return singularize(phrase[-1])


RelationSpec = Union[Mapping[str, str], Sequence[Sequence[str]]]


class RelationTable:
    """noun -> ordered [(class id, level index)] over a fixed list of class names.

    JSON format (`to_json` / `from_json`)::

        {"levels": ["exact", "synonym", "hyponym", "meronym"],
         "source": "where the relations come from",
         "classes": ["dog", "car", ...],
         "relations": {"puppy": [["dog", "hyponym"]],
                       "wheel": {"car": "meronym", "bicycle": "meronym"}}}

    A noun's relations are an ordered list (strongest first; the order breaks ties within a
    level) or a {class: level} dict (sorted by level, then class order). Nouns are stored
    normalised (lower case, single spaces).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        relations: Optional[Mapping[str, RelationSpec]] = None,
        source: str = "",
        origin: str = "<in memory>",
    ):
        self.class_names = [normalize_name(name) for name in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{origin}: class names repeat: {self.class_names}")
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self.source = source
        self._relations: Dict[str, List[Tuple[int, int]]] = {}
        self.update(relations or {}, origin=origin)

    # ---------------------------------------------------------------- editing
    def _parse(self, noun: str, spec: RelationSpec, origin: str) -> List[Tuple[int, int]]:
        pairs = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
        parsed = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(
                    f"{origin}: relations of '{noun}' must be [class, level] pairs or a "
                    f"{{class: level}} dict, got {pair!r}."
                )
            class_name, level = normalize_name(str(pair[0])), str(pair[1])
            if class_name not in self._class_index:
                raise ValueError(
                    f"{origin}: relation '{noun}' -> '{pair[0]}' names a class that is not in "
                    f"the vocabulary {self.class_names}."
                )
            if level not in LEVELS:
                raise ValueError(
                    f"{origin}: relation '{noun}' -> '{pair[0]}' has level '{level}'; use one "
                    f"of {list(LEVELS)}."
                )
            parsed.append((self._class_index[class_name], LEVELS.index(level)))
        if isinstance(spec, Mapping):
            parsed.sort(key=lambda item: (item[1], item[0]))
        seen, unique = set(), []
        for class_id, level in parsed:
            if class_id not in seen:
                seen.add(class_id)
                unique.append((class_id, level))
        return unique

    def update(self, relations: Mapping[str, RelationSpec], origin: str = "<in memory>") -> None:
        """Replace the relations of every noun in `relations` (an empty spec removes the
        noun's relations): how an LLM-written table overrides the WordNet one."""
        for noun, spec in relations.items():
            key = normalize_name(noun)
            entries = self._parse(key, spec, origin)
            if entries:
                self._relations[key] = entries
            else:
                self._relations.pop(key, None)

    def add(self, noun: str, class_id: int, level: str) -> None:
        """Append a relation unless the noun already relates to `class_id`; keeps order."""
        key = normalize_name(noun)
        entries = self._relations.setdefault(key, [])
        if all(existing != class_id for existing, _ in entries):
            entries.append((class_id, LEVELS.index(level)))
            entries.sort(key=lambda item: item[1])

    # ---------------------------------------------------------------- queries
    def __contains__(self, noun: str) -> bool:
        return normalize_name(noun) in self._relations

    def __len__(self) -> int:
        return len(self._relations)

    def relations(self, noun: str) -> List[Tuple[int, int]]:
        """[(class id, level index)] of `noun`, strongest first; [] if unrelated."""
        return list(self._relations.get(normalize_name(noun), []))

    # ---------------------------------------------------------------- I/O
    @classmethod
    def from_vocabulary(
        cls, vocabulary: Sequence[Sequence[str]], source: str = ""
    ) -> "RelationTable":
        """Exact (class name) and synonym (other names of each class) relations of a
        vocabulary given as synonym lists, the first entry being the class name."""
        table = cls([names[0] for names in vocabulary], source=source or "dataset synonyms")
        for class_id, names in enumerate(vocabulary):
            table.add(names[0], class_id, "exact")
        for class_id, names in enumerate(vocabulary):
            for name in names[1:]:
                table.add(name, class_id, "synonym")
        return table

    def to_dict(self) -> dict:
        return {
            "levels": list(LEVELS),
            "source": self.source,
            "classes": list(self.class_names),
            "relations": {
                noun: [[self.class_names[c], LEVELS[level]] for c, level in entries]
                for noun, entries in sorted(self._relations.items())
            },
        }

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=0)

    @classmethod
    def from_json(cls, path: str, class_names: Optional[Sequence[str]] = None) -> "RelationTable":
        """Load a table; with `class_names`, its classes must be exactly those (in order), so a
        table built for another vocabulary is rejected instead of silently misaligned."""
        data = _read_json(path)
        if "classes" not in data or "relations" not in data:
            raise ValueError(f"{path}: a relation table needs the keys 'classes' and 'relations'.")
        levels = data.get("levels", list(LEVELS))
        if list(levels) != list(LEVELS):
            raise ValueError(f"{path}: 'levels' must be {list(LEVELS)}, got {levels}.")
        if class_names is not None:
            expected = [normalize_name(n) for n in class_names]
            if [normalize_name(n) for n in data["classes"]] != expected:
                raise ValueError(
                    f"{path}: the table's classes {data['classes'][:5]}... differ from the test "
                    f"vocabulary {expected[:5]}...; rebuild it with tools/build_lexical_vocab.py "
                    "for this dataset."
                )
        return cls(data["classes"], data["relations"], source=data.get("source", ""), origin=path)

    def update_from_json(self, path: str) -> None:
        """Override with the relations of JSON file `path` (the table format, or a bare
        {noun: relations} dict); classes are resolved by name against this table's."""
        data = _read_json(path)
        relations = data["relations"] if "relations" in data else data
        self.update(relations, origin=path)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Relation table {path} does not exist.")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


class LexicalMapper:
    """Maps free-form descriptions to class ids at each level of `LEVELS` with a
    `RelationTable` (see the module docstring for the rule)."""

    def __init__(
        self,
        table: RelationTable,
        singularize: Callable[[str], str] = rule_singularize,
        is_noun: Optional[Callable[[str], bool]] = None,
    ):
        self.table = table
        self.singularize = singularize
        self._is_noun = is_noun

    @classmethod
    def with_wordnet(cls, table: RelationTable, wordnet=None) -> "LexicalMapper":
        """WordNet singularisation and noun recognition (any WordNet noun may head a phrase)."""
        wordnet = wordnet or load_wordnet()

        def is_noun(phrase: str) -> bool:
            return phrase in table or bool(wordnet.synsets(phrase.replace(" ", "_"), wordnet.NOUN))

        return cls(table, wordnet_singularize(wordnet), is_noun)

    def is_noun(self, phrase: str) -> bool:
        if self._is_noun is not None:
            return self._is_noun(phrase)
        return phrase in self.table

    def subject_noun(self, text: str) -> str:
        return extract_subject_noun(text, self.is_noun, self.singularize)

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


def _lemma_names(synset) -> List[str]:
    return [normalize_name(lemma.replace("_", " ")) for lemma in synset.lemma_names()]


def build_wordnet_relation_table(
    vocabulary: Sequence[Sequence[str]],
    wordnet=None,
    max_senses: int = 3,
    meronym_inherit_depth: int = 2,
) -> RelationTable:
    """The exact -> synonym -> hyponym -> meronym table of a vocabulary from WordNet 3.0.

    For each class, its senses are the first `max_senses` noun synsets of each of its names
    (WordNet orders senses by frequency). Synonyms: the dataset's synonyms and the lemmas of
    those synsets. Hyponyms: lemmas of the transitive (instance) hyponym closure, nearer ones
    first. Meronyms: part / substance / member meronyms of the senses and of their hypernyms up
    to `meronym_inherit_depth` levels up (a car has the wheels of a wheeled vehicle), and the
    parts of those parts. Within a level, relations are ordered by WordNet distance, then
    class order, so the nearest class wins.
    """
    wordnet = wordnet or load_wordnet()
    table = RelationTable.from_vocabulary(
        vocabulary, source="WordNet 3.0 (Debian wordnet-base) via nltk"
    )
    candidates: Dict[str, Dict[int, Tuple[int, int]]] = defaultdict(dict)

    def propose(noun: str, class_id: int, level: str, distance: int) -> None:
        key = (LEVELS.index(level), distance)
        best = candidates[noun].get(class_id)
        if best is None or key < best:
            candidates[noun][class_id] = key

    for class_id, names in enumerate(vocabulary):
        senses = []
        for name in names:
            for synset in wordnet.synsets(normalize_name(name).replace(" ", "_"), wordnet.NOUN)[
                :max_senses
            ]:
                if synset not in senses:
                    senses.append(synset)
        for synset in senses:
            for lemma in _lemma_names(synset):
                propose(lemma, class_id, "synonym", 0)
            frontier, depth, visited = [synset], 0, {synset}
            while frontier:
                depth += 1
                children = []
                for node in frontier:
                    for child in node.hyponyms() + node.instance_hyponyms():
                        if child not in visited:
                            visited.add(child)
                            children.append(child)
                            for lemma in _lemma_names(child):
                                propose(lemma, class_id, "hyponym", depth)
                frontier = children
            wholes = [(synset, 0)]
            ancestors = [synset]
            for up in range(1, meronym_inherit_depth + 1):
                ancestors = [h for node in ancestors for h in node.hypernyms()]
                wholes.extend((ancestor, up) for ancestor in ancestors)
            for whole, up in wholes:
                for part_depth, parts in enumerate(_meronym_levels(whole, 2), start=1):
                    for part in parts:
                        for lemma in _lemma_names(part):
                            propose(lemma, class_id, "meronym", up + part_depth)

    for noun, by_class in sorted(candidates.items()):
        for class_id, _ in sorted(by_class.items(), key=lambda item: (item[1], item[0])):
            table.add(noun, class_id, LEVELS[by_class[class_id][0]])
    return table


def _meronym_levels(synset, depth: int) -> List[List]:
    """Meronyms of `synset` by depth: [direct parts, parts of parts, ...]."""
    levels, frontier = [], [synset]
    for _ in range(depth):
        frontier = [
            part
            for node in frontier
            for part in node.part_meronyms() + node.substance_meronyms() + node.member_meronyms()
        ]
        if not frontier:
            break
        levels.append(frontier)
    return levels


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
