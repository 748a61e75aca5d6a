"""Concept attention op conventions (docs/design.md#op-conventions): opcheck, torch.compile, error messages."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_attention_inputs

import oclear_ext
from oclear_ext.nn import ConceptAttention

FORWARD = torch.ops.oclear.concept_attention_forward.default
BACKWARD = torch.ops.oclear.concept_attention_backward.default
FORWARD_PACKET = torch.ops.oclear.concept_attention_forward  # what dynamo's graphs call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_forward(dtype, broadcast, masked):
    q, k, v, mask = make_attention_inputs(3, 2, 5, 9, 16, broadcast=broadcast, pad_fraction=0.3 if masked else 0.0,
                                          empty_rows=int(masked), dtype=dtype, seed=1)
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), mask, 0.3)
    torch.library.opcheck(FORWARD, args)
    torch.library.opcheck(FORWARD, (*args, "auto"))  # the backend argument, given


def test_opcheck_backward():
    q, k, v, mask = make_attention_inputs(2, 2, 4, 6, 8, broadcast=True, pad_fraction=0.3, seed=2)
    out, lse = FORWARD(q, k, v, mask, 0.35)
    g = torch.randn_like(out)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        torch.library.opcheck(BACKWARD, (g, q, k, v, mask, out, lse, 0.35, *need))
    torch.library.opcheck(BACKWARD, (g, q, k, v, mask, out, lse, 0.35, True, True, True, "auto"))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    model = ConceptAttention(32, 4).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    memory = torch.randn(1, 7, 32, dtype=torch.float64)
    mask = torch.zeros(3, 7, dtype=torch.bool)

    def fn(x_, m_):
        return torch.tanh(model(x_, m_, m_, mask)).sum(-1) * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    xe, me = x.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    xc, mc = x.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    eager, comp = fn(xe, me), compiled(xc, mc)
    torch.testing.assert_close(comp, eager)
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(mc.grad, me.grad)


def _inputs():
    return torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, r"concept_attention: q, k and v must have the same number of heads"),
        (lambda q, k, v: (q, k[..., :6], v[..., :6]), ValueError, r"must have q's head_dim \(dim 3\) = 8"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"k and v must have the same number of keys"),
        (lambda q, k, v: (q, torch.randn(3, 3, 5, 8), torch.randn(3, 3, 5, 8)), ValueError, r"batch size 2 or batch size 1"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must be a 4-D tensor"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"q, k and v must have the same dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"q must be float32, float64, bfloat16 or float16"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"q, k and v must be on one device"),
    ],
)
def test_bad_tensors_raise(mutate, error, match):
    q, k, v = mutate(*_inputs())
    with pytest.raises(error, match=match):
        oclear_ext.concept_attention(q, k, v, scale=0.5)


def test_head_dim_over_256_raises():
    q = torch.randn(1, 1, 2, 257)
    with pytest.raises(ValueError, match=r"head_dim \(q.size\(3\)\) must be in \[1, 256\], got q of shape \[1, 1, 2, 257\]"):
        oclear_ext.concept_attention(q, q, q)


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.zeros(2, 4, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(batch, keys\) = \(2, 5\), got \[2, 4\]"),
        (torch.zeros(5, dtype=torch.bool), ValueError, r"key_padding_mask must have shape"),
        (torch.zeros(2, 5), TypeError, r"key_padding_mask must be bool \(True = padding\), got Float"),
        (torch.zeros(2, 5, dtype=torch.bool, device="meta"), ValueError, r"key_padding_mask must be on q's device"),
        ([[False] * 5] * 2, TypeError, r"key_padding_mask must be a bool Tensor or None"),
    ],
)
def test_bad_masks_raise(mask, error, match):
    with pytest.raises(error, match=match):
        oclear_ext.concept_attention(*_inputs(), mask, scale=0.5)


@pytest.mark.parametrize("scale, error, match", [(float("nan"), ValueError, "scale must be a finite number, got nan"),
                                                 (float("inf"), ValueError, "scale must be a finite number"),
                                                 ("0.1", TypeError, "scale must be a real number or None")])
def test_bad_scale_raises(scale, error, match):
    with pytest.raises(error, match=match):
        oclear_ext.concept_attention(*_inputs(), scale=scale)


def test_not_a_tensor_raises():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="concept_attention: k must be a Tensor, got list"):
        oclear_ext.concept_attention(q, [1.0], v)


def test_module_errors():
    with pytest.raises(ValueError, match=r"dim \(30\) must be a positive multiple of num_heads \(4\)"):
        ConceptAttention(30, 4)
    with pytest.raises(ValueError, match="head_dim = dim / num_heads must be <= 256, got 512"):
        ConceptAttention(512, 1)
    with pytest.raises(ValueError, match="query, key and value must be 3-D"):
        ConceptAttention(8, 2)(torch.randn(2, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))


# The kernel-family switch (backend=): an op argument, with a context manager for the default.
TENSOR_CORE_ON_CPU = r"backend='tensor_core' selects CUDA kernels, but q is on cpu \(CPU tensors take backend='auto'\)"


@pytest.mark.parametrize("call", [
    lambda q, k, v: oclear_ext.concept_attention(q, k, v, backend="fastest"),
    lambda q, k, v: FORWARD(q, k, v, None, 0.5, "fastest"),
    lambda q, k, v: oclear_ext.concept_attention_backend("fastest").__enter__(),
    lambda q, k, v: oclear_ext.concept_attention(q, k, v, backend=3),
])
def test_unknown_backend_raises(call):
    with pytest.raises(ValueError, match=r"concept_attention: backend must be one of 'auto', 'cuda_core', 'tensor_core', got"):
        call(*_inputs())


@pytest.mark.parametrize("backend", ["cuda_core", "tensor_core"])
def test_cuda_backends_on_cpu_tensors_raise(backend):
    q, k, v = _inputs()
    match = TENSOR_CORE_ON_CPU.replace("tensor_core", backend, 1)
    with pytest.raises(ValueError, match=match):
        oclear_ext.concept_attention(q, k, v, backend=backend)
    with pytest.raises(ValueError, match=match):  # the op itself (torch.ops callers skip the wrapper)
        FORWARD(q, k, v, None, 0.5, backend)
    out, lse = FORWARD(q, k, v, None, 0.5)
    with pytest.raises(ValueError, match=match):
        BACKWARD(torch.ones_like(out), q, k, v, None, out, lse, 0.5, True, True, True, backend)


def test_backend_context_sets_the_default_and_restores_it():
    q, k, v = _inputs()
    want = oclear_ext.concept_attention(q, k, v)
    with oclear_ext.concept_attention_backend("tensor_core"):
        with pytest.raises(ValueError, match=TENSOR_CORE_ON_CPU):  # the default reached the op
            oclear_ext.concept_attention(q, k, v)
        with pytest.raises(ValueError, match=TENSOR_CORE_ON_CPU):  # and the modules built on it
            ConceptAttention(8, 2)(torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
        # An explicit argument wins over the block's default.
        torch.testing.assert_close(oclear_ext.concept_attention(q, k, v, backend="auto"), want, rtol=0, atol=0)
        with oclear_ext.concept_attention_backend("auto"):  # nested
            torch.testing.assert_close(oclear_ext.concept_attention(q, k, v), want, rtol=0, atol=0)
        with pytest.raises(ValueError, match=TENSOR_CORE_ON_CPU):
            oclear_ext.concept_attention(q, k, v)
    torch.testing.assert_close(oclear_ext.concept_attention(q, k, v), want, rtol=0, atol=0)
    with pytest.raises(KeyError):
        with oclear_ext.concept_attention_backend("cuda_core"):
            raise KeyError("inside")
    torch.testing.assert_close(oclear_ext.concept_attention(q, k, v), want, rtol=0, atol=0)  # restored


class _RecordBackends(torch.utils._python_dispatch.TorchDispatchMode):
    """The backend argument each concept-attention op receives."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (FORWARD, BACKWARD):
            schema_args = func._schema.arguments
            given = dict(zip((a.name for a in schema_args), args), **kwargs)
            self.seen.append((func.__name__.split(".")[0], given.get("backend", "auto")))
        return func(*args, **kwargs)


