"""Calibration observers (workbench.quant.observers): amax bookkeeping, the re-binned histogram, the four
thresholds against direct computations on the raw data, state round trips and the errors. CPU, seconds."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.quant.observers import (OBSERVERS, EntropyObserver, MaxObserver, MSEObserver, Observer,
                                       PercentileObserver, fake_quantize, make_observer)


def gaussian(rows: int, cols: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def with_outliers(x: torch.Tensor, values=(60.0, -55.0, 50.0)) -> torch.Tensor:
    """x with a few planted outliers at fixed places (a copy)."""
    x = x.clone()
    for k, v in enumerate(values):
        x[37 * k + 5, k] = v
    return x


def feed(obs: Observer, x: torch.Tensor, batches: int = 8) -> Observer:
    for part in x.chunk(batches):
        obs.update(part)
    return obs


def measured_mse(x: torch.Tensor, threshold: float, fmt: str) -> float:
    return (fake_quantize(x, torch.tensor(threshold), fmt) - x).double().square().mean().item()


# --- max --------------------------------------------------------------------------------------------------------

def test_max_per_tensor_tracks_amax_and_history():
    batches = [gaussian(64, seed=s) * scale for s, scale in enumerate([1.0, 3.0, 0.5, 7.0, 2.0])]
    obs = MaxObserver()
    for b in batches:
        obs.update(b)
    assert obs.amax().item() == torch.cat(batches).abs().max().item()
    assert obs.samples == 5 and obs.rows == 5 * 64 and obs.channels == 16
    assert obs.history == [torch.cat(batches[:k + 1]).abs().max().item() for k in range(5)]
    assert all(a <= b for a, b in zip(obs.history, obs.history[1:]))
    assert obs.threshold("fp8") == obs.threshold("int8") == obs.amax()
    assert obs.scale("fp8").item() == pytest.approx(obs.amax().item() / 448, rel=1e-6)
    assert obs.scale("int8").item() == pytest.approx(obs.amax().item() / 127, rel=1e-6)


def test_max_per_channel_weights_and_activations():
    w = gaussian(24, 96, seed=1) * torch.linspace(0.1, 3.0, 24)[:, None]  # rows of very different ranges
    rows = MaxObserver(axis=0)
    for part in w.split(32, dim=1):  # a weight seen in K slices: per row N over all of K
        rows.update(part)
    assert torch.equal(rows.amax(), w.abs().amax(dim=1))
    assert rows.scale("fp8").shape == (24,)
    assert torch.allclose(rows.scale("int8"), w.abs().amax(dim=1) / 127)
    assert rows.history[-1] == w.abs().max().item()

    x = gaussian(200, 8, seed=2) * torch.arange(1.0, 9.0)  # activations [tokens, C]: per input channel
    cols = feed(MaxObserver(axis=-1), x, batches=5)
    assert torch.equal(cols.amax(), x.abs().amax(dim=0))
    assert len(cols.history) == cols.samples == 5


# --- histogram ----------------------------------------------------------------------------------------------------

def test_rebinning_matches_one_histogram_of_all_data():
    batches = [gaussian(4096, seed=s) * scale for s, scale in enumerate([0.5, 1.0, 3.0, 10.0, 10.0, 40.0])]
    growing = PercentileObserver(percentile=99.9)
    for b in batches:
        growing.update(b)
    every = torch.cat(batches)
    first_amax = batches[0].abs().max().item()
    assert growing.hist_range >= 64 * first_amax  # grew several times, by powers of two
    assert every.abs().max().item() < growing.hist_range <= 2 * every.abs().max().item()
    # exact: the same counts as binning everything at the final range in one pass
    direct = (every.abs() / growing.hist_range).mul_(growing.bins).floor_().long().clamp_(max=growing.bins - 1)
    assert torch.equal(growing.counts(), torch.bincount(direct.view(-1), minlength=growing.bins))
    # and the percentile of one histogram built from the concatenated data (its own range)
    once = PercentileObserver(percentile=99.9)
    once.update(every)
    width = max(growing.bin_width, once.bin_width)
    assert abs(growing.threshold("int8").item() - once.threshold("int8").item()) <= width


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
def test_percentile_matches_torch_quantile(p):
    x = gaussian(1 << 16, seed=3)  # 1M values
    obs = feed(PercentileObserver(percentile=p), x)
    expected = torch.quantile(x.abs().view(-1)[: 1 << 24], p / 100).item()
    assert abs(obs.threshold("fp8").item() - expected) <= obs.bin_width
    assert obs.threshold("int8").item() == obs.threshold("fp8").item()


def test_percentile_100_is_amax():
    x = with_outliers(gaussian(4096, seed=4))
    obs = feed(PercentileObserver(percentile=100), x)
    assert obs.threshold("int8").item() == x.abs().max().item()


# --- mse ----------------------------------------------------------------------------------------------------------

def test_mse_clips_outliers_for_int8_but_not_for_fp8():
    # 1M N(0, 1) values and three outliers of 50-60 sigma: int8's uniform grid pays for every unit of range,
    # so clipping the outliers wins; fp8's error is relative (3 mantissa bits) wherever the bulk sits, so
    # clipping only adds error: the squared-error optimum stays at (or within a candidate of) the amax.
    x = with_outliers(gaussian(1 << 16, seed=5))
    amax = x.abs().max().item()
    obs = feed(MSEObserver(), x)
    t_int8 = obs.threshold("int8").item()
    assert t_int8 < 0.5 * amax
    assert measured_mse(x, t_int8, "int8") < 0.5 * measured_mse(x, amax, "int8")
    t_fp8 = obs.threshold("fp8").item()
    assert measured_mse(x, t_fp8, "fp8") <= measured_mse(x, amax, "fp8") * 1.001
    assert t_fp8 >= 0.9 * amax
    # what the threshold minimises agrees with the error of actually quantizing the data
    for fmt in ("int8", "fp8"):
        for t in (0.1 * amax, t_int8, amax):
            estimate = obs.expected_mse(fmt, torch.tensor([t])).item()
            assert estimate == pytest.approx(measured_mse(x, t, fmt), rel=0.02)


def test_mse_without_outliers():
    x = gaussian(1 << 14, seed=6)
    amax = x.abs().max().item()
    obs = feed(MSEObserver(), x)
    assert obs.threshold("fp8").item() >= 0.85 * amax
    t_int8 = obs.threshold("int8").item()  # a uniform grid still trims the sparse tail of a Gaussian
    assert t_int8 < amax
    assert measured_mse(x, t_int8, "int8") < measured_mse(x, amax, "int8")


# --- entropy ------------------------------------------------------------------------------------------------------

def reference_kl(counts: torch.Tensor, i: int) -> float:
    """TensorRT's int8 divergence for candidate i, written out level by level."""
    counts = counts.double()
    p = counts[:i].clone()
    p[-1] += counts[i:].sum()
    q = torch.zeros(i, dtype=torch.float64)
    for level in range(128):
        lo, hi = -(-level * i // 128), -(-(level + 1) * i // 128)  # bins j with floor(128 j / i) == level
        nonzero = p[lo:hi] > 0
        if nonzero.any():
            q[lo:hi][nonzero] = counts[lo:hi].sum() / nonzero.sum()
    q[(p > 0) & (q == 0)] = 1e-4
    m = p > 0
    p, q = p[m] / p.sum(), q[m] / q.sum()
    return (p * (p / q).log()).sum().item()


def test_entropy_int8_on_gaussian():
    x = gaussian(1 << 16, seed=7)  # 1M values
    amax = x.abs().max().item()
    p99 = torch.quantile(x.abs().view(-1), 0.99).item()
    obs = feed(EntropyObserver(), x)
    t = obs.threshold("int8").item()
    assert p99 < t < amax and t > 3.0  # a few sigma
    assert feed(EntropyObserver(), x).threshold("int8").item() == t  # deterministic
    candidates, kl = obs.divergences("int8")
    assert candidates[0] == 128 and t == pytest.approx((candidates[kl.index(min(kl))] + 0.5) * obs.bin_width)
    for k in (0, len(candidates) // 2, len(candidates) - 1):
        assert kl[k] == pytest.approx(reference_kl(obs.counts(), candidates[k]), rel=1e-9)


def test_entropy_fp8():
    x = gaussian(1 << 14, seed=8)
    obs = feed(EntropyObserver(), x)
    p99 = torch.quantile(x.abs().view(-1), 0.99).item()
    assert p99 < obs.threshold("fp8").item() <= x.abs().max().item()
    outliers = feed(EntropyObserver(), with_outliers(x))
    assert 0 < outliers.threshold("fp8").item() <= 60.0


# --- state --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, options", [("max", {}), ("max", {"axis": -1}), ("percentile", {"percentile": 99.9}),
                                           ("mse", {}), ("entropy", {"stride": 8})])
