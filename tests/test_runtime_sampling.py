"""Sampling parameters, the batched sampler, stop checks and incremental detokenization.

The detokenizer runs on two real tokenizers: SmolLM2's (byte-level BPE, GPT-2 style; needs
`workbench fetch smollm2-135m`, like test_smollm2.py) and a tiny SentencePiece-style one (Metaspace,
byte fallback, strip-leading-space decoder, as Llama's) trained here on a few sentences.
"""

import json
import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.runtime.sampling import (IncrementalDetokenizer, SampleOutput, Sampler, SamplingParams, check_stop,
                                        make_generator, suppressed_tokens)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade — déjà vu à Zürich.",
    "你好世界，今天天气很好。日本語のテキスト",
    "Emoji: 🤗🎉 family 👨‍👩‍👧 flags 🇫🇷 done",
    "mixed ünïcödé 漢字 and 🚀 at the end 🚀",
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from workbench.models.intake import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("smollm2-135m", fetch=False))


@pytest.fixture(scope="module")
def sp_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = [TEXTS[0], "Hello world, hello again world!", "The end is near, the end."] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    # add the 256 byte tokens: characters outside the tiny ASCII vocabulary become UTF-8 bytes, as in Llama
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def random_logits(rows, vocab, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def row(probs):
    """Logits [1, vocab] whose softmax is ``probs``."""
    return torch.tensor(probs).log()[None]


def draw(logits, params, n, seed):
    """``n`` draws from one row, all from one seeded generator (the batch repeats the row)."""
    generator = torch.Generator().manual_seed(seed)
    out = Sampler().sample(logits.expand(n, -1), [params] * n, [generator] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[-1]).double() / n


# --- SamplingParams ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "use -1 to consider every token"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=20, max_tokens=10), "raise max_tokens or lower min_tokens"),
    (dict(logprobs=-1), "logprobs must be None or an integer >= 0"),
    (dict(stop=["ok", ""]), "empty stop string"),
    (dict(stop_token_ids=[-3]), "stop_token_ids must be non-negative"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_invalid_params_raise_helpful_errors(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        SamplingParams(**kwargs)


def test_params_defaults_normalisation_and_dict():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.stop, p.stop_token_ids) == (16, 1.0, -1, 1.0, [], [])
    assert not p.greedy and SamplingParams(temperature=0).greedy
    q = SamplingParams(stop="###", stop_token_ids=[5], seed=3, logprobs=2)
    assert q.stop == ["###"]
    assert SamplingParams(**q.to_dict()) == q


# --- Sampler ------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_in_any_float_dtype():
    logits = random_logits(6, 50)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = Sampler().sample(logits.to(dtype), [SamplingParams(temperature=0)] * 6, [None] * 6)
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0]])
    assert Sampler().sample(logits, [SamplingParams(temperature=0)], [None]).token_ids == [1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes exp(-inf - -inf) in both branches
@pytest.mark.parametrize("rows,vocab,dtype", [(1, 5000, torch.bfloat16), (3, 3001, torch.float32),
                                               (6, 1000, torch.float16), (2, 70_000, torch.bfloat16)])
def test_greedy_kernel_matches_argmax_and_log_softmax(rows, vocab, dtype):
    """The one-pass Triton greedy kernel (under the interpreter here): chunked rows (70k columns is 69
    chunks for two rows, more than the combining program takes in one pass), ties across chunks and inside
    one, -inf columns and rows, against torch."""
    from workbench.kernels.triton_sampling import chunking, greedy_logprobs

    logits = (3 * random_logits(rows, vocab, seed=rows)).to(dtype)
    top = logits[0].max() + 1
    ties = {vocab - 1, vocab // 2}  # far apart (other chunks, when split): the lowest id must win
    if vocab // 2 + 1024 < vocab - 1:
        ties.add(vocab // 2 + 1024)  # the same lane, a block later
    if vocab > 66 * 1024:  # chunks 1 and 65: the same lane of the combining program, one pass apart
        ties |= {1024 + 5, 65 * 1024 + 5}
    for t in ties:
        logits[0, t] = top
    expect = logits.float().argmax(-1)
    reference = torch.log_softmax(logits.float(), -1).gather(1, expect[:, None])[:, 0]
    for chunk in (None, 2048):  # 2048: two blocks a program, so lanes meet ties again
        tokens, logprobs = greedy_logprobs(logits, chunk=chunk)
        assert tokens.dtype == torch.int64 and tokens.tolist() == expect.tolist()
        assert tokens[0].item() == min(ties)
        torch.testing.assert_close(logprobs, reference, rtol=1e-5, atol=1e-5)
    assert chunking(rows, vocab)[1] > 1 or vocab <= 1024 * rows  # small batches really are split
    dead = torch.full((2, vocab), float("-inf"), dtype=dtype)
    dead[1, 7] = 1.0
    tokens, logprobs = greedy_logprobs(dead)
    assert tokens.tolist() == [0, 7] and math.isnan(logprobs[0].item()) and logprobs[1].item() == 0


def test_sampler_takes_the_greedy_kernel_only_for_plain_greedy_batches(monkeypatch):
    """Forced on (the runtime uses it on CUDA logits), the kernel gives the torch path's tokens and log-probs;
    a sampled row, a suppressed id or wanted top log-probs keep the torch path."""
    import workbench.kernels.triton_sampling as ts
    import workbench.runtime.sampling as sampling

    logits = random_logits(5, 3000, seed=11).bfloat16()
    greedy = [SamplingParams(temperature=0)] * 5
    plain = Sampler().sample(logits, greedy, [None] * 5)
    calls = []
    kernel = ts.greedy_logprobs
    monkeypatch.setattr(ts, "greedy_logprobs", lambda x: calls.append(x.shape) or kernel(x))
    monkeypatch.setattr(sampling, "_fused_greedy", lambda x: True)
    fused = Sampler().sample(logits, greedy, [None] * 5)
    assert calls == [(5, 3000)]
    assert fused.token_ids == plain.token_ids
    assert fused.logprobs == pytest.approx(plain.logprobs, abs=1e-5)
    assert fused.top_logprobs == plain.top_logprobs == [None] * 5
    for params, suppress in (([SamplingParams(temperature=0)] * 4 + [SamplingParams(temperature=0.7)], None),
                             (greedy, [set(), {3}, set(), set(), set()]),
                             ([SamplingParams(temperature=0, logprobs=2)] + greedy[1:], None)):
        Sampler().sample(logits, params, [None] * 5, suppress)
    assert calls == [(5, 3000)]


def test_top_k_1_is_greedy_at_any_temperature():
    logits = random_logits(8, 100, seed=1)
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0)]
    out = Sampler().sample(logits, params, [None] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    freq = draw(row([0.5, 0.3, 0.15, 0.05]), SamplingParams(top_p=0.8), 2000, seed=0)
    assert set(freq.nonzero()[:, 0].tolist()) == {0, 1}
    assert abs(freq[0] - 0.5 / 0.8) < 0.04 and abs(freq[1] - 0.3 / 0.8) < 0.04
    # ten tokens of 0.1: float32 sums of the first six are 0.59999996, which still reaches top_p 0.6
    assert set(draw(row([0.1] * 10), SamplingParams(top_p=0.6), 500, seed=0).nonzero()[:, 0].tolist()) == set(range(6))
    # the most likely token is always kept, however small top_p is
    assert set(draw(row([0.5, 0.3, 0.15, 0.05]), SamplingParams(top_p=1e-9), 200, seed=0).nonzero()[:, 0]
               .tolist()) == {0}


def test_top_k_keeps_the_k_most_likely():
    freq = draw(row([0.1, 0.4, 0.05, 0.3, 0.15]), SamplingParams(top_k=2), 2000, seed=1)
    assert set(freq.nonzero()[:, 0].tolist()) == {1, 3}
    assert abs(freq[1] - 0.4 / 0.7) < 0.04 and abs(freq[3] - 0.3 / 0.7) < 0.04


def test_top_p_applies_to_the_top_k_distribution():
    # top-k 3 renormalises to [0.5, 0.3, 0.2]: mass before rank 2 is 0.8, so it goes (top-p alone would keep it)
    freq = draw(row([0.4, 0.24, 0.16, 0.12, 0.08]), SamplingParams(top_k=3, top_p=0.8), 2000, seed=2)
    assert set(freq.nonzero()[:, 0].tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    logits = random_logits(1, 8, seed=3) / 3
    n = 20000
    expected = torch.softmax(logits[0].double() / temperature, -1)
    freq = draw(logits, SamplingParams(temperature=temperature), n, seed=4)
    chi2 = (n * (freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 30  # 7 degrees of freedom: p ~ 1e-4


def test_unseeded_rows_use_the_global_rng():
    logits = random_logits(1, 8, seed=5) / 3
    n = 20000
    torch.manual_seed(0)
    out = Sampler().sample(logits.expand(n, -1), [SamplingParams()] * n, [None] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=8).double() / n
    expected = torch.softmax(logits[0].double(), -1)
    assert (n * (freq - expected) ** 2 / expected).sum().item() < 30


def test_seed_gives_the_same_tokens_whatever_the_batch():
    sampler, vocab, steps = Sampler(), 64, 20
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=7),
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(top_k=3)]
    steps_logits = [random_logits(5, vocab, seed=100 + s) for s in range(steps)]

    alone_gen = make_generator(seeded, "cpu")
    alone = [sampler.sample(l[2:3], [seeded], [alone_gen]).token_ids[0] for l in steps_logits]
    batch_gens = [make_generator(p, "cpu") for p in [others[0], others[1], seeded, others[2], others[3]]]
    batch = [sampler.sample(l, [others[0], others[1], seeded, others[2], others[3]], batch_gens).token_ids[2]
             for l in steps_logits]
    assert alone == batch
    assert len(set(alone)) > 3  # really sampling, not a constant
    assert make_generator(SamplingParams(), "cpu") is None


def test_mixed_batch_rows_are_independent():
    logits = random_logits(4, 30, seed=6)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=3.0),
              SamplingParams(temperature=0.8, top_p=0.3), SamplingParams(temperature=0)]
    out = Sampler().sample(logits, params, [None, None, make_generator(SamplingParams(seed=1), "cpu"), None])
    assert out.token_ids[0] == logits[0].argmax().item() and out.token_ids[3] == logits[3].argmax().item()
    assert out.token_ids[1] == logits[1].argmax().item()
    probs = torch.softmax(logits[2] / 0.8, -1).sort(descending=True)
    nucleus = probs.indices[:int((probs.values.cumsum(0) - probs.values < 0.3).sum())].tolist()
    assert out.token_ids[2] in nucleus


def test_logprobs_are_the_raw_model_distribution():
    logits = random_logits(4, 40, seed=7)
    params = [SamplingParams(temperature=0.5, logprobs=5), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(top_k=4, top_p=0.7, logprobs=1), SamplingParams()]
    out = Sampler().sample(logits.half(), params, [None] * 4)
    assert isinstance(out, SampleOutput)
    reference = torch.log_softmax(logits.half().float(), -1)
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-6)
    values, ids = reference.topk(5, -1)
    assert [t for t, _ in out.top_logprobs[0]] == ids[0].tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values[0].tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(out.top_logprobs[0], out.top_logprobs[0][1:]))
    assert out.top_logprobs[1] == [] and out.top_logprobs[3] is None
    assert out.top_logprobs[2] == [(ids[2, 0].item(), pytest.approx(values[2, 0].item(), abs=1e-6))]
    assert all(math.exp(lp) > 0 for lp in out.logprobs)


