"""Layer-normalized recurrent layers with the ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` API.

Notation: T time steps, B batch, I input features, H hidden features, L layers, D directions
(2 if bidirectional), N = sum of batch sizes over time (T*B for a padded batch). LN(z; g, b) is
layer norm over the trailing dim of each sample (biased variance, eps inside the sqrt).

Equations (Ba, Kiros & Hinton 2016; defaults; gate order and weight names as torch):

* LSTM (eq. 20-22), over the fused 4H vector with gates (i, f, g, o)::

      gates = LN(W_hh h; ln_hh) + LN(W_ih x; ln_ih) + b_ih + b_hh
      c'    = sig(f) * c + sig(i) * tanh(g)
      h'    = sig(o) * tanh(LN(c'; ln_cell))

  The un-normalized c' is carried; ``cell_state="normalized"`` carries LN(c') instead (the variant
  of TF-Addons' LayerNormLSTMCell and PyTorch's ``benchmarks/fastrnns/custom_lstms.py``). With
  ``proj_size`` P > 0 (torch's LSTM with projections) ``h' = W_hr (sig(o) * tanh(LN(c')))`` has P
  features, and W_hh is (4H, P).
* GRU (eq. 26-28), gates (r, z, n). Four LNs: over the 2H (r, z) block and over the H (n) block,
  separately for the input and the recurrent projections (so ``ln_ih_weight`` has 3H entries,
  normalized in two groups [2H | H])::

      r, z = sig(LN(W_ih x)_rz + LN(W_hh h)_rz + b_ih_rz + b_hh_rz)
      n    = tanh(LN(W_ih x)_n + b_ih_n + r * (LN(W_hh h)_n + b_hh_n))
      h'   = (1 - z) * n + z * h

  The reset gate multiplies the normalized recurrent candidate. The update follows torch's
  convention (z keeps the old state); the paper writes it with z and 1 - z swapped, which is the
  same model with the sign of z's pre-activation flipped.
* RNN (eq. 4): ``h' = act(LN(W_ih x + W_hh h; ln) + b_ih + b_hh)``, act tanh or relu.

With ``layer_norm=False`` there are no LN parameters and each layer computes exactly what torch's
layer computes, so a torch ``state_dict`` loads strictly. With ``layer_norm=True`` the torch
parameter names are unchanged and ``load_state_dict(torch_layer.state_dict(), strict=False)``
loads the torch weights, leaving the LN parameters at their identity initialisation.

Zoneout (Krueger et al. 2017): with probability ``zoneout`` each unit of h (``zoneout_cell``: of
c) keeps its previous value during training; in eval mode the update is the expectation
``p * old + (1 - p) * new``.

Reads top to bottom: option checks -> pure-torch steps -> one direction of one layer over a packed
batch -> the cells -> the layers. The fused paths (on the CPU: Numba kernels and hand-written
backward through time, :mod:`lnorm.ops.rnn_fused`) are reached through :mod:`lnorm.ops.rnn`; the
pure-torch path here runs anywhere (CUDA, no Numba, ``torch.export``) and is the spec the fused
paths are tested against.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lnorm import functional as LF
from lnorm import validation as V
from lnorm.ops import backend
from lnorm.ops.guards import is_tracing, static_size
from lnorm.ops.rnn import RecurrentWeights, fused_applies, fused_recurrence

# ------------------------------------------------------------------------------------ checks

_MODES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL_STATES = ("raw", "normalized")


def _option_repr(m) -> str:
    """The ``extra_repr`` tail shared by cells and layers: options that differ from the defaults."""
    s = ""
    if m.mode in ("RNN_TANH", "RNN_RELU"):
        s += f", nonlinearity={'tanh' if m.mode == 'RNN_TANH' else 'relu'!r}"
    if not m.layer_norm:
        s += ", layer_norm=False"
    if m.cell_state != "raw":
        s += f", cell_state={m.cell_state!r}"
    if m.zoneout:
        s += f", zoneout={m.zoneout}"
    if m.zoneout_cell:
        s += f", zoneout_cell={m.zoneout_cell}"
    return s


def _refuse_trace(name: str) -> None:
    """A trace of the layers' Python time loop would be fixed to the traced length and batch
    (and packing), and silently wrong for any other input: refuse, and say what works."""
    how = (
        "the legacy ONNX exporter (torch.onnx.export(..., dynamo=False)) traces the model with "
        "torch.jit.trace" if torch.onnx.is_in_onnx_export() else "torch.jit.trace"
    )
    raise RuntimeError(
        f"{name} cannot be traced: {how}, which would fix its time loop to the traced input's "
        f"length and batch size and give wrong results for any other. Export with "
        f"torch.export.export(model, args) or torch.onnx.export(model, args, dynamo=True), or "
        f"loop over its cells, which trace correctly."
    )


# ----------------------------------------------------------------------------- pure-torch steps


def _ln(z: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    # lnorm's own layer norm: torch's kernel below 4M elements, the faster Numba one above (the
    # hoisted input part of a whole sequence, e.g. 3200 x 2048, is above).
    return LF.layer_norm(z, (static_size(z.shape[-1]),), w, b, eps)


def _ln_groups(z: Tensor, w: Tensor, b: Tensor, eps: float, split: int) -> Tensor:
    # GRU: LN over [:split] (r, z) and over [split:] (n) separately
    return torch.cat(
        [_ln(z[..., :split], w[:split], b[:split], eps), _ln(z[..., split:], w[split:], b[split:], eps)],
        dim=-1,
    )


class _Params:
    """The tensors of one direction of one layer (or of a cell); None where absent."""

    __slots__ = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w",
                 "ln_c_b")

    def __init__(self, module: nn.Module, sfx: str, layer_norm: bool, mode: str):
        g = lambda n: getattr(module, n + sfx, None)  # noqa: E731
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh")
        self.w_hr = g("weight_hr")  # the LSTM's projection (proj_size > 0), else None
        if layer_norm and mode in ("LSTM", "GRU"):
            self.ln_ih_w, self.ln_ih_b = g("ln_ih_weight"), g("ln_ih_bias")
            self.ln_hh_w, self.ln_hh_b = g("ln_hh_weight"), g("ln_hh_bias")
        elif layer_norm:  # RNN: one LN over the sum
            self.ln_ih_w, self.ln_ih_b = g("ln_weight"), g("ln_bias")
            self.ln_hh_w = self.ln_hh_b = None
        else:
            self.ln_ih_w = self.ln_ih_b = self.ln_hh_w = self.ln_hh_b = None
        if layer_norm and mode == "LSTM":
            self.ln_c_w, self.ln_c_b = g("ln_cell_weight"), g("ln_cell_bias")
        else:
            self.ln_c_w = self.ln_c_b = None


class _Options:
    __slots__ = ("mode", "layer_norm", "eps", "normalized_cell", "zoneout", "zoneout_cell", "training")

    def __init__(self, mode, layer_norm, eps, cell_state, zoneout, zoneout_cell, training):
        self.mode = mode
        self.layer_norm = layer_norm
        self.eps = eps
        self.normalized_cell = cell_state == "normalized"
        self.zoneout = zoneout
        self.zoneout_cell = zoneout_cell
        self.training = training


def _input_projection(x: Tensor, p: _Params, opt: _Options) -> Tensor:
    """Everything of the gates that does not depend on h, for all rows at once: (N, G*H)."""
    H = p.w_hh.shape[1]
    gx = F.linear(x, p.w_ih)
    if opt.mode == "LSTM":
        if opt.layer_norm:
            gx = _ln(gx, p.ln_ih_w, p.ln_ih_b, opt.eps)
        if p.b_ih is not None:
            gx = gx + (p.b_ih + p.b_hh)
    elif opt.mode == "GRU":
        if opt.layer_norm:
            gx = _ln_groups(gx, p.ln_ih_w, p.ln_ih_b, opt.eps, 2 * H)
        if p.b_ih is not None:
            gx = gx + torch.cat([p.b_ih[: 2 * H] + p.b_hh[: 2 * H], p.b_ih[2 * H :]])
    return gx  # RNN: the LN is over W_ih x + W_hh h, so only the matmul is hoisted


def _recurrent_part(h: Tensor, p: _Params, opt: _Options) -> Tensor:
    """W_hh h with its layer norm for the LSTM and GRU, (B, G*H); the RNN's LN is over the sum."""
    gh = F.linear(h, p.w_hh)
    if opt.layer_norm and opt.mode == "LSTM":
        gh = _ln(gh, p.ln_hh_w, p.ln_hh_b, opt.eps)
    elif opt.layer_norm and opt.mode == "GRU":
        gh = _ln_groups(gh, p.ln_hh_w, p.ln_hh_b, opt.eps, 2 * h.shape[-1])
    return gh


