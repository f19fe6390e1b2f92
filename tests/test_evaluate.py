"""Perplexity windows and greedy decoding, on logits functions whose answers are known exactly."""

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.evaluate import dataset_text, greedy, perplexity

V = 50
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(1))


def bigram(ids):
    """Logits depend only on the current token: every window sees the same prediction."""
    return TABLE[ids]


def exact_bigram_nll(ids):
    lp = torch.log_softmax(TABLE[ids[:-1]].double(), -1)
    return -lp.gather(1, ids[1:, None]).sum().item()


@pytest.mark.parametrize("n,window,stride", [(1000, 128, 64), (1000, 128, 128), (1000, 100, 37), (50, 128, 64),
                                             (129, 128, 1), (300, 16, 500)])
def test_each_token_scored_once(n, window, stride):
    ids = torch.randint(0, V, (n,))
    r = perplexity(bigram, ids, window=window, stride=stride)
    assert r.tokens_scored == n - 1
    assert r.nll_sum == pytest.approx(exact_bigram_nll(ids), rel=1e-6)  # fp32 log-softmax vs fp64
    assert r.perplexity == pytest.approx(math.exp(exact_bigram_nll(ids) / (n - 1)), rel=1e-6)


def test_windows_never_exceed_window_and_keep_context():
    seen = []

    def spy(ids):
        seen.append(ids.shape[1])
        return TABLE[ids]

    perplexity(spy, torch.randint(0, V, (1000,)), window=128, stride=96)
    assert max(seen) == 128 and seen[0] == 128
    assert len(seen) == 1 + -(-(1000 - 128) // 96)


def test_uniform_model_has_perplexity_vocab():
    r = perplexity(lambda ids: torch.zeros(*ids.shape, V), torch.randint(0, V, (300,)), window=64, stride=32)
    assert r.perplexity == pytest.approx(V)


def test_context_is_used_within_a_window():
    """A model that predicts 'the previous token plus one' scores perfectly on a counting sequence."""
    def counter(ids):
        return torch.nn.functional.one_hot((ids + 1) % V, V).float() * 50

    r = perplexity(counter, torch.arange(400) % V, window=64, stride=16)
    assert r.perplexity == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(WorkbenchError, match="stride"):
        perplexity(bigram, torch.arange(10), window=8, stride=0)
    with pytest.raises(WorkbenchError, match="at least 2 tokens"):
        perplexity(bigram, torch.arange(1))
    with pytest.raises(WorkbenchError, match="no dataset 'nope'.*calibration, evaluation"):
        dataset_text("nope")


def test_greedy_follows_argmax_and_stops_at_eos():
    def counter(ids):
        return torch.nn.functional.one_hot((ids + 1) % V, V).float()

    assert greedy(counter, torch.tensor([3, 4]), 5) == [5, 6, 7, 8, 9]
    assert greedy(counter, torch.tensor([3]), 10, eos_token_id=6) == [4, 5, 6]


def test_datasets_are_disjoint_text_sets():
    cal, ev = dataset_text("calibration"), dataset_text("evaluation")
    assert 20_000 < len(ev) < 300_000 and 300_000 < len(cal) < 1_600_000  # a few MB at most, shipped in the repo
    paragraphs = {p.strip() for p in cal.split("\n\n") if len(p.strip()) > 80}
    assert not any(p.strip() in paragraphs for p in ev.split("\n\n") if len(p.strip()) > 80)
