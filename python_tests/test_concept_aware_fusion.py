"""ConceptAwareFusion: documents without text, gradients, batch independence, gate output, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oclear_ext.nn import ConceptAwareFusion


def _batch(b=6, length=9, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, dim, generator=g)
    text = torch.randn(b, length, dim, generator=g)
    mask = torch.rand(b, length, generator=g) < 0.3
    mask[:, 0] = False
    return image, text, mask


def test_documents_without_text_are_the_image_exactly():
    torch.manual_seed(0)
    fusion = ConceptAwareFusion(32, num_concepts=16, num_heads=4)
    image, text, mask = _batch()
    mask[1] = True
    mask[4] = True
    doc, gate = fusion(image, text, mask, return_gate=True)
    expected = F.normalize(image, dim=1)
    assert torch.equal(doc[1], expected[1]) and torch.equal(doc[4], expected[4])
    # Documents with text do move away from the image.
    assert not torch.allclose(doc[0], expected[0])
    assert gate.shape == (6,) and ((gate > 0) & (gate < 1)).all()
    assert torch.allclose(doc.norm(dim=1), torch.ones(6))


def test_gradients_reach_the_memory_and_the_gate():
    torch.manual_seed(1)
    fusion = ConceptAwareFusion(32, num_concepts=16, num_heads=4)
    image, text, mask = _batch(seed=1)
    image.requires_grad_(True)
    text.requires_grad_(True)
    doc = fusion(image, text, mask)
    (doc * torch.randn_like(doc)).sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert fusion.concepts.grad.abs().sum() > 0 and fusion.gate.weight.grad.abs().sum() > 0
    # Padding tokens get no gradient through the image's attention; real tokens do.
    assert text.grad[~mask].abs().sum() > 0


def test_no_text_documents_give_no_gradient_to_the_text_path():
    torch.manual_seed(2)
    fusion = ConceptAwareFusion(32, num_concepts=16, num_heads=4)
    image, text, mask = _batch(seed=2)
    mask[:] = True
    text.requires_grad_(True)
    doc = fusion(image, text, mask)
    doc.sum().backward()
    assert torch.equal(text.grad, torch.zeros_like(text))
    assert torch.equal(fusion.concepts.grad, torch.zeros_like(fusion.concepts))


def test_a_document_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(3)
    fusion = ConceptAwareFusion(32, num_concepts=16, num_heads=4).double()
    image, text, mask = (t.double() if t.is_floating_point() else t for t in _batch(seed=3))
    full = fusion(image, text, mask)
    for i in range(image.shape[0]):
        alone = fusion(image[i : i + 1], text[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(alone[0], full[i], rtol=1e-12, atol=1e-12)
    # Changing another document's text leaves document 0 unchanged.
    text2 = text.clone()
    text2[1:] = torch.randn_like(text2[1:])
    torch.testing.assert_close(fusion(image, text2, mask)[0], full[0], rtol=1e-12, atol=1e-12)


def test_without_mask_and_in_eval_with_dropout():
    torch.manual_seed(4)
    fusion = ConceptAwareFusion(32, num_concepts=8, num_heads=2, dropout=0.5).eval()
    image, text, _ = _batch(seed=4)
    a, b = fusion(image, text), fusion(image, text, torch.zeros(6, 9, dtype=torch.bool))
    torch.testing.assert_close(a, b)


def test_fusion_errors():
    fusion = ConceptAwareFusion(32, num_concepts=8, num_heads=4)
    image, text, mask = _batch()
    with pytest.raises(ValueError, match=r"image_emb must have shape \(B, 32\)"):
        fusion(image[:, :16], text, mask)
    with pytest.raises(ValueError, match=r"text_tokens must have shape \(B, L, 32\) with B = 6"):
        fusion(image, text[:3], mask)
    with pytest.raises(ValueError, match=r"text_padding_mask must be bool of shape \(6, 9\)"):
        fusion(image, text, mask.float())
    with pytest.raises(ValueError, match="num_concepts must be >= 1"):
        ConceptAwareFusion(32, num_concepts=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ConceptAwareFusion(32, dropout=1.0)
