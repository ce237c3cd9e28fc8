"""What every dataset family needs: the data root, a clear error for missing files, metadata."""
import argparse
import contextlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

ENV_ROOT = "OPENSEG_DATASETS"


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset whose files are not where the registry looked for them."""


class AnnotationFileError(ValueError):
    """An annotation file that is not valid JSON or refers to an unknown category."""


@contextlib.contextmanager
def named_json_errors(json_file: os.PathLike) -> Iterator[None]:
    """Re-raise a JSON syntax error met in the block as AnnotationFileError naming the file,
    line and column (json's own message names neither the file nor how to fix it)."""
    try:
        yield
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{json_file}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "the file is damaged or truncated: regenerate or re-download it"
        ) from None


def load_json(json_file: os.PathLike):
    """`json.load` of a file, with syntax errors naming it (see `named_json_errors`)."""
    with named_json_errors(json_file), open(json_file) as f:
        return json.load(f)


def contiguous_category(
    id_map: Mapping[int, int], category_id, json_file: os.PathLike, image_id, where: str
) -> int:
    """`id_map[category_id]`, or an AnnotationFileError naming the file, image, segment or
    annotation (`where`) and the known dataset ids."""
    try:
        return id_map[category_id]
    except (KeyError, TypeError):
        raise AnnotationFileError(
            f"{json_file}: image_id {image_id}, {where}: category_id {category_id!r} is not a "
            f"category of this dataset (known ids: {sorted(id_map)})"
        ) from None


def coco_panoptic_dicts(
    json_file: os.PathLike, image_root: os.PathLike, panoptic_root: os.PathLike, meta: Mapping
) -> List[dict]:
    """detectron2's `load_coco_panoptic_json`, with a damaged file or a segment of an unknown
    category reported by file, image id and segment id instead of a bare JSON / KeyError."""
    with named_json_errors(json_file):
        try:
            return load_coco_panoptic_json(str(json_file), str(image_root), str(panoptic_root), meta)
        except KeyError:
            known = {**meta["stuff_dataset_id_to_contiguous_id"], **meta["thing_dataset_id_to_contiguous_id"]}
            for annotation in load_json(json_file)["annotations"]:
                for segment in annotation["segments_info"]:
                    contiguous_category(
                        known, segment["category_id"], json_file, annotation["image_id"],
                        f"segment id {segment.get('id')}",
                    )
            raise


def coco_instance_dicts(
    json_file: os.PathLike, image_root: os.PathLike, id_map: Optional[Mapping[int, int]]
) -> List[dict]:
    """detectron2's `load_coco_json` (dataset category ids kept), then category ids mapped
    through `id_map` (None: kept); unknown ids name the file, image and annotation id."""
    with named_json_errors(json_file):
        dicts = load_coco_json(str(json_file), str(image_root), extra_annotation_keys=["id"])
    for record in dicts:
        for annotation in record["annotations"]:
            annotation_id = annotation.pop("id", None)
            if id_map is not None:
                annotation["category_id"] = contiguous_category(
                    id_map, annotation["category_id"], json_file, record["image_id"],
                    f"annotation id {annotation_id}",
                )
    return dicts


def dataset_root() -> Path:
    """Root of all datasets: `$OPENSEG_DATASETS`, default `./datasets` (as detectron2)."""
    return Path(os.environ.get(ENV_ROOT, "datasets")).expanduser()


