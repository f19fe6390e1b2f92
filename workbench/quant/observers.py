"""Calibration observers: watch one tensor over calibration batches, then choose its FP8 / INT8 clipping threshold.

    kind          keeps                            threshold(fmt)                                   use for
    "max"         running amax, per tensor or      amax                                             weights (axis=0:
                  per channel (axis)                                                                one per row N)
    "percentile"  histogram of |x| (2048 bins)     the p-th percentile of |x| (p=99.99)             activations
    "mse"         histogram of |x|                 argmin over 128 clip candidates of the expected  with outliers
                                                   squared error of the format (clipping included)  (int8 above all)
    "entropy"     histogram of |x|                 argmin KL(P||Q), TensorRT's entropy calibration

``update(t)`` once per calibration batch (any shape, the last dim is the channel dim; an empty batch, an
expert that got no tokens, is skipped); then ``threshold(fmt)``, the clipping value chosen for "fp8"
(float8_e4m3fn, qmax 448) or "int8" (symmetric, qmax 127); ``scale(fmt)`` = threshold / qmax, what
``workbench.kernels.gemm``'s linears take as ``input_scale`` / ``weight_scale``; ``amax()``, the largest
|x| seen. ``samples`` counts updates, ``rows`` the rows seen, ``history`` the per-tensor amax after each
update (plot it against the samples to see when the range settles). ``state_dict()`` returns tensors for a
safetensors file and a JSON-able dict (kind, options, counts); ``Observer.from_state`` rebuilds the observer
exactly, and it can go on calibrating. ``make_observer(kind, **options)`` builds one from ``OBSERVERS``.

Which one. Weights are known in full: take their max, per output channel. Activations are sampled, and
LLM activations carry a few huge outliers (a handful of channels, the first tokens): int8's uniform grid
pays for every unit of range, so clipping them usually wins: "percentile" is the simple knob, "mse"
minimises the error of the actual format, "entropy" reproduces TensorRT's int8 calibration. fp8's error is
relative (3 mantissa bits) wherever the bulk sits, so a lower threshold barely helps the bulk and clipping
the outliers is a plain loss: "mse" stays at or within a few percent of the amax (on N(0, 1) with three
50-60 sigma outliers it picks 0.32 amax for int8, 3.3x less error than the amax, and the amax for fp8).
For fp8 activations use "max" (or "mse", to confirm).

The histogram works as in TensorRT's and ModelOpt's histogram calibrators, with fixed bins over [0, range).
The first batch sets range just above its amax; a batch beyond it grows range by the smallest power of two
that covers it, merging each run of 2^k old bins into one. The merge is exact: (|x| / range) · bins is
scale-invariant under powers of two, so every value sits in the bin it would have had if the final range
had been known from the start, whatever the batching; amax stays in the upper half (>= bins/2 bins used).

  * percentile: the cumulative count interpolated linearly inside the bin that crosses p% (at most amax).
  * mse: candidates spaced geometrically from amax/256 to amax. Each bin's count is spread over 4 points
    inside it, the points are fake-quantized (int8: round(x/s) within ±127, 255 levels over [-t, t]; fp8:
    gemm's ``quantize_fp8`` at s = t/448, a real float8_e4m3fn cast) and the squared errors weighted by the
    counts. With 4 points the estimate is within ~0.5% of the error measured on the raw data; bin centres
    alone alias onto the grid (errors of ~3%, enough to move the argmin).
  * entropy: the algorithm of Migacz, "8-bit Inference with TensorRT" (GTC 2017): for each candidate i
    (from 128 bins up to the last bin holding data, every ``stride``), P = bins[:i] with the outliers
    folded into P[i-1]; Q = bins[:i] merged into the format's levels, each level's mass spread evenly over
    its bins where P is nonzero, and Q's empty bins under P's mass floored at 1e-4 counts; threshold
    (i + 0.5) · bin width for the i of least KL(P||Q). int8 puts bin j in level floor(128 j / i), TensorRT's
    128 levels. fp8 groups the bins whose centres round to the same float8_e4m3fn value at that threshold:
    the same trade (how much the grid blurs the distribution against how much clipping moves it) asked of
    fp8's real grid, so one algorithm means one thing for both formats. It is not a good fp8 criterion,
    and is kept for comparison rather than replaced by a silent fallback: KL counts bins, not distances,
    and near zero fp8 is finer than a bin, so only the coarse top binades and the folded outliers weigh;
    it clips where fp8's squared error says not to (0.78-0.96 amax on draws of the example above, for
    1-35% more error than the amax).

Tests (CPU, seconds):

    python -m pytest -q tests/test_quant_observers.py
"""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import WorkbenchError
from ..kernels.gemm import FP8_MAX, INT8_MAX, MIN_SCALE, quantize_fp8

