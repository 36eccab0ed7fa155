"""Diagnostics you run on your own model: batch independence, train/eval gap, activation statistics.

* :func:`check_batch_independence`: does a sample's output change when the rest of the batch
  changes? (claim C1: layer norm's statistics are per sample, batch norm's are not)
* :func:`train_eval_gap`: how far train-mode and eval-mode outputs differ, per normalization
  layer and at the output (claim C2), leaving the model exactly as it was.
* :class:`ActivationStats`: opt-in forward/gradient hooks that record per-layer mean, std,
  max-abs and gradient norms, per time step for recurrent layers. Hooks exist only inside the
  ``with`` block, so the model pays nothing otherwise; results are plain dicts or JSONL.

Notation: ``B`` batch size, ``T`` time steps, ``C`` features. A "relative change" is the largest
absolute difference divided by the largest absolute value of the reference tensor, so a
threshold means the same thing at any activation scale.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from lnorm.utils import (
    ModelState,
    first_tensor,
    is_norm_layer,
    is_recurrent_layer,
    nonfinite_count,
    preserved_rng,
    set_mode,
    stochastic_off,
)

__all__ = [
    "ActivationStats",
    "BatchIndependenceReport",
    "ModuleChange",
    "TrainEvalGapReport",
    "check_batch_independence",
    "is_norm_layer",
    "is_recurrent_layer",
    "train_eval_gap",
]

# float32 round-off from a different reduction order (another batch size picks another matmul
# kernel) stays near 1e-6 relative; real batch dependence is O(1e-2) or more.
DEFAULT_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_model_and_input(model, x, batch_dim: int, min_batch: int) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (a batch of inputs), got {type(x).__name__}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, numbers.Integral):
        raise TypeError(f"batch_dim must be an int, got {batch_dim!r}")
    if not -x.dim() <= batch_dim < x.dim():
        raise ValueError(f"batch_dim={batch_dim} is out of range for x of shape {list(x.shape)}")
    batch_dim = batch_dim % x.dim()
    if x.shape[batch_dim] < min_batch:
        raise ValueError(f"x must hold at least {min_batch} samples along batch_dim={batch_dim}, "
                         f"got shape {list(x.shape)}")
    bad = nonfinite_count(x)
    if bad:
        raise ValueError(f"x holds {bad} non-finite value(s) (NaN or inf): the checks compare outputs and "
                         f"would report the NaN as batch dependence or a gap; pass a finite batch")
    return batch_dim


def _check_finite_output(out: Tensor | None, what: str) -> None:
    """A NaN or inf in the model's output would compare as an infinite change: refuse instead."""
    bad = 0 if out is None else nonfinite_count(out)
    if bad:
        raise ValueError(f"the model's output{' ' + what if what else ''} holds {bad} non-finite value(s) (NaN or "
                         f"inf) on a finite input: nothing to compare; fix the model (or its weights) first")


class _Recorder:
    """Forward hooks storing each module's first input and first output tensor, per call."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: (n or "<model>") for n, m in model.named_modules()}
        self.inputs: dict[str, list[Tensor | None]] = {}
        self.outputs: dict[str, list[Tensor | None]] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in self.names]

    def _hook(self, module, args, output) -> None:
        name = self.names[module]
        x, y = first_tensor(args), first_tensor(output)
        # clone: in-place ops later in the forward (ReLU(inplace=True)) would overwrite them
        self.inputs.setdefault(name, []).append(None if x is None else x.detach().clone())
        self.outputs.setdefault(name, []).append(None if y is None else y.detach().clone())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, x: Tensor) -> tuple[Tensor | None, _Recorder]:
    rec = _Recorder(model)
    try:
        with torch.no_grad():
            out = first_tensor(model(x))
    finally:
        rec.remove()
    return (None if out is None else out.detach().clone()), rec


def _relative(diff: float, ref: Tensor) -> float:
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


# --------------------------------------------------------------------------------------------
# batch independence
# --------------------------------------------------------------------------------------------


@dataclass
class ModuleChange:
    """How much one module's output moved; ``input_change`` is the same for its input."""

    name: str
    type: str
    output_change: float  # max abs difference
    output_relative: float  # over the max abs of the reference output
    input_change: float
    input_relative: float


