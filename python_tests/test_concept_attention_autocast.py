"""concept_attention under torch.autocast: q, k, v in the autocast dtype (as scaled_dot_product_attention),
lse float32, the output in the autocast dtype, each input's gradient in its own dtype; an AMP training loop
of ConceptAwareFusion within the project's low-precision rule (docs/design.md#tests); opcheck and
torch.compile(fullgraph=True) under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attention_cases import make_attention_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import oclear_ext
import oclear_ext.nn.concept_attention as attention_module
from oclear_ext import reference
from oclear_ext.nn import ConceptAttention, ConceptAwareFusion

FORWARD = torch.ops.oclear.concept_attention_forward.default
LOW = [torch.bfloat16, torch.float16]


class _RecordForward(TorchDispatchMode):
    """The dtypes of q, k, v and of (out, lse) at each call of the forward op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is FORWARD:
            self.calls.append((tuple(a.dtype for a in args[:3]), tuple(r.dtype for r in result)))
        return result


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("broadcast", [False, True])
def test_autocast_equals_the_cast_by_hand(dtype, broadcast):
    q, k, v, mask = make_attention_inputs(3, 2, 9, 21, 32, broadcast=broadcast, pad_fraction=0.3, empty_rows=1,
                                          dtype=torch.float32, seed=4)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with torch.autocast("cpu", dtype=dtype), _RecordForward() as rec:
        out = oclear_ext.concept_attention(*leaves, mask)
    assert out.dtype == dtype
    assert rec.calls == [((dtype,) * 3, (dtype, torch.float32))]  # the kernel ran in dtype, lse stays float32
    out.backward(grad_out.to(dtype))
    # By hand: the same op on the rounded inputs, its gradients cast back (what autograd of the cast does).
    by_hand = [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v)]
    want = oclear_ext.concept_attention(*by_hand, mask)
    want.backward(grad_out.to(dtype))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for name, got, expected in zip("qkv", leaves, by_hand):
        assert got.grad.dtype == torch.float32, name  # each input's gradient in its own dtype
        torch.testing.assert_close(got.grad, expected.grad.float(), rtol=0, atol=0, msg=lambda m: f"d{name}: {m}")


