"""openseg.checkpoint: released checkpoints of every supported layout load through
MODEL.WEIGHTS, strictly; bad files fail naming the file and the keys, loading nothing.

Oracles: a whole tiny reference Mask2Former saved as a model-zoo .pkl by the release's code
(tests/fixtures/reference/swin, tools/reference_fixtures/swin.py), torchvision's own ResNet
forward pass, and detectron2's own ResNet parameter names."""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_backbone, build_model

import openseg  # noqa: F401  (registers the architectures)
from openseg.checkpoint import (
    CheckpointError,
    OpenSegCheckpointer,
    convert_from_openseg,
    detect_format,
    read_checkpoint_file,
)
from openseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/reference/swin"
ZOO_PKL = FIXTURES / "mask2former_swin_tiny.pkl"
R50_PANOPTIC = "configs/coco/maskformer/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN"]


def tiny_swin_maskformer_cfg(*extra):
    """openseg's released-config mirror with the options the fixture's reference model used."""
    options = torch.load(FIXTURES / "mask2former_swin_tiny_config.pt", weights_only=False)
    opts = ["MODEL.BACKBONE.NAME", "D2SwinTransformer", "MODEL.DEVICE", "cpu",
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    for key, value in options["swin"].items():
        opts += [f"MODEL.SWIN.{key}", str(value)]
    for key, value in options["options"].items():
        opts += [key, str(value)]
    # the release's deformable encoder uses MASK_FORMER.NHEADS heads
    opts += ["MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
             str(options["options"]["MODEL.MASK_FORMER.NHEADS"]), *extra]
    return load_config(str(ROOT / R50_PANOPTIC), opts)


def reference_state():
    with open(ZOO_PKL, "rb") as f:
        return pickle.load(f, encoding="latin1")["model"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_load_fails(model, path, pattern, checkpointer=None):
    """Loading `path` raises a CheckpointError matching `pattern` and changes no tensor."""
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=pattern):
        (checkpointer or OpenSegCheckpointer(model)).load(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although loading failed"


@pytest.fixture(scope="module")
def swin_maskformer():
    torch.manual_seed(0)
    return build_model(tiny_swin_maskformer_cfg())


def test_model_zoo_pkl_loads_every_tensor(swin_maskformer):
    model = swin_maskformer
    result = OpenSegCheckpointer(model).load(str(ZOO_PKL))
    reference = reference_state()
    ours = model.state_dict()
    # every tensor of the release arrives, value for value; converted back, the state dict is
    # the release's again, with the Swin index buffers openseg recomputes instead of loading
    back = convert_from_openseg({k: v for k, v in ours.items() if not k.startswith("criterion.")},
                                "mask2former")
    for ref_key, value in back.items():
        assert np.array_equal(value.numpy(), reference[ref_key]), ref_key
    assert set(reference) - set(back) == {"criterion.empty_weight"}
    assert any(k.endswith("relative_position_index") for k in back)
    assert result == {"__author__": "Mask2Former"}  # nothing else in a model-zoo file


def test_format_detection():
    assert detect_format(list(reference_state())).name == "mask2former"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]).name == "torchvision_resnet"
    assert detect_format(["stem.conv1.weight", "res2.0.conv1.weight"]).name == "detectron2_resnet"
    assert detect_format(["conv1_w", "res2_0_branch2a_w"]).name == "caffe2_resnet"
    assert detect_format(["patch_embed.proj.weight", "layers.0.blocks.0.norm1.weight"]).name == "swin_imagenet"
    assert detect_format(["pixel_decoder.x", "backbone.y"]).name == "openseg"
    assert detect_format(["sam.image_encoder.x"]).name == "openseg"  # any openseg model's own


