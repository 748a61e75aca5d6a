"""OclearModel: shapes, normalisation, the query path never reads text, mixed batches, encoders."""

from __future__ import annotations

import pytest
import torch

from oclear_ext.models import HashingTokenizer, ModelConfig, OclearModel

TEXTS = ["grinning face", None, "red apple with a leaf", ""]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return OclearModel(ModelConfig(dim=32, num_concepts=8, num_heads=4)).eval()


def test_embeddings_are_normalised_and_shaped(model):
    images = torch.rand(4, 3, 32, 32)
    q, d = model.embed_queries(images), model.embed_docs(images, TEXTS)
    assert q.shape == d.shape == (4, 32)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(d.norm(dim=1), torch.ones(4))


def test_query_path_never_touches_text(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the query path called the text encoder")

    monkeypatch.setattr(model.text_encoder, "forward", refuse)
    model.embed_queries(torch.rand(2, 3, 32, 32))
    model(torch.rand(2, 3, 32, 32), [None, None], torch.tensor([True, True]))


def test_mixed_batch_equals_the_two_paths(model):
    images = torch.rand(4, 3, 32, 32)
    is_query = torch.tensor([True, False, True, False])
    mixed = model(images, TEXTS, is_query)
    torch.testing.assert_close(mixed[is_query], model.embed_queries(images[is_query]))
    torch.testing.assert_close(mixed[~is_query], model.embed_docs(images[~is_query], [TEXTS[1], TEXTS[3]]))


def test_docs_without_text_equal_the_image_only_doc_path(model):
    images = torch.rand(2, 3, 32, 32)
    v = model.doc_head(model.encoder(images))
    torch.testing.assert_close(model.embed_docs(images, [None, ""]), torch.nn.functional.normalize(v, dim=1))


def test_image_only_model_has_no_text_parts():
    m = OclearModel(ModelConfig(dim=16, num_heads=2, fusion=False))
    assert m.text_encoder is None and m.fusion is None
    assert m.embed_docs(torch.rand(2, 3, 32, 32), ["a", "b"]).shape == (2, 16)


def test_tokenizer_is_stable_and_pads():
    tok = HashingTokenizer(buckets=100, max_tokens=3)
    ids, pad = tok(["Red apple, GREEN pear!", None])
    assert ids.shape == (2, 3) and pad[1].all() and not pad[0].any()
    assert ids[0, 0].item() == tok(["red"])[0][0, 0].item()  # case-insensitive, deterministic (CRC-32)
    assert ((ids[0] >= 1) & (ids[0] <= 100)).all()


@pytest.mark.parametrize("kw, match", [(dict(dim=30, num_heads=4), "divisible by num_heads"),
                                       (dict(dim=0), "dim must be a positive int"),
                                       (dict(image_encoder="resnet"), "unknown image encoder 'resnet'")])
def test_bad_model_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        OclearModel(ModelConfig(**kw))


def test_mismatched_texts_are_rejected(model):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.embed_docs(torch.rand(2, 3, 32, 32), ["a"])


def test_frozen_pretrained_encoder_caches_features_by_content(monkeypatch):
    from oclear_ext.models.pretrained import EfficientNetLite0

    encoder = EfficientNetLite0(input_size=40)  # an input size no other test uses: the cache is shared
    calls = []
    compute = encoder._compute
    monkeypatch.setattr(encoder, "_compute", lambda x: calls.append(x.shape[0]) or compute(x))
    images = torch.rand(3, 3, 16, 16)
    first = encoder(images)
    assert first.shape == (3, 1280) and not first.requires_grad
    again = encoder(torch.cat([images[1:], torch.rand(1, 3, 16, 16)]))  # two cached, one new
    assert calls == [3, 1]
    torch.testing.assert_close(again[:2], first[1:], rtol=0, atol=0)
    encoder.train()
    assert not encoder.net.training and not any(p.requires_grad for p in encoder.parameters())


def test_cache_without_freeze_is_rejected():
    from oclear_ext.models.pretrained import EfficientNetLite0

    with pytest.raises(ValueError, match="cache=True needs freeze=True"):
        EfficientNetLite0(freeze=False, cache=True)


def test_text_dropout_and_text_embeddings_of_a_training_batch(model):
    images = torch.rand(4, 3, 32, 32)
    is_query = torch.tensor([False, False, True, False])
    texts = ["grinning face", "red apple", "query text is never read", None]
    keep = torch.tensor([True, False, True, True])
    out, text_emb, has_text = model(images, texts, is_query, text_keep=keep, return_text=True)
    assert has_text.tolist() == [True, True, False, False]  # docs with text, kept or dropped
    torch.testing.assert_close(text_emb[has_text].norm(dim=1), torch.ones(2))
    assert (text_emb[~has_text] == 0).all()
    # A dropped text leaves exactly the image-only doc; a kept one is the fused doc.
    torch.testing.assert_close(out[1], model.embed_docs(images[1:2], [None])[0])
    torch.testing.assert_close(out[0], model.embed_docs(images[0:1], texts[0:1])[0])


def test_minilm_text_encoder_pads_textless_docs_caches_and_stays_out_of_the_checkpoint(monkeypatch):
    from oclear_ext.models.minilm import MiniLMTextEncoder

    encoder = MiniLMTextEncoder(dim=16, max_tokens=8)
    tokens, padding = encoder(["a grinning cat face with tears of joy and more words", None, "", "red apple"])
    assert tokens.shape == (4, 8, 16) and padding.shape == (4, 8)
    assert padding[1].all() and padding[2].all()
    assert not padding[0].any()  # cut to max_tokens word pieces, [CLS] and [SEP] included
    assert (~padding[3]).sum().item() == 4  # [CLS] red apple [SEP]
    assert set(encoder.state_dict()) == {"project.weight", "project.bias", "norm.weight", "norm.bias"}
    assert sum(p.numel() for p in encoder.parameters()) == 384 * 16 + 16 + 2 * 16

    def refuse(*args, **kwargs):
        raise AssertionError("a cached text ran through MiniLM again")

    monkeypatch.setattr(encoder, "_run", refuse)
    again, _ = encoder(["red apple"])
    torch.testing.assert_close(again[0, :4], tokens[3, :4])
    with pytest.raises(ValueError, match="cache=True needs freeze=True"):
        MiniLMTextEncoder(dim=16, freeze=False, cache=True)


def test_minilm_model_docs_without_text_equal_the_image_path():
    torch.manual_seed(0)
    m = OclearModel(ModelConfig(dim=32, num_concepts=8, num_heads=4, text_encoder="minilm")).eval()
    images = torch.rand(2, 3, 32, 32)
    v = torch.nn.functional.normalize(m.doc_head(m.encoder(images)), dim=1)
    torch.testing.assert_close(m.embed_docs(images, [None, ""]), v)
    assert m.embed_docs(images, ["grinning face", "red apple"]).shape == (2, 32)


def test_feature_cache_evicts_the_least_recently_used_beyond_its_bound():
    from oclear_ext.models.feature_cache import FeatureCache

    cache = FeatureCache(max_bytes=3 * 16)  # three 4-float entries
    for key in "abc":
        cache.put(key, torch.full((4,), float(ord(key))))
    cache.get("a")  # a is now the most recently used
    cache.put("d", torch.zeros(4))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert len(cache) == 3 and cache.bytes == 48
    cache.put("big", torch.zeros(16))  # larger than the bound: nothing stays
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        FeatureCache(max_bytes=-1)


def test_feature_cache_fetch_computes_each_missing_key_once():
    from oclear_ext.models.feature_cache import FeatureCache

    cache = FeatureCache()
    cache.put("a", torch.zeros(2))
    asked = []

    def compute(positions):
        asked.append(positions)
        return torch.stack([torch.full((2,), float(p)) for p in positions])  # rows of one batch

    got = cache.fetch(["b", "a", "c", "b"], compute)
    assert asked == [[0, 2]]  # b and c, at their first positions; a was cached
    assert [g.tolist() for g in got] == [[0.0, 0.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    assert got[0].untyped_storage().nbytes() == 8  # its own storage, not a view of the batch
    assert cache.fetch(["c"], compute)[0].tolist() == [2.0, 2.0] and len(asked) == 1


def test_encoders_return_features_that_outgrow_their_cache(monkeypatch):
    from oclear_ext.models.feature_cache import FeatureCache
    from oclear_ext.models.minilm import MiniLMTextEncoder

    encoder = MiniLMTextEncoder(dim=8)
    monkeypatch.setattr(MiniLMTextEncoder, "_shared_cache", FeatureCache(max_bytes=1))  # holds nothing
    tokens, padding = encoder(["red apple", "green pear", "red apple"])
    torch.testing.assert_close(tokens[0], tokens[2])
    assert not padding[:, :4].any() and len(MiniLMTextEncoder._shared_cache) == 0
