"""Closed-vocabulary metrics of open-ended predictions and the Lexical Alignment Curve (LAC).

An open-ended model emits `instances` with free-form `pred_texts`. `MappedPredictionEvaluator`
turns every text into a test-vocabulary class with one or more mappings, builds detectron2's
standard outputs from the mapped masks (`panoptic_seg`, `sem_seg`, `instances`) and feeds them
to the standard PanopticEvaluator / SemanticEvaluator / InstanceSegEvaluator, one set per
mapping, so PQ / mIoU / AP mean exactly what they mean for closed-vocabulary models.

`LexicalAlignmentEvaluator` uses the cumulative lexical levels exact -> synonym -> hyponym ->
meronym (openseg.evaluation.lexical) as its mappings: the LAC is PQ / mIoU / AP against the
level, plotted, and its area is the trapezoidal integral over the levels placed evenly on
[0, 1] (so it is in the metric's unit, percent). Per mask, a higher level can only move a
mapping from background to a class or from a wrong class to the ground-truth class (ground-truth
priority), so the share of masks mapped to their ground-truth class (`MapAcc`) never decreases;
PQ / mIoU / AP do not decrease either unless a newly related mask lands on a wrong class (an
extra false positive).
"""

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import Instances

from openseg.data.vocab import get_vocabulary

from .base import SplitAwareEvaluator, contiguous_class_names
from .instance import InstanceSegEvaluator
from .lexical import BACKGROUND, LEVELS, SPACY_PIPELINE, LexicalMapper, build_relation_table
from .open_ended import GroundTruthSegments, match_to_ground_truth, predicted_texts
from .panoptic import PanopticEvaluator
from .semantic import SemanticEvaluator

__all__ = [
    "BackgroundSemanticEvaluator",
    "LexicalAlignmentEvaluator",
    "MappedPredictionEvaluator",
    "curve_area",
    "mapped_outputs",
    "plot_curves",
]


