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
import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from openseg.config import load_config
from script_utils import load_script
from test_train_net import CONFIG, ROOT, TINY

FAST = [
    *TINY, "MODEL.DEVICE", "cpu", "SEED", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "MODEL.BACKBONE.FREEZE_AT", "5",  # smaller checkpoints (no optimizer state for the ResNet)
]
TOY = ["MODEL.META_ARCHITECTURE", "FaultTestToy", "SOLVER.MAX_ITER", "50", "SOLVER.CHECKPOINT_PERIOD", "20",
       "DATALOADER.ASPECT_RATIO_GROUPING", "False", "SOLVER.BASE_LR", "0.01"]


@META_ARCH_REGISTRY.register()
class FaultTestToy(nn.Module):
    """A deterministic model (no BatchNorm, no random sampling) for comparing N-process with
    1-process training: a strided conv, global pooling and a per-image class-presence BCE, so
    the loss of a batch is the mean of its images' losses, as DDP's gradient averaging
    assumes. `loss_weighted` is the same BCE times MODEL.MASK_FORMER.CLASS_WEIGHT, a plain
    float (not a buffer), so a config can make exactly this term non-finite on resume."""

    def __init__(self, cfg):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.head = nn.Linear(8, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.weight = cfg.MODEL.MASK_FORMER.CLASS_WEIGHT

    def forward(self, batched_inputs):
        features = [self.conv((x["image"].float() - self.mean) / 58.0).mean((1, 2)) for x in batched_inputs]
        logits = self.head(torch.stack(features))
        targets = torch.zeros_like(logits)
        for row, x in enumerate(batched_inputs):
            targets[row, x["instances"].gt_classes] = 1.0
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return {"loss_presence": loss, "loss_weighted": loss * self.weight}


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


REFERENCE = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """6 uninterrupted iterations, checkpointed after iterations 1, 3 and 5 (model_final)."""
    out = tmp_path_factory.mktemp("reference")
    train(out, *REFERENCE)
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "console.txt").unlink()
    return target


def final_weights(out: Path) -> dict:
    return checkpoint(out / "model_final.pth")["model"]


# ---------------------------------------------------------------------- 1 + 4. signals, exact resume
def test_kill9_then_sigterm_then_resume_ends_bit_identical_to_an_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "run"
    process = start_training(out, *REFERENCE)
    wait_for(lambda: (out / "last_checkpoint").exists(), "the first periodic checkpoint")
    process.kill()  # SIGKILL: nothing more is saved
    process.wait(timeout=60)
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists(), "the kill came too late to test anything"

    # SIGTERM (SLURM, timeout) as soon as the resumed run trains: it checkpoints and exits
    process = start_training(out, *REFERENCE, resume=True)
    wait_for(lambda: "Starting training from iteration 2" in (out / "log.txt").read_text(), "the resumed run")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, console(out)[-3000:]
    stopped = re.search(r"training stopped by signal 15 after iteration (\d+)", console(out))
    assert stopped and "Traceback" not in console(out), console(out)[-3000:]
    iteration = int(stopped.group(1))
    assert 2 <= iteration < 5
    saved = checkpoint(out / "model_interrupted.pth")
    assert saved["iteration"] == iteration
    assert (out / "last_checkpoint").read_text() == "model_interrupted.pth"
    # the checkpoint holds the data-loader position and the RNG states of the (one) rank
    state = saved["resume_state"][0]
    assert state["data"]["images_consumed"] == (iteration + 1) * 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"}

    text = train(out, *REFERENCE, resume=True)
    assert f"Starting training from iteration {iteration + 1}" in text
    assert "not an exact resume" not in text
    reference, resumed = final_weights(reference_run), final_weights(out)
    assert reference.keys() == resumed.keys()
    different = [key for key in reference if not torch.equal(reference[key], resumed[key])]
    print(f"exact resume (kill -9 after iteration 1, SIGTERM after iteration {iteration}): "
          f"{len(reference) - len(different)} of {len(reference)} tensors bit-identical")
    assert not different


