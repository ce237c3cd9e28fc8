"""Class text embeddings: prompt-ensemble averaging, caching and bad input."""

import os

import numpy as np
import open_clip
import pytest
import torch

from openseg.modeling.text import (
    ClassEmbeddingCache,
    OpenCLIPTextEncoder,
    class_embeddings,
    encode_vocabulary,
    prompts,
)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "open_clip")
open_clip.add_model_config(CONFIG_DIR)
CONVNEXT = "openseg-test-convnext"


class LookupEncoder:
    """Text encoder with a fixed random unit vector per distinct text; counts texts encoded."""

    def __init__(self, identity="lookup", persistent=True, dim=8):
        self.identity = identity
        self.persistent = persistent
        self.dim = dim
        self.table = {}
        self.calls = 0
        self.generator = np.random.default_rng(0)

    def vector(self, text):
        if text not in self.table:
            v = self.generator.standard_normal(self.dim)
            self.table[text] = v / np.linalg.norm(v)
        return self.table[text]

    def tokenize(self, texts):
        return list(texts)

    def encode_text(self, tokens):
        self.calls += len(tokens)
        return torch.tensor(np.stack([self.vector(t) for t in tokens]), dtype=torch.float32)


def test_embeddings_are_normalised_means_over_synonyms_and_templates():
    encoder = LookupEncoder()
    vocabulary = [["cat", "kitten"], "dog"]
    templates = ["a {}.", "the {} here."]
    result = encode_vocabulary(encoder, vocabulary, templates, batch_size=3)
    expected = []
    for names in [["cat", "kitten"], ["dog"]]:
        mean = np.mean([encoder.vector(t.format(n)) for n in names for t in templates], axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(result.numpy(), np.stack(expected), atol=1e-6)
    assert prompts(vocabulary, templates)[0] == [
        "a cat.", "the cat here.", "a kitten.", "the kitten here.", "a dog.", "the dog here."
    ]


def test_memory_and_disk_cache(tmp_path):
    encoder = LookupEncoder()
    cache = ClassEmbeddingCache(str(tmp_path))
    first = cache.get(encoder, ["cat", "dog"], ["{}"])
    calls = encoder.calls
    again = cache.get(encoder, ["cat", "dog"], ["{}"])
    assert encoder.calls == calls
    torch.testing.assert_close(first, again)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    # a new process (new cache object) reads the file instead of encoding
    fresh = LookupEncoder()
    fresh.table = encoder.table
    from_disk = ClassEmbeddingCache(str(tmp_path)).get(fresh, ["cat", "dog"], ["{}"])
    assert fresh.calls == 0
    torch.testing.assert_close(from_disk, first)

    # another vocabulary, template list or encoder is a different entry
    cache.get(encoder, ["cat", "bird"], ["{}"])
    cache.get(encoder, ["cat", "dog"], ["a {}"])
    cache.get(LookupEncoder(identity="other"), ["cat", "dog"], ["{}"])
    assert len(list(tmp_path.glob("*.pt"))) == 4

    # random-init (non-persistent) encoders never touch the disk
    ClassEmbeddingCache(str(tmp_path)).get(LookupEncoder("random", persistent=False), ["x"], ["{}"])
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_openclip_encoder_matches_open_clip_directly(tmp_path):
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder.from_pretrained(CONVNEXT)
    assert not encoder.persistent
    result = class_embeddings(encoder, [["circle"], ["square", "box"]], ["a photo of a {}."])
    model = encoder.clip_model
    tokenizer = open_clip.get_tokenizer(CONVNEXT)
    with torch.no_grad():
        circle = model.encode_text(tokenizer(["a photo of a circle."]), normalize=True)[0]
        square_box = model.encode_text(
            tokenizer(["a photo of a square.", "a photo of a box."]), normalize=True
        ).mean(0)
    torch.testing.assert_close(result[0], circle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result[1], square_box / square_box.norm(), atol=1e-5, rtol=1e-5)

    # weights loaded from a file give a persistent identity naming the file
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    loaded = OpenCLIPTextEncoder.from_pretrained(CONVNEXT, str(checkpoint))
    assert loaded.persistent and str(checkpoint) in loaded.identity
    torch.testing.assert_close(
        class_embeddings(loaded, [["circle"]], ["a photo of a {}."])[0], circle, atol=1e-5,
        rtol=1e-5,
    )


def test_bad_input_is_rejected_naming_it():
    encoder = LookupEncoder()
    with pytest.raises(ValueError, match="entry 2.*'Cat'.*duplicates entry 0"):
        encode_vocabulary(encoder, ["cat", "dog", "Cat"], ["{}"])
    with pytest.raises(ValueError, match="entry 1"):
        encode_vocabulary(encoder, ["cat", ["dog", " "]], ["{}"])
    with pytest.raises(ValueError, match="empty"):
        encode_vocabulary(encoder, [], ["{}"])
    with pytest.raises(ValueError, match="template 1"):
        encode_vocabulary(encoder, ["cat"], ["{}", "no slot"])
    with pytest.raises(ValueError, match="not-a-clip"):
        OpenCLIPTextEncoder.from_pretrained("not-a-clip")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        OpenCLIPTextEncoder.from_pretrained(CONVNEXT, "/nonexistent/missing.pt")
