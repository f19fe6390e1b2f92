"""The accuracy gate of `workbench build` (issue 22) on the CPU: a quantized build measures the perplexity of the
quantized and the unquantized graph on the evaluation text (its first 2048 tokens here), says it in one line,
records it in the workspace and the engine's manifest, does not measure again when up to date, refuses an increase
over --max-ppl-increase in one line unless --force, and a changed calibration file re-calibrates."""

import json
import random

import pytest
import torch
from test_engine_export import WORDS, hf_model_dir

from workbench.cli import main
from workbench.engine import load_engine
from workbench.evaluate import DOCUMENT_SEPARATOR
from workbench.workspace import Workspace

QUICK = ["--samples", "4", "--seq-len", "32", "--device", "cpu"]  # the CPU numbers, on any machine


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf_model_dir(tmp_path_factory.mktemp("gate") / "model")


def test_the_gate_measures_records_and_does_not_measure_again(model, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    import workbench.evaluate
    from workbench.evaluate import perplexity
    from workbench.pipeline import load_program
    from workbench.evaluate import logits_fn

    held_out = tmp_path / "held_out.jsonl"  # 2500 tokens: capped to the first 2048 on the CPU
    held_out.write_text("".join(json.dumps({"text": words(s, 500)}) + "\n" for s in range(5)))
    calib = tmp_path / "calib.txt"
    calib.write_text(DOCUMENT_SEPARATOR.join(words(s, 300) for s in (7, 8)) + "\n")
    out, ws = tmp_path / "engine", Workspace(tmp_path / "engine.workspace")
    args = ["build", str(model), "--precision", "fp8", "--out", str(out), "--calib-data", str(calib),
            "--eval-data", str(held_out), *QUICK]
    assert main(args) == 0
    log = capsys.readouterr().out
    # the numbers are those of the passes and quant graphs over the first 2048 tokens, window 512, stride 256
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = torch.tensor(tokenizer(workbench.evaluate.load_text(held_out)).input_ids)
    assert ids.numel() == 5 * 500 + 4
    base, quant = (perplexity(logits_fn(load_program(ws, stage=s, device="cpu")), ids[:2048], window=512, stride=256)
                   for s in ("passes", "quant"))
    increase = (quant.perplexity / base.perplexity - 1) * 100
    assert base.perplexity != quant.perplexity
    pct = f"{increase:+.2f}%" if abs(increase) >= 0.01 else f"{increase:+.1e}%"  # below 0.01%: not "+0.00%"
    line = (f"accuracy: perplexity {base.perplexity:.2f} -> {quant.perplexity:.2f} ({pct}) on 2047 tokens of "
            f"{held_out} (its first 2048 tokens of 2504: capped on the CPU); limit +5%")
    assert line in log.splitlines()
    assert "calibration: 4 samples x 32 tokens from " in log and "[5/5] export: done in" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accuracy"] == {
        "ppl_base": base.perplexity, "ppl": quant.perplexity, "increase_pct": increase, "tokens": 2047,
        "dataset": str(held_out), "window": 512, "stride": 256, "device": "cpu", "max_tokens": 2048,
        "limit_pct": 5.0, "within_limit": True, "forced": False}
    assert ws.read_json("accuracy", "accuracy.json")["ppl"] == quant.perplexity
    assert load_engine(out).manifest["accuracy"]["tokens"] == 2047

    # up to date: nothing runs, nothing is measured again
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(workbench.evaluate, "perplexity", no_measuring)
    assert main(args) == 0
    log = capsys.readouterr().out
    assert f"{line} (measured before: up to date)" in log.splitlines()
    assert log.count("up to date, skipped") == 4 and "running" not in log  # capture, passes, quant, export
    # another limit: the same measurement, a new manifest
    assert main([*args, "--max-ppl-increase", "7.5"]) == 0
    assert "limit +7.5% (measured before" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["accuracy"]["limit_pct"] == 7.5

    # a changed calibration file: calibrated again, hence measured again
    monkeypatch.undo()
    calib.write_text(DOCUMENT_SEPARATOR.join(words(s, 300) for s in (9, 10)) + "\n")
    assert ws.status("quant") == "stale"
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "[3/5] quant: running" in log and "accuracy: measuring" in log and "(measured before" not in log
    assert ws.status("accuracy") == ws.status("export") == "ok"


