"""Recurrent batch normalization (Cooijmans et al. 2016, "Recurrent Batch Normalization"): the
BN-LSTM that the article's RNN claim argues against, as a lab baseline (not part of the library).

Notation: T time steps, B batch, I input features, H hidden features. BN_t(z; gamma, beta) is batch
norm over the batch at time step t, each step with its own statistics. Gate order i, f, g, o as
torch::

    gates = BN_t(W_hh h; gamma_h, 0) + BN_t(W_ih x; gamma_x, 0) + b
    c'    = sig(f) * c + sig(i) * tanh(g)
    h'    = sig(o) * tanh(BN_t(c'; gamma_c, beta_c))

The two gate BNs have no shift (b is the gates' only bias, as in the paper); every gamma starts at
0.1 (the paper's choice, which keeps the gates out of saturation). The carried state is the raw c'.

Statistics, per BN and per step t < ``max_len``:

* training mode: the biased batch variance and mean over the sequences still running at step t
  (variable lengths: a padded batch with ``lengths``; finished sequences keep their last state and
  do not enter the statistics); each step updates its own running mean and unbiased variance
  (``momentum`` as ``torch.nn.BatchNorm1d``). A step where fewer than two sequences are running
  is normalized with its running statistics instead (one sample has no batch variance); a whole
  batch of one sequence raises ValueError as torch's batch norm does.
* eval mode: the running statistics of step ``min(t, steps_trained - 1)``: past the longest
  training length, those of the last trained step (the paper's rule for longer test sequences).

After training, :func:`population_statistics` replaces the running statistics by their average
over a pass of training batches (the paper's population statistics).

Reads top to bottom: one BN at one step -> the layer (its time loop) -> the input BN of all steps
at once -> one cell step -> population statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_NAMES = ("x", "h", "c")  # the three normalized quantities: W_ih x, W_hh h, c'


class BNLSTM(nn.Module):
    r"""One-layer LSTM with recurrent batch normalization and per-time-step statistics.

    Args:
        input_size, hidden_size: as :class:`torch.nn.LSTM`.
        max_len: the number of time steps with their own statistics (the longest training length).
        momentum, eps: as :class:`torch.nn.BatchNorm1d`.
        gamma_init: the initial value of every BN gain (0.1 in the paper).
        h0_noise: in training mode the initial hidden state is drawn from N(0, h0_noise^2) per
            sequence (the authors' sequential-MNIST run used 0.1), zeros in eval mode. With the
            same h0 for every sequence and a constant input prefix (the blank top rows of a digit)
            the batch variance of W_hh h is zero, and batch norm's gradient there is amplified by
            gamma / sqrt(eps) at every such step until it overflows.

    Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias`` (4H), ``gamma_x``,
    ``gamma_h`` (4H), ``gamma_c``, ``beta_c`` (H). Buffers: ``running_mean_{x,h,c}`` and
    ``running_var_{x,h,c}`` (max_len, F), ``steps_trained`` (the longest length seen in training).

    Shape: ``x`` (B, T, I) batch-first, ``lengths`` (B,) integer or None (all T). Returns ``out``
    (B, T, H) (rows past a sequence's end repeat its last h) and ``h_n`` (B, H): each sequence's
    hidden state at its own last step.
    """

    def __init__(self, input_size: int, hidden_size: int, max_len: int, *, momentum: float = 0.1,
                 eps: float = 1e-5, gamma_init: float = 0.1, h0_noise: float = 0.0):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BNLSTM: {name} must be a positive int, got {v!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BNLSTM: momentum must be in [0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"BNLSTM: eps must be > 0, got {eps!r}")
        if not h0_noise >= 0:
            raise ValueError(f"BNLSTM: h0_noise must be >= 0, got {h0_noise!r}")
        self.input_size, self.hidden_size, self.max_len = input_size, hidden_size, max_len
        self.momentum, self.eps, self.gamma_init, self.h0_noise = momentum, eps, gamma_init, h0_noise
        G, H = 4 * hidden_size, hidden_size
        # same names, shapes and creation order as nn.LSTM's first two tensors: a seeded model
        # draws the same recurrent weights as the unnormalized LSTM of the same seed
        self.weight_ih = nn.Parameter(torch.empty(G, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G, H))
        self.bias = nn.Parameter(torch.empty(G))
        self.gamma_x = nn.Parameter(torch.empty(G))
        self.gamma_h = nn.Parameter(torch.empty(G))
        self.gamma_c = nn.Parameter(torch.empty(H))
        self.beta_c = nn.Parameter(torch.empty(H))
        for name, f in zip(BN_NAMES, (G, G, H), strict=True):
            self.register_buffer(f"running_mean_{name}", torch.zeros(max_len, f))
            self.register_buffer(f"running_var_{name}", torch.ones(max_len, f))
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for w in (self.weight_ih, self.weight_hh, self.bias):
                w.uniform_(-bound, bound)
            for g in (self.gamma_x, self.gamma_h, self.gamma_c):
                g.fill_(self.gamma_init)
            self.beta_c.zero_()
            for name in BN_NAMES:
                getattr(self, f"running_mean_{name}").zero_()
                getattr(self, f"running_var_{name}").fill_(1.0)
            self.steps_trained.zero_()

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, max_len={self.max_len}, gamma_init={self.gamma_init}, "
                f"h0_noise={self.h0_noise}")

    # one BN at one step

    def _bn(self, name: str, z: Tensor, t: int, gamma: Tensor, beta: Tensor | None) -> Tensor:
        """BN_t of ``z`` (n, F), the rows of the sequences running at step t: their batch statistics
        in training (updating step t's running statistics; the running ones where n < 2), the
        running statistics of step ``min(t, steps_trained - 1)`` in eval."""
        rm, rv = getattr(self, f"running_mean_{name}"), getattr(self, f"running_var_{name}")
        if self.training:
            batch = z.shape[0] >= 2
            return F.batch_norm(z, rm[t], rv[t], gamma, beta, batch, self.momentum, self.eps)
        s = min(t, max(int(self.steps_trained), 1) - 1)
        return F.batch_norm(z, rm[s], rv[s], gamma, beta, False, self.momentum, self.eps)

    # the layer

    def _check(self, x: Tensor, lengths) -> Tensor | None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"BNLSTM: x must be a (B, T, {self.input_size}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, T, _ = x.shape
        if self.training and B < 2:
            raise ValueError(f"BNLSTM: expected more than 1 value per channel when training (batch statistics), "
                             f"got batch size {B}")
        if self.training and T > self.max_len:
            raise ValueError(f"BNLSTM: a training sequence of {T} steps is longer than max_len={self.max_len}")
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths).cpu()
        if lengths.shape != (B,) or lengths.dtype.is_floating_point or bool((lengths < 1).any() | (lengths > T).any()):
            raise ValueError(f"BNLSTM: lengths must be (B,) = ({B},) integers in [1, {T}], got {lengths!r}")
        return lengths

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lengths = self._check(x, lengths)
        B, T, _ = x.shape
        order = None
        if lengths is not None:  # packed order: the sequences running at step t are the first n_t rows
            lengths, order = torch.sort(lengths, descending=True, stable=True)
            x = x[order.to(x.device)]
        running = [B] * T if lengths is None else [int((lengths > t).sum()) for t in range(T)]
        xw = x @ self.weight_ih.t()  # (B, T, 4H)
        if lengths is None:  # every step has the whole batch: BN_t(W_ih x) of all steps at once
            xw = self._bn_x_all_steps(xw)
        xw = xw.unbind(1)  # T x (B, 4H); unbind: one backward op, not T selects
        h = x.new_zeros(B, self.hidden_size)
        if self.training and self.h0_noise:
            h = h.normal_(0.0, self.h0_noise)
        c = x.new_zeros(B, self.hidden_size)
        outs = []
        for t, n in enumerate(running):
            if n:
                xn = xw[t] if lengths is None else self._bn("x", xw[t][:n], t, self.gamma_x, self.bias)
                h_new, c_new = self._step(xn, h[:n], c[:n], t)
                h = h_new if n == B else torch.cat([h_new, h[n:]])
                c = c_new if n == B else torch.cat([c_new, c[n:]])
            outs.append(h)
        if self.training:
            self.steps_trained.fill_(max(int(self.steps_trained), T if lengths is None else int(lengths[0])))
        out = torch.stack(outs, 1)  # (B, T, H)
        if order is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(B)
            out, h = out[inverse.to(x.device)], h[inverse.to(x.device)]
        return out, h

    def _bn_x_all_steps(self, xw: Tensor) -> Tensor:
        """BN_t(W_ih x; gamma_x, b) for every step t of a batch without finished sequences, ``xw``
        (B, T, 4H): the same statistics as step by step, in one call (steps are separate features)."""
        B, T, G = xw.shape
        if self.training:
            return F.batch_norm(xw.reshape(B, T * G), self.running_mean_x[:T].view(-1),
                                self.running_var_x[:T].view(-1), self.gamma_x.repeat(T), self.bias.repeat(T), True,
                                self.momentum, self.eps).view(B, T, G)
        s = torch.arange(T, device=xw.device).clamp(max=max(int(self.steps_trained), 1) - 1)
        return (xw - self.running_mean_x[s]) * torch.rsqrt(self.running_var_x[s] + self.eps) * self.gamma_x + self.bias

    def _step(self, xn: Tensor, h: Tensor, c: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """One LSTM step of the n running rows: xn (n, 4H) = BN_t(W_ih x_t) (shifted by b, the
        gates' only bias), h and c (n, H)."""
        gates = self._bn("h", h @ self.weight_hh.t(), t, self.gamma_h, None) + xn
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(self._bn("c", c, t, self.gamma_c, self.beta_c)), c


@torch.no_grad()
def population_statistics(model: nn.Module, batches) -> None:
    """Set the running statistics of every :class:`BNLSTM` in ``model`` to their plain average over
    ``batches`` (the paper's population statistics, estimated after training), by calling
    ``model(*batch)`` in training mode without gradients; the exponential averages kept during
    training lag the weights and start from (0, 1), which dominates them in a short run."""
    bns = [m for m in model.modules() if isinstance(m, BNLSTM)]
    momenta, was = [m.momentum for m in bns], model.training
    for m in bns:
        for name in BN_NAMES:
            getattr(m, f"running_mean_{name}").zero_()
            getattr(m, f"running_var_{name}").fill_(1.0)
    model.train()
    try:
        for k, batch in enumerate(batches):
            for m in bns:
                m.momentum = 1.0 / (k + 1)  # the k-th batch's weight in a running mean
            model(*batch)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was)
