"""Mixed precision: an fp32 class weight beside 16-bit embeddings, and torch.autocast, for the margin softmax
(full and sampled) and the hardest-class scoring op, on CPU (and CUDA when present)."""

from __future__ import annotations

import pytest
import torch
from margin_cases import loss_and_grads, make_inputs

import oclear_ext
from oclear_ext import RandomNegatives, TopKNegatives, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARCFACE = (1.0, 0.3, 0.0)


def _max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_embeddings_with_an_fp32_weight_mean_the_weight_rounded_chunk_by_chunk(device, dtype):
    # The mixed-dtype contract: the same loss and embedding gradient as with weight.to(dtype), and the
    # weight's gradient float32: the gradient at the rounded rows (a cast's backward is the identity).
    x64, w64, labels = make_inputs(70, 9000, 24, seed=3, ignore_fraction=0.1)  # several class chunks
    x, w = x64.to(dtype).to(device), w64.float().to(device)
    labels = labels.to(device)
    got = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, margin=ARCFACE, scale=32.0)
    rounded = loss_and_grads(oclear_ext.margin_softmax_loss, x, w.to(dtype), labels, margin=ARCFACE, scale=32.0)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], rounded[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1].float(), rounded[1].float(), rtol=0, atol=0)
    # rounded[2] is the same gradient rounded to 16 bits: equal within that rounding
    torch.testing.assert_close(got[2].to(dtype).float(), rounded[2].float(), rtol=1e-2, atol=1e-6)
    want = loss_and_grads(reference.margin_softmax_loss, x.double().cpu(), w.to(dtype).double().cpu(), labels.cpu(),
                          margin=ARCFACE, scale=32.0)
    assert _max_error(got[2].cpu(), want[2]) <= 1e-4 * want[2].abs().max().item()  # float32 accuracy, not 16-bit


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))

    def forward(self, x):
        return self.net(x)


def amp_step(device: str, dtype: torch.dtype, negatives=None):
    """A user's AMP loop: the encoder under autocast, the fp32 head, backward and an optimizer step."""
    torch.manual_seed(0)
    encoder = Encoder().to(device)
    head = oclear_ext.nn.MarginSoftmaxLoss(3000, 32, scale=32.0, margin=ARCFACE, negatives=negatives).to(device)
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    x = torch.randn(96, 48, device=device)
    labels = torch.randint(0, 3000, (96,), device=device)
    with torch.autocast(device, dtype=dtype):
        embeddings = encoder(x)
        loss = head(embeddings, labels)
    embeddings.retain_grad()
    loss.backward()
    weight_before = head.weight.detach().clone()
    opt.step()
    return embeddings.detach(), head.weight.grad, weight_before, embeddings.grad, loss, labels, head.weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_amp_loop_equals_the_hand_computation_on_the_rounded_inputs(device, dtype):
    e, grad_w, w, grad_e, loss, labels, weight = amp_step(device, dtype)
    assert e.dtype == dtype and loss.dtype == torch.float32
    assert grad_w.dtype == torch.float32 and weight.dtype == torch.float32 and grad_e.dtype == dtype
    # by hand: the float64 reference on the 16-bit embeddings and the weight rounded to 16 bits
    want = loss_and_grads(reference.margin_softmax_loss, e.double().cpu(), w.to(dtype).double().cpu(), labels.cpu(),
                          margin=ARCFACE, scale=32.0)
    plain = loss_and_grads(reference.margin_softmax_loss, e.cpu(), w.to(dtype).cpu(), labels.cpu(),
                           margin=ARCFACE, scale=32.0)
    for name, g, p, ref in zip(("loss", "grad embeddings", "grad weight"), (loss, grad_e, grad_w), plain, want):
        atol = 1e-3 * ref.abs().max().item()
        assert _max_error(g.cpu(), ref) <= 2 * _max_error(p, ref) + atol, name


@pytest.mark.parametrize("negatives", [TopKNegatives(40), RandomNegatives(rate=0.05, generator=None)],
                         ids=["topk", "random"])
def test_the_sampled_path_runs_under_autocast_with_an_fp32_weight(negatives):
    if isinstance(negatives, RandomNegatives):
        negatives = RandomNegatives(rate=0.05, generator=torch.Generator().manual_seed(1))
    e, grad_w, w, grad_e, loss, labels, weight = amp_step("cpu", torch.bfloat16, negatives)
    assert loss.dtype == torch.float32 and grad_w.dtype == torch.float32 and grad_e.dtype == torch.bfloat16
    assert torch.isfinite(loss) and grad_w.abs().sum() > 0