@dataclass
class BatchIndependenceReport:
    """Result of :func:`check_batch_independence`.

    Attributes:
        independent: no probe moved any sample's output by more than ``rtol`` (relative).
        max_change: largest absolute change of any sample's output over all probes.
        max_relative_change: the same over the largest absolute output value.
        probes: per probe (``permute``, ``split``, ``replace``) the max relative output change.
        sources: modules whose output moved while their input did not (the cause), largest first.
        errors: probes whose forward raised (e.g. batch norm on one sample): itself a dependence.
    """

    independent: bool
    max_change: float
    max_relative_change: float
    mode: str
    batch_size: int
    rtol: float
    probes: dict[str, float] = field(default_factory=dict)
    sources: list[ModuleChange] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _batch_dim_of(full: Tensor, parts: Sequence[Tensor], sizes: Sequence[int]) -> int | None:
    """The one dim whose size is ``B`` in ``full`` and ``sizes[i]`` in ``parts[i]``."""
    if any(p is None or p.dim() != full.dim() for p in parts):
        return None
    found = None
    for d in range(full.dim()):
        if full.shape[d] == sum(sizes) and all(p.shape[d] == s for p, s in zip(parts, sizes, strict=False)):
            if any(full.shape[e] != p.shape[e] for p in parts for e in range(full.dim()) if e != d):
                return None
            if found is not None:
                return None
            found = d
    return found