def gate_preactivations(rnn: nn.Module, x: Tensor, h_prev: Tensor, layer: int = 0,
                        reverse: bool = False) -> Tensor:
    """What the gates of one layer of ``rnn`` (lnorm's or torch's LSTM / GRU) receive before their
    nonlinearities, for inputs ``x`` (*, I) and previous hidden states ``h_prev`` (*, H): the input
    and recurrent parts with their layer norms and biases, (*, G*H) in the gate order (the GRU's n
    block: the recurrent part before the reset gate multiplies it). For statistics such as gate
    saturation; the layer's own forward is what training runs.
    """
    mode = getattr(rnn, "mode", None)
    if mode not in ("LSTM", "GRU"):
        raise ValueError(f"rnn must be an LSTM or GRU layer, got {type(rnn).__name__}")
    layer_norm = getattr(rnn, "layer_norm", False)
    p = _Params(rnn, f"_l{layer}" + ("_reverse" if reverse else ""), layer_norm, mode)
    opt = _Options(mode, layer_norm, getattr(rnn, "eps", 1e-5), "raw", 0.0, 0.0, False)
    return _input_projection(x, p, opt) + _recurrent_part(h_prev, p, opt)


def _zoneout(new: Tensor, old: Tensor, p: float, training: bool) -> Tensor:
    if p == 0.0:
        return new
    if training:
        keep = torch.rand_like(new) < p
        return torch.where(keep, old, new)
    return torch.lerp(new, old, p)  # expectation: p * old + (1 - p) * new