def test_autocast_rules():
    q, k, v, _ = make_attention_inputs(2, 2, 3, 5, 16, dtype=torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The op itself (torch.ops callers skip the Python wrapper) follows the rule too.
        out, lse = FORWARD(q, k, v, None, 0.25)
        assert (out.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
        # Mixed 16-bit inputs all become the autocast dtype (the kernels need one dtype).
        assert oclear_ext.concept_attention(q.half(), k, v.half()).dtype == torch.bfloat16
        # float64 is left alone, as autocast leaves it.
        assert oclear_ext.concept_attention(q.double(), k.double(), v.double()).dtype == torch.float64
        with torch.autocast("cpu", enabled=False):
            assert oclear_ext.concept_attention(q, k, v).dtype == torch.float32
    # Autocast for another device type does not touch CPU tensors.
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert oclear_ext.concept_attention(q, k, v).dtype == torch.float32


def _fusion_batch(b=16, length=12, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, dim, generator=g)
    text = torch.randn(b, length, dim, generator=g)
    mask = torch.rand(b, length, generator=g) < 0.3
    mask[:, 0] = False
    mask[3] = True  # a document without text
    target = F.normalize(torch.randn(b, dim, generator=g), dim=1)
    return image, text, mask, target


def _by_module(model, tensors):
    """{module name: its own parameters' tensors (from `tensors`, by parameter name), flattened and joined}.
    One vector per module: the max error of a one-element tensor (a bias of one gate logit) is a single
    rounding, no measure of an implementation's error. The key projections' biases are left out: softmax
    is invariant to adding q . b_k to every score of a row, so their gradient is zero in exact arithmetic
    and what either implementation returns is rounding noise."""
    groups = {}
    for module_name, module in model.named_modules():
        names = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if not n.endswith("k_proj.bias")]
        if names:
            groups[module_name or "concepts"] = torch.cat([tensors[n].detach().double().flatten() for n in names])
    return groups


def _train(model, batches, autocast_dtype, steps=4, lr=0.5):
    """`steps` SGD steps of a cosine loss. Per step: what the image reads from its text (the two attentions'
    result, c), the document embeddings and each module's gradients; then each module's final parameters.
    float16 trains with a GradScaler, as AMP in float16 must (gradients of 1e-7 are below its normal range);
    a fixed scale (2^14, no growth, no overflow here) so that every run takes every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10**6,
                                  enabled=autocast_dtype == torch.float16)
    record = []
    for step in range(steps):
        image, text, mask, target = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            c = model.read_text(image, text, mask)
            doc, _ = model.mix(image, c)
            loss = (1 - (doc.float() * target).sum(1)).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = _by_module(model, {n: p.grad for n, p in model.named_parameters()})
        record.append({"c": c.detach().double(), "doc": doc.detach().double(),
                       **{"grad " + n: g for n, g in grads.items()}})
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == (2.0**14 if scaler.is_enabled() else 1.0), "a step was skipped"
    record.append(_by_module(model, dict(model.named_parameters())))
    return record


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("dtype", LOW)
def test_amp_training_loop_within_twice_plain_pytorch_error(dtype, monkeypatch):
    # The loop under autocast with the fused op, against the same loop in float64 (the exact reference) on
    # the rounded inputs and initial weights (autocast rounds them first), and plain PyTorch's own error: the
    # same AMP loop with the plain-PyTorch attention. Rule: ours <= 2 x plain + atol, per step, for the
    # attentions' result c, the documents and each module's gradients, and for the final parameters; atol
    # is one rounding to `dtype` of the quantity's largest value (unit roundoff x max |exact|).
    torch.manual_seed(0)
    model = ConceptAwareFusion(64, num_concepts=32, num_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
    batches = [tuple(t.to(dtype).float() if t.is_floating_point() else t for t in _fusion_batch(seed=s)) for s in (1, 2)]
    ours = _train(copy.deepcopy(model), batches, dtype)
    exact_batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    monkeypatch.setattr(attention_module, "concept_attention", reference.concept_attention)
    exact = _train(copy.deepcopy(model).double(), exact_batches, None)
    plain = _train(copy.deepcopy(model), batches, dtype)
    report, worst = [], 0.0
    for step, (o_step, p_step, e_step) in enumerate(zip(ours, plain, exact)):
        for name, e in e_step.items():
            err_ours, err_plain = _max_err(o_step[name], e), _max_err(p_step[name], e)
            atol = torch.finfo(dtype).eps / 2 * e.abs().max().item()
            report.append(f"{'final' if step == len(exact) - 1 else f'step {step}'} {name}: ours {err_ours:.3g} "
                          f"plain {err_plain:.3g} (max |exact| {e.abs().max():.3g})")
            assert err_ours <= 2 * err_plain + atol, report[-1]
            worst = max(worst, (err_ours - atol) / err_plain)
    print("\n".join(report) + f"\nworst (ours - atol) / plain: {worst:.3g}")  # pytest -s shows the measured errors


def test_amp_module_gradients_keep_their_dtypes():
    torch.manual_seed(1)
    attn = ConceptAttention(32, 4)
    x = torch.randn(3, 5, 32, requires_grad=True)
    memory = torch.randn(1, 7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordForward() as rec:
        y = attn(x, memory, memory)
    assert y.dtype == torch.bfloat16
    assert rec.calls == [((torch.bfloat16,) * 3, (torch.bfloat16, torch.float32))]
    y.float().sum().backward()
    assert x.grad.dtype == memory.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in attn.parameters())


@pytest.mark.parametrize("dtype", LOW)
def test_opcheck_under_autocast(dtype):
    q, k, v, mask = make_attention_inputs(3, 2, 5, 9, 16, broadcast=True, pad_fraction=0.3, empty_rows=1,
                                          dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=dtype):
        # float32 inputs (the autocast kernel casts them) and inputs already in the autocast dtype.
        for cast in (torch.float32, dtype):
            args = tuple(t.to(cast).requires_grad_(True) for t in (q, k, v))
            torch.library.opcheck(FORWARD, (*args, mask, 0.3))


@pytest.mark.parametrize("autocast_inside", [False, True])
def test_torch_compile_fullgraph_under_autocast(autocast_inside):
    torch.manual_seed(2)
    model = ConceptAttention(32, 4)
    x = torch.randn(3, 5, 32)
    memory = torch.randn(1, 7, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 3:] = True

    def step(x_, m_):
        if autocast_inside:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x_, m_, m_, mask)
        return model(x_, m_, m_, mask)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xl, ml = x.clone().requires_grad_(True), memory.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not autocast_inside):
            out = fn(xl, ml)
        out.float().square().sum().backward()
        results.append((out, xl.grad, ml.grad))
    (eager, dx_e, dm_e), (comp, dx_c, dm_c) = results
    assert comp.dtype == eager.dtype == torch.bfloat16
    assert dx_c.dtype == dm_c.dtype == torch.float32
    # Inductor may fuse the bf16 projections differently: bf16-level agreement.
    torch.testing.assert_close(comp.float(), eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_c, dx_e, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(dm_c, dm_e, rtol=5e-2, atol=5e-2)