def _first_batch_dim(full: list, p1: list, p2: list, sizes) -> int | None:
    if not (len(full) == len(p1) == len(p2)):
        return None
    for a, b, c in zip(full, p1, p2, strict=False):
        if a is not None:
            return _batch_dim_of(a, [b, c], sizes)
    return None


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_batch_independence(model: nn.Module, x: Tensor, *, batch_dim: int = 0, mode: str = "train",
                             rtol: float = DEFAULT_RTOL, seed: int = 0) -> BatchIndependenceReport:
    """Does any sample's output change when the rest of the batch changes?

    Three probes, each compared sample by sample against the output of the whole batch ``x``:

    * ``permute``: the batch rolled by one (batch norm passes this one: its statistics do not
      depend on the order of the samples);
    * ``split``: the two halves of the batch run separately;
    * ``replace``: the second half replaced by values drawn at random from ``x`` itself (so token
      ids stay token ids), the first half compared.

    Every module's input and output are recorded too, so the report names the modules whose
    output moved while their input did not: the layers that mix samples. The model is left
    exactly as it was (modes and buffers such as running statistics are restored; nothing runs
    under autograd), and so is torch's global random number generator. In train mode dropout and
    zoneout are switched off: their random masks are not batch dependence.

    Args:
        model: the module; called as ``model(x)``; the first tensor of its output is compared.
        x: a batch with at least 4 samples along ``batch_dim`` (so each half holds two: batch
            norm cannot train on one sample).
        batch_dim: the batch dim of ``x`` (1 for ``nn.LSTM`` without ``batch_first``). The batch
            dim of every other tensor is found by watching which dim the split probe halves.
        mode: ``"train"`` (default: where batch norm uses batch statistics), ``"eval"``, or
            ``"current"`` (each module's own mode, dropout and zoneout switched off as in train).
        rtol: relative change above which a sample counts as changed.
        seed: seeds the replacement draw (an int).

    Returns:
        :class:`BatchIndependenceReport`.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        >>> report = check_batch_independence(model, torch.randn(16, 8))
        >>> report.independent, [s.name for s in report.sources]
        (False, ['1'])
    """
    batch_dim = _check_model_and_input(model, x, batch_dim, 4)
    if mode not in ("train", "eval", "current"):
        raise ValueError(f"mode must be 'train', 'eval' or 'current', got {mode!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    state = ModelState(model)
    with preserved_rng(model, x):  # a forward in train mode may draw (the model's own noise)
        try:
            if mode != "current":
                set_mode(model, mode)
            else:  # each module's own mode, but no random masks (they are not batch dependence)
                stochastic_off(model)
            mode_used = "train" if model.training else "eval"
            probes = _Probes(model, x, batch_dim, state, mode)
            probes.split()
            probes.permute()
            probes.replace(seed)
        finally:
            state.restore()
    max_rel = max(probes.changes.values(), default=0.0)
    return BatchIndependenceReport(
        independent=not probes.errors and max_rel <= rtol, max_change=probes.out_abs_worst,
        max_relative_change=max_rel, mode=mode_used, batch_size=probes.B, rtol=float(rtol),
        probes=probes.changes, sources=probes.sources(rtol), errors=probes.errors)


class _Probes:
    """The three probes of :func:`check_batch_independence` and what they share: the reference
    run on the whole batch, each recorded tensor's batch dim, and the worst change per module."""

    def __init__(self, model: nn.Module, x: Tensor, batch_dim: int, state: ModelState, mode: str) -> None:
        self.model, self.x, self.batch_dim = model, x, batch_dim
        self.B = x.shape[batch_dim]
        self.h = self.B // 2
        self.everyone = torch.arange(self.B, device=x.device)
        self.errors: dict[str, str] = {}
        self.changes: dict[str, float] = {}  # probe -> max relative output change
        self.worst: dict[str, list[float]] = {}  # module -> [out abs, out rel, in abs, in rel], over probes
        self.out_abs_worst = 0.0
        self.ref_out, self.ref = _run(model, x)
        state.restore()  # every probe starts from the running statistics the model had
        if mode != "current":
            set_mode(model, mode)
        else:
            stochastic_off(model)
        if self.ref_out is None:
            raise TypeError("the model's output holds no tensor to compare")
        _check_finite_output(self.ref_out, f"in {mode} mode" if mode != "current" else "")
        out_bdim = batch_dim
        self.out_bdim = out_bdim if self.ref_out.dim() > out_bdim and self.ref_out.shape[out_bdim] == self.B else None
        self.bd_out: dict[str, int | None] = {}
        self.bd_in: dict[str, int | None] = {}

    def forward(self, probe: str, inp: Tensor):
        snapshot = ModelState(self.model)  # every probe starts from the same running statistics
        try:
            return _run(self.model, inp)
        except Exception as exc:  # noqa: BLE001 - failing on another batch is itself evidence
            self.errors.setdefault(probe, f"{type(exc).__name__}: {exc}")
            return None, None
        finally:
            snapshot.restore()

    def split(self) -> None:
        """The two halves run separately; which dim halves tells each tensor's batch dim."""
        x, bd, h, B = self.x, self.batch_dim, self.h, self.B
        (o1, r1), (o2, r2) = self.forward("split", x.narrow(bd, 0, h)), self.forward("split", x.narrow(bd, h, B - h))
        if r1 is None or r2 is None:
            self.changes["split"] = math.inf
            return
        sizes, ref = (h, B - h), self.ref
        self.out_bdim = _batch_dim_of(self.ref_out, [o1, o2], sizes) if o1 is not None and o2 is not None else None
        for n in ref.outputs:
            self.bd_out[n] = _first_batch_dim(ref.outputs[n], r1.outputs.get(n, []), r2.outputs.get(n, []), sizes)
            self.bd_in[n] = _first_batch_dim(ref.inputs[n], r1.inputs.get(n, []), r2.inputs.get(n, []), sizes)

        def cat(seq1, seq2, d):
            if d is None or len(seq1) != len(seq2):
                return None
            return [None if a is None or b is None else torch.cat([a, b], d) for a, b in zip(seq1, seq2, strict=False)]

        ins = {n: cat(r1.inputs.get(n, []), r2.inputs.get(n, []), self.bd_in.get(n)) for n in ref.inputs}
        outs = {n: cat(r1.outputs.get(n, []), r2.outputs.get(n, []), self.bd_out.get(n)) for n in ref.outputs}
        out = None if self.out_bdim is None else torch.cat([o1, o2], self.out_bdim)
        self.compare("split", out, ins, outs, self.everyone)

    def permute(self) -> None:
        """The batch rolled by one so that no sample keeps its place, then put back in order."""
        perm = torch.roll(self.everyone, 1)
        inv = torch.argsort(perm)
        o, r = self.forward("permute", self.x.index_select(self.batch_dim, perm))
        if r is None:
            self.changes["permute"] = math.inf
            return

        def back(t, d):
            return t.index_select(d, inv)

        ins = {n: [None if t is None or self.bd_in.get(n) is None else back(t, self.bd_in[n]) for t in lst]
               for n, lst in r.inputs.items()}
        outs = {n: [None if t is None or self.bd_out.get(n) is None else back(t, self.bd_out[n]) for t in lst]
                for n, lst in r.outputs.items()}
        self.compare("permute", None if o is None or self.out_bdim is None else back(o, self.out_bdim),
                     ins, outs, self.everyone)

    def replace(self, seed: int) -> None:
        """The second half drawn from x's own values (token ids stay token ids), the first half compared."""
        x, bd, h = self.x, self.batch_dim, self.h
        g = torch.Generator().manual_seed(seed)
        tail = x.narrow(bd, h, self.B - h)
        idx = torch.randint(0, x.numel(), tuple(tail.shape), generator=g).to(x.device)
        o, r = self.forward("replace", torch.cat([x.narrow(bd, 0, h), x.reshape(-1)[idx]], bd))
        if r is None:
            self.changes["replace"] = math.inf
            return
        self.compare("replace", o, r.inputs, r.outputs, torch.arange(h, device=x.device))

    def compare(self, probe: str, out: Tensor | None, ins: dict, outs: dict, keep: Tensor) -> None:
        """The kept samples of ``out`` and of every module's input and output against the reference."""
        if out is None or self.out_bdim is None:
            self.errors.setdefault(probe, "the output's batch dim could not be matched")
            self.changes[probe] = math.inf
            return
        a, b = self.ref_out.index_select(self.out_bdim, keep), out.index_select(self.out_bdim, keep)
        d = _max_diff(a, b)
        self.out_abs_worst = max(self.out_abs_worst, d)
        self.changes[probe] = _relative(d, a)
        for n in self.ref.outputs:
            w = self.worst.setdefault(n, [0.0, 0.0, 0.0, 0.0])
            for refs, got, bd, slot in ((self.ref.outputs[n], outs.get(n), self.bd_out.get(n), 0),
                                        (self.ref.inputs[n], ins.get(n), self.bd_in.get(n), 2)):
                if got is None or bd is None or len(got) != len(refs):
                    continue
                for r_t, p_t in zip(refs, got, strict=False):
                    if r_t is None or p_t is None or r_t.shape != p_t.shape or not r_t.is_floating_point():
                        continue
                    r_k, p_k = r_t.index_select(bd, keep), p_t.index_select(bd, keep)
                    dd = _max_diff(r_k, p_k)
                    w[slot] = max(w[slot], dd)
                    w[slot + 1] = max(w[slot + 1], _relative(dd, r_k))

    def sources(self, rtol: float) -> list[ModuleChange]:
        """The modules that introduce the change: their output moved while their input did not."""
        types = {(n or "<model>"): type(m).__name__ for n, m in self.model.named_modules()}
        found = [ModuleChange(n, types.get(n, "?"), w[0], w[1], w[2], w[3])
                 for n, w in self.worst.items() if w[1] > rtol and w[3] <= rtol]
        names = [s.name for s in found]
        # keep the innermost: drop a container when one of its descendants is already a source
        found = [s for s in found if not any(
            o != s.name and (s.name == "<model>" or o.startswith(s.name + ".")) for o in names)]
        found.sort(key=lambda s: -s.output_relative)
        return found


# --------------------------------------------------------------------------------------------
# train / eval gap
# --------------------------------------------------------------------------------------------


@dataclass
class LayerGap:
    """One normalization layer's train-vs-eval difference on the same batch.

    ``output_gap`` is the max abs difference of its output; ``input_gap`` the same for its input
    (nonzero when an earlier layer already differs). A layer with an output gap but no input gap
    is where the gap starts.
    """

    name: str
    type: str
    input_gap: float
    output_gap: float
    output_relative: float
    input_relative: float


@dataclass
class TrainEvalGapReport:
    """Result of :func:`train_eval_gap`.

    Attributes:
        max_gap / relative_gap: max abs difference of the model output between train and eval
            mode, and the same over the max abs of the eval-mode output.
        consistent: ``relative_gap <= rtol``.
        layers: every normalization layer, in forward order.
    """

    max_gap: float
    relative_gap: float
    consistent: bool
    rtol: float
    layers: list[LayerGap] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_eval_gap(model: nn.Module, x: Tensor, *, rtol: float = DEFAULT_RTOL,
                   include_dropout: bool = False) -> TrainEvalGapReport:
    """How far the outputs of train mode and eval mode differ on the same batch.

    Runs ``x`` once in eval mode and once in train mode, without autograd, and compares the
    model output and the input and output of every normalization layer. Batch norm uses batch
    statistics in train mode and running averages in eval mode, so it shows a gap; layer, group
    and RMS norm compute the same thing in both (claim C2). Afterwards the model is exactly as
    it was: every module's ``training`` flag and every buffer (running statistics,
    ``num_batches_tracked``) are restored, and so is torch's global random number generator.

    Args:
        model: called as ``model(x)``; the first tensor of its output is compared.
        x: a batch of inputs.
        rtol: relative gap above which the model counts as inconsistent.
        include_dropout: keep dropout and zoneout active in the train pass (a bool). Default
            False: their random masks would hide the normalization's gap.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        >>> report = train_eval_gap(model, torch.randn(32, 8) * 3 + 1)
        >>> report.consistent, [(l.name, l.type) for l in report.layers]
        (False, [('1', 'BatchNorm1d')])
    """
    _check_model_and_input(model, x, 0, 1)
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    if not isinstance(include_dropout, bool):  # "no" or 0.5 would read as True
        raise TypeError(f"include_dropout must be a bool, got {include_dropout!r} ({type(include_dropout).__name__})")
    state = ModelState(model)
    with preserved_rng(model, x):  # dropout, zoneout and the model's own noise draw in train mode
        try:
            set_mode(model, "eval")
            out_eval, rec_eval = _run(model, x)
            set_mode(model, "train", keep_dropout=include_dropout)
            out_train, rec_train = _run(model, x)
        finally:
            state.restore()
    if out_eval is None or out_train is None:
        raise TypeError("the model's output holds no tensor to compare")
    _check_finite_output(out_eval, "in eval mode")
    _check_finite_output(out_train, "in train mode")
    gap = _max_diff(out_eval, out_train) if out_eval.shape == out_train.shape else math.inf
    rel = _relative(gap, out_eval)
    layers = []
    for n, m in model.named_modules():
        if not is_norm_layer(m):
            continue
        name = n or "<model>"
        diffs = []
        for recs in ((rec_eval.inputs, rec_train.inputs), (rec_eval.outputs, rec_train.outputs)):
            d_abs, d_rel = 0.0, 0.0
            for a, b in zip(recs[0].get(name, []), recs[1].get(name, []), strict=False):
                if a is None or b is None or a.shape != b.shape:
                    continue
                d = _max_diff(a, b)
                d_abs, d_rel = max(d_abs, d), max(d_rel, _relative(d, a))
            diffs.append((d_abs, d_rel))
        if name in rec_eval.outputs:  # called in this forward
            layers.append(LayerGap(name, type(m).__name__, diffs[0][0], diffs[1][0], diffs[1][1], diffs[0][1]))
    return TrainEvalGapReport(max_gap=gap, relative_gap=rel, consistent=rel <= rtol, rtol=float(rtol),
                              layers=layers)


# --------------------------------------------------------------------------------------------
# activation and gradient statistics
# --------------------------------------------------------------------------------------------


class _Moments:
    """Running count, sum, sum of squares and max-abs (float64), for exact pooled mean and std."""

    __slots__ = ("n", "s", "ss", "m")

    def __init__(self) -> None:
        self.n, self.s, self.ss, self.m = 0, 0.0, 0.0, 0.0

    def add(self, t: Tensor) -> None:
        t = t.detach().double()
        self.n += t.numel()
        self.s += t.sum().item()
        self.ss += t.square().sum().item()
        self.m = max(self.m, t.abs().max().item() if t.numel() else 0.0)

    def as_dict(self) -> dict:
        if self.n == 0:
            return {"mean": math.nan, "std": math.nan, "max_abs": math.nan}
        mean = self.s / self.n
        return {"mean": mean, "std": math.sqrt(max(self.ss / self.n - mean * mean, 0.0)), "max_abs": self.m}


class _PerStep:
    """Per-time-step moments over (batch, features); grows when a longer sequence arrives."""

    def __init__(self) -> None:
        self.n: list[int] = []
        self.s: list[float] = []
        self.ss: list[float] = []
        self.m: list[float] = []

    def add(self, seq: Tensor, time_dim: int) -> None:
        seq = seq.detach().double().movedim(time_dim, 0)  # (T, ...)
        T = seq.shape[0]
        flat = seq.reshape(T, -1)
        while len(self.n) < T:
            self.n.append(0)
            self.s.append(0.0)
            self.ss.append(0.0)
            self.m.append(0.0)
        if flat.shape[1] == 0:
            return
        sums, sqs, mx = flat.sum(1).tolist(), flat.square().sum(1).tolist(), flat.abs().amax(1).tolist()
        for t in range(T):
            self.n[t] += flat.shape[1]
            self.s[t] += sums[t]
            self.ss[t] += sqs[t]
            self.m[t] = max(self.m[t], mx[t])

    def as_dict(self) -> dict:
        mean = [s / n if n else math.nan for s, n in zip(self.s, self.n, strict=False)]
        std = [math.sqrt(max(ss / n - mu * mu, 0.0)) if n else math.nan
               for ss, n, mu in zip(self.ss, self.n, mean, strict=False)]
        return {"mean": mean, "std": std, "max_abs": list(self.m)}


def _time_dim(module: nn.Module, seq: Tensor) -> int:
    if seq.dim() == 2:  # unbatched (T, H)
        return 0
    return 1 if getattr(module, "batch_first", False) else 0


class _ModuleStats:
    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.type = type(module).__name__
        self.recurrent = is_recurrent_layer(module)
        self.calls = 0
        self.act = _Moments()
        self.grad_calls = 0
        self.grad_sq_sum = 0.0  # sum over backward calls of ||g||^2
        self.grad_norms: list[float] = []
        self.grad_numel = 0
        self.steps = _PerStep() if self.recurrent else None
        self.grad_steps = _PerStep() if self.recurrent else None

    def summary(self) -> dict:
        d = {"type": self.type, "calls": self.calls, **self.act.as_dict()}
        if self.grad_calls:
            d["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
            d["grad_norm_max"] = max(self.grad_norms)
            d["grad_rms"] = math.sqrt(self.grad_sq_sum / self.grad_numel) if self.grad_numel else math.nan
            d["grad_calls"] = self.grad_calls
        if self.steps is not None and self.steps.n:
            d["time"] = self.steps.as_dict()
            if self.grad_steps.n:
                g = self.grad_steps.as_dict()
                # per step: the RMS of the gradient over (batch, features)
                d["time"]["grad_rms"] = [math.sqrt(mu * mu + sd * sd) for mu, sd in zip(g["mean"], g["std"], strict=False)]
        return d


class ActivationStats:
    """Opt-in per-layer activation and gradient statistics, as a context manager.

    Inside the ``with`` block every selected module gets a forward hook recording the mean, std
    and max-abs of its output (the first tensor of it; for recurrent layers, whose output is
    ``(output, state)``, the output sequence, also per time step) and, when ``grads`` is True, a
    hook on that output recording the norm of the gradient reaching it during ``backward()``.
    Leaving the block removes every hook: outside it the model runs exactly as before, at no
    cost. Call ``backward()`` inside the block; gradients arriving later are not recorded.

    Statistics pool every element of every call since the last :meth:`reset`: ``mean``, ``std``
    (population), ``max_abs``; ``grad_norm`` is the mean over backward calls of the L2 norm of
    the gradient w.r.t. the module's output, ``grad_rms`` that norm per element (comparable
    across layers of different sizes). Recurrent layers add ``time``: lists over steps of
    ``mean``, ``std``, ``max_abs`` and ``grad_rms``.

    Args:
        model: the module to watch.
        modules: which submodules: None (default) for every leaf module and every recurrent
            layer; a type or tuple of types (``nn.LayerNorm``); or an iterable of names as in
            ``model.named_modules()`` (``""`` is the model itself).
        grads: also record gradient norms. Default True.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
        >>> with ActivationStats(model) as stats:
        ...     model(torch.randn(4, 8)).square().sum().backward()
        >>> s = stats.summary()["1"]           # the LayerNorm
        >>> sorted(s)[:4], round(s["std"], 2)
        (['calls', 'grad_calls', 'grad_norm', 'grad_norm_max'], 1.0)
    """

    def __init__(self, model: nn.Module, modules=None, grads: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(grads, bool):
            raise TypeError(f"grads must be a bool, got {grads!r}")
        self.model = model
        self.grads = grads
        self._targets = self._select(model, modules)
        self._stats = {n: _ModuleStats(n, m) for n, m in self._targets}
        self._handles: list = []
        self._active = False

    @staticmethod
    def _select(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
        named = list(model.named_modules())
        if modules is None:
            # leaves, plus recurrent layers that hold submodules (their cells, their norms)
            picked = [(n, m) for n, m in named if not any(True for _ in m.children()) or is_recurrent_layer(m)]
            inside_rnn = [n for n, m in picked if is_recurrent_layer(m)]
            return [(n, m) for n, m in picked
                    if not any(n != r and (r == "" or n.startswith(r + ".")) for r in inside_rnn)]
        if isinstance(modules, type) or (isinstance(modules, tuple) and modules
                                         and all(isinstance(t, type) for t in modules)):
            picked = [(n, m) for n, m in named if isinstance(m, modules)]
            if not picked:  # else the stats would watch nothing and summary() be empty, silently
                raise ValueError(f"modules: no submodule of the model is a {modules!r}")
            return picked
        if isinstance(modules, str) or not isinstance(modules, Iterable):
            raise TypeError("modules must be None, a module type, a tuple of types or an iterable of "
                            f"names, got {modules!r}")
        wanted = list(modules)
        if not wanted:
            raise ValueError("modules must name at least one submodule (None: every leaf module), got an empty "
                             f"{type(modules).__name__}")
        by_name = dict(named)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"modules names not found in the model: {missing}; "
                             f"known: {[n for n, _ in named][:20]}")
        return [(n, by_name[n]) for n in wanted]

    # context manager -------------------------------------------------------------------------
    def __enter__(self) -> ActivationStats:
        if self._active:
            raise RuntimeError("ActivationStats is already active")
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str, module: nn.Module):
        def hook(mod, args, output):
            st = self._stats[name]  # looked up per call: reset() replaces it
            y = first_tensor(output)
            if y is None and isinstance(output, (tuple, list)) and output and \
                    isinstance(output[0], nn.utils.rnn.PackedSequence):
                y = output[0].data  # packed: overall stats only, no time axis
                time_dim = None
            else:
                time_dim = None if y is None or not st.recurrent else _time_dim(module, y)
            if y is None or not y.is_floating_point():
                return
            st.calls += 1
            st.act.add(y)
            if time_dim is not None:
                st.steps.add(y, time_dim)
            if self.grads and y.requires_grad:
                y.register_hook(self._make_grad_hook(st, time_dim))

        return hook

    def _make_grad_hook(self, st: _ModuleStats, time_dim: int | None):
        def grad_hook(g: Tensor) -> None:
            if not self._active:
                return
            g64 = g.detach().double()
            sq = g64.square().sum().item()
            st.grad_calls += 1
            st.grad_sq_sum += sq
            st.grad_numel += g.numel()
            st.grad_norms.append(math.sqrt(sq))
            if time_dim is not None:
                st.grad_steps.add(g, time_dim)

        return grad_hook

    # results ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, dict]:
        """``{module name: {type, calls, mean, std, max_abs[, grad_norm, grad_norm_max, grad_rms,
        grad_calls][, time]}}`` for every watched module that ran; plain Python numbers."""
        return {n: s.summary() for n, s in self._stats.items() if s.calls}

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. between training steps)."""
        self._stats = {n: _ModuleStats(n, m) for n, m in self._targets}

    def to_jsonl(self, path, extra: dict | None = None) -> int:
        """Append one JSON line per module, ``{"module": name, **extra, **stats}``; returns the count.

        ``extra`` (e.g. ``{"step": 100}``) is added to every line so a training loop can log
        ``summary`` at intervals into one file.
        """
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
        rows = self.summary()
        # a key of extra that is also a column (the module's name, a statistic) would overwrite
        # it on every line: the rows could no longer be told apart
        taken = {"module"}.union(*(s.keys() for s in rows.values()))
        clash = sorted(k for k in (extra or {}) if k in taken)
        if clash:
            raise ValueError(f"extra must not use the names of the columns it is written beside, got {clash} "
                             f"(taken: {sorted(taken)})")
        with open(path, "a", encoding="utf-8") as f:
            for name, s in rows.items():
                f.write(json.dumps({"module": name, **(extra or {}), **s}, allow_nan=True) + "\n")
        return len(rows)