def _step(gx: Tensor, h: Tensor, c: Tensor | None, p: _Params, opt: _Options):
    """One time step from the hoisted input part ``gx`` (B, G*H) and the state (B, H)."""
    H = h.shape[-1]
    gh = _recurrent_part(h, p, opt)
    if opt.mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = _ln(c_new, p.ln_c_w, p.ln_c_b, opt.eps) if opt.layer_norm else c_new
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        if p.w_hr is not None:
            h_new = F.linear(h_new, p.w_hr)
        if opt.normalized_cell:
            c_new = c_out
        c_new = _zoneout(c_new, c, opt.zoneout_cell, opt.training)
    elif opt.mode == "GRU":
        ghn = gh[..., 2 * H :]
        if p.b_hh is not None:
            ghn = ghn + p.b_hh[2 * H :]
        rz = torch.sigmoid(gx[..., : 2 * H] + gh[..., : 2 * H])
        r, z = rz[..., :H], rz[..., H:]
        n = torch.tanh(gx[..., 2 * H :] + r * ghn)
        h_new = (1 - z) * n + z * h
        c_new = None
    else:
        pre = gx + gh
        if opt.layer_norm:
            pre = _ln(pre, p.ln_ih_w, p.ln_ih_b, opt.eps)
        if p.b_ih is not None:
            pre = pre + (p.b_ih + p.b_hh)
        h_new = torch.tanh(pre) if opt.mode == "RNN_TANH" else torch.relu(pre)
        c_new = None
    h_new = _zoneout(h_new, h, opt.zoneout, opt.training)
    return h_new, c_new