class BackgroundSemanticEvaluator(SemanticEvaluator):
    """SemanticEvaluator whose label maps may also hold `num_classes` = background (no class).

    Mapped open-ended predictions leave pixels unlabelled; they must count as missed
    ground truth, not as class 0. The confusion matrix gets one extra predicted-only class,
    which has no ground-truth pixels and so enters no mean (see `semantic_metrics`).
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        super().__init__(dataset_name, output_dir, distributed)
        self.background_label = self._num_classes
        self._num_classes += 1
        self._confusion = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)


# metric family -> (evaluator class, result key of its evaluate(), headline metric)
_FAMILIES = {
    "panoptic": (PanopticEvaluator, "panoptic_seg", "PQ"),
    "semantic": (BackgroundSemanticEvaluator, "sem_seg", "mIoU"),
    "instance": (InstanceSegEvaluator, "segm", "AP"),
}


def mapped_outputs(
    masks: torch.Tensor,
    scores: torch.Tensor,
    class_ids: Sequence[int],
    is_thing: np.ndarray,
    families: Sequence[str],
) -> dict:
    """detectron2 outputs of masks labelled `class_ids` (BACKGROUND = dropped).

    Panoptic / semantic maps are painted from the highest score down, each pixel going to the
    first mask covering it; masks of one stuff class form one segment (as Mask2Former's panoptic
    inference does); a mask left without pixels is dropped. Instances keep the thing-class
    masks whole. Semantic background is label `len(is_thing)`.
    """
    num_classes = len(is_thing)
    height, width = masks.shape[-2:]
    class_ids = torch.as_tensor(list(class_ids), dtype=torch.int64)
    outputs = {}
    if "panoptic" in families or "semantic" in families:
        id_map = torch.zeros((height, width), dtype=torch.int32)
        segments: List[dict] = []
        stuff_segment: Dict[int, int] = {}
        for index in torch.argsort(scores, descending=True, stable=True).tolist():
            class_id = int(class_ids[index])
            if class_id == BACKGROUND:
                continue
            free = masks[index] & (id_map == 0)
            if not free.any():
                continue
            if not is_thing[class_id] and class_id in stuff_segment:
                id_map[free] = stuff_segment[class_id]
                continue
            segment_id = len(segments) + 1
            id_map[free] = segment_id
            segments.append(
                {"id": segment_id, "category_id": class_id, "isthing": bool(is_thing[class_id])}
            )
            if not is_thing[class_id]:
                stuff_segment[class_id] = segment_id
        if "panoptic" in families:
            outputs["panoptic_seg"] = (id_map, segments)
        if "semantic" in families:
            lookup = torch.tensor([num_classes] + [s["category_id"] for s in segments])
            outputs["sem_seg"] = lookup[id_map.long()]
    if "instance" in families:
        keep = (class_ids >= 0) & torch.as_tensor(
            is_thing[class_ids.clamp(min=0).numpy()], dtype=torch.bool
        )
        instances = Instances((height, width))
        instances.pred_masks = masks[keep]
        instances.scores = scores[keep]
        instances.pred_classes = class_ids[keep]
        outputs["instances"] = instances
    return outputs


def curve_area(values: Sequence[float]) -> float:
    """Trapezoidal area under values placed evenly on [0, 1] (NaN if any value is NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return float(values[0])
    step = 1.0 / (values.size - 1)
    return float(step * (values.sum() - 0.5 * (values[0] + values[-1])))


def plot_curves(curves: Dict[str, Sequence[float]], levels: Sequence[str], path: str) -> str:
    """Save the LAC plot (one line per metric, levels on x) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, values in curves.items():
        axis.plot(
            range(len(levels)), values, marker="o", label=f"{name} (area {curve_area(values):.1f})"
        )
    axis.set_xticks(range(len(levels)), list(levels))
    axis.set_xlabel("lexical level (cumulative)")
    axis.set_ylabel("metric (%)")
    axis.set_title("Lexical Alignment Curve")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


TextMapper = Callable[[List[str], np.ndarray], np.ndarray]


class MappedPredictionEvaluator(SplitAwareEvaluator):
    """Standard metrics of open-ended predictions under each of several text -> class mappings.

    `mapper(texts, gt_classes)` returns an int array [len(mapping_names), N]: the class id (or
    BACKGROUND) of each text under each mapping, given the ground-truth class each mask matched
    (-1 if none, IoU >= `iou_threshold`). `families` picks from panoptic / semantic / instance
    (default: those in the dataset metadata `evaluators`). The result holds
    `<metric>@<mapping>` plus `MapAcc@<mapping>` (share of matched masks mapped to their
    ground-truth class).
    """

    result_key = "mapped"

    def __init__(
        self,
        dataset_name: str,
        mapper: TextMapper,
        mapping_names: Sequence[str],
        output_dir: Optional[str] = None,
        distributed: bool = True,
        families: Optional[Sequence[str]] = None,
        iou_threshold: float = 0.5,
    ):
        super().__init__(dataset_name, output_dir, distributed)
        self._mapper = mapper
        self._mapping_names = list(mapping_names)
        class_names = contiguous_class_names(self._metadata)
        thing_ids = list(self._metadata.get("thing_dataset_id_to_contiguous_id", {}).values())
        self._is_thing = np.zeros(len(class_names), dtype=bool)
        self._is_thing[thing_ids] = True
        if not families:
            families = [f for f in self._metadata.get("evaluators", []) or [] if f in _FAMILIES]
        unknown = [f for f in families if f not in _FAMILIES]
        if unknown or not families:
            raise ValueError(
                f"{type(self).__name__} on '{dataset_name}': metric families {list(families)} "
                f"must be a non-empty subset of {sorted(_FAMILIES)} (set "
                "cfg.TEST.OPEN_ENDED.METRICS or the dataset metadata `evaluators`)."
            )
        self._families = list(families)
        self._iou_threshold = float(iou_threshold)
        self._ground_truth = GroundTruthSegments(
            dataset_name, self._metadata.get("ignore_label", None)
        )
        self._evaluators = {
            name: {
                family: _FAMILIES[family][0](
                    dataset_name,
                    output_dir=(
                        os.path.join(output_dir, f"{self.result_key}_{name}")
                        if output_dir
                        else None
                    ),
                    distributed=distributed,
                )
                for family in self._families
            }
            for name in self._mapping_names
        }

    def reset(self) -> None:
        super().reset()
        for by_family in self._evaluators.values():
            for evaluator in by_family.values():
                evaluator.reset()

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for model_input, output in zip(inputs, outputs):
            file_name = model_input["file_name"]
            masks, texts = predicted_texts(output, file_name)
            instances = output["instances"]
            scores = (
                instances.scores.detach().to("cpu").float()
                if instances.has("scores")
                else torch.ones(len(texts))
            )
            gt_masks, gt_classes = self._ground_truth(file_name)
            matched, _ = match_to_ground_truth(
                masks.numpy(), gt_masks, gt_classes, self._iou_threshold
            )
            mapped = np.asarray(self._mapper(texts, matched), dtype=np.int64).reshape(
                len(self._mapping_names), len(texts)
            )
            for name, class_ids in zip(self._mapping_names, mapped):
                standard = mapped_outputs(
                    masks, scores, class_ids.tolist(), self._is_thing, self._families
                )
                for evaluator in self._evaluators[name].values():
                    evaluator.process([model_input], [standard])
            has_gt = matched >= 0
            self.record(
                {
                    "file_name": file_name,
                    "num_matched": int(has_gt.sum()),
                    "num_correct": (mapped[:, has_gt] == matched[None, has_gt]).sum(axis=1),
                    "num_background": (mapped == BACKGROUND).sum(axis=1),
                    "texts": texts,
                    "mapped": mapped,
                }
            )

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        per_mapping = {
            name: {family: evaluator.evaluate() for family, evaluator in by_family.items()}
            for name, by_family in self._evaluators.items()
        }
        records = self.gathered_records()
        if records is None:
            return None
        metrics = OrderedDict()
        num_matched = sum(r["num_matched"] for r in records)
        for index, name in enumerate(self._mapping_names):
            for family in self._families:
                _, result_key, headline = _FAMILIES[family]
                result = per_mapping[name][family] or {}
                metrics[f"{headline}@{name}"] = float(
                    result.get(result_key, {}).get(headline, float("nan"))
                )
            correct = sum(r["num_correct"][index] for r in records)
            metrics[f"MapAcc@{name}"] = 100 * correct / num_matched if num_matched else float("nan")
        metrics.update(self.summarize_curves(metrics))
        self.log_table(
            f"Open-ended predictions mapped to the vocabulary ({type(self).__name__})",
            [
                [name] + [metrics[f"{h}@{name}"] for h in self.headlines()]
                for name in self._mapping_names
            ],
            ["mapping"] + self.headlines(),
        )
        self.save_metrics(metrics)
        return OrderedDict({self.result_key: metrics})

    def headlines(self) -> List[str]:
        return [_FAMILIES[f][2] for f in self._families] + ["MapAcc"]

    def summarize_curves(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Extra entries computed from the per-mapping metrics (none here)."""
        return {}


class LexicalAlignmentEvaluator(MappedPredictionEvaluator):
    """PQ / mIoU / AP (and MapAcc) at every lexical level, the LAC plot
    (`<output_dir>/lac.png`) and each curve's area (`<metric>_LAC_area`)."""

    result_key = "lac"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        mapper: Optional[LexicalMapper] = None,
        relation_table: str = "",
        relation_overrides: Sequence[str] = (),
        families: Optional[Sequence[str]] = None,
        iou_threshold: float = 0.5,
        spacy_pipeline: str = SPACY_PIPELINE,
    ):
        if mapper is None:
            vocabulary = get_vocabulary(dataset_name)
            table = build_relation_table(vocabulary, relation_table, relation_overrides)
            mapper = LexicalMapper.with_wordnet(table, pipeline=spacy_pipeline)
        self.lexical_mapper = mapper

        def map_levels(texts: List[str], gt_classes: np.ndarray) -> np.ndarray:
            levels = [mapper.map_levels(text, int(gt)) for text, gt in zip(texts, gt_classes)]
            return np.asarray(levels, dtype=np.int64).reshape(len(texts), len(LEVELS)).T

        super().__init__(
            dataset_name, map_levels, LEVELS, output_dir, distributed, families, iou_threshold
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None):
        options = cfg.TEST.OPEN_ENDED
        return cls(
            dataset_name,
            output_dir=output_dir,
            relation_table=options.RELATION_TABLE,
            relation_overrides=list(options.RELATION_OVERRIDES),
            families=list(options.METRICS),
            iou_threshold=options.MATCH_IOU,
            spacy_pipeline=options.SPACY_PIPELINE,
        )

    def summarize_curves(self, metrics: Dict[str, float]) -> Dict[str, float]:
        curves = {
            headline: [metrics[f"{headline}@{level}"] for level in LEVELS]
            for headline in self.headlines()
        }
        if self._output_dir:
            plot_curves(curves, LEVELS, os.path.join(self._output_dir, "lac.png"))
        return {f"{headline}_LAC_area": curve_area(values) for headline, values in curves.items()}
