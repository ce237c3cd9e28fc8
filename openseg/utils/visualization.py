"""Draw model outputs (detectron2's standard formats) with detectron2's Visualizer."""
from typing import Dict

import numpy as np
import torch
from detectron2.data import Metadata
from detectron2.utils.visualizer import ColorMode, Visualizer


def draw_prediction(image_rgb: np.ndarray, prediction: Dict, metadata: Metadata,
                    score_threshold: float = 0.5) -> np.ndarray:
    """Return an RGB image with the richest output the model gave: panoptic, else instances
    (scores >= `score_threshold`), else the arg-max of the semantic scores.

    `pred_texts` (open-ended models) replace the class names when present.
    """
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in prediction:
        panoptic, segments_info = prediction["panoptic_seg"]
        drawn = visualizer.draw_panoptic_seg(panoptic.to("cpu"), segments_info)
    elif "instances" in prediction:
        instances = prediction["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        if instances.has("pred_texts"):
            drawn = visualizer.overlay_instances(
                masks=instances.pred_masks.numpy(),
                labels=[f"{text} {score:.0%}" for text, score in
                        zip(instances.pred_texts, instances.scores.tolist())],
            )
        else:
            drawn = visualizer.draw_instance_predictions(instances)
    elif "sem_seg" in prediction:
        drawn = visualizer.draw_sem_seg(torch.argmax(prediction["sem_seg"], dim=0).to("cpu"))
    else:
        raise KeyError(f"prediction has none of panoptic_seg / instances / sem_seg: {sorted(prediction)}")
    return drawn.get_image()
