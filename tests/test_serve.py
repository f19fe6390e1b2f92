"""The OpenAI-compatible server on the CPU: a tiny random-weight Llama with SmolLM2's vocabulary, driven through
SmolLM2's real tokenizer and chat template (a fast model, real text), served by uvicorn in a thread and driven
by httpx: 200 concurrent requests whose text equals ``LLM.generate``'s, disconnects that free their blocks,
every bad input answered with OpenAI's error body while good requests go on, back-pressure, shutdown, a
failing engine, and ``workbench serve`` stopped by SIGTERM mid-stream. About 30 s on 2 cores."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest.mock import ANY

import httpx
import pytest

from workbench.errors import WorkbenchError
from workbench.models import PRESETS, ModelSource, load_tokenizer, resolve_source
from workbench.runtime.async_engine import AsyncLLMEngine, ContextLengthError, EngineClosedError, QueueFullError
from workbench.runtime.engine import LLM, LLMEngine
from workbench.runtime.sampling import SamplingParams
from workbench.runtime.scheduler import SchedulerConfig
from workbench.serve import create_app
from workbench.serve.metrics import prometheus_text

SMOL_SHAPED = dict(PRESETS["tiny-llama"], vocab_size=49152, max_position_embeddings=512)
MODEL = "tiny-smol"
SERVED_BLOCKS = 16
SHARED = "You are a careful assistant. Answer in one short sentence, plainly and without any preamble. "
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
    "The three primary colors are", "To bake bread at home, you first need to", "Water boils at",
    SHARED + "What is the tallest mountain?", SHARED + "Why is the sky blue?", SHARED + "Name a prime number.",
    "Héllo wörld, ünïcode ✓ and emoji 🙂 →", "1, 2, 3, 4,", "import numpy as np\n", "Q: What is 2+2?\nA:",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_source("smollm2-135m", fetch=False))


@pytest.fixture(scope="module")
def smol_program():
    """The optimized graph (paged attention) of a 2-layer random Llama with SmolLM2's 49152-token vocabulary."""
    from workbench.pipeline import optimize

    return optimize(ModelSource("random", MODEL, None, SMOL_SHAPED, 0), device="cpu").program


def make_engine(program, tokenizer, *, max_pending=256, num_blocks=256, max_num_seqs=32):
    return AsyncLLMEngine(LLMEngine(program, tokenizer, num_blocks=num_blocks,
                                    config=SchedulerConfig(max_num_seqs=max_num_seqs)), max_pending=max_pending)


class ServerThread:
    """uvicorn serving ``app`` on a free local port, in a background thread (its own event loop)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def served(smol_program, tokenizer):
    # 16 blocks of 16 tokens for up to 32 running requests: the load test preempts
    engine = make_engine(smol_program, tokenizer, num_blocks=SERVED_BLOCKS)
    app = create_app(engine, model_name=MODEL, chat_template=tokenizer.chat_template, max_body_bytes=2**20)
    with ServerThread(app) as server:
        yield server.url, engine
    assert not engine._thread.is_alive()  # the lifespan's end shut the engine down


@pytest.fixture(scope="module")
def offline(smol_program, tokenizer):
    return LLM(smol_program, tokenizer=tokenizer, num_blocks=1024)


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def metric_values(text):
    """{'name{labels}': value} of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def post(client, url, body, *, stream=False, close_after=None):
    """POST a request; returns (status, body) or, streaming, (status, {index: text}, finish reasons, usage,
    logprob chunks, whether [DONE] came). ``close_after`` chunks: disconnect early."""
    if not stream:
        r = await client.post(url, json=body)
        return r.status_code, r.json()
    texts, reasons, usage, chunks, done = {}, {}, None, 0, False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json(), None, None, False
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                piece = c["delta"].get("content") or "" if "delta" in c else c["text"]
                texts[c["index"]] = texts.get(c["index"], "") + piece
                if c["finish_reason"] is not None:
                    reasons[c["index"]] = c["finish_reason"]
            usage = chunk.get("usage") or usage
            chunks += 1
            if close_after is not None and chunks >= close_after:
                break  # leaving the block closes the connection mid-stream
    return r.status_code, texts, reasons, usage, done