#: quantization formats: the largest magnitude each one represents (its qmax)
FORMATS = {"fp8": FP8_MAX, "int8": INT8_MAX}
#: the first histogram range sits this fraction above the first amax, so no value ever equals range
_RANGE_MARGIN = 2.0 ** -8
#: elements binned per chunk: bounds the index buffer (int64) at 128 MiB for huge activations
_CHUNK = 1 << 24
_MSE_CANDIDATES = 128
_MSE_LOWEST = 2.0 ** -8  # smallest candidate, as a fraction of amax
_MSE_POINTS_PER_BIN = 4
_ENTROPY_LEVELS = 128  # TensorRT's int8 levels (the positive half of the grid)
_KL_FLOOR = 1e-4  # counts given to a zero bin of Q where P has mass


def _qmax(fmt: str) -> float:
    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown quantization format {fmt!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_finite(t: torch.Tensor) -> None:
    """Raise naming how many NaN / ±Inf values the batch holds and where the first one is."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    first = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
    raise WorkbenchError(f"update(): the batch {list(t.shape)} holds {nan} NaN and {inf} Inf values (first at index "
                         f"{first}); observers need finite values: find the layer that overflows (run it in float32) "
                         "or leave this batch out")


class Observer:
    """Base class: running amax, sample counts, history and state; subclasses choose the threshold.

    ``samples`` counts update calls, ``rows`` the rows seen (elements / last dim), ``channels`` the size of
    the channel dim (the last dim, or ``axis`` when per channel), fixed by the first update."""

    kind = ""  # the key in OBSERVERS
    supports_per_channel = False

    def __init__(self, axis: int | None = None):
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise WorkbenchError(f"axis must be None (per tensor) or an int (per channel), got {axis!r}")
        if axis is not None and not self.supports_per_channel:
            raise WorkbenchError(f"{type(self).__name__} is per-tensor only (axis={axis} asked); only the 'max' "
                                 "observer keeps per-channel statistics: use MaxObserver(axis=0) for weights")
        self.axis = axis
        self.samples = 0
        self.rows = 0
        self.channels: int | None = None
        self.history: list[float] = []
        self._amax: torch.Tensor | None = None  # float32: scalar, or [channels] per channel

    @property
    def options(self) -> dict:
        """The constructor's arguments, JSON-able: ``make_observer(kind, **options)`` rebuilds an empty twin."""
        return {"axis": self.axis} if self.supports_per_channel else {}

    # --- feeding ------------------------------------------------------------------------------------------------

    def update(self, t: torch.Tensor) -> None:
        """Observe one calibration batch. An empty batch (an expert that got no tokens) is skipped."""
        t = t.detach()
        if t.numel() == 0:
            return
        dim = -1 if self.axis is None else self.axis
        if t.dim() == 0 or not -t.dim() <= dim < t.dim():
            raise WorkbenchError(f"update(): the batch has shape {list(t.shape)}, which has no dim {dim} to hold "
                                 f"channels; pass the tensor with its channel dim")
        channels = t.shape[dim]
        if self.channels is not None and channels != self.channels:
            raise WorkbenchError(f"update(): this observer has seen {self.channels} channels (dim {dim}), this batch "
                                 f"{list(t.shape)} has {channels}; one observer watches one tensor: make one per layer")
        mag = t.abs().float()
        if self.axis is None:
            batch_amax = mag.amax()
        else:
            batch_amax = mag.movedim(self.axis, 0).reshape(channels, -1).amax(dim=1)
        largest = float(batch_amax.max())
        if not math.isfinite(largest):  # NaN and Inf reach the amax (max propagates NaN), so the element-wise
            _check_finite(t)            # check, 7x an amax on the CPU, runs only on a bad batch (it raises)
        if self._amax is not None:
            batch_amax = batch_amax.to(self._amax.device)
        self._amax = batch_amax if self._amax is None else torch.maximum(self._amax, batch_amax)
        self._observe(mag, largest)
        self.channels = channels
        self.samples += 1
        self.rows += t.numel() // t.shape[-1]
        self.history.append(float(self._amax.max()))

    def _observe(self, mag: torch.Tensor, batch_amax: float) -> None:
        """Subclass hook: |batch| as float32 and its amax."""

    # --- answers ------------------------------------------------------------------------------------------------

    def _require_data(self, what: str) -> None:
        if self._amax is None:
            raise WorkbenchError(f"{what}: {type(self).__name__} has seen no data yet; call update() with "
                                 "calibration batches first")

    def amax(self) -> torch.Tensor:
        """The largest |x| seen: a scalar tensor, or [channels] per channel."""
        self._require_data("amax()")
        return self._amax.clone()

    def threshold(self, fmt: str) -> torch.Tensor:
        """The clipping value chosen for ``fmt`` ("fp8" or "int8"), shaped like ``amax()``."""
        _qmax(fmt)
        self._require_data(f"threshold({fmt!r})")
        return self._threshold(fmt).float().to(self._amax.device)

    def _threshold(self, fmt: str) -> torch.Tensor:
        return self._amax.clone()

    def scale(self, fmt: str) -> torch.Tensor:
        """fp32 quantization scale ``threshold / qmax`` (448 for fp8, 127 for int8), floored like gemm's scales."""
        return (self.threshold(fmt) / _qmax(fmt)).clamp(min=MIN_SCALE)

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for safetensors, on the CPU; JSON-able dict: kind, options, samples, rows, channels)."""
        tensors = {"history": torch.tensor(self.history, dtype=torch.float64)}
        if self._amax is not None:
            tensors["amax"] = self._amax.cpu().clone()
        meta = {"kind": self.kind, "options": self.options, "samples": self.samples, "rows": self.rows,
                "channels": self.channels}
        return tensors, meta

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Subclass hook: restore the statistics beyond amax."""

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Observer:
        """Rebuild an observer from ``state_dict()``'s output (e.g. read back with safetensors' load_file)."""
        missing = [k for k in ("kind", "options", "samples", "rows", "channels") if k not in meta]
        if missing or "history" not in tensors:
            raise WorkbenchError(f"observer state lacks {missing or ['the history tensor']}; save it with "
                                 "Observer.state_dict()")
        obs = make_observer(meta["kind"], **meta["options"])
        if not isinstance(obs, cls):
            raise WorkbenchError(f"the state holds a {type(obs).__name__}, not a {cls.__name__}")
        obs.samples, obs.rows, obs.channels = int(meta["samples"]), int(meta["rows"]), meta["channels"]
        obs.history = [float(v) for v in tensors["history"].tolist()]
        if obs.samples:
            if "amax" not in tensors:
                raise WorkbenchError(f"observer state says {obs.samples} samples but holds no 'amax' tensor; "
                                     "it was edited or truncated: calibrate again")
            obs._amax = tensors["amax"].float().clone()
            obs._load(tensors)
        return obs

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts}; samples={self.samples}, rows={self.rows})"


