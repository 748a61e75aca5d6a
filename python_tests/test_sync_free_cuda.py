"""CUDA: a training step of an encoder and the fp32 margin-softmax head under autocast makes no host
synchronisation (torch.cuda.set_sync_debug_mode("error") turns any into an error). Skipped without CUDA.

What still synchronises, by design, and is documented: check_labels=True (the label range check reads a flag
back), and the counting samplers' active set (RandomNegatives(rate / count), TopKNegatives: its size depends
on the labels, torch.unique). RandomNegatives(size=...) is the sync-free sampler, tested here too.
"""

from __future__ import annotations

import pytest
import torch

import oclear_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.mark.parametrize("sampled", [False, True])
def test_an_amp_training_step_makes_no_host_sync(sampled):
    torch.manual_seed(0)
    device = torch.device("cuda")
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(device)
    negatives = oclear_ext.RandomNegatives(size=5_000, generator=torch.Generator(device=device)) if sampled else None
    head = oclear_ext.nn.MarginSoftmaxLoss(50_000, 64, scale=32.0, margin=(1.0, 0.5, 0.0), check_labels=False,
                                           negatives=negatives).to(device)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3, foreach=True)
    x = torch.randn(256, 64, device=device)
    labels = torch.randint(0, 50_000, (256,), device=device)
    for step in range(3):  # the first step allocates optimizer state; the later ones are the steady state
        debug = "error" if step else "default"
        torch.cuda.set_sync_debug_mode(debug)
        try:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = head(encoder(x), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 5.0, foreach=True)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and head.weight.grad.dtype == torch.float32