def _direction_torch(gx, batch_sizes, h0, c0, p: _Params, opt: _Options, reverse: bool):
    """One direction of one layer over a packed batch, in pure torch.

    gx: (N, G*H) the hoisted input part of N time-major packed rows (batch_sizes[t] rows for step t, sorted by length, longest
    first); h0, c0: (B, H). Returns the packed output (N, H) and the final h, c (B, H): at step t
    only the first batch_sizes[t] rows of the state advance, so each sequence stops at its own
    length (forward) or starts at its own length from h0 (reverse).
    """
    offsets = [0]
    for bs in batch_sizes:
        offsets.append(offsets[-1] + bs)
    T = len(batch_sizes)
    B = h0.shape[0]
    h, c = h0, c0
    outs = [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        bs = batch_sizes[t]
        g_t = gx[offsets[t] : offsets[t + 1]]
        if bs == B:
            h, c = _step(g_t, h, c, p, opt)
            outs[t] = h
        else:
            h_new, c_new = _step(g_t, h[:bs], c[:bs] if c is not None else None, p, opt)
            outs[t] = h_new
            h = torch.cat([h_new, h[bs:]])
            c = torch.cat([c_new, c[bs:]]) if c is not None else None
    out = torch.cat(outs) if T > 0 else gx.new_zeros(0, h0.shape[1])
    return out, h, c


def _kernel_weights(p: _Params, opt: _Options) -> RecurrentWeights | None:
    """The fused kernels' record of this direction, or None where they do not cover the options."""
    if opt.mode not in ("LSTM", "GRU") or not opt.layer_norm or opt.normalized_cell \
            or opt.zoneout or opt.zoneout_cell or p.w_hr is not None:  # no kernel projects h
        return None
    return RecurrentWeights(opt.mode, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.ln_ih_w, p.ln_ih_b,
                            p.ln_hh_w, p.ln_hh_b, p.ln_c_w, p.ln_c_b, opt.eps)


def _direction(x, batch_sizes, h0, c0, p: _Params, opt: _Options, reverse: bool):
    """One direction of one layer over packed rows x (N, I): on a fused path where one applies,
    else the input part for all steps at once, then the recurrence in pure torch."""
    weights = _kernel_weights(p, opt)
    if weights is not None and fused_applies(x, weights):
        return fused_recurrence(x, batch_sizes, h0, c0, weights, reverse)
    gx = _input_projection(x, p, opt)
    return _direction_torch(gx, batch_sizes, h0, c0, p, opt, reverse)


# ----------------------------------------------------------------------------- parameters


def _register(module: nn.Module, mode: str, input_size: int, hidden_size: int, bias: bool,
              layer_norm: bool, sfx: str, factory_kwargs: dict, proj_size: int = 0) -> None:
    G = _MODES[mode]
    H = hidden_size
    e = lambda *shape: nn.Parameter(torch.empty(*shape, **factory_kwargs))  # noqa: E731
    module.register_parameter("weight_ih" + sfx, e(G * H, input_size))
    module.register_parameter("weight_hh" + sfx, e(G * H, proj_size or H))
    module.register_parameter("bias_ih" + sfx, e(G * H) if bias else None)
    module.register_parameter("bias_hh" + sfx, e(G * H) if bias else None)
    if proj_size:
        module.register_parameter("weight_hr" + sfx, e(proj_size, H))
    if not layer_norm:
        return
    if mode in ("LSTM", "GRU"):
        for part in ("ih", "hh"):
            module.register_parameter(f"ln_{part}_weight{sfx}", e(G * H))
            module.register_parameter(f"ln_{part}_bias{sfx}", e(G * H))
        if mode == "LSTM":
            module.register_parameter("ln_cell_weight" + sfx, e(H))
            module.register_parameter("ln_cell_bias" + sfx, e(H))
    else:
        module.register_parameter("ln_weight" + sfx, e(H))
        module.register_parameter("ln_bias" + sfx, e(H))


def _reset(module: nn.Module, hidden_size: int) -> None:
    # torch's init for the torch parameters; LN gain 1 and bias 0 (the paper's default)
    stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0
    with torch.no_grad():
        for name, w in module.named_parameters(recurse=False):
            if name.startswith("ln_"):
                (w.fill_(1.0) if "_weight" in name else w.zero_())
            else:
                w.uniform_(-stdv, stdv)


def _set_common_options(module: nn.Module, mode: str, input_size, hidden_size, bias, layer_norm, eps,
                        cell_state, zoneout, zoneout_cell) -> None:
    """Check and set the options cells and layers share."""
    module.mode = mode
    module.input_size = V.check_int(input_size, "input_size")
    module.hidden_size = V.check_int(hidden_size, "hidden_size")
    module.bias = V.check_bool(bias, "bias")
    V.check_bool(layer_norm, "layer_norm")
    eps = V.check_eps(eps)
    V.check_choice(cell_state, "cell_state", _CELL_STATES)
    if mode != "LSTM" and cell_state != "raw":
        raise ValueError(f"cell_state={cell_state!r} applies to LSTM only")
    zoneout = V.check_probability(zoneout, "zoneout")
    zoneout_cell = V.check_probability(zoneout_cell, "zoneout_cell")
    if mode != "LSTM" and zoneout_cell != 0.0:
        raise ValueError(f"zoneout_cell={zoneout_cell!r} applies to LSTM only (it has no cell state)")
    module.eps, module.zoneout, module.zoneout_cell = eps, zoneout, zoneout_cell
    module.layer_norm, module.cell_state = layer_norm, cell_state


def _split_hx(name: str, hx, is_lstm: bool) -> tuple[Tensor, Tensor | None]:
    """The initial state argument as (h, c): a pair (h_0, c_0) for the LSTM, one tensor otherwise."""
    if is_lstm and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
    h, c = hx if is_lstm else (hx, None)
    for what, t in (("h_0", h), ("c_0", c)) if is_lstm else (("hx", h),):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
    return h, c


def _check_proj_size(proj_size, hidden_size: int, mode: str) -> int:
    proj_size = V.check_int(proj_size, "proj_size", minimum=0)
    if proj_size and mode != "LSTM":
        raise ValueError(f"proj_size={proj_size} applies to LSTM only, not {mode}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
                         f"hidden_size={hidden_size}")
    return proj_size


def _autocast_to(t, dtype: torch.dtype):
    """Under autocast a floating-point input or state of another dtype (a ``Linear``'s bfloat16
    output, say) runs as the parameters' dtype, as ``nn.LSTM`` accepts it: autocast casts the
    layer's matrix products itself, exactly as for an input of the parameters' dtype."""
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype and t.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(t.device.type)):
        return t.to(dtype)
    return t


def _refuse_script(name: str) -> None:
    raise RuntimeError(
        f"{name} cannot be compiled by torch.jit.script (its time loop and the fused paths are Python). "
        f"Use torch.compile, or export with torch.export.export(model, args) or "
        f"torch.onnx.export(model, args, dynamo=True)."
    )