class MaxObserver(Observer):
    """Running amax: per tensor (axis=None), or per channel along ``axis`` (0: the rows N of a [N, K] weight)."""

    kind = "max"
    supports_per_channel = True


class _HistogramObserver(Observer):
    """A histogram of |x|: ``bins`` equal bins over [0, range), range grown by powers of two (see the module)."""

    def __init__(self, bins: int = 2048, axis: int | None = None):
        super().__init__(axis)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < _ENTROPY_LEVELS:
            raise WorkbenchError(f"bins must be an int >= {_ENTROPY_LEVELS}, got {bins!r}; 2048 is the usual choice")
        self.bins = bins
        self._counts: torch.Tensor | None = None  # int64 [bins]
        self._range = 0.0  # 0 while every value seen was zero (they sit in bin 0)

    @property
    def options(self) -> dict:
        return {"bins": self.bins}

    @property
    def hist_range(self) -> float:
        """The histogram's upper edge (0 while every value seen was zero)."""
        return self._range

    @property
    def bin_width(self) -> float:
        return self._range / self.bins

    def counts(self) -> torch.Tensor:
        """The histogram: [bins] int64 counts of |x| over [0, hist_range)."""
        self._require_data("counts()")
        return self._counts.clone()

    def _observe(self, mag: torch.Tensor, batch_amax: float) -> None:
        if self._counts is None:
            self._counts = torch.zeros(self.bins, dtype=torch.int64, device=self._amax.device)
        if batch_amax > 0 and self._range == 0:
            self._range = batch_amax * (1 + _RANGE_MARGIN)
        elif batch_amax >= self._range > 0:
            factor = 2
            while self._range * factor <= batch_amax:
                factor *= 2
            self._counts = _merge_bins(self._counts, factor)
            self._range *= factor
        flat = mag.reshape(-1)
        for chunk in flat.split(_CHUNK):
            if self._range == 0:
                idx = torch.zeros(chunk.numel(), dtype=torch.int64, device=chunk.device)
            else:  # (x / range) * bins: both steps are exact under power-of-two range changes
                idx = (chunk / self._range).mul_(self.bins).floor_().long().clamp_(max=self.bins - 1)
            self._counts += torch.bincount(idx, minlength=self.bins).to(self._counts.device)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict()
        if self._counts is not None:
            tensors["counts"] = self._counts.cpu().clone()
            tensors["range"] = torch.tensor(self._range, dtype=torch.float64)
        return tensors, meta

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "counts" not in tensors or "range" not in tensors or tensors["counts"].numel() != self.bins:
            raise WorkbenchError(f"{type(self).__name__} state needs 'counts' [{self.bins}] and 'range' tensors; it "
                                 "was edited or truncated: calibrate again")
        self._counts = tensors["counts"].long().clone()
        self._range = float(tensors["range"])

    def _percentile(self, p: float) -> float:
        """|x| below which p% of the values lie, interpolated linearly inside the crossing bin."""
        counts = self._counts.double()
        cdf = counts.cumsum(0)
        target = p / 100 * float(cdf[-1])
        j = min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype, device=cdf.device))),
                self.bins - 1)
        before = float(cdf[j] - counts[j])
        frac = (target - before) / float(counts[j]) if counts[j] > 0 else 1.0
        return (j + frac) * self.bin_width