def test_suppress_forbids_tokens_and_min_tokens_hides_eos():
    eos, vocab = 2, 10
    logits = random_logits(3, vocab, seed=8)
    logits[:, eos] = 20.0  # EOS dominates every row
    p = SamplingParams(min_tokens=3, stop_token_ids=[5])
    assert suppressed_tokens(p, 0, eos) == {2, 5} and suppressed_tokens(p, 2, eos) == {2, 5}
    assert suppressed_tokens(p, 3, eos) == set()
    assert suppressed_tokens(SamplingParams(min_tokens=3, ignore_eos=True), 0, eos) == set()
    params = [SamplingParams(temperature=0, min_tokens=3), SamplingParams(min_tokens=3), SamplingParams(temperature=0)]
    suppress = [suppressed_tokens(q, 1, eos) for q in params]
    for seed in range(20):
        gens = [None, torch.Generator().manual_seed(seed), None]
        out = Sampler().sample(logits, params, gens, suppress=suppress)
        assert out.token_ids[0] == logits[0].masked_fill(torch.arange(vocab) == eos, -1e9).argmax().item()
        assert out.token_ids[1] != eos and out.token_ids[2] == eos
    assert logits[0, eos] == 20.0  # the caller's logits are untouched
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[out.token_ids[0]].item(), abs=1e-6)