def _check_input_tensor(name: str, x, input_size: int, dtype: torch.dtype) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a Tensor or PackedSequence, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:  # before x.shape[-1], which a 0-d tensor does not have
        raise ValueError(f"{name}: input must have a feature dimension of size input_size={input_size}, got a "
                         "0-d tensor")
    if x.shape[-1] != input_size:
        raise ValueError(
            f"{name}: input.size(-1) must be equal to input_size. Expected {input_size}, got "
            f"{x.shape[-1]} (input of shape {list(x.shape)})"
        )
    if x.dtype != dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the parameters' dtype {dtype}")


def _check_packed(name: str, data: Tensor, batch_sizes_t) -> list[int]:
    """The batch sizes of a PackedSequence, checked against its data: the fused kernels index the
    data's rows by them, so a mismatch would read or write out of bounds."""
    if not isinstance(batch_sizes_t, Tensor) or batch_sizes_t.dim() != 1 or batch_sizes_t.is_floating_point():
        raise ValueError(f"{name}: PackedSequence batch_sizes must be a 1-D integer tensor, got {batch_sizes_t!r}")
    batch_sizes = [int(b) for b in batch_sizes_t.tolist()]
    if any(b1 < b2 for b1, b2 in zip(batch_sizes, batch_sizes[1:], strict=False)) or (batch_sizes and batch_sizes[-1] <= 0):
        raise ValueError(f"{name}: PackedSequence batch_sizes must be positive and non-increasing, got {batch_sizes}")
    if data.dim() != 2 or data.shape[0] != sum(batch_sizes):
        raise ValueError(f"{name}: PackedSequence data must have sum(batch_sizes) = {sum(batch_sizes)} rows "
                         f"of input_size features, got data of shape {list(data.shape)}")
    return batch_sizes


# ----------------------------------------------------------------------------------- cells


class _LayerNormCellBase(nn.Module):
    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, layer_norm: bool = True,
                 eps: float = 1e-5, cell_state: str = "raw", zoneout: float = 0.0,
                 zoneout_cell: float = 0.0, device=None, dtype=None, _mode: str | None = None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        mode = _mode or self._mode
        _set_common_options(self, mode, input_size, hidden_size, bias, layer_norm, eps, cell_state, zoneout,
                            zoneout_cell)
        _register(self, mode, self.input_size, self.hidden_size, bias, layer_norm, "", factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + _option_repr(self)

    def _options(self) -> _Options:
        return _Options(self.mode, self.layer_norm, self.eps, self.cell_state, self.zoneout,
                        self.zoneout_cell, self.training)

    def __prepare_scriptable__(self):  # torch.jit.script calls it first: one clear error
        _refuse_script(type(self).__name__)

    def forward(self, input: Tensor, hx=None):
        name = type(self).__name__
        is_lstm = self.mode == "LSTM"
        input = _autocast_to(input, self.weight_ih.dtype)
        _check_input_tensor(name, input, self.input_size, self.weight_ih.dtype)
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B, H = x.shape[0], self.hidden_size
        if hx is None:
            z = x.new_zeros(B, H)
            h, c = (z, z) if is_lstm else (z, None)
        else:
            h, c = _split_hx(name, hx, is_lstm)
            h, c = _autocast_to(h, input.dtype), _autocast_to(c, input.dtype)
            want = (B, H) if batched else (H,)
            for nm, t in (("h_0", h), ("c_0", c)) if is_lstm else (("hx", h),):
                if tuple(t.shape) != want:
                    raise ValueError(f"{name}: Expected {nm} of shape {list(want)}, got {list(t.shape)}")
                if t.dtype != input.dtype:  # else the error would come from deep inside, naming neither
                    raise TypeError(f"{name}: {nm} dtype {t.dtype} does not match the input's dtype {input.dtype}")
                if t.device != input.device:
                    raise ValueError(f"{name}: input and {nm} must be on the same device, got input on "
                                     f"{input.device} and {nm} on {t.device}")
            if not batched:
                h = h.unsqueeze(0)
                c = c.unsqueeze(0) if c is not None else None
        p = _Params(self, "", self.layer_norm, self.mode)
        opt = self._options()
        gx = _input_projection(x, p, opt)
        h_new, c_new = _step(gx, h, c, p, opt)
        if not batched:
            h_new = h_new.squeeze(0)
            c_new = c_new.squeeze(0) if c_new is not None else None
        return (h_new, c_new) if is_lstm else h_new


class LayerNormLSTMCell(_LayerNormCellBase):
    r"""A layer-normalized LSTM cell with the API of :class:`torch.nn.LSTMCell`.

    .. math::
        (i, f, g, o) = LN(W_{hh} h; \gamma_1, \beta_1) + LN(W_{ih} x; \gamma_2, \beta_2) + b_{ih} + b_{hh} \\
        c' = \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \quad
        h' = \sigma(o) \odot \tanh(LN(c'; \gamma_3, \beta_3))

    Args:
        input_size, hidden_size, bias: as :class:`torch.nn.LSTMCell`.
        layer_norm: False gives exactly :class:`torch.nn.LSTMCell` (and no LN parameters).
        eps: added to the variance inside the square root of each LN.
        cell_state: ``"raw"`` carries the un-normalized c' (the paper); ``"normalized"`` carries
            LN(c') (TF-Addons, PyTorch's custom_lstms).
        zoneout, zoneout_cell: zoneout probabilities for h and c (expectation in eval mode).

    Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``, ``bias_hh`` (4H) as
    torch; ``ln_ih_weight``, ``ln_ih_bias``, ``ln_hh_weight``, ``ln_hh_bias`` (4H) and
    ``ln_cell_weight``, ``ln_cell_bias`` (H).

    Shape: input (B, I) or (I,); hx a tuple (h, c) of (B, H) or (H,), zeros if None; returns (h', c').

    Example::

        >>> cell = LayerNormLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
    """

    _mode = "LSTM"


class LayerNormGRUCell(_LayerNormCellBase):
    r"""A layer-normalized GRU cell with the API of :class:`torch.nn.GRUCell` (module docstring has
    the equations). LN parameters ``ln_ih_weight``, ``ln_ih_bias``, ``ln_hh_weight``,
    ``ln_hh_bias`` (3H, normalized in groups [2H | H]). Returns h'."""

    _mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, layer_norm: bool = True,
                 eps: float = 1e-5, zoneout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, layer_norm=layer_norm, eps=eps, zoneout=zoneout,
                         device=device, dtype=dtype)