def require(path: os.PathLike, prepare: str) -> Path:
    """Return `path` if it exists, else raise naming the path and the script that makes it.

    `prepare` names a script in `datasets/` (or a short instruction) that produces the path.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path} does not exist. Dataset roots are read from ${ENV_ROOT} "
            f"(now {dataset_root().resolve()}); create it with: {prepare} "
            f"(see datasets/README.md)."
        )
    return path


class LazyMetadata(Metadata):
    """Metadata whose `lazy_keys` are read from the dataset's files on first access.

    Large vocabularies (LVIS, ADE20K-847, Pascal Context-459) are defined by files of the
    prepared dataset; reading them at registration would touch the disk, so `fill()` runs the
    first time one of `lazy_keys` is asked for. A missing file raises `fill`'s own error
    (a DatasetNotFoundError naming the prepare script) on every access until it exists.
    """

    def __init__(self, name: str, fill: Callable[[], Dict], lazy_keys: Iterable[str]):
        super().__init__(name=name)
        self.__dict__["_fill"] = fill
        self.__dict__["_lazy_keys"] = frozenset(lazy_keys)

    def __getattr__(self, key: str):
        if key.startswith("_") or key not in self.__dict__.get("_lazy_keys", ()):
            return super().__getattr__(key)
        values = self.__dict__["_fill"]()
        missing = self._lazy_keys - values.keys()
        if missing:
            raise KeyError(f"Metadata loader of '{self.name}' did not return {sorted(missing)}")
        self.__dict__["_lazy_keys"] = frozenset()
        self.set(**values)
        return values[key]


def register_lazy(
    name: str,
    loader: Callable[[], List[dict]],
    lazy_metadata: Optional[Callable[[], Dict]] = None,
    lazy_keys: Iterable[str] = (),
    **metadata,
) -> None:
    """Register `loader` under `name` (files are read only when the dataset is used) and set
    its metadata. Re-registering the same name replaces it, so tests may point roots elsewhere.

    `lazy_metadata()` returns the `lazy_keys` entries, read from disk on first access (see
    `LazyMetadata`); use it for vocabularies defined by the dataset's own files.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    if lazy_metadata is not None:
        MetadataCatalog[name] = LazyMetadata(name, lazy_metadata, lazy_keys)
    MetadataCatalog.get(name).set(**metadata)


def deterministic_subset(records: List[dict], num_images: int, seed: int = 0) -> List[dict]:
    """`num_images` records of a fixed random order of `records` (sorted by file name, then
    shuffled with numpy's PCG64 `seed`), kept in file-name order. The order does not depend on
    `num_images`, so smaller subsets are contained in larger ones."""
    if not 0 < num_images <= len(records):
        raise ValueError(
            f"A subset of {num_images} images needs 1 to {len(records)} (the full set's size)."
        )
    ordered = sorted(records, key=lambda r: str(r.get("file_name", r.get("image_id"))))
    order = np.random.default_rng(seed).permutation(len(ordered))[:num_images]
    return [ordered[i] for i in sorted(order)]


def register_subset(base_name: str, num_images: int, seed: int = 0) -> str:
    """Register `<base_name>_subset<num_images>` (seed 0) or `..._seed<seed>`: the
    `deterministic_subset` of `base_name`'s records, with its metadata; returns the name.
    For in-domain models trained on few labelled images ("What holds back open-vocabulary
    segmentation?", Sec. 4.4, Figure 4)."""
    name = f"{base_name}_subset{num_images}" + (f"_seed{seed}" if seed else "")
    metadata = {k: v for k, v in MetadataCatalog.get(base_name).as_dict().items() if k != "name"}
    register_lazy(
        name, lambda: deterministic_subset(DatasetCatalog.get(base_name), num_images, seed),
        **metadata,
    )
    return name


def load_semantic_pairs(
    image_root: os.PathLike, sem_seg_root: os.PathLike, prepare: str, image_ext: str = ".jpg"
) -> List[dict]:
    """Semantic dataset dicts: one per label file under `sem_seg_root` (any depth), paired
    with the image of the same relative path and stem under `image_root`.

    Listing the labels (not the images) lets a split use a subset of a shared image folder.
    """
    image_root = require(image_root, prepare)
    sem_seg_root = require(sem_seg_root, prepare)
    dicts = []
    for label in sorted(p for p in sem_seg_root.rglob("*") if p.suffix in (".png", ".tif")):
        image = image_root / label.relative_to(sem_seg_root).with_suffix(image_ext)
        require(image, prepare)
        dicts.append({"file_name": str(image), "sem_seg_file_name": str(label)})
    if not dicts:
        raise DatasetNotFoundError(f"No label files in {sem_seg_root}; create them with: {prepare}")
    return dicts