def _merge_bins(counts: torch.Tensor, factor: int) -> torch.Tensor:
    """Counts over a range ``factor`` (a power of two) times wider: bin j sums old bins [j·factor, (j+1)·factor)."""
    bins = counts.numel()
    groups = -(-bins // factor)
    padded = torch.zeros(groups * factor, dtype=counts.dtype, device=counts.device)
    padded[:bins] = counts
    merged = torch.zeros_like(counts)
    merged[:groups] = padded.view(groups, factor).sum(dim=1)
    return merged


class PercentileObserver(_HistogramObserver):
    """The ``percentile`` (0 < p ≤ 100) of |x|, from the histogram; the same threshold for both formats."""

    kind = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048, axis: int | None = None):
        super().__init__(bins, axis)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise WorkbenchError(f"percentile must be in (0, 100], got {percentile!r}; e.g. 99.99 keeps all but one "
                                 "value in 10,000 unclipped")
        self.percentile = float(percentile)

    @property
    def options(self) -> dict:
        return {"percentile": self.percentile, "bins": self.bins}

    def _threshold(self, fmt: str) -> torch.Tensor:
        return torch.tensor(min(self._percentile(self.percentile), float(self._amax)), dtype=torch.float32)


def fake_quantize(x: torch.Tensor, threshold: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` quantized with scale ``threshold / qmax`` and dequantized, in fp32 (int8: round half to even,
    clamped to ±127; fp8: saturated and cast to float8_e4m3fn by gemm's ``quantize_fp8``)."""
    s = (threshold.float() / _qmax(fmt)).clamp(min=MIN_SCALE)
    if fmt == "fp8":
        return quantize_fp8(x, s).float() * s
    return (x.float() / s).round().clamp(-INT8_MAX, INT8_MAX) * s


class MSEObserver(_HistogramObserver):
    """The clipping threshold minimising the expected squared error of the format over the histogram."""

    kind = "mse"

    def _threshold(self, fmt: str) -> torch.Tensor:
        amax = float(self._amax)
        if amax == 0:
            return torch.tensor(0.0)
        candidates = amax * torch.logspace(math.log2(_MSE_LOWEST), 0, _MSE_CANDIDATES, base=2, dtype=torch.float64)
        return candidates[int(self.expected_mse(fmt, candidates).argmin())].float()

    def expected_mse(self, fmt: str, thresholds: torch.Tensor) -> torch.Tensor:
        """The histogram's estimate of the mean squared error at each of ``thresholds`` (a 1-D tensor): each
        bin's count spread evenly over points inside it, the points fake-quantized, errors weighted by counts."""
        _qmax(fmt)
        self._require_data("expected_mse()")
        m = _MSE_POINTS_PER_BIN
        points = (torch.arange(self.bins * m, dtype=torch.float64) + 0.5) * (self.bin_width / m)
        weights = self._counts.cpu().double().repeat_interleave(m)
        keep = weights > 0
        points, weights = points[keep].float(), weights[keep]
        t = thresholds.reshape(-1, 1).cpu()
        err = (fake_quantize(points[None, :], t, fmt) - points[None, :]).double().square()
        return (err * weights).sum(dim=1) / weights.sum()


class EntropyObserver(_HistogramObserver):
    """TensorRT's entropy calibration: the threshold minimising KL(P‖Q) between the clipped histogram and its
    quantized copy; int8 with 128 uniform levels, fp8 with the float8_e4m3fn grid (see the module docstring)."""

    kind = "entropy"

    def __init__(self, bins: int = 2048, stride: int = 16, axis: int | None = None):
        super().__init__(bins, axis)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise WorkbenchError(f"stride must be a positive int (candidate thresholds every stride bins), got "
                                 f"{stride!r}")
        self.stride = stride

    @property
    def options(self) -> dict:
        return {"bins": self.bins, "stride": self.stride}

    def divergences(self, fmt: str) -> tuple[list[int], list[float]]:
        """(candidate bin counts i, KL(P‖Q) for each): the curve ``threshold()`` takes the argmin of."""
        _qmax(fmt)
        self._require_data("divergences()")
        counts = self._counts.cpu().double()
        stop = int(counts.nonzero().max()) + 1  # bins holding data
        candidates = list(range(_ENTROPY_LEVELS, stop, self.stride)) + [stop]
        if stop <= _ENTROPY_LEVELS:  # fewer bins than levels: nothing to merge
            candidates = [stop]
        return candidates, [self._kl(counts, i, fmt) for i in candidates]

    def _levels(self, i: int, fmt: str) -> torch.Tensor:
        """Level index of each of the first i bins."""
        j = torch.arange(i)
        if fmt == "int8":
            return j * _ENTROPY_LEVELS // i
        centres = (j.double() + 0.5) * self.bin_width
        s = torch.tensor((i + 0.5) * self.bin_width / FP8_MAX)
        codes = quantize_fp8(centres, s).float()
        return torch.unique_consecutive(codes, return_inverse=True)[1]  # codes are non-decreasing in j

    def _kl(self, counts: torch.Tensor, i: int, fmt: str) -> float:
        p = counts[:i].clone()
        p[-1] += counts[i:].sum()  # outliers clip to the threshold
        levels = self._levels(i, fmt)
        n = int(levels.max()) + 1
        level_mass = torch.zeros(n, dtype=torch.float64).index_add_(0, levels, counts[:i])
        nonzero = (p > 0).double()
        level_bins = torch.zeros(n, dtype=torch.float64).index_add_(0, levels, nonzero)
        q = (level_mass / level_bins.clamp(min=1))[levels] * nonzero
        q = torch.where((p > 0) & (q == 0), torch.full_like(q, _KL_FLOOR), q)
        mask = p > 0
        p, q = p[mask] / p.sum(), q[mask] / q.sum()
        return float((p * (p / q).log()).sum())

    def _threshold(self, fmt: str) -> torch.Tensor:
        candidates, kl = self.divergences(fmt)
        best = candidates[min(range(len(kl)), key=kl.__getitem__)]
        return torch.tensor(min((best + 0.5) * self.bin_width, float(self._amax)), dtype=torch.float32)


OBSERVERS: dict[str, type[Observer]] = {
    "max": MaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(kind: str, **options) -> Observer:
    """An empty observer of ``kind`` (a key of OBSERVERS) with its options (e.g. ``percentile=99.9``)."""
    if kind not in OBSERVERS:
        raise WorkbenchError(f"unknown observer kind {kind!r}; valid kinds: {', '.join(OBSERVERS)}")
    cls = OBSERVERS[kind]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise WorkbenchError(f"observer {kind!r} takes options {valid}, not {unknown}")
    return cls(**options)