def load_requests(tokenizer):
    """200 request specs: completions and chats, greedy and seeded sampling, stop strings, n=2, log-probs,
    a few long ones; half streaming, one in ten of those disconnecting after two chunks."""
    specs = []
    for i in range(200):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": MODEL, "max_tokens": 3 + i % 6, "seed": 1000 + i}
        if i % 3:
            body.update(temperature=0.8, top_p=0.9, top_k=40)
        else:
            body["temperature"] = 0
        if i % 7 == 0:
            body["stop"] = ["e", "in"]
        if i % 25 == 4:
            body["n"] = 2
        if i % 17 == 8:  # long enough to need blocks while the cache is full: preemptions
            body.update(max_tokens=40, ignore_eos=True)
        chat = i % 5 == 1
        stream = i % 2 == 0
        disconnect = stream and i % 20 == 0
        if disconnect:
            body.update(max_tokens=200, ignore_eos=True)
            body.pop("stop", None)
        if chat:
            messages = [{"role": "user", "content": prompt}]
            body["messages"] = messages
            prompt_ids = chat_ids(tokenizer, messages)
            if i % 13 == 6:
                body.update(logprobs=True, top_logprobs=2)
        else:
            body["prompt"] = prompt
            prompt_ids = tokenizer(prompt).input_ids
            if i % 13 == 6:
                body["logprobs"] = 2
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        specs.append(dict(i=i, body=body, chat=chat, stream=stream, disconnect=disconnect, prompt_ids=prompt_ids))
    return specs


def expected_outputs(offline, specs):
    """``LLM.generate`` offline for every choice of every request: the same prompt tokens, params and seeds."""
    prompts, params, where = [], [], []
    for s in specs:
        b = s["body"]
        for j in range(0 if s["disconnect"] else b.get("n", 1)):
            top = b.get("top_logprobs", 0) if b.get("logprobs") is True else b.get("logprobs")
            params.append(SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"],
                                         top_p=b.get("top_p", 1.0), top_k=b.get("top_k", -1), seed=b["seed"] + j,
                                         stop=b.get("stop"), ignore_eos=b.get("ignore_eos", False), logprobs=top))
            prompts.append(s["prompt_ids"])
            where.append((s["i"], j))
    return dict(zip(where, offline.generate(prompts, params)))


def test_200_concurrent_requests_equal_offline_generation(served, offline, tokenizer):
    url, engine = served
    specs = load_requests(tokenizer)
    expected = expected_outputs(offline, specs)
    before = metric_values(httpx.get(url + "/metrics").text)

    async def one(client, s):
        await asyncio.sleep(s["i"] // 25 * 0.2 + s["i"] % 25 * 0.002)  # staggered, in bursts that fill the cache
        path = "/v1/chat/completions" if s["chat"] else "/v1/completions"
        if s["stream"]:
            return await post(client, url + path, s["body"], stream=True, close_after=2 if s["disconnect"] else None)
        return await post(client, url + path, s["body"])

    async def run():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, s) for s in specs))

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    completed = sum(check_answer(s, res, expected) for s, res in zip(specs, results))
    disconnected = sum(s["disconnect"] for s in specs)
    deadline = time.monotonic() + 30
    while engine.stats()["pending"] and time.monotonic() < deadline:  # aborts are processed between steps
        time.sleep(0.05)
    check_metrics_after_the_load(url, engine, before, completed, disconnected, elapsed)


def check_answer(s: dict, res: tuple, expected: dict) -> int:
    """One request's answer against offline generation's (text, finish reason, usage, logprobs); returns the
    completions it finished (0 for a client that disconnected)."""
    b, n = s["body"], s["body"].get("n", 1)
    assert res[0] == 200, (s, res)
    if s["disconnect"]:
        assert not res[4] and len(res[1][0]) > 0  # some text came, then the client left
        return 0
    want = [expected[(s["i"], j)] for j in range(n)]
    if s["stream"]:
        _, texts, reasons, usage, done = res
        assert done and [texts[j] for j in range(n)] == [w.text for w in want], (s["i"], texts, want)
        assert [reasons[j] for j in range(n)] == [w.finish_reason for w in want]
    else:
        body = res[1]
        key = "message" if s["chat"] else "text"
        got = [c["message"]["content"] if s["chat"] else c["text"] for c in body["choices"]]
        assert got == [w.text for w in want], (s["i"], key, got, want)
        assert [c["finish_reason"] for c in body["choices"]] == [w.finish_reason for w in want]
        assert body["object"] == ("chat.completion" if s["chat"] else "text_completion")
        usage = body["usage"]
        if "logprobs" in b:
            lp = body["choices"][0]["logprobs"]
            if s["chat"]:
                got_lp = [t["logprob"] for t in lp["content"]]
                assert all(len(t["top_logprobs"]) == 2 for t in lp["content"])
            else:
                got_lp = lp["token_logprobs"]
                assert len(lp["tokens"]) == len(got_lp) and all(len(t) <= 2 for t in lp["top_logprobs"])
            assert got_lp == pytest.approx(want[0].logprobs, abs=1e-4)
    generated = sum(len(w.token_ids) for w in want)
    assert usage == {"prompt_tokens": len(s["prompt_ids"]), "completion_tokens": generated,
                     "total_tokens": len(s["prompt_ids"]) + generated}
    return n