# ---------------------------------------------------------------------- 2. atomic files, resume fallback
def test_unreadable_checkpoint_is_named_the_newest_readable_used_and_a_new_lr_applied(reference_run, tmp_path):
    out = copy_run(reference_run, tmp_path / "run")
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a damaged disk / copy
    text = train(out, "SOLVER.MAX_ITER", "7", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.BASE_LR", "0.001",
                 resume=True)
    assert f"cannot read checkpoint {final}" in text
    assert f"resumed from {out / 'model_0000003.pth'}" in text
    assert "Starting training from iteration 4" in text
    # a learning rate given with --resume is applied and listed, not silently ignored
    assert "SOLVER.BASE_LR: 0.0003 -> 0.001" in text
    groups = checkpoint(final)["trainer"]["_trainer"]["optimizer"]["param_groups"]
    # head groups start from the new base LR (backbone ones at 0.1 x, Mask2Former's rule)
    assert max(group["initial_lr"] for group in groups) == pytest.approx(0.001)


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


def test_second_ctrl_c_or_full_disk_while_saving_leaves_the_previous_resume_point(tmp_path, monkeypatch, request):
    from openseg.engine.checkpoint import TrainingCheckpointer

    checkpointer = TrainingCheckpointer(_Model(), str(tmp_path))
    checkpointer.save("model_0000009")
    good = (tmp_path / "model_0000009.pth").read_bytes()
    # a shell starts background jobs with SIGINT ignored, and Python keeps that: install the
    # handler a terminal's Ctrl-C meets, whatever launched the test run
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_handler))

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
def test_nan_loss_stops_naming_iteration_terms_and_last_good_checkpoint(toy_run, tmp_path):
    out = copy_run(toy_run, tmp_path / "run")
    config = tmp_path / "nan.yaml"  # makes loss_weighted NaN, loss_presence stays finite
    config.write_text(f"_BASE_: {CONFIG}\nMODEL:\n  MASK_FORMER:\n    CLASS_WEIGHT: .nan\n")
    text = train(out, *TOY, "SOLVER.MAX_ITER", "60", resume=True, config=str(config), script=Path(__file__),
                 expect_rc=1)
    assert "training diverged at iteration 50: non-finite loss terms (rank 0: loss_weighted=nan)" in text
    assert f"Last good checkpoint: {out / 'model_final.pth'}" in text
    assert (out / "model_diverged_0000050.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    from openseg.engine.checkpoint import TrainingCheckpointer

    candidates = TrainingCheckpointer(_Model(), str(out)).resume_candidates()
    assert candidates[0] == str(out / "model_final.pth")
    assert not any("model_diverged" in path for path in candidates)


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
        for total in (1.0, 2.0, 1.5, 16.0, 19.0):  # median of the previous 3: 1.5, then 2.0
            hook(module, (), {"loss_a": torch.tensor(total / 2), "loss_b": torch.tensor(total / 2)})
    spikes = [r.getMessage() for r in caplog.records if "MAX_LOSS_SPIKE" in r.getMessage()]
    assert len(spikes) == 1 and "total loss 16 " in spikes[0]  # 19 < 10 x 2.0 is no spike
    with pytest.raises(NonFiniteError, match=r"iteration 7: non-finite loss terms \(rank 0: loss_b=inf\)"):
        hook(module, (), {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(float("inf"))})
    hook(module.eval(), (), {"loss_b": torch.tensor(float("nan"))})  # evaluation is not guarded


# ---------------------------------------------------------------------- 6. CPU multi-process
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """50 iterations of FaultTestToy in one process, total batch 2."""
    out = tmp_path_factory.mktemp("toy_one")
    train(out, *TOY, script=Path(__file__))
    return out


def last_losses(out: Path) -> dict:
    last = json.loads((out / "metrics.json").read_text().splitlines()[-1])
    return {key: value for key, value in last.items() if "loss" in key}


def test_two_cpu_processes_stopped_by_sigusr1_and_resumed_train_like_one_process(toy_run, tmp_path):
    """`--num-gpus 2 MODEL.DEVICE cpu` (gloo, batch 1 per process) against one process with
    batch 2: SIGUSR1 (SLURM's pre-emption warning) to the launcher stops both ranks after the
    same iteration with one checkpoint, and the resumed pair ends where one process does."""
    out = tmp_path / "two"
    script = Path(__file__)
    process = start_training(out, *TOY, num_gpus=2, script=script)
    wait_for(lambda: training_started(out), "training to start")
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=300) == 128 + signal.SIGUSR1, console(out)[-3000:]
    assert "Traceback" not in console(out)
    saved = checkpoint(out / "model_interrupted.pth")
    assert saved["iteration"] < 49
    consumed = [state["data"]["images_consumed"] for state in saved["resume_state"]]
    assert consumed == [saved["iteration"] + 1] * 2  # both ranks, one image each per iteration

    text = train(out, *TOY, num_gpus=2, script=script, resume=True)
    assert f"Starting training from iteration {saved['iteration'] + 1}" in text
    one, two = last_losses(toy_run), last_losses(out)
    assert one.keys() == two.keys() == {"total_loss", "loss_presence", "loss_weighted"}
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    initial = FaultTestToy(load_config(CONFIG)).state_dict()
    for key, value in final_weights(toy_run).items():
        torch.testing.assert_close(final_weights(out)[key], value, atol=1e-5, rtol=0)
        assert not torch.equal(value, initial[key])  # it did train


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
        with pytest.raises(ValueError, match=rf"ground truth {re.escape(record['sem_seg_file_name'])} has size "
                                             rf"\(64, 64\) \(height, width\) but the image has size "
                                             rf"\({size[0]}, {size[1]}\)"):
            semantic.process(inputs, [{"sem_seg": torch.zeros(8, *size)}])
        panoptic = PanopticEvaluator(name, distributed=False)
        panoptic.reset()
        with pytest.raises(ValueError, match=rf"ground truth {re.escape(record['pan_seg_file_name'])} has size \(64, 64\)"):
            panoptic.process(inputs, [{"panoptic_seg": (torch.zeros(size, dtype=torch.int32), [])}])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---------------------------------------------------------------------- 7. demo tool