def test_hardest_classes_under_autocast_scores_the_16_bit_embeddings_against_the_rounded_weight():
    torch.manual_seed(0)
    x, w = torch.randn(40, 16), torch.randn(5000, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, ids = oclear_ext.hardest_classes(x, w, 7)
    want_scores, want_ids = oclear_ext.hardest_classes(x.to(torch.bfloat16), w.to(torch.bfloat16), 7)
    torch.testing.assert_close(scores, want_scores)
    torch.testing.assert_close(ids, want_ids)
    ref_scores, ref_ids = reference.hardest_classes(x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double(), 7)
    torch.testing.assert_close(ids, ref_ids)


def test_float64_is_left_alone_and_a_mismatched_16_bit_weight_is_refused():
    x64, w64, labels = make_inputs(8, 30, 6, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = oclear_ext.margin_softmax_loss(x64, w64, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference.margin_softmax_loss(x64, w64, labels))
    with pytest.raises(TypeError, match="weight must have the embeddings' dtype, or be float32 beside 16-bit "
                                        "embeddings, got weight Half and embeddings BFloat16"):
        oclear_ext.margin_softmax_loss(x64.to(torch.bfloat16), w64.half(), labels)
    with pytest.raises(TypeError, match="got weight Float and embeddings Double"):
        oclear_ext.margin_softmax_loss(x64, w64.float(), labels)


def test_opcheck_and_compile_under_autocast():
    x64, w64, labels = make_inputs(12, 50, 8, seed=2, ignore_fraction=0.2)
    x, w = x64.to(torch.bfloat16).requires_grad_(), w64.float().requires_grad_()
    args = (x, w, labels, 0, 50, 16.0, 1.0, 0.3, 0.0, None, -100, False)
    torch.library.opcheck(torch.ops.oclear.margin_softmax_forward.default, args)

    def step(x_, w_, labels_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return oclear_ext.margin_softmax_loss(x_, w_, labels_, scale=16.0, margin=ARCFACE)

    x32 = x64.float()
    eager = loss_and_grads(step, x32, w64.float(), labels)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True), x32, w64.float(), labels)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_class_chunk_and_check_labels_are_arguments_and_a_block_default():
    from oclear_ext._ops.options import current_options

    x, w, labels = make_inputs(9, 700, 6, seed=4)
    base = oclear_ext.margin_softmax_loss(x, w, labels)
    for chunk in (1, 7, 256):  # the result does not depend on the chunking
        torch.testing.assert_close(oclear_ext.margin_softmax_loss(x, w, labels, class_chunk=chunk), base)
    with oclear_ext.margin_softmax_options(class_chunk=5, check_labels=False):
        assert current_options().class_chunk == 5 and not current_options().check_labels
        torch.testing.assert_close(oclear_ext.margin_softmax_loss(x, w, labels), base)
        # unchecked: a label outside [0, C) matches no class (a row without a target), memory-safe
        bad = labels.clone()
        bad[0] = 10**9
        assert torch.isfinite(oclear_ext.margin_softmax_loss(x, w, bad, reduction="none")).all()
        with pytest.raises(IndexError, match=r"labels\[0\] = 1000000000 is out of range"):
            oclear_ext.margin_softmax_loss(x, w, bad, check_labels=True)  # the call's argument wins
    assert current_options().class_chunk is None and current_options().check_labels
    with pytest.raises(IndexError, match=r"labels\[0\] = 1000000000 is out of range"):
        oclear_ext.margin_softmax_loss(x, w, bad)
    with pytest.raises(ValueError, match=r"class_chunk must be a positive int or None \(automatic\), got 0"):
        oclear_ext.margin_softmax_loss(x, w, labels, class_chunk=0)
    with pytest.raises(ValueError, match="margin_softmax_options: class_chunk must be a positive int"):
        with oclear_ext.margin_softmax_options(class_chunk=-3):
            pass
    head = oclear_ext.nn.MarginSoftmaxLoss(700, 6, class_chunk=3, check_labels=False)
    assert head.settings.op_args()[-3:] == (3, False, "auto")
    scores, ids = oclear_ext.hardest_classes(x, w, 4)
    scores_chunked, ids_chunked = oclear_ext.hardest_classes(x, w, 4, class_chunk=3)
    torch.testing.assert_close(scores, scores_chunked)
    torch.testing.assert_close(ids, ids_chunked)
