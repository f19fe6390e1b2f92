"""Workspace: atomic artifacts, records, staleness, protection of hand edits."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from workbench.errors import WorkbenchError
from workbench.workspace import Workspace


def _run(ws, stage, artifacts, upstream=(), input_files=(), force=False):
    with ws.run(stage, params={"n": len(artifacts)}, upstream=upstream, input_files=list(input_files),
                force=force) as run:
        for name, data in artifacts.items():
            run.write_bytes(name, data)


def test_record_describes_the_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights")
    _run(ws, "capture", {"graph.json": b"{}"}, input_files=[src])
    rec = ws.record("capture")
    assert rec["params"] == {"n": 1}
    assert rec["artifacts"]["graph.json"]["bytes"] == 2
    assert rec["input_files"][str(src.resolve())]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert rec["artifacts"]["graph.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert rec["versions"]["torch"] and rec["host"]["cpu_count"] >= 1
    assert rec["duration_s"] >= 0
    assert ws.status("capture") == "ok"
    assert ws.status("passes") == "missing"


def test_upstream_change_marks_downstream_stale(tmp_path):
    ws = Workspace(tmp_path)
    _run(ws, "capture", {"graph.json": b"v1"})
    _run(ws, "passes", {"graph.json": b"fused"}, upstream=("capture",))
    _run(ws, "quant", {"plan.json": b"{}"}, upstream=("passes",))
    assert [ws.status(s) for s in ("capture", "passes", "quant")] == ["ok", "ok", "ok"]
    _run(ws, "capture", {"graph.json": b"v2"})  # re-run upstream with a different result
    assert [ws.status(s) for s in ("capture", "passes", "quant")] == ["ok", "stale", "stale"]
    _run(ws, "passes", {"graph.json": b"fused2"}, upstream=("capture",))
    assert [ws.status(s) for s in ("capture", "passes", "quant")] == ["ok", "ok", "stale"]
    df = ws.info()
    assert list(df["stage"]) == ["capture", "passes", "quant"]
    assert list(df["status"]) == ["ok", "ok", "stale"]



def test_up_to_date_needs_an_ok_status_and_the_same_settings(tmp_path):
    ws = Workspace(tmp_path)
    assert not ws.up_to_date("capture")  # never run
    _run(ws, "capture", {"graph.json": b"v1"})
    _run(ws, "passes", {"graph.json": b"x", "report.json": b"[]"}, upstream=("capture",))
    assert ws.up_to_date("passes") and ws.up_to_date("passes", {"n": 2})
    assert ws.up_to_date("passes", matches=lambda p: p["n"] == 2)
    assert not ws.up_to_date("passes", {"n": 3})  # other settings
    assert not ws.up_to_date("passes", {"n": 2}, matches=lambda p: False)
    _run(ws, "capture", {"graph.json": b"v2"})
    assert ws.status("passes") == "stale" and not ws.up_to_date("passes", {"n": 2})

def test_rerun_with_identical_result_keeps_downstream_fresh(tmp_path):
    ws = Workspace(tmp_path)
    _run(ws, "capture", {"graph.json": b"v1"})
    _run(ws, "passes", {"graph.json": b"x"}, upstream=("capture",))
    _run(ws, "capture", {"graph.json": b"v1"})
    assert ws.status("passes") == "ok"


def test_input_file_change_marks_stale(tmp_path):
    ws = Workspace(tmp_path / "ws")
    src = tmp_path / "config.json"
    src.write_text("{}")
    _run(ws, "capture", {"graph.json": b"v1"}, input_files=[src])
    os.utime(src, ns=(1, 1))  # touched but same content: still ok
    assert ws.status("capture") == "ok"
    src.write_text('{"layers": 3}')
    assert ws.status("capture") == "stale"


def test_hand_edits_are_never_overwritten_silently(tmp_path):
    ws = Workspace(tmp_path)
    _run(ws, "capture", {"graph.json": b"v1"})
    _run(ws, "quant", {"plan.json": b'{"layer0": "fp8"}'}, upstream=("capture",))
    (tmp_path / "quant" / "plan.json").write_text('{"layer0": "bf16"}')  # the user's tweak
    assert ws.status("quant") == "modified"
    with pytest.raises(WorkbenchError, match="quant/plan.json changed by hand.*--force"):
        _run(ws, "quant", {"plan.json": b'{"layer0": "fp8"}'}, upstream=("capture",))
    assert (tmp_path / "quant" / "plan.json").read_text() == '{"layer0": "bf16"}'
    _run(ws, "quant", {"plan.json": b'{"layer0": "fp8"}'}, upstream=("capture",), force=True)
    assert ws.status("quant") == "ok"


def test_missing_upstream_is_refused(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(WorkbenchError, match="needs the 'capture' stage"):
        _run(ws, "passes", {"graph.json": b"x"}, upstream=("capture",))


def test_failed_run_keeps_previous_record(tmp_path):
    ws = Workspace(tmp_path)
    _run(ws, "capture", {"graph.json": b"v1"})
    with pytest.raises(RuntimeError):
        with ws.run("capture", params={}):
            raise RuntimeError("capture crashed")
    assert ws.status("capture") == "ok"
    assert ws.record("capture")["params"] == {"n": 1}


def test_killed_mid_write_leaves_previous_artifact_intact(tmp_path):
    """SIGKILL a process while it streams a large artifact; the old one must survive whole."""
    ws = Workspace(tmp_path / "ws")
    _run(ws, "capture", {"weights.bin": b"v1" * 1000})
    script = textwrap.dedent(f"""
        import sys, time
        from workbench.workspace import Workspace
        ws = Workspace({str(tmp_path / "ws")!r})
        def slow(f):
            for i in range(10_000):
                f.write(b"x" * 65536)
                f.flush()
                if i == 20:
                    print("writing", flush=True)
                time.sleep(0.005)
        with ws.run("capture", params={{}}) as run:
            run.write_bytes("weights.bin", slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        tmp_files = list((tmp_path / "ws" / "capture").glob(".weights.bin.tmp-*"))
        assert tmp_files and tmp_files[0].stat().st_size > 20 * 65536  # it really was mid-write
        assert ws.status("capture") == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (tmp_path / "ws" / "capture" / "weights.bin").read_bytes() == b"v1" * 1000
    assert ws.record("capture")["artifacts"]["weights.bin"]["bytes"] == 2000
    assert ws.status("capture") == "interrupted"
    _run(ws, "capture", {"weights.bin": b"v3"})  # a re-run recovers and cleans up
    assert ws.status("capture") == "ok"
    assert not list((tmp_path / "ws" / "capture").glob(".*.tmp-*"))


def test_corrupt_record_and_artifact_messages(tmp_path):
    ws = Workspace(tmp_path)
    _run(ws, "capture", {"graph.json": b"{not json"})
    with pytest.raises(WorkbenchError, match="capture/graph.json|is not valid JSON"):
        ws.read_json("capture", "graph.json")
    (tmp_path / "capture" / "record.json").write_text("{")
    with pytest.raises(WorkbenchError, match="record.json is corrupt"):
        ws.record("capture")
    with pytest.raises(WorkbenchError, match="has no passes/graph.json"):
        ws.path("passes", "graph.json")


# ---- refusals leave nothing behind ----------------------------------------------------------------------------

def test_opening_makes_nothing_and_a_refused_first_run_removes_what_it_made(tmp_path):
    ws = Workspace(tmp_path / "a" / "ws")
    assert not (tmp_path / "a").exists() and ws.stages() == [] and ws.info().empty
    with pytest.raises(WorkbenchError, match="unsupported"):
        with ws.run("capture", params={}):
            raise WorkbenchError("unsupported architecture")
    assert not (tmp_path / "a").exists()  # the stage folder, the workspace and its parent: all made by the run
    with pytest.raises(KeyboardInterrupt):
        with ws.run("capture", params={}):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="is a file"):
        Workspace(tmp_path / "file.txt")