class LayerNormRNNCell(_LayerNormCellBase):
    r"""A layer-normalized Elman cell with the API of :class:`torch.nn.RNNCell`:
    ``h' = act(LN(W_ih x + W_hh h; ln_weight, ln_bias) + b_ih + b_hh)``, act ``tanh`` or ``relu``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 *, layer_norm: bool = True, eps: float = 1e-5, zoneout: float = 0.0, device=None,
                 dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, layer_norm=layer_norm, eps=eps, zoneout=zoneout,
                         device=device, dtype=dtype, _mode="RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU")


# ---------------------------------------------------------------------------------- layers


class _LayerNormRNNBase(nn.Module):
    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 layer_norm: bool = True, eps: float = 1e-5, cell_state: str = "raw",
                 zoneout: float = 0.0, zoneout_cell: float = 0.0, proj_size: int = 0, device=None,
                 dtype=None, _mode: str | None = None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        mode = _mode or self._mode
        _set_common_options(self, mode, input_size, hidden_size, bias, layer_norm, eps, cell_state, zoneout,
                            zoneout_cell)
        self.proj_size = _check_proj_size(proj_size, self.hidden_size, mode)
        self.num_layers = V.check_int(num_layers, "num_layers")
        self.batch_first = V.check_bool(batch_first, "batch_first")
        self.bidirectional = V.check_bool(bidirectional, "bidirectional")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(
                f"dropout should be a number in range [0, 1) representing the probability of an "
                f"element being zeroed, got {dropout!r}"
            )
        self.dropout = float(dropout)
        D = 2 if bidirectional else 1
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self._output_size * D
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                _register(self, mode, layer_input, self.hidden_size, bias, layer_norm, sfx, factory_kwargs,
                          self.proj_size)
        self.reset_parameters()

    @property
    def _output_size(self) -> int:
        """Features of h (and of each direction's output): proj_size when projecting, else H."""
        return self.proj_size or self.hidden_size

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s + _option_repr(self)

    # torch's weight lists: the torch-named parameters only, in torch's order (the LN parameters
    # are not in them, so code written for nn.LSTM that walks them sees what it expects)

    @property
    def _all_weights(self) -> list[list[str]]:
        names = []
        for layer in range(self.num_layers):
            for d in range(2 if self.bidirectional else 1):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                names.append(["weight_ih" + sfx, "weight_hh" + sfx])
                if self.bias:
                    names[-1] += ["bias_ih" + sfx, "bias_hh" + sfx]
                if self.proj_size:
                    names[-1].append("weight_hr" + sfx)
        return names

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op, as torch's is off cuDNN: the parameters are used as they are."""

    def _torch_equivalent(self) -> bool:
        # layer_norm=False without zoneout is exactly torch's layer: run torch's own kernel
        return not self.layer_norm and self.zoneout == 0.0 and self.zoneout_cell == 0.0

    def _check_hidden(self, name: str, t, want: tuple, what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: Expected {what} size {want}, got {tuple(t.shape)}")
        if t.dtype != self.weight_ih_l0.dtype:
            raise TypeError(f"{name}: {what} dtype {t.dtype} does not match the parameters' dtype {self.weight_ih_l0.dtype}")

    def __prepare_scriptable__(self):  # torch.jit.script calls it first: one clear error
        _refuse_script(type(self).__name__)

    def forward(self, input, hx=None):
        name = type(self).__name__
        if is_tracing():
            _refuse_trace(name)
        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        L, H, P = self.num_layers, self.hidden_size, self._output_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            data = _autocast_to(data, self.weight_ih_l0.dtype)
            _check_input_tensor(name, data, self.input_size, self.weight_ih_l0.dtype)
            batch_sizes = _check_packed(name, data, batch_sizes_t)
            B = batch_sizes[0] if batch_sizes else 0
            batched = True
            x = data
        else:
            input = _autocast_to(input, self.weight_ih_l0.dtype)
            _check_input_tensor(name, input, self.input_size, self.weight_ih_l0.dtype)
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            if self.batch_first:
                x = x.transpose(0, 1)
            T, B = x.shape[0], x.shape[1]
            if T == 0:  # as torch's layers: an output with no graph would fail later, at backward
                raise ValueError(f"{name}: Expected sequence length to be larger than 0 in RNN, got input of "
                                 f"shape {list(input.shape)}")
            batch_sizes = [B] * T
            sorted_indices = unsorted_indices = None
            x = x.reshape(T * B, self.input_size)

        # initial state, as (L*D, B, P) for h and (L*D, B, H) for c
        if hx is None:
            h0 = x.new_zeros(L * D, B, P)
            c0 = x.new_zeros(L * D, B, H) if is_lstm else None
        else:
            h0, c0 = _split_hx(name, hx, is_lstm)
            h0, c0 = _autocast_to(h0, self.weight_ih_l0.dtype), _autocast_to(c0, self.weight_ih_l0.dtype)
            if not batched:
                for what, t in (("h_0", h0), ("c_0", c0)) if is_lstm else (("hx", h0),):
                    if isinstance(t, Tensor) and t.dim() != 2:
                        raise ValueError(f"{name}: For unbatched 2-D input, {what} should also be 2-D but got a {t.dim()}-D tensor")
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            for what, t, size in (("h_0", h0, P), ("c_0", c0, H)) if is_lstm else (("hx", h0, H),):
                self._check_hidden(name, t, (L * D, B, size), what)
                if t.device != x.device:
                    raise ValueError(f"{name}: Input and hidden tensors are not at the same device, found "
                                     f"input tensor at {x.device} and {what} at {t.device}")
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices) if c0 is not None else None

        # layer_norm=False is torch's layer: the fast backend runs torch's own kernel, the torch
        # backend runs the same loop as the LN layers (which the parity tests check against it)
        if self._torch_equivalent() and backend.get_backend() == "numba":
            out, h_n, c_n = self._run_torch_kernel(x, batch_sizes, batch_sizes_t if packed else None, h0, c0)
        else:
            out, h_n, c_n = self._run_layers(x, batch_sizes, h0, c0)

        if packed:
            output = PackedSequence(out, batch_sizes_t, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
        else:
            output = out.reshape(len(batch_sizes), B, D * P)
            if self.batch_first:
                output = output.transpose(0, 1)
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)

    def _run_layers(self, x, batch_sizes, h0, c0):
        D = 2 if self.bidirectional else 1
        opt = _Options(self.mode, self.layer_norm, self.eps, self.cell_state, self.zoneout,
                       self.zoneout_cell, self.training)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                p = _Params(self, f"_l{layer}" + ("_reverse" if d else ""), self.layer_norm, self.mode)
                out, h, c = _direction(x, batch_sizes, h0[k], c0[k] if c0 is not None else None, p, opt, d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, torch.stack(h_n), (torch.stack(c_n) if self.mode == "LSTM" else None)

    def _run_torch_kernel(self, x, batch_sizes, batch_sizes_t, h0, c0):
        weights = [getattr(self, n) for n in self._flat_weights_names]
        T, B = len(batch_sizes), h0.shape[1]
        fn = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
              "RNN_RELU": torch._VF.rnn_relu}[self.mode]
        hx = (h0, c0) if self.mode == "LSTM" else h0
        if batch_sizes_t is not None:
            res = fn(x, batch_sizes_t, hx, weights, self.bias, self.num_layers, self.dropout,
                     self.training, self.bidirectional)
            out = res[0]
        else:
            xs = x.reshape(T, B, x.shape[-1])  # explicit sizes: -1 is ambiguous when B = 0
            if self.batch_first:  # torch's kernel on torch's layout: nn.LSTM's result to the bit
                xs = xs.transpose(0, 1).contiguous()
            res = fn(xs, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                     self.bidirectional, self.batch_first)
            out = res[0].transpose(0, 1) if self.batch_first else res[0]
        if out.dim() == 3:  # (T, B, H) -> packed rows; explicit sizes, as above
            out = out.reshape(out.shape[0] * out.shape[1], out.shape[2])
        if self.mode == "LSTM":
            return out, res[1], res[2]
        return out, res[1], None


class LayerNormLSTM(_LayerNormRNNBase):
    r"""A multi-layer layer-normalized LSTM with the API of :class:`torch.nn.LSTM`.

    Each layer computes (paper eq. 20-22; gate order i, f, g, o as torch)

    .. math::
        (i, f, g, o) = LN(W_{hh} h_{t-1}; \gamma_1, \beta_1) + LN(W_{ih} x_t; \gamma_2, \beta_2) + b_{ih} + b_{hh} \\
        c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g), \quad
        h_t = \sigma(o) \odot \tanh(LN(c_t; \gamma_3, \beta_3))

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
            dtype: as :class:`torch.nn.LSTM`.
        proj_size: as :class:`torch.nn.LSTM`: if > 0, ``h_t = W_{hr} (\sigma(o) \odot
            \tanh(LN(c_t)))`` has ``proj_size`` features (0 <= proj_size < hidden_size).
        layer_norm: False computes exactly :class:`torch.nn.LSTM` and has no LN parameters.
        eps: added to the variance inside the square root of each LN (default 1e-5).
        cell_state: ``"raw"`` (default) carries the un-normalized c_t, ``"normalized"`` carries
            LN(c_t) (TF-Addons, PyTorch's custom_lstms).
        zoneout, zoneout_cell: probability that a unit of h (of c) keeps its previous value at each
            step in training; in eval the expectation ``p * old + (1 - p) * new``.

    Parameters: torch's ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` (``_reverse`` for the backward direction) unchanged, plus
    ``ln_ih_weight_l{k}``, ``ln_ih_bias_l{k}``, ``ln_hh_weight_l{k}``, ``ln_hh_bias_l{k}`` (4H)
    and ``ln_cell_weight_l{k}``, ``ln_cell_bias_l{k}`` (H), gains initialised to 1, biases to 0;
    with ``proj_size`` P > 0 also torch's ``weight_hr_l{k}`` (P, H), and ``weight_hh_l{k}`` is
    (4H, P).

    Shape: input (T, B, I), (B, T, I) with ``batch_first``, (T, I) unbatched, or a
    PackedSequence; ``hx = (h_0, c_0)`` each (L*D, B, H) or (L*D, H) (h_0 (L*D, B, P) with
    ``proj_size``), zeros if None. Returns ``output, (h_n, c_n)`` with output (T, B, D*H) (D*P
    with ``proj_size``; or packed) like torch.

    Example::

        >>> lstm = LayerNormLSTM(10, 20, num_layers=2, batch_first=True)
        >>> out, (h, c) = lstm(torch.randn(3, 5, 10))
    """

    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *, layer_norm: bool = True, eps: float = 1e-5, cell_state: str = "raw",
                 zoneout: float = 0.0, zoneout_cell: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         layer_norm=layer_norm, eps=eps, cell_state=cell_state, zoneout=zoneout,
                         zoneout_cell=zoneout_cell, proj_size=proj_size, device=device, dtype=dtype)


