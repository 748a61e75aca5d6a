"""Row-sparse SGD (momentum, weight decay) and AdamW for class-weight matrices.

With negative sampling a step uses a few percent of the C classes, yet a dense optimizer reads and writes
every row of the weight and of its optimizer state: at C = 10^6, D = 512, fp32 that is ~10 GB of memory
traffic per step, as much as the GEMMs. These optimizers update only the rows that carry a gradient.

Which rows: a parameter whose `.grad` is a sparse COO tensor with one sparse dimension (what
`MarginSoftmaxLoss(..., sparse_grad=True)` and `ShardedMarginClassifier(..., sparse_grad=True)` produce
through F.embedding(sparse=True)) is updated on the rows of its indices only; a parameter with a dense
`.grad` (encoders, heads) gets the ordinary dense update, identical to torch.optim.SGD / AdamW. So one
optimizer can hold the whole model, or the class weights can sit in their own optimizer beside a
torch.optim one.

Lazy semantics (documented contract, tested):
- A row that is not active in a step (not sampled) is not touched at all: its parameter does not move in
  that step (as in Partial FC, TensorFlow's LazyAdam and torch.optim.SparseAdam), and neither weight decay
  nor the momentum drift a dense optimizer would apply to a zero-gradient row is applied to it.
- Its optimizer state still decays exactly as in the dense optimizer, lazily: when the row is next touched
  after k skipped steps, its momentum (SGD) is multiplied by mu^k and its moments (AdamW) by beta1^k and
  beta2^k in one operation, before the step's own update ("exact on touch"). The per-row step of the last
  touch is kept in `state["last_step"]`.
- AdamW's bias corrections use the global step count, as the dense optimizer does.
- When every row is active in every step (full softmax, or a dense gradient), the result equals
  torch.optim.SGD(momentum, weight_decay) / torch.optim.AdamW exactly up to floating-point rounding.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable

import torch
from torch import Tensor


def _active_rows(param: Tensor, grad: Tensor, name: str) -> tuple[Tensor | None, Tensor]:
    """(row ids or None for all rows, gradient rows) of a parameter's gradient."""
    if not grad.is_sparse:
        if grad.shape != param.shape:
            raise ValueError(f"{name}: gradient shape {tuple(grad.shape)} differs from the parameter's {tuple(param.shape)}")
        return None, grad
    if grad.sparse_dim() != 1 or param.dim() < 1:
        raise ValueError(f"{name}: sparse gradients must be row-sparse (one sparse dimension, e.g. from "
                         f"F.embedding(sparse=True)), got sparse_dim={grad.sparse_dim()}")
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        # F.embedding(sparse=True) over sorted unique ids (the active set) is coalesced in all but the flag;
        # coalesce() would sort and copy every value row for nothing.
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()  # sums duplicate rows (e.g. accumulated over micro-batches), sorts the ids
        else:
            return rows, grad._values()
    return grad.indices()[0], grad.values()


def _check_hyper(name: str, **values: float) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: {key} must be a finite number >= 0, got {value!r}")


