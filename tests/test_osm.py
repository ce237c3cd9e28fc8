"""OSM meta-architecture on CPU with a tiny random InstructBLIP written in the Hugging Face
layout (projects/osm/tiny_base_model.py): window geometry, input preparation, the training
text and labels of Table 4, one mask per sample with half specific / half agnostic modes,
the loss against a hand-written per-token loop, greedy answers, mask sources (ground truth,
registry proposals, SAM2) and the errors for bad input. Equivalence with the released code:
tests/test_osm_reference.py."""

import itertools
import os
import shutil

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.config import load_config
from openseg.projects.osm import INSTRUCTION_TEMPLATES, load_released_checkpoint
from openseg.projects.osm.omniscient import window_starts
from openseg.projects.osm.tiny_base_model import CLIP_MEAN, CLIP_STD, write_tiny_base_model

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "osm_tiny_test.yaml")
CLASS_NAMES = ["circle", "square", "triangle", "cross", "sky", "grass", "water", "sand"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_base_model(str(tmp_path_factory.mktemp("osm_base")), CLASS_NAMES)


def _cfg(base_dir, *overrides):
    return load_config(CONFIG, ["MODEL.OSM.BASE_MODEL", base_dir, *overrides])


@pytest.fixture(scope="module")
def model(base_dir):
    torch.manual_seed(0)
    return build_model(_cfg(base_dir)).eval()


def _inputs(num_images=2, height=40, width=56, with_instances=True):
    generator = torch.Generator().manual_seed(1)
    batch = []
    for _ in range(num_images):
        masks = torch.zeros(3, height, width, dtype=torch.bool)
        masks[0, 4:20, 6:30] = True
        masks[1, 20:38, 30:54] = True
        masks[2] = ~(masks[0] | masks[1])
        item = {
            "image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8),
            "height": height, "width": width,
        }
        if with_instances:
            instances = Instances((height, width))
            instances.gt_masks = masks
            instances.gt_classes = torch.tensor([0, 1, 4])
            item["instances"] = instances
        batch.append(item)
    return batch


def test_window_starts_follow_the_release_rule():
    assert window_starts(1120, 224, 224) == [0, 224, 448, 672, 896]
    assert window_starts(896, 224, 224) == [0, 224, 448, 672]
    # overlapping windows: the last one is shifted back to end at the border
    assert window_starts(1120, 224, 168) == [0, 168, 336, 504, 672, 840, 896]
    assert window_starts(56, 28, 14) == [0, 14, 28]


def test_paper_defaults(base_dir):
    cfg = load_config(os.path.join(os.path.dirname(CONFIG), "..", "osm", "coco", "osm_final_gt_masks.yaml"))
    assert cfg.MODEL.OSM.INPUT_SIZE == 1120 and cfg.MODEL.OSM.CONTEXT_RATIO == 0.5
    assert (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, cfg.INPUT.IMAGE_SIZE) == (0.5, 1.5, 1120)
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == ("ADAMW", 4e-5, 0.05)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
    ablation = load_config(os.path.join(os.path.dirname(CONFIG), "..", "osm", "coco", "osm_ablation_896_gt_masks.yaml"))
    assert ablation.MODEL.OSM.INPUT_SIZE == 896 and ablation.MODEL.OSM.CONTEXT_RATIO < 0
    assert len(INSTRUCTION_TEMPLATES) == 19
    assert INSTRUCTION_TEMPLATES[0] == "What is in the segmentation mask? Assistant:"  # test template


def test_model_shape_and_trained_parameters(model):
    core = model.model
    assert core.mask_query.shape == core.context_query.shape == (1, 4, 32)  # InstructBLIP's query count
    assert core.context_query is core.base_model.query_tokens
    assert core.window_pos_embed.shape == (1, 4 + 4 * 4, 32)  # 2x2 windows' cls tokens + 4x4 cells
    trained = {n.split(".")[0] if not n.startswith("base_model") else ".".join(n.split(".")[:2])
               for n, p in core.named_parameters() if p.requires_grad}
    assert trained == {"window_pos_embed", "mask_query", "qformer_mode_query", "mode_query",
                       "context_query", "base_model.qformer", "base_model.language_projection"}


def test_prepare_image_and_masks(model):
    image = torch.randint(0, 256, (3, 28, 56), dtype=torch.uint8)
    prepared = model.prepare_image(image)
    assert prepared.shape == (3, 56, 56)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    # longer side already 56: no resize; bottom zero-padded in pixel space, then normalised
    torch.testing.assert_close(prepared[:, :28], (image.float() / 255 - mean) / std)
    torch.testing.assert_close(prepared[:, 28:], ((0 - mean) / std).expand(3, 28, 56))
    masks = torch.zeros(1, 112, 70, dtype=torch.bool)
    masks[0, :56, :35] = True
    prepared_masks = model.prepare_masks(masks)
    # longer side 112 -> 56, shorter 70 -> floor(56 * 70 / 112) = 35, right padding
    assert prepared_masks.shape == (1, 56, 56)
    assert prepared_masks[0, :28, :17].all() and not prepared_masks[0, 28:].any() and not prepared_masks[0, :, 35:].any()


def test_training_text_and_labels(model):
    ids, attention, labels = model.training_text(
        [INSTRUCTION_TEMPLATES[0], INSTRUCTION_TEMPLATES[3]], ["circle", "sky"]
    )
    vocab = model.tokenizer.get_vocab()
    words = ["<s>", "What", "is", "in", "the", "segmentation", "mask", "?", "Assistant", ":", "circle", "</s>"]
    assert ids[0, : len(words)].tolist() == [vocab[w] for w in words]
    assert labels[0, 0] == -100  # bos is never a target
    assert labels[0, 1 : len(words)].tolist() == [vocab[w] for w in words[1:]]  # instruction + answer + eos
    row = ["<s>", "What", "is", "this", "segmentation", "mask", "?", "Assistant", ":", "sky", "</s>"]
    assert attention[1].sum() == len(row) and (labels[1, len(row):] == -100).all()


def test_training_loss_one_mask_per_sample_and_half_agnostic_modes(model, monkeypatch):
    captured = {}
    forward = model.model.forward

    def spy(image_embeds, masks, context, modes, q_ids, q_attention, ids, attention):
        captured.update(masks=masks, modes=modes, ids=ids, attention=attention, q=(q_ids, q_attention))
        return prefix_inputs(image_embeds, masks, context, modes, q_ids, q_attention, ids, attention)

    prefix_inputs = model.model.prefix_inputs
    monkeypatch.setattr(model.model, "prefix_inputs", spy)
    model.train()
    torch.manual_seed(3)
    batch = _inputs(num_images=4)
    try:
        loss = model(batch)["loss_text"]
    finally:
        model.eval()
    assert captured["masks"].shape == (4, 56, 56)  # one mask per image
    assert [model.model.modes[i] for i in captured["modes"].tolist()] == ["coco", "coco", "any", "any"]
    gt = [model.prepare_masks(x["instances"].gt_masks) for x in batch]
    assert all(any(torch.equal(m, g) for g in gts) for m, gts in zip(captured["masks"], gt))
    # hand-written: per-token cross-entropy over the text positions, mean per mode group,
    # then the mean of the two groups (the release's (loss_specific + loss_agnostic) / 2)
    ids, attention = captured["ids"], captured["attention"]
    with torch.no_grad():
        embeds = model.model.encode_image(torch.stack([model.prepare_image(x["image"]) for x in batch]))
        logits = model.model(embeds, captured["masks"], model.context_masks(captured["masks"]), captured["modes"],
                             *captured["q"], ids, attention).logits
    prefix = logits.shape[1] - ids.shape[1]
    groups = {}
    for row in range(4):
        terms = []
        for t in range(1, ids.shape[1]):
            if attention[row, t] and ids[row, t] != model.tokenizer.pad_token_id:
                terms.append(-logits[row, prefix + t - 1].log_softmax(-1)[ids[row, t]])
        groups.setdefault(int(captured["modes"][row]), []).extend(terms)
    expected = sum(torch.stack(v).mean() for v in groups.values()) / len(groups)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    core = model.model
    assert core.mode_query["coco"].grad.abs().sum() > 0 and core.mode_query["any"].grad.abs().sum() > 0
    assert core.base_model.language_model.lm_head.weight.grad is None
    assert core.base_model.vision_model.embeddings.patch_embedding.weight.grad is None
    core.zero_grad(set_to_none=True)


def test_inference_names_every_mask(model):
    batch = _inputs(num_images=1)
    with torch.no_grad():
        output = model(batch)[0]["instances"]
    assert len(output) == 3 and len(output.pred_texts) == 3
    assert output.pred_masks.shape == (3, 40, 56)
    assert torch.equal(output.pred_masks, batch[0]["instances"].gt_masks)
    assert all(isinstance(t, str) for t in output.pred_texts)
    assert ((output.scores >= 0) & (output.scores <= 1)).all()


def test_greedy_answer_is_argmax_continuation(model):
    """The decoded answer equals a cache-free argmax loop over the full sequence."""
    batch = _inputs(num_images=1)
    core = model.model
    with torch.no_grad():
        embeds = core.encode_image(model.prepare_image(batch[0]["image"])[None])
        masks = model.prepare_masks(batch[0]["instances"].gt_masks[:1])
        texts, _ = model.name_masks(embeds, masks)
        prompt = [INSTRUCTION_TEMPLATES[0]]
        q_ids, q_att = model._tokenize(model.qformer_tokenizer, prompt)
        ids, _ = model._tokenize(model.tokenizer, prompt)
        modes = core.mode_indices(["any"], embeds.device)
        generated = []
        for _ in range(model.max_new_tokens):
            logits = core(embeds, masks, model.context_masks(masks), modes, q_ids, q_att, ids).logits
            token = int(logits[0, -1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert texts[0] == model.tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_empty_answer_does_not_crash(model):
    eos = model.tokenizer.eos_token_id
    head = model.model.language_model.lm_head

    def eos_first(module, inputs, output):
        bonus = torch.zeros_like(output)
        bonus[..., eos] = 1e4
        return output + bonus

    handle = head.register_forward_hook(eos_first)
    try:
        with torch.no_grad():
            output = model(_inputs(num_images=1))[0]["instances"]
    finally:
        handle.remove()
    assert output.pred_texts == ["", "", ""]
    assert (output.scores == 0).all()
    texts, confidence = model.decode(torch.tensor([[eos, 5]]), torch.zeros(1, 2, len(model.tokenizer)))
    assert texts == [""] and confidence.tolist() == [0.0]


def test_image_without_masks_is_reported(model):
    with pytest.raises(KeyError, match="TEST.ORACLE.SEGMENTATION"):
        model(_inputs(num_images=1, with_instances=False))


def test_base_model_directory_missing_a_file(base_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    os.remove(broken / "qformer_tokenizer" / "tokenizer_config.json")
    os.remove(broken / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*qformer_tokenizer/tokenizer_config.json"):
        build_model(_cfg(str(broken)))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_model(_cfg(str(tmp_path / "nowhere")))


def _release_format(model, path, perturb=True):
    """The release's format: trained parameters (both names of the shared query tokens)."""
    trained = {id(p) for p in model.model.parameters() if p.requires_grad}
    state = {k: v.detach() + (0.1 if perturb else 0.0)
             for k, v in model.model.state_dict(keep_vars=True).items() if id(v) in trained}
    torch.save({"epoch": 9, "model_state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return state


def test_released_checkpoint_loads_through_config(base_dir, model, tmp_path):
    path = tmp_path / "osm_final.pt"
    expected = _release_format(model, path)
    loaded = build_model(_cfg(base_dir, "MODEL.OSM.CHECKPOINT", str(path)))
    own = loaded.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(own[key], value, msg=key)


def test_checkpoint_of_another_base_model_is_rejected(base_dir, model, tmp_path):
    other_dir = write_tiny_base_model(str(tmp_path / "other"), CLASS_NAMES, num_query_tokens=6)
    other = build_model(_cfg(other_dir))
    path = tmp_path / "other.pt"
    _release_format(other, path)
    with pytest.raises(ValueError, match="another base model.*mask_query"):
        load_released_checkpoint(model.model, str(path))
    partial = tmp_path / "partial.pt"
    state = _release_format(model, partial, perturb=False)
    del state["mode_query.any"]
    torch.save({"model_state_dict": state}, partial)
    with pytest.raises(KeyError, match="mode_query.any"):
        load_released_checkpoint(model.model, str(partial))


def test_unknown_mode_is_reported(base_dir):
    with pytest.raises(ValueError, match="DATASET_MODES"):
        build_model(_cfg(base_dir, "MODEL.OSM.DATASET_MODES", "['openseg_demo_train:nope']"))
    with pytest.raises(KeyError, match="no mode query"):
        build_model(_cfg(base_dir, "MODEL.OSM.TEST_MODE", "nope"))


def test_proposals_from_a_registered_class_agnostic_model(base_dir, tmp_path):
    """MASK_SOURCE 'proposals' names the top-k masks of a class-agnostic MaskFormer."""
    from detectron2.checkpoint import DetectionCheckpointer

    proposal_config = os.path.join(os.path.dirname(CONFIG), "maskformer_R18_class_agnostic.yaml")
    torch.manual_seed(0)
    proposal = build_model(load_config(proposal_config)).eval()
    DetectionCheckpointer(proposal, save_dir=str(tmp_path)).save("proposal")
    osm = build_model(_cfg(
        base_dir, "MODEL.OSM.MASK_SOURCE", "proposals", "MODEL.OSM.PROPOSAL_CONFIG", proposal_config,
        "MODEL.OSM.PROPOSAL_WEIGHTS", str(tmp_path / "proposal.pth"), "MODEL.OSM.PROPOSAL_TOPK", "3",
    )).eval()
    batch = _inputs(num_images=1, height=64, width=64, with_instances=False)
    with torch.no_grad():
        expected = proposal(batch)[0]["instances"]
        named = osm(batch)[0]["instances"]
    top = expected.scores.argsort(descending=True)[:3]
    assert len(named) == 3 and len(named.pred_texts) == 3
    assert torch.equal(named.pred_masks, expected.pred_masks[top].bool())


def test_sam2_automatic_masks_with_random_weights(base_dir):
    """MASK_SOURCE 'sam2': SAM2's automatic mask generator (random tiny Hiera) gives the masks,
    largest first; OSM names each of them."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    overrides = [
        "MODEL.OSM.MASK_SOURCE", "sam2", "MODEL.OSM.SAM2.CONFIG", "configs/sam2.1/sam2.1_hiera_t.yaml",
        "MODEL.OSM.SAM2.IMAGE_SIZE", "128", "MODEL.OSM.SAM2.POINTS_PER_SIDE", "4",
        "MODEL.OSM.SAM2.PRED_IOU_THRESH", "0.0", "MODEL.OSM.SAM2.STABILITY_SCORE_THRESH", "0.0",
        "MODEL.OSM.SAM2.MIN_MASK_REGION_AREA", "0",
    ]
    torch.manual_seed(0)
    osm = build_model(_cfg(base_dir, *overrides)).eval()
    batch = _inputs(num_images=1, height=64, width=64, with_instances=False)
    with torch.no_grad():
        named = osm(batch)[0]["instances"]
        generator = SAM2AutomaticMaskGenerator(osm.mask_generator.sam2, **osm.mask_generator.settings)
        generator.predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]
        found = generator.generate(batch[0]["image"].permute(1, 2, 0).numpy())
    assert len(found) > 0 and len(named) == len(found) and len(named.pred_texts) == len(found)
    areas = named.pred_masks.flatten(1).sum(1)
    assert (areas[:-1] >= areas[1:]).all()
    assert sorted(areas.tolist(), reverse=True) == sorted((m["area"] for m in found), reverse=True)


def test_mixture_sampler_follows_ratios():
    from openseg.projects.osm.data import MixtureTrainingSampler

    sampler = MixtureTrainingSampler([3, 100, 10], [1.0, 1.0, 2.0], seed=0)
    indices = list(itertools.islice(iter(sampler), 8000))
    shares = [sum(lo <= i < hi for i in indices) / len(indices) for lo, hi in ((0, 3), (3, 103), (103, 113))]
    assert all(abs(s - e) < 0.03 for s, e in zip(shares, (0.25, 0.25, 0.5)))
    assert set(i for i in indices if i < 3) == {0, 1, 2}
    assert indices == list(itertools.islice(iter(MixtureTrainingSampler([3, 100, 10], [1.0, 1.0, 2.0], seed=0)), 8000))
    with pytest.raises(ValueError, match="ratios"):
        MixtureTrainingSampler([3, 4], [1.0])


def test_mixture_loader_tags_records_with_their_dataset(base_dir):
    from openseg.projects.osm.data import build_mixture_train_loader

    cfg = _cfg(base_dir, "DATASETS.TRAIN", "('openseg_demo_train', 'openseg_demo_val')",
               "MODEL.OSM.DATASET_RATIOS", "[1.0, 3.0]", "MODEL.OSM.DATASET_MAPPERS", "['panoptic_osm', 'panoptic']",
               "SOLVER.IMS_PER_BATCH", "8")
    batch = next(iter(build_mixture_train_loader(cfg)))
    names = [x["dataset_name"] for x in batch]
    assert len(batch) == 8 and set(names) <= {"openseg_demo_train", "openseg_demo_val"}
    lsj = [tuple(x["image"].shape[-2:]) for x in batch if x["dataset_name"] == "openseg_demo_train"]
    assert all(hw == (56, 56) for hw in lsj)  # the OSM mapper's fixed crop of INPUT.IMAGE_SIZE
    with pytest.raises(ValueError, match="DATASET_RATIOS"):
        build_mixture_train_loader(_cfg(base_dir, "MODEL.OSM.DATASET_RATIOS", "[1.0, 2.0]"))


def test_opal_contrastive_loss_hand_computed():
    """Two masks of one description 'a', one of 'b'; temperature 0.5; unit vectors."""
    import math

    from openseg.projects.osm.opal import contrastive_alignment_loss

    masks = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # normalised: e1, e2, e1
    texts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # e1 ('a'), e2 ('b')
    targets = torch.tensor([0, 1, 0])
    # logits = cos / 0.5: rows [2, 0], [0, 2], [2, 0]
    e2, e0 = math.exp(2), 1.0
    mask_to_text = -(math.log(e2 / (e2 + e0)) * 3) / 3
    # text 'a': softmax over masks of column [2, 0, 2] -> positives masks 0 and 2
    text_a = -math.log((e2 + e2) / (e2 + e0 + e2))
    # text 'b': column [0, 2, 0] -> positive mask 1
    text_b = -math.log(e2 / (e0 + e2 + e0))
    expected = (mask_to_text + (text_a + text_b) / 2) / 2
    loss = contrastive_alignment_loss(masks, texts, targets, temperature=0.5)
    assert abs(loss.item() - expected) < 1e-6


def test_opal_two_passes_lora_and_gradients_on_both_sides(base_dir, monkeypatch):
    torch.manual_seed(0)
    osm = build_model(_cfg(base_dir, "MODEL.OSM.OPAL.ENABLED", "True", "MODEL.OSM.OPAL.LORA_DROPOUT", "0.0"))
    llm = osm.model.language_model
    trained_llm = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trained_llm and all("lora_" in n for n in trained_llm)
    calls = []
    llm.register_forward_pre_hook(lambda m, args, kwargs: calls.append(sorted(k for k in kwargs if kwargs[k] is not None)),
                                  with_kwargs=True)
    captured = {}
    text_embeddings = osm.opal.text_embeddings

    def spy(names):
        captured["names"] = names
        captured["text"] = text_embeddings(names)
        captured["text"].retain_grad()
        return captured["text"]

    monkeypatch.setattr(osm.opal, "text_embeddings", spy)
    osm.train()
    losses = osm(_inputs(num_images=2))
    assert set(losses) == {"loss_text", "loss_opal"}
    # pass 1: image + mask prefix as embeddings; pass 2: the description tokens alone
    assert calls[0] == ["attention_mask", "inputs_embeds"] and "input_ids" in calls[1]
    sum(losses.values()).backward()
    assert captured["text"].grad.abs().sum() > 0  # the text side is not detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in llm.named_parameters() if "lora_B" in n)
    assert osm.model.base_model.language_projection.weight.grad.abs().sum() > 0  # the mask side
    # the text embedding is the last layer's hidden state at the description's last token
    with torch.no_grad():
        ids = torch.tensor([osm.tokenizer(captured["names"][0])["input_ids"]])
        hidden = llm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(captured["text"][0].detach(), hidden)