class LayerNormGRU(_LayerNormRNNBase):
    r"""A multi-layer layer-normalized GRU with the API of :class:`torch.nn.GRU` (paper eq. 26-28;
    equations in the module docstring). LN parameters ``ln_ih_weight_l{k}``, ``ln_ih_bias_l{k}``,
    ``ln_hh_weight_l{k}``, ``ln_hh_bias_l{k}`` (3H each, normalized in the groups [r, z | n]).
    Returns ``output, h_n``.

    Example::

        >>> gru = LayerNormGRU(10, 20)
        >>> out, h = gru(torch.randn(5, 3, 10))
    """

    _mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 layer_norm: bool = True, eps: float = 1e-5, zoneout: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         layer_norm=layer_norm, eps=eps, zoneout=zoneout, device=device, dtype=dtype)


class LayerNormRNN(_LayerNormRNNBase):
    r"""A multi-layer layer-normalized Elman RNN with the API of :class:`torch.nn.RNN` (paper eq.
    4): ``h_t = act(LN(W_ih x_t + W_hh h_{t-1}; ln_weight, ln_bias) + b_ih + b_hh)`` with
    ``nonlinearity`` ``"tanh"`` or ``"relu"``. LN parameters ``ln_weight_l{k}``,
    ``ln_bias_l{k}`` (H). Returns ``output, h_n``.

    Example::

        >>> rnn = LayerNormRNN(10, 20, nonlinearity="relu")
        >>> out, h = rnn(torch.randn(5, 3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, layer_norm: bool = True, eps: float = 1e-5,
                 zoneout: float = 0.0, device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         layer_norm=layer_norm, eps=eps, zoneout=zoneout, device=device, dtype=dtype,
                         _mode="RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU")


__all__ = [
    "gate_preactivations",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "LayerNormRNN",
    "LayerNormRNNCell",
]