class _RowSparseOptimizer(torch.optim.Optimizer, abc.ABC):
    """Shared bookkeeping: the step counter, the per-row step of the last touch, gather workspaces.

    Abstract: RowSparseSGD and RowSparseAdamW define the state (_init_state) and the update (_update).
    """

    _NAME = "row-sparse optimizer"

    def __init__(self, params: Iterable, defaults: dict) -> None:
        super().__init__(params, defaults)
        self._workspaces: dict[Tensor, dict[int, Tensor]] = {}

    def _begin(self, param: Tensor) -> tuple[dict, int]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["last_step"] = torch.zeros(param.shape[0] if param.dim() else 1, dtype=torch.long, device=param.device)
            self._init_state(param, state)
        state["step"] += 1
        return state, state["step"]

    @abc.abstractmethod
    def _init_state(self, param: Tensor, state: dict) -> None:
        """Creates the optimizer's per-parameter buffers in `state` (first step)."""

    @staticmethod
    def _skipped(state: dict, rows: Tensor | None, step: int) -> Tensor | None:
        """Steps each row missed since its last touch (None: dense update, nothing missed)."""
        if rows is None:
            state["last_step"].fill_(step)
            return None
        skipped = step - 1 - state["last_step"][rows]
        state["last_step"][rows] = step
        return skipped

    @staticmethod
    def _row_factor(base: float, exponent: Tensor, dtype: torch.dtype) -> Tensor:
        """(A, 1) per-row base**exponent, powers taken in float64."""
        powers = torch.pow(torch.tensor(base, dtype=torch.float64, device=exponent.device), exponent.double())
        return powers.to(dtype).unsqueeze(1)

    def _workspace(self, param: Tensor, slot: int, like: Tensor, rows: int) -> Tensor:
        """A (rows, ...) tensor kept per (parameter, slot) and reused across steps.

        Fresh (A, D) tensors every step cost more than the arithmetic here: at A x D = 26k x 512 fp32, each
        new 51 MiB block is page-faulted in at ~2 GB/s. The workspaces (at most the largest active set
        seen, a few per parameter) live outside `state`, so they are never written into checkpoints.
        """
        spaces = self._workspaces.setdefault(param, {})
        space = spaces.get(slot)
        if space is None or space.shape[0] < rows:
            space = spaces[slot] = like.new_empty((rows, *like.shape[1:]))
        return space[:rows]

    def _gather(self, param: Tensor, slot: int, source: Tensor, rows: Tensor) -> Tensor:
        """source[rows], written into workspace `slot` of `param`."""
        return torch.index_select(source, 0, rows, out=self._workspace(param, slot, source, rows.numel()))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, grad = _active_rows(param, param.grad, self._NAME)
                state, step = self._begin(param)
                skipped = self._skipped(state, rows, step)
                self._update(param, grad, rows, skipped, state, step, group)
        return loss

    @abc.abstractmethod
    def _update(self, param, grad, rows, skipped, state, step, group) -> None:
        """Applies one step to `rows` of `param` (all rows when rows is None); skipped: steps each row missed."""


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum and (coupled, L2) weight decay, updating only the rows of a row-sparse gradient.

    Per active row, as torch.optim.SGD (dampening 0, no Nesterov):
        v <- mu^k v            (k = steps the row skipped; exact on touch)
        g <- grad + weight_decay * w
        v <- mu * v + g        (v = g on the first step, as torch)
        w <- w - lr * v
    See the module docstring for the lazy semantics.
    """

    _NAME = "RowSparseSGD"

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        _check_hyper(self._NAME, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if momentum >= 1:
            raise ValueError(f"{self._NAME}: momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _init_state(self, param: Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update(self, param, grad, rows, skipped, state, step, group) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        buf = state["momentum_buffer"]
        if rows is None:  # dense: the same operations as torch.optim.SGD
            d_p = grad.add(param, alpha=wd) if wd else grad
            if mu:
                buf.mul_(mu).add_(d_p)
                d_p = buf
            param.add_(d_p, alpha=-lr)
            return
        if mu:
            # v <- mu^(k+1) v + grad (+ wd w): the k skipped decays and this step's in one per-row factor.
            d_p = self._gather(param, 0, buf, rows).mul_(self._row_factor(mu, skipped + 1, buf.dtype)).add_(grad)
            if wd:
                d_p.add_(self._gather(param, 1, param, rows), alpha=wd)
            buf.index_copy_(0, rows, d_p)
        else:
            d_p = grad.add(self._gather(param, 1, param, rows), alpha=wd) if wd else grad
        param.index_add_(0, rows, d_p, alpha=-lr)  # rows are unique: w[rows] - lr * d_p


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay), updating only the rows of a row-sparse gradient.

    Per active row, as torch.optim.AdamW (no amsgrad), with t the global step:
        m <- beta1^k m,  v <- beta2^k v      (k = steps the row skipped; exact on touch)
        w <- w * (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
        w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    See the module docstring for the lazy semantics.
    """

    _NAME = "RowSparseAdamW"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        _check_hyper(self._NAME, lr=lr, eps=eps, weight_decay=weight_decay)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"{self._NAME}: betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, param: Tensor, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update(self, param, grad, rows, skipped, state, step, group) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if rows is None:
            w, m, v = param, state["exp_avg"], state["exp_avg_sq"]
        else:
            w = self._gather(param, 0, param, rows)
            m = self._gather(param, 1, state["exp_avg"], rows).mul_(self._row_factor(beta1, skipped, param.dtype))
            v = self._gather(param, 2, state["exp_avg_sq"], rows).mul_(self._row_factor(beta2, skipped, param.dtype))
        w.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = v.sqrt() if rows is None else torch.sqrt(v, out=self._workspace(param, 3, v, v.shape[0]))
        w.addcdiv_(m, denom.div_(bias_correction2_sqrt).add_(eps), value=-step_size)
        if rows is not None:
            param.index_copy_(0, rows, w)
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
