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