def check_metrics_after_the_load(url, engine, before: dict, completed: int, disconnected: int,
                                 elapsed: float) -> None:
    """/metrics after the load: every request counted by how it ended, the cache and the queues empty again,
    preemptions and prefix-cache hits seen, latencies recorded."""
    after = metric_values(httpx.get(url + "/metrics").text)

    def delta(key):
        return after[key] - before.get(key, 0)

    assert delta('workbench_requests_total{finish_reason="abort"}') == disconnected == 10
    assert (delta('workbench_requests_total{finish_reason="stop"}') +
            delta('workbench_requests_total{finish_reason="length"}')) == completed
    assert after["workbench_requests_running"] == after["workbench_requests_waiting"] == 0
    assert after["workbench_requests_pending"] == 0 and after["workbench_kv_cache_usage_percent"] == 0
    assert engine.engine.scheduler.bm.num_free == SERVED_BLOCKS and not engine.engine.states  # freed, released
    assert delta("workbench_preemptions_total") > 0  # and the outputs still equal offline generation's
    assert after["workbench_prefix_cache_hit_rate"] > 0  # the shared preamble's blocks were reused
    assert delta("workbench_time_to_first_token_seconds_count") >= completed
    assert delta("workbench_inter_token_latency_seconds_count") > 0
    assert delta('workbench_e2e_request_latency_seconds_bucket{le="+Inf"}') == completed + disconnected
    stopped = delta('workbench_requests_total{finish_reason="stop"}')
    print(f"200 requests in {elapsed:.1f} s: {delta('workbench_preemptions_total'):.0f} preemptions, "
          f"{stopped:.0f} stopped, prefix-cache hit rate {after['workbench_prefix_cache_hit_rate']:.2f}")


BAD_INPUTS = [
    # (path, raw body or JSON, status, param, code)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, None, None),                   # malformed JSON
    ("/v1/completions", b'{"prompt": "caf\xe9 \xff"}', 400, None, None),                        # invalid UTF-8
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, None, None),              # not JSON numbers
    ("/v1/completions", b'["a", "list"]', 400, None, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),        # wrong types
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"prompt": "hi", "stop": [1, 2]}, 400, "stop", None),
    ("/v1/completions", {}, 400, "prompt", None),                                               # missing field
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),   # unknown model
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),           # negative
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),                          # empty messages
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),                                   # empty prompt
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [5, 49152]}, 400, "prompt", None),                           # id not in vocab
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature", None),  # inf: would NaN
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [49152], "min_tokens": 1}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**40}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "top_k": 0}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", None),                     # not implemented
    ("/v1/completions", b'{"prompt": "' + b"x" * (2**20 + 10) + b'"}', 413, None, "request_too_large"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt", None),                       # lone surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages", None),
    ("/v1/completions", b'{"prompt": "x", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None, None),  # nested
    ("/v1/completions", {"prompt": "x", "a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}, 400, None, None),
    ("/v1/completions", {"prompt": "hi", "stop": ["ab"] * 100_000}, 400, "stop", None),         # over the limits
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 257}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1] * 257}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 128}, 400, "n", None),                # never fits
    ("/v1/completions", {"prompt": "hi", "seed": True}, 400, "seed", None),
    ("/v1/nothing", {"prompt": "hi"}, 404, None, "not_found"),
]