def test_state_round_trip_through_safetensors(kind, options, tmp_path):
    x = with_outliers(gaussian(4096, seed=9)) * torch.linspace(0.5, 2.0, 16)
    obs = feed(make_observer(kind, **options), x, batches=4)
    tensors, meta = obs.state_dict()
    path = tmp_path / "observer.safetensors"
    save_file(tensors, path, metadata={"observer": json.dumps(meta)})
    back = Observer.from_state(load_file(path), json.loads(load_file_meta(path)["observer"]))
    assert type(back) is type(obs) and back.options == obs.options
    assert (back.samples, back.rows, back.channels, back.history) == (obs.samples, obs.rows, obs.channels,
                                                                        obs.history)
    for fmt in ("fp8", "int8"):
        assert torch.equal(back.scale(fmt), obs.scale(fmt))
    more = gaussian(512, seed=10) * 100  # both keep calibrating alike (the histogram grows the same way)
    obs.update(more)
    back.update(more)
    for fmt in ("fp8", "int8"):
        assert torch.equal(back.scale(fmt), obs.scale(fmt))


def load_file_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- edges and errors ---------------------------------------------------------------------------------------------

def test_registry_and_edge_batches():
    assert set(OBSERVERS) == {"max", "percentile", "mse", "entropy"}
    for kind, cls in OBSERVERS.items():
        obs = make_observer(kind)
        assert isinstance(obs, cls) and obs.kind == kind
        obs.update(torch.empty(0, 16))  # an expert that got no tokens: skipped
        assert obs.samples == 0
    # a first batch of exact zeros (a masked layer) leaves the histogram valid for what follows
    obs = PercentileObserver(percentile=99.0)
    obs.update(torch.zeros(100, 16))
    x = gaussian(4096, seed=11) + 0.5
    obs.update(x)
    expected = torch.quantile(torch.cat([torch.zeros(1600), x.abs().view(-1)]), 0.99).item()
    assert abs(obs.threshold("int8").item() - expected) <= obs.bin_width
    assert obs.amax().item() == x.abs().max().item()


