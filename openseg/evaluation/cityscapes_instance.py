"""Cityscapes instance-segmentation AP and AP50 (Cordts et al. CVPR 2016), as the benchmark
defines them and as Mask2Former reports them (its CityscapesInstanceEvaluator, detectron2's).

The numbers come from the official `cityscapesscripts` evaluation
(`evalInstanceLevelSemanticLabeling`): AP averaged over overlaps 0.5:0.95:0.05 and the 8 thing
classes with ground truth; ground-truth instances under 100 px and "group" (crowd) regions are
not counted, and an unmatched prediction lying mostly on them or on void is no false positive. Per image the predicted masks are recorded (RLE, gathered over
ranks: no shared file system needed); at `evaluate` the main process writes them in the
benchmark's format (one PNG per mask plus a `<image>_pred.txt` of "png label_id score" lines)
and scores the processed images against their `*_gtFine_instanceIds.png`. AP values are in
percent, as detectron2 reports them.
"""

import contextlib
import copy
import io
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from .base import SplitAwareEvaluator
from .instance import encode_instance_masks, predicted_instances

__all__ = ["CityscapesInstanceEvaluator", "ground_truth_instance_file"]

_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def ground_truth_instance_file(input_dict: dict, gt_dir: str) -> str:
    """The `*_gtFine_instanceIds.png` of a dataset dict: its `instance_ids_file_name`, else
    `<gt_dir>/<city>/<prefix>_gtFine_instanceIds.png` from the image name."""
    if input_dict.get("instance_ids_file_name"):
        return str(input_dict["instance_ids_file_name"])
    image = Path(input_dict["file_name"])
    if not image.name.endswith(_IMAGE_SUFFIX):
        raise ValueError(
            f"{image}: a Cityscapes image must be named <city>_<seq>_<frame>{_IMAGE_SUFFIX} (or its "
            "dataset dict must name its `instance_ids_file_name`)."
        )
    prefix = image.name[: -len(_IMAGE_SUFFIX)]
    return str(Path(gt_dir) / image.parent.name / f"{prefix}{_INSTANCE_SUFFIX}")


class CityscapesInstanceEvaluator(SplitAwareEvaluator):
    """AP / AP50 (and AP per class) of `instances` predictions with cityscapesscripts."""

    result_key = "segm"

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        gt_dir = self._metadata.get("gt_dir", None)
        if not id_map or not gt_dir:
            raise ValueError(
                f"Dataset '{dataset_name}' needs metadata `thing_dataset_id_to_contiguous_id` "
                "(Cityscapes label id -> contiguous id) and `gt_dir` (gtFine/<split>) for the "
                "Cityscapes instance evaluation."
            )
        self._gt_dir = str(gt_dir)
        self._contiguous_to_label_id = {int(c): int(d) for d, c in id_map.items()}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            instances = predicted_instances(input_dict, output)
            classes = instances.pred_classes.tolist()
            unknown = sorted(set(classes) - set(self._contiguous_to_label_id))
            if unknown:
                raise ValueError(
                    f"Predictions for {input_dict.get('file_name')} have class ids {unknown}, "
                    f"which are not contiguous ids of dataset '{self._dataset_name}' (valid: "
                    f"{sorted(self._contiguous_to_label_id)})."
                )
            self.record(
                {
                    "gt_file": ground_truth_instance_file(input_dict, self._gt_dir),
                    "height": int(input_dict["height"]),
                    "width": int(input_dict["width"]),
                    "label_ids": [self._contiguous_to_label_id[c] for c in classes],
                    "scores": instances.scores.tolist(),
                    "masks": encode_instance_masks(instances.pred_masks),
                }
            )

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self.gathered_records()
        if records is None:
            return {}
        if not records:
            self._logger.warning(f"{type(self).__name__} received no images; no metrics.")
            return {}
        with tempfile.TemporaryDirectory(prefix="openseg_cityscapes_") as work_dir:
            averages = _run_cityscapes_evaluation(records, work_dir)
        metrics = {"AP": 100 * float(averages["allAp"]), "AP50": 100 * float(averages["allAp50%"])}
        for name, values in averages["classes"].items():
            metrics[f"AP-{name}"] = 100 * float(values["ap"])
        self.log_table("Cityscapes instance segmentation (%)", [[metrics["AP"], metrics["AP50"]]], ["AP", "AP50"])
        self.log_table(
            "Per-class Cityscapes instance AP (%)",
            [[name, metrics[f"AP-{name}"]] for name in averages["classes"]],
            ["class", "AP"],
        )
        self.save_metrics(metrics)
        return {self.result_key: metrics}


def _run_cityscapes_evaluation(records: List[dict], work_dir: str) -> dict:
    """Write `records` in the benchmark's prediction format under `work_dir` and run
    cityscapesscripts on them; returns its averages ("allAp", "allAp50%", "classes")."""
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cityscapes_eval
    except ImportError as error:
        raise ImportError(
            "The Cityscapes instance evaluation needs the official scripts: pip install "
            "cityscapesscripts (in requirements.txt)."
        ) from error
    work_dir = os.path.abspath(work_dir)
    predictions, ground_truth = [], []
    for index, record in enumerate(records):
        if not os.path.isfile(record["gt_file"]):
            raise FileNotFoundError(
                f"{record['gt_file']} does not exist: the Cityscapes instance evaluation reads the "
                "official gtFine *_gtFine_instanceIds.png (gtFine_trainvaltest.zip)."
            )
        stem = f"{index:06d}_{Path(record['gt_file']).name[: -len(_INSTANCE_SUFFIX)]}"
        lines = []
        for k, (label_id, score, rle) in enumerate(zip(record["label_ids"], record["scores"], record["masks"])):
            png = f"{stem}_{k}.png"
            mask = mask_util.decode(dict(rle, counts=rle["counts"].encode("ascii")))
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(work_dir, png))
            lines.append(f"{png} {label_id} {score!r}\n")
        pred_file = os.path.join(work_dir, f"{stem}_pred.txt")
        with open(pred_file, "w") as f:
            f.writelines(lines)
        predictions.append(pred_file)
        ground_truth.append(record["gt_file"])
    args = copy.deepcopy(cityscapes_eval.args)
    args.predictionPath = work_dir
    args.predictionWalk = None
    args.gtInstancesFile = os.path.join(work_dir, "gtInstances.json")
    args.JSONOutput = False
    args.colorized = False
    args.quiet = True
    cwd = os.getcwd()
    os.chdir(work_dir)  # the scripts write matches.json into the working directory
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            results = cityscapes_eval.evaluateImgLists(predictions, ground_truth, args)
    except SystemExit:  # the scripts' printError exits
        raise RuntimeError(f"cityscapesscripts rejected the input: {printed.getvalue().strip()}") from None
    finally:
        os.chdir(cwd)
    return results["averages"]
