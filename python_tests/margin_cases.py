"""Helpers shared by the margin-softmax tests: input builders and a fused-vs-reference runner."""

from __future__ import annotations

import torch

import oclear_ext
from oclear_ext import reference

COSFACE = (1.0, 0.0, 0.4)
ARCFACE = (1.0, 0.5, 0.0)
SPHEREFACE = (1.7, 0.0, 0.0)
COMBINED = (1.2, 0.3, 0.15)
MARGINS = (COSFACE, ARCFACE, SPHEREFACE, COMBINED, (1.0, 0.0, 0.0))


def make_inputs(n, c, d, *, dtype=torch.float64, seed=0, ignore_fraction=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    if ignore_fraction > 0:
        labels[torch.rand(n, generator=g) < ignore_fraction] = ignore_index
    return x, w, labels


def loss_and_grads(fn, x, w, labels, **kwargs):
    """(loss, dL/dx, dL/dw) of fn; for reduction='none' the upstream gradient is a fixed ramp."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w, labels, **kwargs)
    if loss.dim() == 0:
        upstream = torch.ones((), dtype=loss.dtype)
    else:
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, w.grad


def fused_and_reference(x, w, labels, **kwargs):
    return (
        loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, **kwargs),
        loss_and_grads(reference.margin_softmax_loss, x, w, labels, **kwargs),
    )


def assert_close_all(got, want, rtol, atol):
    """atol: one number, or a triple (loss, grad embeddings, grad weight)."""
    atols = atol if isinstance(atol, tuple) else (atol,) * 3
    for name, a, b, tol in zip(("loss", "grad embeddings", "grad weight"), got, want, atols):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=tol, msg=lambda m: f"{name}: {m}")


def natural_atols(x, w, scale, eps):
    """Absolute tolerances on (loss, dL/dx, dL/dw): relative rounding `eps` of each quantity's natural size.

    |dL/dz| <= 2 per row, dz/dx^ ~ s, and normalisation divides by |x| (|w|); dW sums over the N rows.
    Exact zeros (one class, D = 1) come out as rounding noise of that size, not as 0.
    """
    n = max(x.shape[0], 1)
    x_inv = 1.0 / x.double().norm(dim=1).min().clamp_min(1e-12).item() if x.numel() else 1.0
    w_inv = 1.0 / w.double().norm(dim=1).min().clamp_min(1e-12).item()
    return (eps * scale, eps * scale * x_inv, eps * scale * n * w_inv)


def check_compile_matches_eager(device: torch.device | str) -> None:
    """torch.compile(fullgraph=True) of a function around the loss gives the eager loss and gradients."""
    x, w, labels = make_inputs(16, 40, 8, dtype=torch.float32, seed=5, ignore_fraction=0.2)
    x, w, labels = x.to(device), w.to(device), labels.to(device)

    def loss_fn(x_, w_, labels_):
        return oclear_ext.margin_softmax_loss(torch.tanh(x_), w_, labels_, margin=ARCFACE, scale=32.0) * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    eager_loss = loss_fn(xe, we, labels)
    compiled_loss = compiled(xc, wc, labels)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(wc.grad, we.grad)
