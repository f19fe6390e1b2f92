"""The workspace: one folder per stage, atomic artifacts, and a record of every run.

    ws/
      capture/
        graph.json            artifacts, each written atomically
        constants.safetensors
        record.json           written last: inputs' hashes, params, versions, host, timings
      passes/ ...

Status of a stage, from its record and the files on disk:

    missing      never run
    running      a run is in progress (its process is alive)
    interrupted  a run started and its process died before finishing: re-run it
    ok           artifacts are what the run wrote and every input is unchanged
    modified     an artifact was changed by hand since the run; re-running refuses
                 to overwrite it unless forced, so a user's tweak is never lost silently
    stale        an input changed since the run: an upstream stage's artifacts
                 (or that stage is itself stale/modified), or an input file

Every write goes to a temporary file in the same folder, is fsynced, then
renamed over the target, so a run killed mid-write leaves the previous artifact
intact; ``record.json`` is written after all artifacts, so a record never
describes artifacts that are not there.

Directories appear when a stage first runs, not when a ``Workspace`` is opened, and a
stage run that fails or is refused removes the directories it made if they are still
empty: a refused ``workbench capture`` or ``build`` leaves no empty workspace behind, and
never touches a directory that was there before.

The folders are the stages, each written by one command: capture/ (``workbench capture``),
passes/ (``optimize``), quant/ (``quantize``), tune/ (``tune``), export/ (``export``: the
record of the engine written elsewhere); ``build`` runs them all, and its accuracy gate
writes accuracy/.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .env import atomic_write, environment, sha256_file
from .errors import WorkbenchError

#: Stages in pipeline order (for display); a stage declares its own upstream when it runs.
STAGE_ORDER = ("capture", "passes", "quant", "tune", "export")
RECORD = "record.json"
RUNNING = "running.json"


def _file_entry(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(path: Path, entry: dict[str, Any]) -> bool:
    """Same content as recorded; size and mtime spare re-hashing a file nobody touched."""
    if not path.is_file():
        return False
    st = path.stat()
    if st.st_size == entry["bytes"] and st.st_mtime_ns == entry["mtime_ns"]:
        return True
    return st.st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


@dataclass
class StageRun:
    """Handle given to a running stage: write artifacts through it so they are recorded."""

    stage: str
    directory: Path
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write_bytes(self, name: str, data: bytes | Callable[[io.BufferedWriter], None]) -> Path:
        path = self.directory / name
        atomic_write(path, data)
        self.artifacts[name] = _file_entry(path)
        return path

    def adopt(self, name: str) -> Path:
        """Record an artifact the stage wrote itself (atomically) while it ran, e.g. a cache saved as it grew."""
        path = self.directory / name
        if not path.is_file():
            raise WorkbenchError(f"stage {self.stage!r} has no artifact {name!r} to record")
        self.artifacts[name] = _file_entry(path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=1, sort_keys=False) + "\n")

    def write_safetensors(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save

        return self.write_bytes(name, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


class Workspace:
    """A workspace directory. ``create=False`` requires it to exist; otherwise a missing one is made by the
    first stage that runs in it (``run``), so opening one and then being refused leaves nothing on disk."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise WorkbenchError(f"{self.root} is a file, not a workspace directory; give a directory")
        if not self.root.is_dir() and not create:
            raise WorkbenchError(f"{self.root} is not a workspace directory; create one with "
                                 "`workbench capture MODEL DIR`")

    # ---- reading ------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path(self, stage: str, artifact: str) -> Path:
        p = self.stage_dir(stage) / artifact
        if not p.is_file():
            raise WorkbenchError(f"{self.root} has no {stage}/{artifact}; run the {stage} stage first "
                                 f"(status: {self.status(stage)})")
        return p

    def read_json(self, stage: str, artifact: str) -> Any:
        p = self.path(stage, artifact)
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{p} is not valid JSON ({e}); fix it or re-run the {stage} stage with --force") from None

    def record(self, stage: str) -> dict[str, Any] | None:
        p = self.stage_dir(stage) / RECORD
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            raise WorkbenchError(f"{p} is corrupt; delete the {stage} folder and re-run the stage") from None

    def stages(self) -> list[str]:
        if not self.root.is_dir():  # opened, no stage run yet
            return []
        present = [d.name for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        return [s for s in STAGE_ORDER if s in present] + [s for s in present if s not in STAGE_ORDER]

    def status(self, stage: str) -> str:
        return self._status(stage, set())

    def _status(self, stage: str, visiting: set[str]) -> str:
        directory = self.stage_dir(stage)
        marker = directory / RUNNING
        if marker.is_file():
            try:
                pid = json.loads(marker.read_text())["pid"]
                os.kill(pid, 0)
                return "running"
            except PermissionError:  # alive, owned by another user
                return "running"
            except (ValueError, KeyError, ProcessLookupError):
                return "interrupted"
        rec = self.record(stage)
        if rec is None:
            return "missing"
        if any(not _unchanged(directory / a, e) for a, e in rec["artifacts"].items()):
            return "modified"
        if any(not _unchanged(Path(p), e) for p, e in rec.get("input_files", {}).items()):
            return "stale"
        for up, recorded in rec.get("upstream", {}).items():
            if up in visiting:
                raise WorkbenchError(f"workspace stages form a cycle through {up!r}")
            up_rec = self.record(up)
            if up_rec is None or self._status(up, visiting | {stage}) != "ok":
                return "stale"
            if {a: e["sha256"] for a, e in up_rec["artifacts"].items()} != recorded:
                return "stale"
        return "ok"

    def up_to_date(self, stage: str, params: dict[str, Any] | None = None, *,
                   matches: Callable[[dict[str, Any]], bool] | None = None) -> bool:
        """``stage`` need not run again: its status is "ok" and its record's params are ``params`` (compared as
        JSON) and satisfy ``matches`` (each only where given). The settings are compared first: a stage run
        with other settings is out of date without hashing its artifacts."""
        rec = self.record(stage)
        if rec is None:
            return False
        if params is not None and rec["params"] != json.loads(json.dumps(params)):
            return False
        if matches is not None and not matches(rec["params"]):
            return False
        return self.status(stage) == "ok"

    def info(self):
        """One row per stage: status, artifacts, size, when and how long."""
        import pandas as pd

        rows = []
        for stage in self.stages():
            rec = self.record(stage) or {}
            arts = rec.get("artifacts", {})
            rows.append({"stage": stage, "status": self.status(stage), "artifacts": ", ".join(arts),
                         "bytes": sum(e["bytes"] for e in arts.values()), "finished": rec.get("finished_at"),
                         "duration_s": rec.get("duration_s"), "upstream": ", ".join(rec.get("upstream", {}))})
        return pd.DataFrame(rows, columns=["stage", "status", "artifacts", "bytes", "finished", "duration_s", "upstream"])

    # ---- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, stage: str, *, params: dict[str, Any], upstream: tuple[str, ...] = (),
            input_files: list[Path] = (), force: bool = False) -> Iterator[StageRun]:
        """Run a stage: yields a ``StageRun`` to write artifacts through, then writes the record.

        Refuses to overwrite artifacts edited by hand unless ``force``; refuses to run on
        an upstream stage that is missing. A run that raises removes the directories it made
        (the stage's folder, the workspace and its missing parents) where they are still empty,
        so a refused first stage leaves nothing; what a failed run wrote (an interrupted tuning's
        timing cache) stays, and so does every directory that existed before.
        """
        directory = self.stage_dir(stage)
        status = self.status(stage)
        if status == "running":
            raise WorkbenchError(f"stage {stage!r} is being run by another process in {self.root}; wait for it "
                                 f"or stop it (see {directory / RUNNING})")
        if not force and status == "modified":
            rec = self.record(stage)
            edited = [a for a, e in rec["artifacts"].items() if not _unchanged(directory / a, e)]
            raise WorkbenchError(f"{stage}/{', '.join(edited)} changed by hand since the stage wrote it; re-running "
                                 "would overwrite it. Keep a copy elsewhere, or pass --force (force=True) to re-run")
        upstream_hashes = {}
        for up in upstream:
            up_rec = self.record(up)
            if up_rec is None:
                raise WorkbenchError(f"stage {stage!r} needs the {up!r} stage, which has not run in {self.root}")
            upstream_hashes[up] = {a: e["sha256"] for a, e in up_rec["artifacts"].items()}
        made = _missing_dirs(directory)  # deepest first: what this run creates, and removes again if left empty
        directory.mkdir(parents=True, exist_ok=True)
        try:
            for leftover in directory.glob(".*.tmp-*"):  # from a writer that was killed; never renamed into place
                leftover.unlink(missing_ok=True)
            started = time.time()
            atomic_write(directory / RUNNING, json.dumps({"pid": os.getpid(), "started": started}).encode())
            handle = StageRun(stage, directory)
            yield handle
        except BaseException:
            (directory / RUNNING).unlink(missing_ok=True)
            _remove_if_empty(made)
            raise
        finished = time.time()
        record = {
            "stage": stage,
            "started_at": _iso(started), "finished_at": _iso(finished),
            "duration_s": round(finished - started, 3),
            "params": params,
            "upstream": upstream_hashes,
            "input_files": {str(Path(p).resolve()): _file_entry(Path(p)) for p in input_files},
            "artifacts": handle.artifacts,
            **environment(),
        }
        atomic_write(directory / RECORD, (json.dumps(record, indent=1) + "\n").encode())
        (directory / RUNNING).unlink(missing_ok=True)


def _missing_dirs(directory: Path) -> list[Path]:
    """``directory`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    return missing


def _remove_if_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while each is empty; stop at the first that holds anything."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: a failed run's partial artifacts stay, and so does everything above them
            return


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")
