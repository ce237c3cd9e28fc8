"""Shared pieces of the reference-equivalence tests (`tests/test_reference_*.py`): loading a
fixture written by `tools/make_reference_fixtures.py`, the one-thread rule the fixtures were
computed under, the scale-relative comparison, detectron2 inputs built from the fixture's
images and targets, and the checks every Mask2Former-style model repeats (post-processing,
the training step's point draws).

Import the `one_thread` fixture into a test module (``from reference_utils import one_thread``)
to make it autouse there; pytest picks up fixtures from the module namespace."""
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

import pytest
import torch
from detectron2.structures import Instances

from openseg.modeling.meta_arch.maskformer import OpenSegMaskFormer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
# outputs agree within 1e-5 of their magnitude (mask logits reach ~30, backbone features ~6000)
TOLERANCE = 1e-5


def load_reference(name: str) -> Dict[str, Any]:
    """`tests/fixtures/reference/<name>/fixtures.pt` (pickled dicts of tensors and metadata)."""
    return torch.load(FIXTURES / name / "fixtures.pt", weights_only=False)


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were computed with one thread; more threads change summation orders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Elementwise within TOLERANCE x max(1, max |expected|)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=lambda m: f"{what}: {m}"
    )


def copy_config(node: Any, values: Mapping[str, Any], skip: Iterable[str] = ()) -> None:
    """Copy the release's config values into the openseg node for every key both have
    (recursively; lists become tuples where openseg keeps tuples), except the keys in `skip`."""
    skip = tuple(skip)
    for key, value in values.items():
        if key not in node or key in skip:
            continue
        if isinstance(value, dict):
            copy_config(node[key], value, skip)
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) else value


def detectron2_inputs(reference: Mapping[str, Any], with_targets: bool = False) -> List[Dict[str, Any]]:
    """The fixture's images as detectron2 dataset dicts (output size = the release's), with
    `Instances` of the fixture's targets for a training step."""
    inputs = []
    for i, (image, (height, width)) in enumerate(zip(reference["images"], reference["output_sizes"])):
        record = {"image": image, "height": height, "width": width}
        if with_targets:
            instances = Instances(tuple(image.shape[-2:]))
            instances.gt_classes = reference["targets"][i]["labels"]
            instances.gt_masks = reference["targets"][i]["masks"]
            record["instances"] = instances
        inputs.append(record)
    return inputs


def assert_predictions_match(
    outputs: Mapping[str, Any],
    expected: List[Mapping[str, torch.Tensor]],
    close: Callable[[torch.Tensor, torch.Tensor, str], None] = assert_close,
) -> None:
    """`pred_logits` and `pred_masks` of every decoder prediction (deep-supervision levels
    first, then the final one) against the release's, level for level and as many levels."""
    ours = outputs["aux_outputs"] + [outputs]
    assert len(ours) == len(expected)
    for index, (mine, theirs) in enumerate(zip(ours, expected)):
        for key in ("pred_logits", "pred_masks"):
            close(mine[key], theirs[key], f"prediction {index} {key}")


def assert_postprocessing_matches(
    results: List[Dict[str, Any]],
    reference: Mapping[str, Any],
    close: Callable[[torch.Tensor, torch.Tensor, str], None] = assert_close,
) -> None:
    """Semantic scores (within tolerance), panoptic segment map and segments (identical) and
    instances (classes and binary masks identical, scores within tolerance, both sides in
    descending score order) of every image."""
    for b, result in enumerate(results):
        close(result["sem_seg"], reference["sem_seg"][b], f"image {b} sem_seg")

        segment_map, segments = result["panoptic_seg"]
        expected = reference["panoptic"][b]
        assert segments == expected["segments_info"]
        assert torch.equal(segment_map, expected["segment_map"])

        instances, theirs = result["instances"], reference["instances"][b]
        mine_order = instances.scores.argsort(descending=True)
        their_order = theirs["scores"].argsort(descending=True)
        assert torch.equal(instances.pred_classes[mine_order], theirs["pred_classes"][their_order])
        close(instances.scores[mine_order], theirs["scores"][their_order], f"image {b} scores")
        assert torch.equal(instances.pred_masks[mine_order].bool(), theirs["pred_masks"][their_order])


def postprocess_release_outputs(
    model: torch.nn.Module, reference: Mapping[str, Any], pred_logits: torch.Tensor, pred_masks: torch.Tensor
) -> List[Dict[str, Any]]:
    """openseg's post-processing (`OpenSegMaskFormer.postprocess`) of the release's own class
    logits [B, Q, K+1] and mask logits [B, Q, h, w]. It isolates post-processing from the
    ~1e-6 differences of the layers before it (each compared on its own), which the semantic
    map's sigmoids and sums over queries can amplify past 1e-5 on some CPUs."""
    inputs = detectron2_inputs(reference)
    with torch.no_grad():
        images = model.preprocess_images(inputs)
        return OpenSegMaskFormer.postprocess(
            model, {"pred_logits": pred_logits, "pred_masks": pred_masks}, inputs, images
        )


def assert_decisions_match(results: List[Dict[str, Any]], reference: Mapping[str, Any]) -> None:
    """End to end, where earlier layers differ by rounding: every post-processing decision
    (panoptic segments and map, instance classes and masks) identical, scores within 1e-4."""
    assert_postprocessing_matches(
        results, reference, close=lambda a, e, what: torch.testing.assert_close(
            a.float(), e.float(), rtol=1e-4, atol=1e-4 * max(1.0, float(e.abs().max())),
            msg=lambda m: f"{what}: {m}",
        ),
    )


def record_criterion_rand(model: torch.nn.Module, seed: int, monkeypatch: pytest.MonkeyPatch) -> List[Tuple[int, ...]]:
    """Seed torch before `model.criterion` runs (as the fixture script seeded the release's)
    and record the shape of every `torch.rand` draw during the criterion; returns the list the
    shapes are appended to."""
    draws: List[Tuple[int, ...]] = []
    real_rand = torch.rand

    def recording_rand(*size, **kwargs):
        draws.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size))
        return real_rand(*size, **kwargs)

    def start(module, args):
        torch.manual_seed(seed)
        monkeypatch.setattr(torch, "rand", recording_rand)

    model.criterion.register_forward_pre_hook(start)
    model.criterion.register_forward_hook(lambda *args: monkeypatch.setattr(torch, "rand", real_rand))
    return draws
