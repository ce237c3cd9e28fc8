"""Training and evaluation under faults, with real processes and real signals (issue 11):
SIGTERM / SIGUSR1 stop with a checkpoint, kill -9 + --resume is bit-identical, checkpoint
files are complete or absent, unreadable checkpoints are skipped by name, non-finite losses
stop with a named error, CPU multi-process training equals single-process training, data
errors name their file, the demo tool survives bad inputs, stale metrics are moved aside and
the test session refuses to run another checkout's code.

Every training run is tiny (R18 MaskFormer at 64 px, batch 2, no evaluation) and runs in its
own process (`python tools/train_net.py ...`); this file doubles as the entry point of the
toy model used for the multi-process comparison (`python tests/test_faults.py ARGS`).
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from test_train_net import CONFIG, ROOT, TINY

FAST = [
    *TINY, "MODEL.DEVICE", "cpu", "SEED", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
]


@META_ARCH_REGISTRY.register()
class FaultTestToy(nn.Module):
    """A deterministic model (no BatchNorm, no random sampling) for comparing N-process with
    1-process training: a strided conv, global pooling and a per-image class-presence BCE, so
    the loss of a batch is the mean of its images' losses, as DDP's gradient averaging
    assumes."""

    def __init__(self, cfg):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.head = nn.Linear(8, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        features = [self.conv((x["image"].float() - self.mean) / 58.0).mean((1, 2)) for x in batched_inputs]
        logits = self.head(torch.stack(features))
        targets = torch.zeros_like(logits)
        for row, x in enumerate(batched_inputs):
            targets[row, x["instances"].gt_classes] = 1.0
        return {"loss_presence": nn.functional.binary_cross_entropy_with_logits(logits, targets)}


# ---------------------------------------------------------------------- helpers
def start_training(out: Path, *opts: str, resume: bool = False, config: str = CONFIG,
                   num_gpus: int = 1, script: Path = ROOT / "tools" / "train_net.py") -> subprocess.Popen:
    """`python tools/train_net.py` on the tiny demo settings, output in `out/console.txt`."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script), "--config-file", str(config), "--num-gpus", str(num_gpus),
           "--dist-url", "auto", *(["--resume"] if resume else []), *FAST, "OUTPUT_DIR", str(out), *opts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "console.txt", "a") as console:
        return subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def train(out: Path, *opts: str, expect_rc: int = 0, **kwargs) -> str:
    """Run training to the end; returns the console text of this run."""
    before = len(console(out)) if (out / "console.txt").exists() else 0
    process = start_training(out, *opts, **kwargs)
    rc = process.wait(timeout=600)
    text = console(out)[before:]
    assert rc == expect_rc, f"exit status {rc}, expected {expect_rc}:\n{text[-4000:]}"
    return text


def console(out: Path) -> str:
    return (out / "console.txt").read_text()


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.1)


