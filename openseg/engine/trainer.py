"""The one Trainer every openseg method trains and evaluates with."""
import logging
import os
from collections import OrderedDict
from typing import Optional

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..data.mappers import build_mapper
from ..evaluation import build_evaluator
from .optimizer import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with openseg's mappers, evaluators (chosen from dataset
    metadata), optimizer, poly schedule, and a checkpoint written when training is cut short."""

    @classmethod
    def build_train_loader(cls, cfg):
        # a meta-architecture may bring its own training loader (e.g. OSM's dataset mixture)
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if hasattr(meta_arch, "build_train_loader"):
            return meta_arch.build_train_loader(cfg)
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder: Optional[str] = None) -> DatasetEvaluators:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> OrderedDict:
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and not results:
            logger.warning("evaluation produced no metrics: check DATASETS.TEST and TEST.EVALUATORS")
        return results

    def train(self):
        """Train and return the final evaluation's metrics (None when there was none).

        If a step raises (or Ctrl-C), the last completed iteration is saved as
        `model_interrupted.pth`, so `--resume` continues from there, not from the last period."""
        try:
            super().train()
            return getattr(self, "_last_eval_results", None)
        except BaseException:
            if comm.is_main_process() and self.iter > self.start_iter:
                failed_iter = self.iter
                self.iter = failed_iter - 1  # the checkpoint holds the last step that finished
                self.checkpointer.save("model_interrupted", iteration=self.iter)
                self.iter = failed_iter
                logger.error(
                    "training stopped at iteration %d; saved %s/model_interrupted.pth, "
                    "continue with --resume", failed_iter, self.cfg.OUTPUT_DIR,
                )
            raise
