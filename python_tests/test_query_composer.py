"""Composed queries: QueryComposer, OclearModel.embed_queries(images, modifiers) and the weighting signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oclear_ext.models import ModelConfig, OclearModel
from oclear_ext.nn import QueryComposer
from oclear_ext.nn.query_composer import weight_loss, weight_targets

DIM = 32


def _model(mode: str = "adaptive", **overrides) -> OclearModel:
    torch.manual_seed(0)
    return OclearModel(ModelConfig(dim=DIM, num_heads=4, num_concepts=8, composed_queries=True,
                                   query_composition=mode, **overrides)).eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_queries_without_modifiers_are_the_image_only_path_exactly():
    model, images = _model(), _images()
    with torch.no_grad():
        plain = F.normalize(model.query_head(model.encoder(images)), dim=1)
        assert torch.equal(model.embed_queries(images), plain)
        assert torch.equal(model.embed_queries(images, [None] * 4), plain)
        mixed = model.embed_queries(images, [None, "medium-dark skin tone", None, "woman"])
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(mixed[[1, 3]], plain[[1, 3]])
    assert torch.allclose(mixed.norm(dim=1), torch.ones(4))


def test_a_modifier_without_words_is_the_image_only_query():
    model, images = _model(), _images(2)
    with torch.no_grad():
        assert torch.equal(model.embed_queries(images, ["!!", "--"]), model.embed_queries(images))


def test_image_only_model_is_unchanged_by_the_composed_option():
    torch.manual_seed(0)
    plain = OclearModel(ModelConfig(dim=DIM, num_heads=4, num_concepts=8)).eval()
    composed = _model()
    missing, unexpected = composed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("composer.") for k in missing)
    with torch.no_grad():
        assert torch.equal(composed.embed_queries(_images()), plain.embed_queries(_images()))


@pytest.mark.parametrize("mode", ["adaptive", "sum", "text", "image"])
def test_each_mode_computes_its_formula(mode):
    torch.manual_seed(0)
    composer = QueryComposer(DIM, num_heads=4, mode=mode)
    torch.nn.init.normal_(composer.weight.weight, std=0.3)  # alpha away from its initial 1/2
    v = torch.randn(3, DIM)
    tokens, padding = torch.randn(3, 5, DIM), torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    q, parts = composer(v, tokens, padding, return_parts=True)
    i = F.normalize(v, dim=1)
    keep = (~padding).float().unsqueeze(2)
    p = F.normalize(composer.pool_projection((tokens * keep).sum(1) / keep.sum(1)), dim=1)
    if mode == "image":
        expected = i
    elif mode == "text":
        expected = p
    elif mode == "sum":
        expected = F.normalize(i + p, dim=1)
    else:
        c = composer.image_to_modifier(v.unsqueeze(1), tokens, tokens, padding).squeeze(1)
        t = F.normalize(i + p + F.normalize(composer.read_projection(c), dim=1), dim=1)
        alpha = torch.sigmoid(composer.weight(torch.cat([i, t, i * t], 1))).squeeze(1)
        assert torch.allclose(parts["alpha"], alpha)
        assert not torch.allclose(alpha, torch.full_like(alpha, 0.5))
        expected = F.normalize(alpha[:, None] * i + (1 - alpha[:, None]) * t, dim=1)
    assert torch.allclose(q, expected, atol=1e-6)


def test_adaptive_weight_starts_at_one_half_and_trains():
    model, images = _model(), _images()
    model.train()
    out, parts = model(images, [None] * 4, torch.ones(4, dtype=torch.bool), modifiers=["woman", None, "man", "light skin tone"],
                       return_query_parts=True)
    assert parts["rows"].tolist() == [0, 2, 3]
    assert torch.allclose(parts["alpha"], torch.full((3,), 0.5))
    loss = out[parts["rows"]].sum() + weight_loss(parts["alpha"], torch.tensor([0.9, 0.1, 0.5]))
    loss.backward()
    for name in ("weight.weight", "read_projection.weight", "image_to_modifier.q_proj.weight"):
        grad = dict(model.composer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_forward_without_modifiers_returns_no_query_parts():
    model = _model()
    out, parts = model(_images(), [None] * 4, torch.ones(4, dtype=torch.bool), return_query_parts=True)
    assert parts is None and out.shape == (4, DIM)


def test_weight_targets_favour_the_part_with_the_lower_loss():
    target = weight_targets(torch.tensor([0.5, 3.0, 1.0]), torch.tensor([2.5, 1.0, 1.0]), temperature=1.0)
    assert target[0] > 0.85 and target[1] < 0.15 and target[2] == 0.5
    assert torch.allclose(weight_targets(torch.tensor([0.0]), torch.tensor([2.0]), temperature=2.0),
                          torch.sigmoid(torch.tensor([1.0])))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="query_composition"):
        ModelConfig(composed_queries=True, query_composition="concat")
    with pytest.raises(ValueError, match="composed_queries=True"):
        OclearModel(ModelConfig(dim=DIM, num_heads=4, num_concepts=8)).embed_queries(_images(1), ["woman"])
    with pytest.raises(ValueError, match="2 query images but 1 modifiers"):
        _model().embed_queries(_images(2), ["woman"])
    with pytest.raises(ValueError, match="padding must be bool"):
        QueryComposer(DIM)(torch.randn(2, DIM), torch.randn(2, 3, DIM), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        weight_targets(torch.zeros(2), torch.zeros(2), temperature=0.0)