def test_bad_inputs_get_openai_errors_while_good_requests_complete(served, offline, tokenizer):
    url, engine = served
    good = [{"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0.7, "seed": 5 + i, "stream": i % 2 == 0}
            for i, p in enumerate(PROMPTS[:6])]
    want = offline.generate(PROMPTS[:6], [SamplingParams(max_tokens=6, temperature=0.7, seed=5 + i) for i in range(6)])
    good.append({"prompt": PROMPTS[6], "max_tokens": 6, "temperature": 1e-30, "stream": False})  # greedy, as vLLM
    want += offline.generate(PROMPTS[6:7], SamplingParams(max_tokens=6, temperature=0))

    async def bad(client, i, case):
        path, body, *_ = case
        await asyncio.sleep(0.01 * i)
        if isinstance(body, bytes):
            r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post(url + path, json=body)
        return r.status_code, r.json()

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            goods = [post(client, url + "/v1/completions", b, stream=b["stream"]) for b in good]
            bads = [bad(client, i, case) for i, case in enumerate(BAD_INPUTS)]
            results = await asyncio.gather(*goods, *bads)
            wrong_method = await client.get(url + "/v1/completions")
            return results[:len(good)], results[len(good):], wrong_method

    goods, bads, wrong_method = asyncio.run(run())
    for case, (status, body) in zip(BAD_INPUTS, bads):
        path, _, want_status, want_param, want_code = case
        assert status == want_status, (case[:2], body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["type"] == "invalid_request_error"
        if want_param is not None:
            assert body["error"]["param"] == want_param, (case[:2], body)
        if want_code is not None:
            assert body["error"]["code"] == want_code, (case[:2], body)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"
    for b, res, w in zip(good, goods, want):
        assert res[0] == 200
        assert (res[1][0] if b["stream"] else res[1]["choices"][0]["text"]) == w.text
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == SERVED_BLOCKS * 16


def test_a_seed_whose_choices_overflow_64_bits_works_and_the_engine_goes_on(served, offline):
    """Issue 25: seed 2**64-1 with n=2 stopped the engine thread (seed + 1 overflowed); choice i's seed is now
    seed + i in 64 bits, so choice 1 samples with seed 0."""
    url, engine = served
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0.8, "n": 2, "seed": 2**64 - 1}
    want = offline.generate([PROMPTS[0]] * 2, [SamplingParams(max_tokens=4, temperature=0.8, seed=s)
                                               for s in (2**64 - 1, 0)])
    with httpx.Client(timeout=60) as c:
        plain = c.post(url + "/v1/completions", json=body)
        streamed = c.post(url + "/v1/completions", json={**body, "stream": True})
        canary = c.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert plain.status_code == 200 and [ch["text"] for ch in plain.json()["choices"]] == [w.text for w in want]
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n") and '"error"' not in streamed.text
    assert canary.status_code == 200 and engine.is_running


def test_a_request_that_fails_inside_the_step_fails_alone(smol_program, tokenizer, offline):
    """The supervisor: one request's draw raises inside the shared step (injected: its seed poisons the sampler);
    that request gets a 500 (in-band in a stream), its batch-mates get offline generation's text, and the
    server goes on serving."""
    engine = make_engine(smol_program, tokenizer)
    launch = engine.engine.sampler.launch

    def poisoned(logits, params, generators, suppress=None):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling failure")
        return launch(logits, params, generators, suppress)

    engine.engine.sampler.launch = poisoned
    app = create_app(engine, model_name=MODEL)
    good = [{"prompt": p, "max_tokens": 8, "temperature": 0.7, "seed": 5 + i} for i, p in enumerate(PROMPTS[:4])]
    want = offline.generate(PROMPTS[:4], [SamplingParams(max_tokens=8, temperature=0.7, seed=5 + i) for i in range(4)])
    bad = {"prompt": PROMPTS[5], "max_tokens": 8, "temperature": 0.7, "seed": 666}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            results = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in good),
                                           c.post("/v1/completions", json=bad),
                                           c.post("/v1/completions", json={**bad, "stream": True}))
            canary = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            metrics = await c.get("/metrics")
            return results, canary, metrics

    (*goods, failed, failed_stream), canary, metrics = asyncio.run(run())
    assert [r.json()["choices"][0]["text"] for r in goods] == [w.text for w in want]
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
    assert "injected sampling failure" in failed.json()["error"]["message"]
    assert failed_stream.status_code == 200 and '"request_failed"' in failed_stream.text
    assert failed_stream.text.endswith("data: [DONE]\n\n")
    assert canary.status_code == 200 and engine.is_running
    assert metric_values(metrics.text)['workbench_requests_total{finish_reason="error"}'] == 2
    engine.shutdown(1)
    assert engine.engine.scheduler.bm.num_free == 256 and not engine.engine.states


def test_api_key_host_allow_list_json_bodies_and_cors(smol_program, tokenizer, monkeypatch):
    """The access rules (serve/access.py) through the ASGI app: a bearer key on /v1 (not /health), JSON-only
    bodies (a cross-origin "simple" text/plain POST runs nothing), the Host allow-list, CORS only for the
    allowed origins; max_tokens null means OpenAI's 16; the request models are in /openapi.json."""
    from workbench.serve.access import Access, default_allowed_hosts

    engine = make_engine(smol_program, tokenizer)
    access = Access("sk-test", default_allowed_hosts("127.0.0.1"), ("https://ok.example",))
    app = create_app(engine, model_name=MODEL, access=access)
    key, body = {"Authorization": "Bearer sk-test"}, {"prompt": "hi", "max_tokens": 2}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000",
                                     timeout=60) as c:
            post = c.post
            return dict(
                no_key=await post("/v1/completions", json=body),
                wrong_key=await post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-tesT"}),
                models_no_key=await c.get("/v1/models"),
                health=await c.get("/health"),
                ok=await post("/v1/completions", json=body, headers=key),
                null=await post("/v1/completions", json={**body, "max_tokens": None, "ignore_eos": True}, headers=key),
                text_plain=await post("/v1/completions", content=json.dumps(body),
                                      headers={**key, "Content-Type": "text/plain"}),
                no_type=await post("/v1/completions", content=json.dumps(body).encode(), headers=key),
                rebound=await post("/v1/completions", json=body, headers={**key, "Host": "evil.example"}),
                ipv6=await c.get("/health", headers={"Host": "[::1]:8000"}),
                preflight=await c.options("/v1/completions", headers={
                    "Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type"}),
                other_origin=await c.get("/health", headers={"Origin": "https://evil.example"}),
                openapi=await c.get("/openapi.json"))

    r = asyncio.run(run())
    engine.shutdown(1)
    for name in ("no_key", "wrong_key", "models_no_key"):
        assert r[name].status_code == 401 and r[name].json()["error"]["code"] == "invalid_api_key", name
    assert r["no_key"].headers["www-authenticate"] == "Bearer"
    assert r["health"].status_code == r["ok"].status_code == r["ipv6"].status_code == 200
    assert r["null"].json()["usage"]["completion_tokens"] == 16  # OpenAI: "max_tokens ... Defaults to 16"
    assert r["text_plain"].status_code == r["no_type"].status_code == 415
    assert r["rebound"].status_code == 400 and r["rebound"].json()["error"]["code"] == "invalid_host"
    assert r["preflight"].headers["access-control-allow-origin"] == "https://ok.example"
    assert "access-control-allow-origin" not in r["other_origin"].headers
    schemas = r["openapi"].json()["components"]["schemas"]
    assert "prompt" in schemas["CompletionRequest"]["properties"] and "ChatMessage" in schemas
    assert engine.metrics.finished["length"] == 2  # ok and null: nothing else ran
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.1.2.3") == {"10.1.2.3"}
    assert default_allowed_hosts("10.1.2.3", ["*"]) is None

    import workbench.serve as serve_package
    from workbench.cli import main

    seen = {}
    monkeypatch.setattr(serve_package, "serve", lambda path, **kw: seen.update(kw))
    monkeypatch.setenv("WORKBENCH_API_KEY", "from-env")
    assert main(["serve", "e/", "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c"]) == 0
    assert seen["api_key"] == "from-env" and seen["allowed_hosts"] == ["a.example", "b.example", "c"]
    assert main(["serve", "e/", "--api-key", "flag"]) == 0 and seen["api_key"] == "flag"