def register_semantic(
    name: str,
    image_root: Path,
    sem_seg_root: Path,
    prepare: str,
    ignore_label: int = 255,
    lazy_metadata: Optional[Callable[[], Dict]] = None,
    **metadata,
) -> None:
    """Register a semantic-segmentation set of `load_semantic_pairs` dicts (evaluator
    "semantic"); `metadata` holds its `stuff_classes` and `synonyms` unless `lazy_metadata`
    reads them from the prepared files."""
    lazy_keys = ("stuff_classes", "synonyms") if lazy_metadata is not None else ()
    register_lazy(
        name,
        partial(load_semantic_pairs, image_root, sem_seg_root, prepare),
        lazy_metadata=lazy_metadata,
        lazy_keys=lazy_keys,
        image_root=str(image_root),
        sem_seg_root=str(sem_seg_root),
        ignore_label=ignore_label,
        evaluators=["semantic"],
        **metadata,
    )


def prepare_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser of a datasets/prepare_*.py script: its docstring as help and `--root`."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=dataset_root(), help="dataset root ($OPENSEG_DATASETS)"
    )
    return parser


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int], ignore: int) -> np.ndarray:
    """Map every value of an integer label image through `mapping`; other values -> `ignore`."""
    lookup = np.full(max(int(labels.max()), max(mapping, default=0)) + 1, ignore, dtype=np.int64)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[labels]



def panoptic_segment(mask: np.ndarray, segment_id: int, category_id: int, iscrowd: int = 0) -> Dict:
    """COCO-panoptic `segments_info` entry of a boolean mask (area, XYWH box)."""
    rows, cols = np.nonzero(mask)
    x, y = int(cols.min()), int(rows.min())
    return {
        "id": int(segment_id),
        "category_id": int(category_id),
        "area": int(rows.size),
        "bbox": [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1],
        "iscrowd": int(iscrowd),
    }


def load_panoptic_json(
    panoptic_json: Path,
    panoptic_root: Path,
    locate: Callable[[dict], Tuple[Path, Path]],
    metadata: Dict,
    prepare: str,
) -> List[dict]:
    """Panoptic dataset dicts from a COCO-panoptic JSON whose image ids may be strings.

    `locate(image_entry)` gives the (image, semantic label) paths of a JSON image entry.
    Category ids become contiguous through `stuff_dataset_id_to_contiguous_id`, which covers
    every class (Mask2Former convention); `isthing` follows `thing_dataset_id_to_contiguous_id`.
    """
    panoptic = load_json(require(panoptic_json, prepare))
    to_contiguous = metadata["stuff_dataset_id_to_contiguous_id"]
    thing_ids = set(metadata["thing_dataset_id_to_contiguous_id"])
    images = {image["id"]: image for image in panoptic["images"]}
    dicts = []
    for annotation in panoptic["annotations"]:
        if annotation["image_id"] not in images:
            raise AnnotationFileError(
                f"{panoptic_json}: annotation {annotation.get('file_name')} has image_id "
                f"{annotation['image_id']!r}, which is not in its `images` list"
            )
        image = images[annotation["image_id"]]
        image_file, sem_seg_file = locate(image)
        segments = [
            dict(
                s,
                category_id=contiguous_category(
                    to_contiguous, s["category_id"], panoptic_json, image["id"], f"segment id {s.get('id')}"
                ),
                isthing=s["category_id"] in thing_ids,
            )
            for s in annotation["segments_info"]
        ]
        dicts.append(
            {
                "file_name": str(require(image_file, prepare)),
                "image_id": image["id"],
                "height": image["height"],
                "width": image["width"],
                "pan_seg_file_name": str(require(panoptic_root / annotation["file_name"], prepare)),
                "sem_seg_file_name": str(require(sem_seg_file, prepare)),
                "segments_info": segments,
            }
        )
    return dicts