def test_unknown_layout_fails_naming_the_keys(tmp_path, swin_maskformer):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(3)}}, path)
    assert_load_fails(swin_maskformer, path, r"other\.pth \(read as 'openseg'\): \d+ keys the model "
                                              r"needs are missing \(first: \['backbone\.")


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 100, b""])
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_garbage_bytes_name_the_file(tmp_path, swin_maskformer, content, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    assert_load_fails(swin_maskformer, path, f"not a PyTorch / detectron2 checkpoint: {path}")


def test_truncated_files_name_the_file(tmp_path, swin_maskformer):
    pkl = tmp_path / "cut.pkl"
    pkl.write_bytes(ZOO_PKL.read_bytes()[: ZOO_PKL.stat().st_size // 2])
    pth = tmp_path / "cut.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in reference_state().items()}}, pth)
    pth.write_bytes(pth.read_bytes()[:-5000])
    for path in (pkl, pth):
        assert_load_fails(swin_maskformer, path, f"not a PyTorch / detectron2 checkpoint: {path}")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="checkpoint not found: /nonexistent/R-50.pkl"):
        read_checkpoint_file("/nonexistent/R-50.pkl")


def test_missing_decoder_key_is_an_error_naming_it(tmp_path, swin_maskformer):
    state = reference_state()
    del state["sem_seg_head.predictor.mask_embed.layers.2.bias"]
    path = tmp_path / "no_mask_embed.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    assert_load_fails(swin_maskformer, path, r"1 keys the model needs are missing.*"
                                             r"transformer_decoder\.mask_embed\.layers\.2\.bias")


def test_new_class_head_needs_the_config_to_allow_it():
    """7 classes instead of the checkpoint's 4: an error naming the key and both shapes,
    unless MODEL.WEIGHTS_ALLOW_MISSING names the class head (then only it keeps its init)."""
    cfg = tiny_swin_maskformer_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7")
    model = build_model(cfg)
    before = snapshot(model)
    assert_load_fails(model, ZOO_PKL, re.escape(
        "transformer_decoder.class_predictor.weight: checkpoint [5, 32] vs model [8, 32]"),
        OpenSegCheckpointer.from_config(cfg, model))

    cfg.MODEL.WEIGHTS_ALLOW_MISSING = ["transformer_decoder.class_predictor"]
    OpenSegCheckpointer.from_config(cfg, model).load(str(ZOO_PKL))
    reference = reference_state()
    ours = model.state_dict()
    assert torch.equal(ours["transformer_decoder.class_predictor.weight"],
                       before["transformer_decoder.class_predictor.weight"])
    assert np.array_equal(ours["transformer_decoder.query_feat.weight"].numpy(),
                          reference["sem_seg_head.predictor.query_feat.weight"])


def test_checkpoint_of_another_backbone_fails_naming_keys():
    """The Swin model-zoo checkpoint into the same Mask2Former on a ResNet-18: an error naming
    the missing backbone keys; nothing loaded (not even the matching heads)."""
    model = build_model(tiny_swin_maskformer_cfg("MODEL.BACKBONE.NAME", "build_resnet_backbone", *R18))
    assert_load_fails(model, ZOO_PKL, r"mask2former_swin_tiny\.pkl \(read as 'mask2former'\): "
                                      r"\d+ keys the model needs are missing \(first: \['backbone\.stem")


# ------------------------------------------------------------------------------ ImageNet ResNets
def r18_cfg():
    return load_config(str(ROOT / R50_PANOPTIC), [
        "MODEL.DEVICE", "cpu", *R18, "DATASETS.TEST", "()", "DATASETS.TRAIN", "()"])


class BackboneOnly(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg)


def test_torchvision_resnet_state_dict_gives_torchvision_features(tmp_path):
    """A raw torchvision resnet18 state dict (.pth) loaded into detectron2's ResNet-18
    backbone reproduces torchvision's own stage outputs."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = BackboneOnly(r18_cfg()).eval()
    OpenSegCheckpointer(model).load(str(path))
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(image)
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        for index, name in enumerate(("res2", "res3", "res4", "res5")):
            x = getattr(reference, f"layer{index + 1}")(x)
            torch.testing.assert_close(features[name], x, rtol=0, atol=1e-5)


def test_detectron2_resnet_pkl_loads_and_logs_the_classifier_unused(tmp_path, caplog):
    """R-50.pkl layout (detectron2 names, numpy arrays, __author__ torchvision): every tensor
    arrives; `stem.fc` is logged as unused; the heads keep their initialisation."""
    cfg = r18_cfg()
    source = BackboneOnly(cfg)
    state = {k: v.numpy() for k, v in source.backbone.state_dict().items()}
    state["stem.fc.weight"] = np.zeros((1000, 512), np.float32)
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    model = build_model(cfg)
    checkpointer = OpenSegCheckpointer(model)
    with caplog.at_level("INFO"):
        checkpointer.load(str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    log = caplog.text
    assert "detectron2_resnet" in log and "Unused keys of the weights (1): backbone.stem (1)" in log
    assert "Left at initialisation" in log and "pixel_decoder" in log


def test_caffe2_resnet_names_load(tmp_path):
    """MSRA's Caffe2 names (res2_0_branch2a_w, res_conv1_bn_s, ...): affine BN only, so the
    running statistics keep their (0, 1) initialisation and are not an error."""
    cfg = r18_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    source = BackboneOnly(cfg).backbone.state_dict()
    stage_blocks = {2: 2, 3: 2, 4: 2, 5: 2}
    c2 = {"conv1_w": source["stem.conv1.weight"].numpy(),
          "res_conv1_bn_s": source["stem.conv1.norm.weight"].numpy(),
          "res_conv1_bn_b": source["stem.conv1.norm.bias"].numpy()}
    for stage, blocks in stage_blocks.items():
        for block in range(blocks):
            for conv, branch in (("conv1", "branch2a"), ("conv2", "branch2b"), ("shortcut", "branch1")):
                key = f"res{stage}.{block}.{conv}"
                if f"{key}.weight" not in source:
                    continue
                c2[f"res{stage}_{block}_{branch}_w"] = source[f"{key}.weight"].numpy() + 1
                c2[f"res{stage}_{block}_{branch}_bn_s"] = source[f"{key}.norm.weight"].numpy() + 2
                c2[f"res{stage}_{block}_{branch}_bn_b"] = source[f"{key}.norm.bias"].numpy() + 3
    path = tmp_path / "R-18-c2.pkl"
    with open(path, "wb") as f:
        pickle.dump(c2, f)  # MSRA files are a bare {blob name: array} pickle
    model = BackboneOnly(cfg)
    OpenSegCheckpointer(model).load(str(path))
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["res3.0.shortcut.weight"], source["res3.0.shortcut.weight"] + 1)
    assert torch.equal(loaded["res4.1.conv2.norm.weight"], source["res4.1.conv2.norm.weight"] + 2)
    assert torch.equal(loaded["stem.conv1.norm.bias"], source["stem.conv1.norm.bias"])
    assert torch.equal(loaded["res2.0.conv1.norm.running_var"], torch.ones(64))


def test_openseg_training_checkpoint_round_trip(tmp_path, swin_maskformer):
    """openseg's own .pth (with iteration / optimizer entries) loads back exactly."""
    OpenSegCheckpointer(swin_maskformer).load(str(ZOO_PKL))
    saved = snapshot(swin_maskformer)
    torch.save({"model": saved, "iteration": 7}, tmp_path / "model_0000007.pth")
    torch.manual_seed(3)
    fresh = build_model(tiny_swin_maskformer_cfg())
    extra = OpenSegCheckpointer(fresh).load(str(tmp_path / "model_0000007.pth"))
    assert extra == {"iteration": 7, "__author__": "unknown"}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key


# ------------------------------------------------------------------------------ offline conversion
def _convert_tool():
    from script_utils import load_script

    return load_script("tools/convert_checkpoint.py")


def test_convert_tool_round_trip_gives_the_release_file_back(tmp_path, swin_maskformer):
    tool = _convert_tool()
    ours = tmp_path / "openseg.pth"
    back = tmp_path / "release.pkl"
    assert tool.main([str(ZOO_PKL), str(ours)]) == 0
    assert tool.main([str(ours), str(back), "--to", "mask2former"]) == 0
    OpenSegCheckpointer(swin_maskformer).load(str(ours))  # the openseg file loads strictly
    reference = reference_state()
    with open(back, "rb") as f:
        released = pickle.load(f)["model"]
    assert sorted(released) == sorted(reference)
    for key, value in reference.items():
        assert np.array_equal(released[key], value), key
    with pytest.raises(KeyError, match="no conversion from openseg to 'torchvision_resnet'"):
        tool.main([str(ours), str(tmp_path / "x.pkl"), "--to", "torchvision_resnet"])


def test_reference_training_pth_with_extra_objects_loads(tmp_path, swin_maskformer):
    """A .pth of the release's train_net.py: the model under "model" (tensors, release names)
    next to optimizer / scheduler state and plain Python objects that torch's weights-only
    unpickler rejects (here an argparse.Namespace)."""
    import argparse

    path = tmp_path / "model_0004999.pth"
    state = {k: torch.from_numpy(v) for k, v in reference_state().items()}
    torch.save({"model": state, "iteration": 4999, "scheduler": {"last_epoch": 4999},
                "args": argparse.Namespace(num_gpus=8)}, path)
    extra = OpenSegCheckpointer(swin_maskformer).load(str(path))
    assert extra["iteration"] == 4999 and extra["args"].num_gpus == 8
    assert torch.equal(swin_maskformer.state_dict()["transformer_decoder.query_embed.weight"],
                       state["sem_seg_head.predictor.query_embed.weight"])