def fuzz_bodies():
    """Hypothesis strategies of request bodies: OpenAI's fields with valid, edge and wrong values, plus junk."""
    from hypothesis import strategies as st

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner,
                                                                                           max_size=3),
                               max_leaves=8)
    text = st.text(max_size=20) | st.sampled_from(["hi", "\ud800", "", "\x00", "é🙂"])
    common = {"temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-30, 1e308, "hot"]),
              "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-2, 2**40), "n": st.integers(-1, 3),
              "seed": st.integers(-2**64, 2**65), "stop": text | st.lists(text, max_size=20),
              "stop_token_ids": st.lists(st.integers(-3, 60_000), max_size=3), "stream": st.booleans(),
              "logprobs": st.integers(-1, 25) | st.booleans(), "min_tokens": st.integers(-1, 4),
              "model": st.sampled_from([MODEL, "gpt-4", None]), "junk": json_values}
    prompt = text | st.lists(text, max_size=3) | st.lists(st.integers(-2, 50_000), max_size=4) | json_values
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]),
                                     "content": text | st.none() | json_values})
    max_tokens = st.integers(-2, 3) | st.sampled_from(["1", 1.5, 2**70, [], {}])
    completion = st.fixed_dictionaries({"prompt": prompt, "max_tokens": max_tokens | st.none()}, optional=common)
    chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=3), "max_tokens": max_tokens},
                                 optional=common)
    return st.tuples(st.just("/v1/completions"), completion | json_values) | \
        st.tuples(st.just("/v1/chat/completions"), chat | json_values)


def test_fuzzed_bodies_never_get_a_5xx_and_the_engine_goes_on(served, offline):
    """Property: whatever JSON arrives (a fixed, small number of generated bodies), the answer is a 2xx or an
    OpenAI 4xx, never a 5xx, and a canary request afterwards still gets offline generation's text."""
    from hypothesis import HealthCheck, given, settings

    url, engine = served
    client = httpx.Client(base_url=url, timeout=60)

    @settings(max_examples=80, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_bodies())
    def one(case):
        path, body = case
        r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    try:
        one()
        canary = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    finally:
        client.close()
    assert canary.status_code == 200 and engine.is_running
    want = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))[0].text
    assert canary.json()["choices"][0]["text"] == want


def test_chat_template_queue_full_and_closed_engine(smol_program, tokenizer):
    """Without a chat template chat is a clear 400; max_pending unfinished requests make the next one a 429 (with
    Retry-After; a request's n choices count together); n beyond max_pending is a 400 (retrying cannot help);
    after shutdown requests get 503 (through the ASGI app, no socket)."""
    engine = make_engine(smol_program, tokenizer, max_pending=2)
    app = create_app(engine, model_name=MODEL, chat_template=None)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            chat = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            slow = [asyncio.create_task(c.post("/v1/completions", json={"prompt": p, "max_tokens": 40,
                                                                        "ignore_eos": True, "temperature": 0}))
                    for p in PROMPTS[:2]]
            while engine.stats()["pending"] < 2:
                await asyncio.sleep(0.01)
            full = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            two = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2})
            done = await asyncio.gather(*slow)
            n3 = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3})
            ok = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2})
            await asyncio.to_thread(engine.shutdown, 5)
            closed = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            health = await c.get("/health")
            metrics = await c.get("/metrics")
            return chat, full, two, done, n3, ok, closed, health, metrics

    chat, full, two, done, n3, ok, closed, health, metrics = asyncio.run(run())
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template"
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert full.headers["retry-after"] == "1"
    assert two.status_code == 429
    assert [r.json()["usage"]["completion_tokens"] for r in done] == [40, 40]
    assert n3.status_code == 400 and n3.json()["error"]["param"] == "n"  # three never fit two pending slots
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    assert closed.status_code == 503 and closed.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503
    values = metric_values(metrics.text)
    assert values['workbench_requests_rejected_total{reason="queue_full"}'] == 2
    assert values['workbench_requests_rejected_total{reason="closed"}'] == 1
    assert values['workbench_requests_total{finish_reason="length"}'] == 4
    assert engine.engine.scheduler.bm.num_free == 256


