"""Calibration and evaluation text from the user's files (issue 22): plain text and JSONL read the same, every kind
of bad file is one line naming the file, the line and the fix, the default sample count is what the data holds up
to the device's default (and is recorded), an explicit count the data cannot fill is refused, a changed file makes
the quant stage stale, and `workbench eval --dataset FILE` reads a file. tiny-llama with a word-level tokenizer."""

import json
import random
import re

import pytest
import torch
from test_engine_export import WORDS, hf_model_dir

from workbench.errors import WorkbenchError
from workbench.evaluate import DOCUMENT_SEPARATOR, dataset_text, load_text
from workbench.quant import calibrate, calibration_ids
from workbench.quant.calibrate import choose_sizes
from workbench.workspace import Workspace


def random_docs(seed: int, docs: int, words: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(docs)]


def write_jsonl(path, docs, **extra):
    path.write_text("".join(json.dumps({"id": i, "text": d, **extra}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf_model_dir(tmp_path_factory.mktemp("calib") / "model")


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


@pytest.fixture(scope="module")
def ws(model, tmp_path_factory):
    from workbench.pipeline import capture_stage, passes_stage

    ws = Workspace(tmp_path_factory.mktemp("calib_ws") / "ws")
    capture_stage(ws, str(model))
    passes_stage(ws)
    return ws


# ---- one loader --------------------------------------------------------------------------------------------

def test_plain_text_and_jsonl_give_the_same_ids(tmp_path, tokenizer):
    docs = random_docs(3, docs=7, words=60)
    plain = tmp_path / "data.txt"
    plain.write_text(DOCUMENT_SEPARATOR.join(docs) + "\n")  # the shipped sets' layout
    jsonl = write_jsonl(tmp_path / "data.jsonl", docs, source="test")
    as_json = write_jsonl(tmp_path / "data.json", docs)
    undeclared = write_jsonl(tmp_path / "data.dump", docs)  # JSONL found by its content
    ids = calibration_ids(tokenizer, plain)
    assert ids.numel() == sum(len(d.split()) for d in docs) + len(docs) - 1  # a word each, an unknown "---" each
    for other in (jsonl, as_json, undeclared):
        assert load_text(other) == plain.read_text()
        assert torch.equal(calibration_ids(tokenizer, other), ids)
    assert dataset_text(str(jsonl)) == plain.read_text() and dataset_text("calibration").startswith("The Morning")
    # the shipped set, split into documents and given as JSONL, is the shipped set
    shipped = dataset_text("evaluation")
    write_jsonl(tmp_path / "evaluation.jsonl", shipped.split(DOCUMENT_SEPARATOR))
    assert load_text(tmp_path / "evaluation.jsonl") == shipped


@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, r"--calib-data .*missing\.txt: no such file; give a plain-text file, or JSONL"),
    ("empty.txt", b"", r"empty\.txt holds no text \(it is empty or only whitespace\)"),
    ("blank.jsonl", b"\n  \n", r"blank\.jsonl holds no text"),
    ("latin1.txt", "the city\nof paris\nand the rivi\xe8re\n".encode("latin-1"),
     r"latin1\.txt is not UTF-8 text \(line 3: byte 0xe8\); convert it to UTF-8"),
    ("broken.jsonl", b'{"text": "the city"}\n{"text": "paris\n', r"broken\.jsonl line 2 is not JSON \(.*\); each line "
     r"of a JSONL file is one object with a string \"text\""),
    ("list.jsonl", b'{"text": "a"}\n\n["the", "city"]\n', r"list\.jsonl line 3 is a JSON list, not an object"),
    ("notext.jsonl", b'{"body": "the city"}\n', r'notext\.jsonl line 1 has no "text" \(keys: body\); each line'),
    ("number.json", b'{"text": "a"}\n{"text": 5}\n', r'number\.json line 2 has a int "text" \(keys: text\)'),
])
def test_each_bad_file_is_one_line_naming_file_line_and_fix(tmp_path, model, capsys, name, content, match):
    from workbench.cli import main

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WorkbenchError, match=match.replace("--calib-data ", "")) as e:
        load_text(path)
    assert "\n" not in str(e.value)
    # through the command line: one line on stderr, before any stage runs
    out = tmp_path / "engine"
    assert main(["build", str(model), "--precision", "fp8", "--out", str(out), "--calib-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("workbench: error: --calib-data")
    assert re.search(match, err)
    assert not (tmp_path / "engine.workspace" / "capture").exists()
    assert main(["build", str(model), "--precision", "fp8", "--out", str(out), "--eval-data", str(path)]) == 2
    assert capsys.readouterr().err.startswith("workbench: error: --eval-data")


# ---- how many samples --------------------------------------------------------------------------------------

def test_default_sample_count_is_what_the_data_holds_up_to_the_device_default():
    assert choose_sizes(124_834, "cpu") == (32, 256)           # the shipped set on the CPU: as before
    assert choose_sizes(124_834, "cuda") == (243, 512)         # on a GPU: all it holds, not 512 (an error before)
    assert choose_sizes(1_000_000, "cuda") == (512, 512)
    assert choose_sizes(5_000, "cpu", seq_len=100) == (32, 100) and choose_sizes(3_000, "cpu", seq_len=100) == (30, 100)
    assert choose_sizes(11_884, "cuda", samples=23) == (23, 512)
    with pytest.raises(WorkbenchError, match=r"the calibration set has 11884 tokens, too few for 512 samples x 512 "
                                             r"tokens \(262144\); ask for at most 23 samples of 512 tokens"):
        choose_sizes(11_884, "cuda", samples=512)
    with pytest.raises(WorkbenchError, match=r"mine\.txt has 200 tokens, fewer than one sample of 256 tokens; ask for "
                                             r"shorter samples \(at most 200\)"):
        choose_sizes(200, "cpu", source="mine.txt")


def test_calibrate_takes_what_the_ids_hold(tiny_program):
    ids = torch.randint(1, 512, (3 * 256 + 100,), generator=torch.Generator().manual_seed(5))
    stats = calibrate(tiny_program, ids, progress=False)  # CPU default 32 x 256, the ids hold 3
    assert (stats.samples, stats.seq_len) == (3, 256)
    assert stats.activations["layers.0.qkv"].samples == 1  # 3 samples, 4 per step: one step
    with pytest.raises(WorkbenchError, match="has 868 tokens, too few for 4 samples x 256 tokens"):
        calibrate(tiny_program, ids, samples=4, progress=False)


def test_quant_stage_records_the_count_the_data_and_goes_stale_when_it_changes(ws, tokenizer, tmp_path, capsys):
    from workbench.cli import main
    from workbench.pipeline import QuantOptions, quant_stage

    data = tmp_path / "mine.jsonl"
    docs = random_docs(11, docs=5, words=120)
    write_jsonl(data, docs)
    tokens = calibration_ids(tokenizer, data).numel()
    assert 32 * 3 < tokens < 32 * 32  # the data, not the device default, limits the count
    lines = []
    _, stats, _ = quant_stage(ws, options=QuantOptions(fmt="fp8", seq_len=32, calib_data=data), log=lines.append,
                              progress=False, device="cpu")
    rec = ws.record("quant")
    calib = rec["params"]["calibration"]
    assert (calib["samples"], calib["seq_len"], calib["tokens"]) == (tokens // 32, 32, tokens)
    assert calib["text"] == str(data) and calib["requested"] == {"samples": None, "seq_len": 32}
    assert str(data.resolve()) in rec["input_files"] and stats.samples == tokens // 32
    assert lines == [f"calibration: {tokens // 32} samples x 32 tokens from {data} ({tokens} tokens)"]
    assert ws.status("quant") == "ok"
    # the same data again: its statistics are reused
    quant_stage(ws, options=QuantOptions(fmt="fp8", seq_len=32, calib_data=data), log=lines.append, progress=False,
                device="cpu")
    assert lines[-1].endswith("; statistics reused")
    # another content in the same file, as many tokens (each word -> the next): the stage is stale, and re-running
    # calibrates again, though the sizes are the same
    write_jsonl(data, [" ".join(WORDS[(WORDS.index(w) + 1) % len(WORDS)] for w in d.split()) for d in docs])
    assert calibration_ids(tokenizer, data).numel() == tokens
    assert ws.status("quant") == "stale"
    _, new_stats, _ = quant_stage(ws, options=QuantOptions(fmt="fp8", seq_len=32, calib_data=data), log=lines.append,
                                  progress=False, device="cpu")
    assert not lines[-1].endswith("reused") and ws.status("quant") == "ok"
    assert ws.record("quant")["params"]["calibration"]["sha256"] != calib["sha256"]
    # (layer 1: layer 0's qkv input depends on each token alone, and both texts hold every word; a group's
    # per-tensor maximum can be the same token's in both, so any of layer 1's groups)
    layer1 = [g for g in stats.activations if g.startswith("layers.1.")]
    assert layer1 and any(not torch.equal(new_stats.activations[g].amax(), stats.activations[g].amax())
                          for g in layer1)
    # the default: the shipped set, capped by the device default (CPU: 32 samples)
    quant_stage(ws, options=QuantOptions(fmt="fp8", seq_len=16), log=lines.append, progress=False, device="cpu")
    calib = ws.record("quant")["params"]["calibration"]
    assert (calib["samples"], calib["seq_len"], calib["text"]) == (32, 16, "datasets/calibration.txt")
    assert lines[-1].startswith(f"calibration: 32 samples x 16 tokens from datasets/calibration.txt ({calib['tokens']}")
    # the command line: an explicit count the data cannot fill is refused with the numbers
    assert main(["quantize", str(ws.root), "--calib-data", str(data), "--samples", "100", "--seq-len", "32",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"the calibration set {data} has {calib_data_tokens(tokenizer, data)} tokens, too few for 100 samples x " \
           "32 tokens" in err and err.count("\n") == 1
    assert main(["quantize", str(ws.root), "--calib-data", str(data), "--seq-len", "32", "--device", "cpu"]) == 0
    assert f"calibration: {calib_data_tokens(tokenizer, data) // 32} samples x 32 tokens from {data}" in \
        capsys.readouterr().out


def calib_data_tokens(tokenizer, path) -> int:
    return calibration_ids(tokenizer, path).numel()


def test_random_weights_calibrate_on_random_ids_and_refuse_text(optimized_ws, tmp_path):
    from workbench.pipeline import QuantOptions, quant_stage

    ws = optimized_ws
    lines = []
    quant_stage(ws, options=QuantOptions(fmt="int8_wo", samples=3, seq_len=16), log=lines.append, progress=False,
                device="cpu")
    assert lines == ["calibration: 3 samples x 16 tokens of random token ids (no tokenizer)"]
    assert ws.record("quant")["params"]["calibration"]["random_seed"] == 0
    with pytest.raises(WorkbenchError, match="random weights and no tokenizer to read text with; leave --calib-data"):
        quant_stage(ws, options=QuantOptions(calib_data=tmp_path / "x.txt"), progress=False)


# ---- `workbench eval --dataset FILE` -------------------------------------------------------------------------

def test_eval_reads_a_file_by_path(ws, tokenizer, tmp_path, capsys):
    from workbench.cli import main
    from workbench.evaluate import perplexity
    from workbench.pipeline import load_program
    from workbench.evaluate import logits_fn

    docs = random_docs(21, docs=4, words=150)
    plain, jsonl = tmp_path / "held_out.txt", write_jsonl(tmp_path / "held_out.jsonl", docs)
    plain.write_text(DOCUMENT_SEPARATOR.join(docs) + "\n")
    ids = calibration_ids(tokenizer, plain)
    expected = perplexity(logits_fn(load_program(ws, stage="passes", device="cpu")), ids, window=64, stride=32)
    lines = []
    for path in (plain, jsonl):
        assert main(["eval", str(ws.root), "--dataset", str(path), "--stage", "passes", "--window", "64",
                     "--stride", "32", "--device", "cpu"]) == 0
        lines.append(capsys.readouterr().out.strip())
    assert lines[0] == lines[1] == (f"workbench passes: perplexity {expected.perplexity:.4f} over "
                                    f"{ids.numel() - 1} tokens ({expected.windows} windows)")
    assert main(["eval", str(ws.root), "--dataset", "nope", "--stage", "passes"]) == 2
    assert "no dataset 'nope'" in capsys.readouterr().err
    assert main(["eval", str(ws.root), "--dataset", str(tmp_path / "gone.jsonl"), "--stage", "passes"]) == 2
    assert "gone.jsonl: no such file" in capsys.readouterr().err