def test_the_backward_runs_the_forwards_backend():
    q, k, v = (t.requires_grad_(True) for t in _inputs())
    with _RecordBackends() as rec:
        oclear_ext.concept_attention(q, k, v, backend="auto").sum().backward()
    assert rec.seen == [("concept_attention_forward", "auto"), ("concept_attention_backward", "auto")]


def test_torch_compile_sees_the_backend_and_recompiles_when_it_changes():
    q, k, v = _inputs()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([n.args for n in gm.graph.nodes if n.target in (FORWARD, FORWARD_PACKET)])
        return gm.forward

    compiled = torch.compile(lambda a, b, c: oclear_ext.concept_attention(a, b, c) * 2, backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), oclear_ext.concept_attention(q, k, v) * 2)
    assert len(graphs) == 1 and graphs[0][0][-1] == "auto"  # the choice is an argument in the graph
    # Under another default the guard fails and the function is traced again: the fake kernel sees the new
    # backend (and, on CPU tensors, raises its error at trace time) instead of the old graph running "auto".
    with oclear_ext.concept_attention_backend("tensor_core"):
        with pytest.raises(Exception, match=TENSOR_CORE_ON_CPU):
            compiled(q, k, v)


def test_backend_context_inside_a_compiled_region():
    q, k, v = _inputs()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([n.args[-1] for n in gm.graph.nodes if n.target in (FORWARD, FORWARD_PACKET)])
        return gm.forward

    def fn(a, b, c):
        with oclear_ext.concept_attention_backend("auto"):
            inner = oclear_ext.concept_attention(a, b, c)
        return inner + oclear_ext.concept_attention(a, b, c, backend="auto")

    out = torch.compile(fn, backend=capture, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, 2 * oclear_ext.concept_attention(q, k, v))
    assert graphs == [["auto", "auto"]]