def test_an_engine_without_a_tokenizer_answers_and_streams_token_ids(smol_program, tokenizer):
    """A random-weight preset has no tokenizer: token-id prompts get ``token_ids`` in every choice (vLLM's field),
    the stream sends each new token as it comes, and both equal the offline engine's greedy ids."""
    ids = tokenizer.encode(PROMPTS[0])
    want = LLMEngine(smol_program, None, num_blocks=256)
    want.add_request("w", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    while want.has_unfinished:
        want.step()
    want = want.output("w").token_ids
    engine = make_engine(smol_program, None)
    app = create_app(engine, model_name=MODEL, chat_template=None)
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            whole = await c.post("/v1/completions", json=body)
            chunks = []
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:])["choices"][0])
            await asyncio.to_thread(engine.shutdown, 5)
            return whole, chunks

    whole, chunks = asyncio.run(run())
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["token_ids"] == want and whole.json()["choices"][0]["text"] == ""
    streamed = [c["token_ids"] for c in chunks]
    assert sum(streamed, []) == want
    assert len([t for t in streamed if t]) >= 2  # sent as they came, not all at the end
    assert chunks[-1]["finish_reason"] == "length"


def test_async_engine_shutdown_finishes_in_flight_then_aborts_past_the_timeout(smol_program, tokenizer, offline):
    params = SamplingParams(max_tokens=6, temperature=0)

    async def finish_in_time():
        engine = make_engine(smol_program, tokenizer)
        streams = [engine.submit(p, params) for p in PROMPTS[:3]]
        outs = asyncio.gather(*(last(s) for s in streams))
        report = await asyncio.to_thread(engine.shutdown, 60)
        with pytest.raises(EngineClosedError):
            engine.submit("more", params)
        return await outs, report, engine

    async def last(stream):
        async for out in stream:
            pass
        return out

    outs, report, engine = asyncio.run(finish_in_time())
    assert [o.text for o in outs] == [o.text for o in offline.generate(PROMPTS[:3], params)]
    assert report == {"in_flight": 3, "aborted": 0} and not engine._thread.is_alive()

    async def past_the_timeout():
        engine = make_engine(smol_program, tokenizer)
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        streams = [engine.submit(p, long) for p in PROMPTS[:2]]
        iterators = [s.__aiter__() for s in streams]  # kept alive: a collected iterator aborts its request
        first = [await it.__anext__() for it in iterators]  # both are generating
        report = await asyncio.to_thread(engine.shutdown, 0.2)
        return first, report, engine

    first, report, engine = asyncio.run(past_the_timeout())
    assert all(len(o.token_ids) >= 1 for o in first) and report == {"in_flight": 2, "aborted": 2}
    values = metric_values(prometheus_text(engine.metrics, engine.stats()))
    assert values['workbench_requests_total{finish_reason="abort"}'] == 2
    assert engine.engine.scheduler.bm.num_free == 256 and not engine.engine.states