def test_sample_rejects_mismatched_rows():
    with pytest.raises(WorkbenchError, match="one of each per row"):
        Sampler().sample(random_logits(3, 5), [SamplingParams()] * 2, [None] * 2)


# --- check_stop ---------------------------------------------------------------------------------------------

def run_stops(tok, params, ids, eos):
    """Feeds ``ids`` as generated tokens until check_stop says stop; returns (reason, kept text, tokens used)."""
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"))
    for n, token in enumerate(ids, 1):
        detok.add(token)
        stop, reason, keep = check_stop(params, ids[:n], token, detok.text, eos)
        if stop:
            return reason, detok.text[:keep], n
    return None, detok.text, len(ids)


def test_stop_token_eos_and_length(smol_tokenizer):
    tok = smol_tokenizer
    eos = tok.eos_token_id
    ids = tok.encode(" one two three four five")
    assert run_stops(tok, SamplingParams(), ids + [eos, 9], eos) == ("stop", " one two three four five", len(ids) + 1)
    assert run_stops(tok, SamplingParams(ignore_eos=True, max_tokens=len(ids) + 2), ids + [eos, 9, 9], eos)[::2] \
        == ("length", len(ids) + 2)
    assert run_stops(tok, SamplingParams(stop_token_ids=[ids[2]]), ids, eos)[::2] == ("stop", 3)
    assert run_stops(tok, SamplingParams(max_tokens=2), ids, eos) == ("length", decode(tok, ids[:2]), 2)
    # stop reasons win over the length limit on the same token
    assert run_stops(tok, SamplingParams(max_tokens=3, stop_token_ids=[ids[2]]), ids, eos)[0] == "stop"