def test_errors_name_the_problem():
    obs = MSEObserver()
    with pytest.raises(WorkbenchError, match="seen no data yet"):
        obs.scale("int8")
    with pytest.raises(WorkbenchError, match="no data yet"):
        MaxObserver().amax()

    bad = gaussian(8, 4, seed=12)
    bad[2, 1] = float("nan")
    with pytest.raises(WorkbenchError, match=r"1 NaN and 0 Inf values \(first at index \(2, 1\)\)"):
        obs.update(bad)
    bad[2, 1] = float("-inf")
    with pytest.raises(WorkbenchError, match="0 NaN and 1 Inf"):
        obs.update(bad)
    assert obs.samples == 0  # a rejected batch leaves no trace

    with pytest.raises(WorkbenchError, match="per-tensor only.*MaxObserver\\(axis=0\\)"):
        make_observer("percentile", axis=0)
    for kind in ("mse", "entropy"):
        with pytest.raises(WorkbenchError, match="per-tensor only"):
            make_observer(kind, axis=0)
    for p in (0, -1.0, 100.5, float("nan")):
        with pytest.raises(WorkbenchError, match=r"percentile must be in \(0, 100\]"):
            PercentileObserver(percentile=p)

    obs.update(gaussian(8, 16, seed=13))
    with pytest.raises(WorkbenchError, match="has seen 16 channels.*has 32"):
        obs.update(gaussian(8, 32, seed=14))
    weights = MaxObserver(axis=0)
    weights.update(gaussian(8, 4, seed=15))
    with pytest.raises(WorkbenchError, match="has seen 8 channels"):
        weights.update(gaussian(6, 4, seed=16))

    with pytest.raises(WorkbenchError, match="valid kinds: max, percentile, mse, entropy"):
        make_observer("minmax")
    with pytest.raises(WorkbenchError, match="takes options"):
        make_observer("max", percentile=99.0)
    with pytest.raises(WorkbenchError, match="unknown quantization format 'fp4'"):
        obs.scale("fp4")
    with pytest.raises(WorkbenchError, match="bins must be an int"):
        EntropyObserver(bins=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = with_outliers(gaussian(1 << 14, seed=17))
    for kind in OBSERVERS:
        cpu, gpu = feed(make_observer(kind), x), feed(make_observer(kind), x.cuda())
        for fmt in ("fp8", "int8"):
            assert gpu.scale(fmt).is_cuda
            assert torch.allclose(gpu.scale(fmt).cpu(), cpu.scale(fmt), rtol=1e-3)