def test_generate_cancellation_back_pressure_and_the_metrics_page(smol_program, tokenizer):
    engine = make_engine(smol_program, tokenizer, max_pending=1)

    async def run():
        texts = [out.text async for out in engine.generate("The capital of France is",
                                                           SamplingParams(max_tokens=4, temperature=0))]
        gen = engine.generate("Water boils at", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        await gen.__anext__()
        with pytest.raises(QueueFullError):
            engine.submit("one too many", SamplingParams(max_tokens=2))

        async def consume():
            async for _ in gen:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()  # a consumer cancelled mid-generation (a client that went away)
        await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(ContextLengthError):
            engine.submit("hi", SamplingParams(max_tokens=600))
        with pytest.raises(WorkbenchError, match="temperature must be 0"):  # would NaN the whole step
            engine.submit("hi", SamplingParams(temperature=1e-30))
        for _ in range(200):
            if not engine.stats()["pending"]:
                break
            await asyncio.sleep(0.02)
        return texts

    texts = asyncio.run(run())
    assert len(texts) >= 1 and texts[-1]
    stats = engine.stats()
    assert stats["pending"] == stats["running"] == stats["waiting"] == 0 and stats["kv_usage_percent"] == 0
    page = prometheus_text(engine.metrics, engine.stats())
    engine.shutdown(1)
    for name, kind in (("workbench_requests_total", "counter"), ("workbench_kv_cache_usage_percent", "gauge"),
                       ("workbench_time_to_first_token_seconds", "histogram"), ("workbench_preemptions_total",
                                                                               "counter")):
        assert f"# TYPE {name} {kind}" in page and f"# HELP {name} " in page
    values = metric_values(page)
    assert values['workbench_requests_total{finish_reason="abort"}'] == 1
    assert values['workbench_requests_total{finish_reason="length"}'] == 1
    assert values['workbench_requests_rejected_total{reason="queue_full"}'] == 1
    buckets = [v for k, v in values.items() if k.startswith("workbench_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == values["workbench_time_to_first_token_seconds_count"] == 2
    assert re.search(r'_bucket\{le="\+Inf"\} \d+\n', page)


def test_a_failing_engine_step_ends_every_request_with_an_error_instead_of_hanging(smol_program, tokenizer):
    engine = make_engine(smol_program, tokenizer)
    submitted = threading.Event()

    def broken_step(**kwargs):
        submitted.wait(10)  # fail once all three are in
        raise RuntimeError("device lost")

    engine.engine.step = broken_step

    async def run():
        streams = [engine.submit(p, SamplingParams(max_tokens=4)) for p in PROMPTS[:3]]
        submitted.set()
        errors = []
        for s in streams:
            with pytest.raises(EngineClosedError, match="device lost") as e:
                async for _ in s:
                    pass
            errors.append(e)
        with pytest.raises(EngineClosedError, match="stopped after an error"):
            engine.submit("more", SamplingParams(max_tokens=2))
        return errors

    assert len(asyncio.run(run())) == 3 and not engine.is_running
    assert engine.shutdown(1) == {"in_flight": 0, "aborted": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A workspace (random weights of SmolLM2's shape, passes run) and the engine exported from it."""
    from workbench.engine import export_engine
    from workbench.pipeline import capture_stage, passes_stage
    from workbench.workspace import Workspace

    root = tmp_path_factory.mktemp("exported")
    config = root / "config.json"
    config.write_text(json.dumps(dict(SMOL_SHAPED, max_position_embeddings=2048)))
    ws = Workspace(root / "ws")
    capture_stage(ws, str(config))
    passes_stage(ws)
    export_engine(ws, root / "engine")
    return root / "ws", root / "engine"


def test_serve_opens_a_workspace_and_refuses_a_bad_target_in_one_line(exported, capsys):
    from workbench.cli import main
    from workbench.runnable import open_runnable

    ws, engine = exported
    from_ws = open_runnable(ws, tokenizer="smollm2-135m")
    assert (from_ws.name, from_ws.kind, from_ws.stage) == ("ws", "workspace", "passes")
    assert from_ws.limits.max_model_len == 2048 and "im_start" in from_ws.chat_template
    assert main(["serve", str(ws.parent / "nothing")]) == 2  # one line naming the problem, no traceback
    assert main(["serve", str(engine), "--tokenizer", "tiny-llama"]) == 2
    assert main(["serve", str(engine), "--read-timeout", "0"]) == 2
    capsys.readouterr()
    assert main(["info", str(engine)]) == 0  # an engine directory: what it is and where its stages are
    assert "an engine directory" in capsys.readouterr().out
    assert main(["serve", str(engine), "--port", "99999"]) == 2
    assert main(["serve", str(engine), "--shutdown-timeout", "-5"]) == 2
    with socket.socket() as taken:  # a port in use: said before the engine loads, not by uvicorn after
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(engine), "--port", str(taken.getsockname()[1])]) == 2


def wait_until_up(proc, url: str, seconds: float = 90) -> None:
    """Polls ``/health`` until the server answers 200; fails with its output if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def start_serve(engine, *args: str):
    """``workbench serve ENGINE ARGS`` on a free port (SmolLM2's tokenizer, warnings only): (process, port, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", str(engine), "--port", str(port),
                             "--tokenizer", "smollm2-135m", "--log-level", "warning", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, port, f"http://127.0.0.1:{port}"


def test_workbench_serve_sigterm_finishes_in_flight_within_the_timeout_then_aborts_and_exits_0(exported):
    """The command on an engine directory (random weights, SmolLM2's tokenizer via --tokenizer). SIGTERM with two
    streams in flight: the short one completes, the long one is aborted at the timeout; both end with [DONE],
    and the process exits 0."""
    _, engine = exported
    proc, port, url = start_serve(engine, "--shutdown-timeout", "1.5", "--read-timeout", "2")

    async def stream(client, max_tokens, started):
        body = {"prompt": "The capital of France is", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        chunks, done = [], False
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line:
                    chunks.append(json.loads(line[6:]))
                    started.set()
        return chunks, done

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            started = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(stream(client, n, e)) for n, e in zip((12, 2000), started)]
            await asyncio.gather(*(e.wait() for e in started))
            proc.send_signal(signal.SIGTERM)  # both mid-stream
            return await asyncio.gather(*tasks)

    try:
        wait_until_up(proc, url)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as half:  # a request that never ends
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 40\r\n\r\n{")
            assert half.recv(1000).startswith(b"HTTP/1.1 408 Request Timeout")  # after --read-timeout
        assert httpx.get(url + "/v1/models").json()["data"][0] == {
            "id": "engine", "object": "model", "owned_by": "workbench", "created": ANY, "max_model_len": 2048}
        (short, short_done), (long, long_done) = asyncio.run(run())
        assert short_done and short[-1]["usage"]["completion_tokens"] == 12
        assert [c["choices"][0]["finish_reason"] for c in short if c["choices"]][-1] == "length"
        assert long_done and 0 < long[-1]["usage"]["completion_tokens"] < 2000
        assert [c["choices"][0]["finish_reason"] for c in long if c["choices"]][-1] == "abort"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_ctrl_c_aborts_the_requests_in_flight_and_exits_at_once(exported):
    """Ctrl-C lets in-flight requests finish for --shutdown-timeout (here 120 s); a second Ctrl-C aborts them now:
    the stream still ends with finish_reason "abort" and [DONE], and the process exits 0 long before the timeout."""
    _, engine = exported
    proc, _, url = start_serve(engine, "--shutdown-timeout", "120")
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    try:
        wait_until_up(proc, url)
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")  # under way
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            assert proc.poll() is None  # draining: the request may finish
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=40) == 0  # not the 120 s the first Ctrl-C gave
        assert "second signal: aborting the requests in flight" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_engine_process_streams_what_an_in_process_engine_gives_and_its_death_is_named(exported):
    """``workbench serve`` steps its engine in a child process (``AsyncLLMEngine.spawn``). Over the same engine
    directory its streamed outputs equal ``LLM.generate``'s (text, token ids, log-probs, top log-probs), a
    stream left early frees its request, the gauges come back, and a killed engine process ends the stream in
    flight with a message naming it, refuses what comes after, and shuts down at once."""
    import functools

    from workbench.serve.app import open_served_engine

    _, engine_dir = exported
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
    want = LLM(engine_dir, device="cpu", tokenizer="smollm2-135m", num_blocks=64).generate(PROMPTS[:4], params)
    factory = functools.partial(open_served_engine, engine_dir, device="cpu", tokenizer="smollm2-135m",
                                num_blocks=64, memory_fraction=None, max_num_seqs=None, max_num_batched_tokens=None,
                                max_model_len=None, tensor_parallel_size=1)
    aengine = AsyncLLMEngine.spawn(factory, max_pending=8)
    assert aengine.extra["max_model_len"] == 2048 and "im_start" in aengine.extra["chat_template"]

    async def last(stream):
        seen = []
        async for out in stream:
            seen.append(out)
        return seen

    async def run():
        got = await asyncio.gather(*(last(aengine.submit(p, params)) for p in PROMPTS[:4]))
        # a consumer that does not read (its loop busy): the engine and the delivering thread go on without it,
        # and it then gets one snapshot with every token
        slow = aengine.submit(PROMPTS[4], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
        for _ in range(600):
            if sum(aengine.metrics.finished.values()) == 5:
                break
            time.sleep(0.05)  # blocks this loop, as a busy server's would be
        slow_seen = await last(slow)
        long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        async for out in aengine.submit(PROMPTS[0], long):  # left after its first token: aborted, freed
            break
        for _ in range(200):
            if aengine.stats()["pending"] == 0 and aengine.stats()["kv_usage_percent"] == 0:
                break
            await asyncio.sleep(0.02)
        stats = aengine.stats()
        stream = aengine.submit(PROMPTS[1], long)
        it = stream.__aiter__()
        await it.__anext__()
        os.kill(aengine.process.pid, signal.SIGKILL)
        with pytest.raises(EngineClosedError, match="engine process exited unexpectedly"):
            while True:
                await it.__anext__()
        with pytest.raises(EngineClosedError, match="stopped after an error"):
            aengine.submit("more", params)
        return got, stats, slow_seen

    got, stats, slow_seen = asyncio.run(run())
    assert [len(o.token_ids) for o in slow_seen] == [48] and slow_seen[0].finished
    for seen, w in zip(got, want):
        out = seen[-1]
        assert (out.token_ids, out.text, out.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert out.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert [sorted(t) for t in out.top_logprobs] == [sorted(t) for t in w.top_logprobs]
        assert [len(o.token_ids) for o in seen] == sorted({len(o.token_ids) for o in seen})  # cumulative, growing
    assert stats["pending"] == stats["running"] == 0 and stats["kv_usage_percent"] == 0
    assert not aengine.is_running and aengine.shutdown(1) == {"in_flight": 0, "aborted": 0}