def test_stop_strings_truncate_the_text(smol_tokenizer):
    tok = smol_tokenizer
    ids = tok.encode(" Hello world. The end\n\nNext part")
    # "o wor" spans the tokens " Hello" and " world": the request stops on " world", text cut before the match
    reason, text, used = run_stops(tok, SamplingParams(stop=["o wor", "zzz"]), ids, None)
    assert (reason, text) == ("stop", " Hell") and decode(tok, ids[:used]).endswith(" world")
    assert run_stops(tok, SamplingParams(stop="\n\n"), ids, None)[:2] == ("stop", " Hello world. The end")
    # the earliest of several matches wins
    assert run_stops(tok, SamplingParams(stop=["end", "The"]), ids, None)[:2] == ("stop", " Hello world. ")


def test_min_tokens_holds_back_stops():
    p = SamplingParams(min_tokens=3, stop=["b"], stop_token_ids=[7])
    eos = 0
    assert check_stop(p, [1, 2, 0], 0, "aaa", eos) == (False, None, 3)
    assert check_stop(p, [1, 2, 7], 7, "aaa", eos) == (False, None, 3)
    assert check_stop(p, [1, 2, 3], 3, "aab", eos) == (False, None, 3)
    assert check_stop(p, [1, 2, 3, 0], 0, "aaaa", eos) == (True, "stop", 4)
    assert check_stop(p, [1, 2, 3, 4], 4, "aaab", eos) == (True, "stop", 3)
    assert check_stop(SamplingParams(max_tokens=3, min_tokens=3), [1, 2, 0], 0, "aa", eos) == (True, "length", 2)


# --- IncrementalDetokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["smol_tokenizer", "sp_tokenizer"])
def test_incremental_detokenization_matches_full_decode(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    prompt = tok.encode("Say it:", add_special_tokens=False)
    split_chars = 0
    for text in TEXTS:
        generated = tok.encode(" " + text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add(t) for t in generated]
        assert all("\ufffd" not in d for d in deltas)
        full = decode(tok, prompt + generated)
        assert full.startswith(decode(tok, prompt))
        assert "".join(deltas) == detok.text == full[len(decode(tok, prompt)):]
        assert detok.token_ids == generated
        split_chars += deltas.count("")
    assert split_chars > 5  # the texts really have characters split across tokens


@pytest.mark.parametrize("tokenizer", ["smol_tokenizer", "sp_tokenizer"])
def test_detokenization_without_prompt_and_with_special_tokens(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    for text in TEXTS:
        generated = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, [])
        assert "".join(detok.add(t) for t in generated + [tok.eos_token_id]) == decode(tok, generated)


def test_sentencepiece_keeps_word_spaces(sp_tokenizer):
    tok = sp_tokenizer
    ids = tok.encode("Hello world again", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["Hello", "world", "again"]  # alone, each loses its space
    detok = IncrementalDetokenizer(tok, tok.encode("Hello", add_special_tokens=False))
    assert [detok.add(i) for i in ids] == [" Hello", " world", " again"]
