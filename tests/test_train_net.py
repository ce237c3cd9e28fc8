"""End to end on the demo data: tools/train_net.py trains, evaluates with the evaluators named
in the dataset metadata, resumes from its checkpoints (periodic and interrupted), and
tools/demo.py draws predictions of the trained model."""
import json
from pathlib import Path

import cv2
import pytest
import torch

from openseg.config import load_config
from openseg.engine import Trainer
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo/maskformer_R18.yaml")
TINY = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "SOLVER.WARMUP_ITERS", "1",
]


train_net = load_script("tools/train_net.py")


def _args(*extra):
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args(["--config-file", CONFIG, *extra])


def _iteration(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["iteration"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 iterations with checkpoints every 2, then evaluation on openseg_demo_val."""
    out = tmp_path_factory.mktemp("train")
    results = train_net.main(_args(*TINY, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out)))
    return out, results


def test_train_then_evaluate_with_metadata_evaluators(trained):
    out, results = trained
    # the demo metadata names panoptic, semantic and instance evaluation, each with split columns
    assert {"panoptic_seg", "sem_seg", "segm"} <= set(results)
    for task, metric in (("panoptic_seg", "PQ"), ("sem_seg", "mIoU"), ("segm", "AP")):
        assert {metric, f"{metric}_seen", f"{metric}_unseen"} <= set(results[task])
    assert (out / "model_final.pth").is_file()
    assert _iteration(out / "model_final.pth") == 3
    metrics_files = list((out / "inference" / "openseg_demo_val").glob("*_metrics.json"))
    assert len(metrics_files) == 3
    for path in metrics_files:
        json.loads(path.read_text())


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        (resumed / name).write_bytes((out / name).read_bytes())
    cfg = load_config(CONFIG, [*TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(resumed)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    trainer.train()
    assert _iteration(resumed / "model_final.pth") == 5


class _Interrupted(RuntimeError):
    pass


class _FailingTrainer(Trainer):
    """Raises in the middle of iteration 3, as a crash or a Ctrl-C would."""

    def run_step(self):
        if self.iter == 3:
            raise _Interrupted("simulated failure")
        super().run_step()


def test_interrupted_training_saves_and_resumes_from_last_finished_step(tmp_path):
    cfg = load_config(CONFIG, [*TINY, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "100",
                               "OUTPUT_DIR", str(tmp_path)])
    trainer = _FailingTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(_Interrupted):
        trainer.train()
    checkpoint = tmp_path / "model_interrupted.pth"
    assert checkpoint.is_file() and _iteration(checkpoint) == 2
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_interrupted.pth"
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3


def test_eval_only_reproduces_training_evaluation(trained):
    out, results = trained
    again = train_net.main(_args("--eval-only", *TINY, "MODEL.WEIGHTS", str(out / "model_final.pth"),
                                 "OUTPUT_DIR", str(out / "eval_only")))
    for task in results:
        for key, value in results[task].items():
            assert again[task][key] == pytest.approx(value, nan_ok=True), (task, key)


def test_demo_tool_writes_visualisations(trained, tmp_path):
    out, _ = trained
    demo = load_script("tools/demo.py")
    from detectron2.data import DatasetCatalog

    images = [d["file_name"] for d in DatasetCatalog.get("openseg_demo_val")[:2]]
    written = demo.main(["--config-file", CONFIG, "--input", *images, "--output", str(tmp_path),
                         *TINY, "MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert [p.name for p in written] == [Path(f).stem + ".png" for f in images]
    for path, source in zip(written, images):
        assert cv2.imread(str(path)).shape == cv2.imread(source).shape


def test_demo_tool_renames_vocabulary_and_rejects_wrong_size(trained, tmp_path):
    out, _ = trained
    demo = load_script("tools/demo.py")
    from detectron2.data import DatasetCatalog

    image = DatasetCatalog.get("openseg_demo_val")[0]["file_name"]
    common = ["--config-file", CONFIG, "--input", image, "--output", str(tmp_path)]
    weights = [*TINY, "MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert demo.main([*common, "--thing-classes", "disc,box,wedge,plus|x",
                      "--stuff-classes", "air,lawn,sea,beach", *weights])
    with pytest.raises(ValueError, match="NUM_CLASSES=8"):
        demo.main([*common, "--thing-classes", "cat,dog", *weights])
    with pytest.raises(ValueError, match="duplicates"):
        demo.main([*common, "--thing-classes", "a,b,c,a", "--stuff-classes", "e,f,g,h", *weights])


def test_unknown_config_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {CONFIG}\nSOLVER:\n  MAX_ITERS: 3\n")
    with pytest.raises(KeyError, match="bad.yaml.*SOLVER.MAX_ITERS"):
        train_net.main(_args_for(bad))


def _args_for(config):
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args(["--config-file", str(config)])


def test_demo_training_beats_an_untrained_model(tmp_path):
    """150 iterations of the demo recipe: every metric family clearly above random init."""
    common = ["SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0"]
    untrained = train_net.main(_args("--eval-only", *common, "OUTPUT_DIR", str(tmp_path / "untrained")))
    trained = train_net.main(_args(*common, "SOLVER.MAX_ITER", "150", "OUTPUT_DIR", str(tmp_path / "trained")))
    for task, metric, margin in (("panoptic_seg", "PQ_seen", 15), ("sem_seg", "mIoU_seen", 20),
                                 ("segm", "AP_seen", 3)):
        assert trained[task][metric] > untrained[task][metric] + margin, (task, trained[task], untrained[task])
