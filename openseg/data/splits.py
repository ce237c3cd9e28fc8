"""Class splits of a test vocabulary with respect to what a model was trained on.

Open-vocabulary papers report PQ / mIoU separately on classes seen and unseen in training
(FC-CLIP, Yu et al. NeurIPS 2023, Sec. 4: "seen" = test classes whose name also names a COCO
class). Open-world LVIS (LVIS-OW) splits classes three ways: "known" classes are labelled
in training, "seen" classes appear in training images without labels, "unseen" ones never
appear. Splits are lists of contiguous class ids stored in `metadata.class_splits`.
"""

import logging
from typing import Dict, List, Optional, Sequence, Set, Union

from detectron2.data import MetadataCatalog

from .vocab import get_vocabulary, normalize_name

logger = logging.getLogger(__name__)

ClassEntry = Union[str, Sequence[str]]


def name_forms(name: str) -> Set[str]:
    """The normalized name and the singular forms its last word may have under simple English
    plural rules (-s, -es, -ies), so "buses" meets "bus", "berries" meets "berry" and "skis"
    meets "ski"; two names match when their forms intersect."""
    words = normalize_name(name).split(" ")
    last = words[-1]
    candidates = {last}
    if last.endswith("s") and not last.endswith("ss"):
        candidates.add(last[:-1])
    if last.endswith("es"):
        candidates.add(last[:-2])
    if last.endswith("ies"):
        candidates.add(last[:-3] + "y")
    return {" ".join(words[:-1] + [form]) for form in candidates if form}


def _names(entry: ClassEntry) -> List[str]:
    return [entry] if isinstance(entry, str) else list(entry)


def seen_unseen_split(
    train_vocab: Sequence[ClassEntry], test_vocab: Sequence[ClassEntry]
) -> Dict[str, List[int]]:
    """Split test classes (contiguous ids into `test_vocab`) into seen and unseen.

    A test class is seen when any of its names matches (`name_forms`) any name of any train
    class, the name-overlap rule FC-CLIP uses for COCO -> ADE20K / Cityscapes / ... .
    Entries are class names or synonym lists.
    """
    train_keys: Set[str] = {
        form for entry in train_vocab for name in _names(entry) for form in name_forms(name)
    }
    seen, unseen = [], []
    for class_id, entry in enumerate(test_vocab):
        keys = {form for name in _names(entry) for form in name_forms(name)}
        (seen if keys & train_keys else unseen).append(class_id)
    return {"seen": seen, "unseen": unseen}


def exact_synonym_split(
    train_vocab: Sequence[ClassEntry], test_vocab: Sequence[ClassEntry]
) -> Dict[str, List[int]]:
    """FC-CLIP's seen / unseen rule, as its release computes `category_overlapping_mask`
    (bytedance/fc-clip, `FCCLIP.prepare_class_names_from_metadata`; the paper does not define
    it): a test class is seen when one of its synonyms is, as an exact string, a synonym of
    some training class. No normalisation or plural forms (unlike `seen_unseen_split`): with
    FC-CLIP's synonym lists, 64 of ADE20K-150's classes are seen from COCO panoptic."""
    train_names = {name for entry in train_vocab for name in _names(entry)}
    seen, unseen = [], []
    for class_id, entry in enumerate(test_vocab):
        (seen if train_names.intersection(_names(entry)) else unseen).append(class_id)
    return {"seen": seen, "unseen": unseen}


def store_class_splits(dataset_name: str, split: Dict[str, List[int]], reason: str) -> None:
    """Set `class_splits` of `dataset_name` (replacing an earlier split, logged with `reason`)."""
    meta = MetadataCatalog.get(dataset_name)
    if hasattr(meta, "class_splits") and meta.class_splits != split:
        logger.info("Replacing class_splits of %s: %s.", dataset_name, reason)
        del meta.class_splits
    meta.class_splits = split


def known_seen_unseen(
    known: Sequence[int],
    seen: Sequence[int],
    unseen: Sequence[int],
    num_classes: Optional[int] = None,
) -> Dict[str, List[int]]:
    """Validate and return a LVIS-OW style {"known", "seen", "unseen"} split.

    The three groups must be disjoint lists of contiguous ids; with `num_classes` given, every
    id must be in [0, num_classes) and together they must cover all classes.
    """
    groups = {"known": list(known), "seen": list(seen), "unseen": list(unseen)}
    owner: Dict[int, str] = {}
    for group, ids in groups.items():
        for class_id in ids:
            if not isinstance(class_id, int) or isinstance(class_id, bool):
                raise TypeError(f"class_splits[{group!r}] holds {class_id!r}; ids must be ints.")
            if class_id in owner:
                raise ValueError(
                    f"Class id {class_id} is in both {owner[class_id]!r} and {group!r}; "
                    f"the known/seen/unseen groups must be disjoint."
                )
            if num_classes is not None and not 0 <= class_id < num_classes:
                raise ValueError(f"Class id {class_id} in {group!r} is outside [0, {num_classes}).")
            owner[class_id] = group
    if num_classes is not None and len(owner) != num_classes:
        missing = sorted(set(range(num_classes)) - set(owner))
        raise ValueError(f"Class ids {missing} are in no group of the known/seen/unseen split.")
    return {group: sorted(ids) for group, ids in groups.items()}


def apply_class_splits(dataset_name: str, train_dataset_name: str) -> Dict[str, List[int]]:
    """Compute the seen/unseen split of `dataset_name`'s vocabulary against the vocabulary of
    `train_dataset_name` and store it as `class_splits` in `dataset_name`'s metadata
    (replacing an earlier split: the split depends on the training set)."""
    split = seen_unseen_split(get_vocabulary(train_dataset_name), get_vocabulary(dataset_name))
    store_class_splits(dataset_name, split, f"the split against {train_dataset_name}")
    logger.info(
        "%s vs %s: %d seen, %d unseen classes.",
        dataset_name,
        train_dataset_name,
        len(split["seen"]),
        len(split["unseen"]),
    )
    return split
