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