def test_a_failed_run_keeps_what_was_there_and_what_it_wrote(tmp_path):
    ws = Workspace(tmp_path / "ws")
    _run(ws, "capture", {"graph.json": b"v1"})
    with pytest.raises(RuntimeError):
        with ws.run("passes", params={}, upstream=("capture",)):
            raise RuntimeError("a pass crashed")
    assert ws.stages() == ["capture"] and ws.status("capture") == "ok"  # its new folder went, the rest stayed
    with pytest.raises(RuntimeError):
        with ws.run("tune", params={}, upstream=("capture",)) as run:
            run.write_bytes("timings.json", b"{}")  # saved as it grew: an interrupted tuning resumes from it
            raise RuntimeError("interrupted")
    assert (tmp_path / "ws" / "tune" / "timings.json").read_bytes() == b"{}"
    assert ws.status("tune") == "missing"
    (tmp_path / "empty").mkdir()  # a directory the user made stays, even empty
    with pytest.raises(RuntimeError):
        with Workspace(tmp_path / "empty").run("capture", params={}):
            raise RuntimeError("refused")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def _unsupported_config(tmp_path):
    path = tmp_path / "bloom.json"
    path.write_text('{"architectures": ["BloomForCausalLM"], "model_type": "bloom"}')
    return str(path)


def test_refused_capture_and_build_leave_no_workspace(tmp_path, capsys, monkeypatch):
    from workbench.cli import main

    bad = [str(tmp_path / "no" / "such" / "model"), _unsupported_config(tmp_path)]
    for model in bad:
        assert main(["capture", model, str(tmp_path / "ws")]) == 2
        assert main(["build", model, "--precision", "bf16", "--out", str(tmp_path / "engine")]) == 2
        assert main(["build", model, "--precision", "fp8", "--out", str(tmp_path / "e2"), "--workspace",
                     str(tmp_path / "deep" / "ws")]) == 2
    err = capsys.readouterr().err
    assert "no file, directory, preset or model" in err and "unsupported architecture 'BloomForCausalLM'" in err
    # a capture refused inside its stage, after its folders were made, removes them too
    import workbench.pipeline

    def refuse(*args, **kwargs):
        raise WorkbenchError("torch.export refused this model")

    monkeypatch.setattr(workbench.pipeline, "capture_source", refuse)
    assert main(["capture", "tiny-llama", str(tmp_path / "ws")]) == 2
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(tmp_path / "engine")]) == 2
    assert "torch.export refused this model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom.json"]


def test_a_refused_capture_keeps_an_existing_workspace(tmp_path, capsys):
    from workbench.cli import main

    ws = Workspace(tmp_path / "ws")
    _run(ws, "capture", {"graph.json": b"{}"})
    _run(ws, "passes", {"graph.json": b"{}"}, upstream=("capture",))
    for model in [str(tmp_path / "missing"), _unsupported_config(tmp_path)]:
        assert main(["capture", model, str(ws.root)]) == 2
        assert main(["capture", model, str(ws.root), "--force"]) == 2
        assert main(["build", model, "--precision", "bf16", "--out", str(tmp_path / "engine"), "--workspace",
                     str(ws.root)]) == 2
    capsys.readouterr()
    assert ws.stages() == ["capture", "passes"] and ws.status("passes") == "ok"
    assert not (tmp_path / "engine").exists()