def test_demo_tool_skips_unreadable_images_and_keeps_distinct_names(reference_run, tmp_path):
    import logging

    from detectron2.data import DatasetCatalog

    source = DatasetCatalog.get("openseg_demo_val")[0]["file_name"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(source, inputs / "a.jpg")
    cv2.imwrite(str(inputs / "a.png"), cv2.imread(source))
    (inputs / "b.jpg").write_bytes(Path(source).read_bytes()[:200])  # truncated JPEG
    (inputs / "c.png").write_bytes(b"not an image")
    out = tmp_path / "vis"
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("openseg.demo").addHandler(handler)
    try:
        written = load_script("tools/demo.py").main([
            "--config-file", CONFIG, "--input", str(inputs), str(tmp_path / "missing.jpg"), "--output", str(out),
            *TINY, "MODEL.BACKBONE.FREEZE_AT", "5", "MODEL.WEIGHTS", str(reference_run / "model_final.pth"),
        ])
    finally:
        logging.getLogger("openseg.demo").removeHandler(handler)
    assert [p.name for p in written] == ["a_jpg.png", "a_png.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png"]
    text = "\n".join(messages)
    for skipped in ("b.jpg", "c.png"):
        assert f"skipped Cannot read {inputs / skipped}" in text, text
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
def test_session_refuses_code_from_another_checkout(tmp_path, monkeypatch):
    import conftest

    # this checkout is the one installed: nothing foreign
    assert conftest.foreign_packages(ROOT) == []
    # seen from another clone, the installed code is foreign and the session must not start
    monkeypatch.setattr(conftest, "ROOT", tmp_path)
    with pytest.raises(pytest.UsageError) as error:
        conftest.pytest_configure(None)
    message = str(error.value)
    assert f"the tests in {tmp_path} would exercise code from elsewhere" in message
    assert f"openseg -> {ROOT / 'openseg' / '__init__.py'}" in message
    for project in (p.parent.name for p in (ROOT / "projects").glob("*/__init__.py")):
        assert f"openseg.projects.{project} -> {ROOT / 'projects' / project / '__init__.py'}" in message
    assert f"`bash tools/run.sh test` from {tmp_path}" in message


if __name__ == "__main__":
    # entry point of the multi-process comparison: train_net with FaultTestToy registered
    sys.path.insert(0, str(ROOT / "tools"))
    import train_net

    train_net.cli(sys.argv[1:])