def test_the_gate_refuses_over_its_limit_unless_forced(tmp_path, capsys):
    """tiny-llama with random weights (no tokenizer): measured on seeded random ids; a planted limit of 1e-9 %
    trips on a real FP8 quantization. (On a random model FP8 noise moves the perplexity either way: weights seed
    1 is one where it rises, +8e-3%.)"""
    out, ws = tmp_path / "engine", tmp_path / "engine.workspace"
    args = ["build", "tiny-llama", "--seed", "1", "--precision", "fp8", "--out", str(out), *QUICK,
            "--max-ppl-increase", "1e-9"]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()[-1]  # after the progress bars
    assert captured.err.count("workbench: error:") == 1 and "Traceback" not in captured.err
    assert "graph on cpu, 2048 seeded random token ids (the model has no tokenizer) ..." in captured.out
    assert "on 2047 seeded random token ids (the model has no tokenizer), over the limit" in err
    assert err.startswith("workbench: error: accuracy gate: the fp8 graph's perplexity rises ")
    assert "over the limit of +1e-09% (--max-ppl-increase); build with a gentler precision such as --precision auto, " \
           "or export it anyway with --force" in err
    measured = json.loads((ws / "accuracy" / "accuracy.json").read_text())
    assert measured["increase_pct"] > 1e-9 and measured["tokens"] == 2047
    assert f"rises {measured['ppl_base']:.2f} -> {measured['ppl']:.2f} (" in err
    assert not out.exists() and not (ws / "tune").exists() and not (ws / "export").exists()

    assert main([*args, "--force"]) == 0
    log = capsys.readouterr().out
    assert "OVER the limit +1e-09%, exported anyway (--force) (measured before: up to date)" in log
    accuracy = load_engine(out).manifest["accuracy"]
    assert accuracy["forced"] and not accuracy["within_limit"] and accuracy["limit_pct"] == 1e-9
    assert accuracy["dataset"] == "random token ids (no tokenizer)" and accuracy["ppl"] == measured["ppl"]

    # bf16 needs no gate, and its manifest says nothing of one
    bf16 = tmp_path / "bf16"
    assert main(["build", "tiny-llama", "--seed", "1", "--precision", "bf16", "--out", str(bf16), "--workspace",
                 str(ws), "--device", "cpu"]) == 0
    assert "accuracy: not needed (--precision bf16)" in capsys.readouterr().out
    assert "accuracy" not in load_engine(bf16).manifest
    assert main(["build", "tiny-llama", "--precision", "fp8", "--out", str(out), "--max-ppl-increase", "-1"]) == 2
    assert ">= 0; got -1.0" in capsys.readouterr().err


def test_an_fp8_kv_cache_is_a_build_setting(tmp_path, capsys):
    """--kv-cache fp8 with a quantized precision: the engine's cache is float8_e4m3fn; back to bf16, the quant
    stage runs again; with --precision bf16 it is refused in one line."""
    out, ws = tmp_path / "engine", tmp_path / "ws"
    args = ["build", "tiny-llama", "--precision", "fp8", "--out", str(out), "--workspace", str(ws), *QUICK]
    assert main([*args, "--kv-cache", "fp8"]) == 0
    assert load_engine(out).limits.kv_cache_dtype == "float8_e4m3fn"
    capsys.readouterr()
    assert main(args) == 0
    assert "[3/5] quant: running" in capsys.readouterr().out
    assert load_engine(out).limits.kv_cache_dtype == "bfloat16"
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(out), "--kv-cache", "fp8"]) == 2
    assert "an FP8 KV cache is set by the quantization stage" in capsys.readouterr().err


def test_a_build_of_a_preset_with_scaled_rope_resumes_where_it_stopped(tmp_path, capsys):
    """Re-running `workbench build` on a preset whose config has a rope_scaling dict (Llama 3.1/3.2) resumes: the
    second run skips every stage. It used to refuse its own workspace ("holds a capture of 'llama-3.2-1b', not
    'llama-3.2-1b'"): transformers wrote rope_theta into the preset's nested dict, so the recorded source differed,
    and the build compared a seed of None with the capture's 0."""
    from workbench.models import PRESETS

    before = json.dumps(PRESETS["tiny-llama31"], sort_keys=True)
    args = ["build", "tiny-llama31", "--precision", "bf16", "--out", str(tmp_path / "engine"), "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "[1/5] capture: up to date, skipped" in log and "[2/5] passes: up to date, skipped" in log, log
    assert json.dumps(PRESETS["tiny-llama31"], sort_keys=True) == before  # the preset itself is left alone