def training_started(out: Path) -> bool:
    log = out / "log.txt"
    return log.exists() and "Starting training from iteration" in log.read_text()


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """Iterations 0 and 1, checkpointed after each (model_0000000.pth, model_final.pth)."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    train(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1")
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "console.txt").unlink()
    return target


# ---------------------------------------------------------------------- 1. stop signals
def test_sigterm_checkpoints_the_last_finished_iteration_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    process = start_training(out, "SOLVER.MAX_ITER", "500", "SOLVER.CHECKPOINT_PERIOD", "1000")
    wait_for(lambda: training_started(out), "training to start")
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    text = console(out)
    stopped = re.search(r"training stopped by signal 15 after iteration (\d+)", text)
    assert stopped, text[-3000:]
    assert "Traceback" not in text
    iteration = int(stopped.group(1))
    assert checkpoint(out / "model_interrupted.pth")["iteration"] == iteration
    assert (out / "last_checkpoint").read_text() == "model_interrupted.pth"

    text = train(out, "SOLVER.MAX_ITER", str(iteration + 3), resume=True)
    assert f"Starting training from iteration {iteration + 1}" in text
    assert checkpoint(out / "model_final.pth")["iteration"] == iteration + 2


def test_sigusr1_to_the_launcher_stops_every_rank_of_a_two_process_cpu_run(tmp_path):
    out = tmp_path / "run"
    process = start_training(out, "SOLVER.MAX_ITER", "500", "SOLVER.CHECKPOINT_PERIOD", "1000", num_gpus=2)
    wait_for(lambda: training_started(out), "training to start")
    time.sleep(2)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == 128 + signal.SIGUSR1, console(out)[-3000:]
    assert "Traceback" not in console(out)
    saved = checkpoint(out / "model_interrupted.pth")
    # both ranks stopped after the same iteration and handed their state to the checkpoint
    assert len(saved["resume_state"]) == 2
    consumed = [state["data"]["images_consumed"] for state in saved["resume_state"]]
    assert consumed == [saved["iteration"] + 1] * 2  # one image per rank and iteration


# ---------------------------------------------------------------------- 4. exact resume
def test_kill9_then_resume_gives_bit_identical_weights(tmp_path):
    opts = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "3"]
    train(tmp_path / "uninterrupted", *opts)

    out = tmp_path / "killed"
    process = start_training(out, *opts)
    wait_for(lambda: (out / "last_checkpoint").exists(), "the first checkpoint")
    process.kill()  # SIGKILL: nothing is saved
    process.wait(timeout=60)
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (out / "model_final.pth").exists(), "the kill came too late to test anything"
    text = train(out, *opts, resume=True)
    assert "Starting training from iteration 3" in text
    assert "not an exact resume" not in text

    reference = checkpoint(tmp_path / "uninterrupted" / "model_final.pth")["model"]
    resumed = checkpoint(out / "model_final.pth")["model"]
    assert reference.keys() == resumed.keys()
    different = [key for key in reference if not torch.equal(reference[key], resumed[key])]
    print(f"exact resume: {len(reference) - len(different)} of {len(reference)} tensors bit-identical")
    assert not different
    # a run that skipped the restore (fresh data order and RNG) would not be identical:
    # the checkpoint does hold each rank's RNG and data-loader state
    state = checkpoint(out / "model_0000002.pth")["resume_state"][0]
    assert state["data"]["images_consumed"] == 3 * 2 and set(state["rng"]) >= {"python", "numpy", "torch"}


def test_resume_applies_a_changed_learning_rate_and_lists_it(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path / "run")
    text = train(out, "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.001", resume=True)
    assert "SOLVER.BASE_LR: 0.0003 -> 0.001" in text
    groups = checkpoint(out / "model_final.pth")["optimizer"]["param_groups"]
    # the head's groups start from the new base LR (backbone ones at 0.1 x, Mask2Former's rule)
    assert max(group["initial_lr"] for group in groups) == pytest.approx(0.001)


# ---------------------------------------------------------------------- 2. atomic files
def test_unreadable_last_checkpoint_is_named_and_the_newest_readable_one_is_used(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path / "run")
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a damaged disk / copy
    text = train(out, "SOLVER.MAX_ITER", "3", resume=True)
    assert f"cannot read checkpoint {final}" in text
    assert f"resumed from {out / 'model_0000000.pth'}" in text
    assert "Starting training from iteration 1" in text


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 64)


def _interrupted_save(checkpointer, monkeypatch, failure):
    """Save `model_interrupted` while torch.save fails half-way through with `failure`."""
    import openseg.engine.checkpoint as module

    real_save = torch.save

    def failing_save(data, f):
        real_save({"partial": torch.zeros(1000)}, f)
        failure()

    monkeypatch.setattr(module.torch, "save", failing_save)
    try:
        checkpointer.save("model_interrupted")
    finally:
        monkeypatch.setattr(module.torch, "save", real_save)


def test_second_ctrl_c_or_full_disk_while_saving_leaves_the_previous_resume_point(tmp_path, monkeypatch):
    from openseg.engine.checkpoint import TrainingCheckpointer

    checkpointer = TrainingCheckpointer(_Model(), str(tmp_path))
    checkpointer.save("model_0000009")
    good = (tmp_path / "model_0000009.pth").read_bytes()

    def second_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered during the write
        time.sleep(1)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    for failure, raised in ((second_ctrl_c, KeyboardInterrupt), (disk_full, OSError)):
        with pytest.raises(raised):
            _interrupted_save(checkpointer, monkeypatch, failure)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
        assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
        assert (tmp_path / "model_0000009.pth").read_bytes() == good
    restored = _Model()
    TrainingCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    torch.testing.assert_close(restored.state_dict(), checkpointer.model.state_dict())


# ---------------------------------------------------------------------- 3. non-finite
def test_nan_loss_stops_naming_iteration_terms_and_last_good_checkpoint(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path / "run")
    config = tmp_path / "nan.yaml"  # a NaN no-object weight makes loss_ce NaN, nothing else
    config.write_text(f"_BASE_: {CONFIG}\nMODEL:\n  MASK_FORMER:\n    NO_OBJECT_WEIGHT: .nan\n")
    text = train(out, "SOLVER.MAX_ITER", "4", resume=True, config=str(config), expect_rc=1)
    assert "training diverged at iteration 2: non-finite loss terms (rank 0: loss_ce=nan" in text
    assert "loss_mask=" not in text.split("training diverged")[1].split("\n")[0]
    assert f"Last good checkpoint: {out / 'model_final.pth'}" in text
    assert (out / "model_diverged_0000002.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    from openseg.engine.checkpoint import TrainingCheckpointer

    assert "model_diverged" not in " ".join(TrainingCheckpointer(_Model(), str(out)).resume_candidates())


def test_diverging_weights_are_reported_as_non_finite_not_as_a_matcher_error(tmp_path):
    out = tmp_path / "run"
    text = train(out, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.BASE_LR", "1e6",
                 expect_rc=1)
    diverged = re.search(r"training diverged at iteration (\d+): non-finite (outputs|weights|loss)", text)
    assert diverged, text[-3000:]
    iteration = int(diverged.group(1))
    assert (out / f"model_diverged_{iteration:07d}.pth").exists()
    assert (out / "last_checkpoint").read_text() == f"model_{iteration - 1:07d}.pth"


def test_loss_guard_names_non_finite_terms_and_warns_on_spikes(caplog):
    from openseg.engine.hooks import NonFiniteError, loss_guard

    trainer = SimpleNamespace(iter=7)
    hook = loss_guard(trainer, max_spike=10.0, window=3)
    module = nn.Linear(1, 1).train()
    with caplog.at_level("WARNING", logger="openseg.engine.hooks"):
        for total in (1.0, 2.0, 1.5, 14.0, 16.0):  # median of the previous 3 is 1.5, then 2.0
            hook(module, (), {"loss_a": torch.tensor(total / 2), "loss_b": torch.tensor(total / 2)})
    spikes = [r.getMessage() for r in caplog.records if "MAX_LOSS_SPIKE" in r.getMessage()]
    assert len(spikes) == 1 and "total loss 14" in spikes[0]  # 16 > 10 x 2.0 is not a spike
    with pytest.raises(NonFiniteError, match=r"iteration 7: non-finite loss terms \(rank 0: loss_b=inf\)"):
        hook(module, (), {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(float("inf"))})
    hook(module.eval(), (), {"loss_b": torch.tensor(float("nan"))})  # evaluation is not guarded


# ---------------------------------------------------------------------- 6. CPU multi-process
def test_two_cpu_processes_train_like_one_with_the_same_total_batch(tmp_path):
    toy = ["MODEL.META_ARCHITECTURE", "FaultTestToy", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
           "DATALOADER.ASPECT_RATIO_GROUPING", "False", "SOLVER.BASE_LR", "0.01"]
    script = Path(__file__)
    train(tmp_path / "one", *toy, script=script)
    train(tmp_path / "two", *toy, num_gpus=2, script=script)
    losses = [json.loads((tmp_path / run / "metrics.json").read_text().splitlines()[-1])["loss_presence"]
              for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    one, two = (checkpoint(tmp_path / run / "model_final.pth")["model"] for run in ("one", "two"))
    initial = FaultTestToy(SimpleNamespace(MODEL=SimpleNamespace(
        SEM_SEG_HEAD=SimpleNamespace(NUM_CLASSES=8), PIXEL_MEAN=[0.0, 0.0, 0.0]))).state_dict()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0)
        if key != "mean":
            assert not torch.equal(one[key], initial[key])  # it did train


# ---------------------------------------------------------------------- 5. named data errors
@pytest.fixture
def demo_copy(tmp_path):
    from openseg.data.datasets.demo import generate_demo

    return generate_demo(tmp_path, num_train=2, num_val=2)


def test_broken_annotation_json_names_the_file_and_line(demo_copy):
    from openseg.data.datasets.common import AnnotationFileError
    from openseg.data.datasets.demo import load_demo

    panoptic = demo_copy / "annotations" / "panoptic_train.json"
    panoptic.write_text(panoptic.read_text()[:-40])
    with pytest.raises(AnnotationFileError, match=rf"{re.escape(str(panoptic))}: not valid JSON .* line 1"):
        load_demo(demo_copy, "train")


def test_unknown_category_names_file_image_segment_and_known_ids(demo_copy):
    from openseg.data.datasets.common import AnnotationFileError
    from openseg.data.datasets.demo import demo_metadata, load_demo

    known = sorted(demo_metadata()["stuff_dataset_id_to_contiguous_id"])
    for name, key in (("panoptic_train.json", "segments_info"), ("instances_train.json", None)):
        path = demo_copy / "annotations" / name
        data = json.loads(path.read_text())
        entry = data["annotations"][1][key][0] if key else data["annotations"][1]
        original = entry["category_id"]
        entry["category_id"] = 99
        path.write_text(json.dumps(data))
        image_id = data["annotations"][1]["image_id"]
        where = f"segment id {entry['id']}" if key else f"annotation id {entry['id']}"
        with pytest.raises(AnnotationFileError) as error:
            load_demo(demo_copy, "train")
        assert str(error.value).startswith(f"{path}: image_id {image_id}, {where}: category_id 99 ")
        if key:
            assert f"known ids: {known}" in str(error.value)
        entry["category_id"] = original
        path.write_text(json.dumps(data))


def test_ground_truth_of_the_wrong_size_is_named_at_evaluation(demo_copy):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from openseg.data.datasets.demo import demo_metadata, load_demo
    from openseg.evaluation.panoptic import PanopticEvaluator
    from openseg.evaluation.semantic import SemanticEvaluator

    dicts = load_demo(demo_copy, "val")
    name = "openseg_test_faults_wrong_gt"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(**demo_metadata())
    try:
        record = dicts[0]
        for key in ("sem_seg_file_name", "pan_seg_file_name"):
            image = cv2.imread(record[key], cv2.IMREAD_UNCHANGED)
            cv2.imwrite(record[key], cv2.resize(image, (64, 64), interpolation=cv2.INTER_NEAREST))
        inputs = [{"file_name": record["file_name"], "image_id": record["image_id"],
                   "height": record["height"], "width": record["width"]}]
        size = (record["height"], record["width"])
        semantic = SemanticEvaluator(name, distributed=False)
        semantic.reset()
        with pytest.raises(ValueError, match=rf"ground truth {re.escape(record['sem_seg_file_name'])} is 64x64 "
                                             rf"\(height x width\) but the image is {size[0]}x{size[1]}"):
            semantic.process(inputs, [{"sem_seg": torch.zeros(8, *size)}])
        panoptic = PanopticEvaluator(name, distributed=False)
        panoptic.reset()
        with pytest.raises(ValueError, match=rf"ground truth {re.escape(record['pan_seg_file_name'])} is 64x64"):
            panoptic.process(inputs, [{"panoptic_seg": (torch.zeros(size, dtype=torch.int32), [])}])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---------------------------------------------------------------------- 7. demo tool
def test_demo_tool_skips_unreadable_images_and_keeps_distinct_names(two_checkpoints, tmp_path):
    from detectron2.data import DatasetCatalog

    source = DatasetCatalog.get("openseg_demo_val")[0]["file_name"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(source, inputs / "a.jpg")
    cv2.imwrite(str(inputs / "a.png"), cv2.imread(source))
    (inputs / "b.jpg").write_bytes(Path(source).read_bytes()[:200])  # truncated JPEG
    (inputs / "c.png").write_bytes(b"not an image")
    out = tmp_path / "vis"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--config-file", CONFIG, "--input", str(inputs),
         str(tmp_path / "missing.jpg"), "--output", str(out), *TINY, "MODEL.DEVICE", "cpu",
         "MODEL.WEIGHTS", str(two_checkpoints / "model_final.pth")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png"]
    for skipped in ("b.jpg", "c.png"):
        assert re.search(rf"skipped Cannot read {re.escape(str(inputs / skipped))}", text), text[-3000:]
    assert f"skipped --input {tmp_path / 'missing.jpg'}: no such file" in text
    assert re.search(r"demo: 2 written to .*, 3 skipped", text)


# ---------------------------------------------------------------------- 8. stale metrics
def test_evaluation_moves_previous_metrics_aside_before_it_starts(tmp_path):
    from openseg.evaluation.semantic import SemanticEvaluator

    (tmp_path / "sem_seg_raw").mkdir()
    (tmp_path / "sem_seg_metrics.json").write_text('{"summary": {"mIoU": 99.0}}')
    (tmp_path / "sem_seg_raw" / "rank3.jsonl").write_text("{}\n")  # from a run with 4 processes
    evaluator = SemanticEvaluator("openseg_demo_val", output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    assert not (tmp_path / "sem_seg_metrics.json").exists()
    assert json.loads((tmp_path / "sem_seg_metrics.previous.json").read_text())["summary"]["mIoU"] == 99.0
    assert sorted(p.name for p in (tmp_path / "sem_seg_raw").iterdir()) == ["rank0.jsonl"]


# ---------------------------------------------------------------------- 9. the checkout under test
def test_session_refuses_code_from_another_checkout(tmp_path):
    clone = tmp_path / "other_clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    (clone / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                             str(clone / "tests")], capture_output=True, text=True, cwd=clone, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"the tests in {clone} would exercise code from elsewhere" in text
    assert f"openseg -> {ROOT / 'openseg' / '__init__.py'}" in text
    assert "bash tools/run.sh test" in text
    assert "1 passed" not in text


if __name__ == "__main__":
    # entry point of the multi-process comparison: train_net with FaultTestToy registered
    sys.path.insert(0, str(ROOT / "tools"))
    import train_net

    train_net.cli(sys.argv[1:])
