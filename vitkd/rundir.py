"""A training run's folder: one owner for its layout, its lock and its single commit point.

Layout of ``RunDir(path)``:

- ``last.state.safetensors``: **the commit point**. Everything ``--resume`` needs (weights,
  optimizer, RNG, step, the checkpoint metadata, every epoch's metrics) in one file, written
  aside, fsynced and renamed into place once per epoch. A run is at epoch N exactly when this
  file says so.
- ``last.safetensors``, ``best.safetensors`` (only with a validation split), ``metrics.jsonl``:
  exports derived from the state, rewritten after each commit and repaired on resume when a
  kill landed between the commit and an export.
- ``progress.json``: live position within an epoch, for the app (advisory).
- ``job.json`` and ``log.txt``: written by ``vitkd.jobs`` for runs started from the app.
- ``.train.lock``: held (``flock``) by the one process training into the folder; the kernel
  drops it when that process dies, so a crashed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    load_training_state,
    read_checkpoint_meta,
    read_training_state_epoch,
    save_checkpoint,
    save_training_state,
)
from .errors import CheckpointError, VitkdError
from .files import write_text_atomic

__all__ = ["RunDir", "RunBusyError", "crash_point"]

# Test hook: ``VITKD_CRASH_AT=<file name>:<epoch>`` SIGKILLs this process right after that file of
# that epoch lands (``*`` for every epoch), so tests can kill a run at every point of a commit.
_CRASH_ENV = "VITKD_CRASH_AT"


class RunBusyError(VitkdError):
    """Another process is training into this run folder."""


def crash_point(name: str, epoch: int) -> None:
    """SIGKILL ourselves here if ``VITKD_CRASH_AT`` names this point (a no-op otherwise)."""
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    target, _, when = spec.rpartition(":")
    if target == name and when in ("*", str(epoch)):
        os.kill(os.getpid(), 9)


@dataclass(frozen=True)
class RunDir:
    """Paths and the commit protocol of one run folder (``--out``)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def state(self) -> Path:
        return self.path / "last.state.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def lock_file(self) -> Path:
        return self.path / ".train.lock"

    # ------------------------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's training lock; a second trainer gets ``RunBusyError`` at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")  # noqa: SIM115 - held for the whole block
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunBusyError(f"{self.path} is in use: {holder} is training into it; wait for it to end "
                                   "or choose another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            handle.close()  # closing drops the flock

    def remove_temp_files(self) -> list[Path]:
        """Delete temp files a killed writer left behind (``.NAME.*.tmp``); call while holding the lock."""
        removed = []
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed

    # ---------------------------------------------------------------------------- commit point

    def commit(self, state: dict[str, Any]) -> None:
        """Make ``state`` (with ``epoch`` and ``model`` weights) the run's current epoch, durably."""
        save_training_state(state, self.state)
        crash_point(self.state.name, int(state["epoch"]))

    def committed_epoch(self) -> int:
        """The epoch the state file commits (0 when the run has none)."""
        if not self.state.is_file():
            return 0
        return read_training_state_epoch(self.state)

    def load_state(self) -> dict[str, Any] | None:
        """The committed state, migrated from the older two-file layout if needed, or None."""
        if not self.state.is_file():
            return None
        state = load_training_state(self.state)
        if "model" not in state:  # vitkd <= 0.3: weights lived only in last.safetensors
            state = self._migrate(state)
        return state

    def _migrate(self, state: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import load_file

        epoch = int(state["epoch"])
        try:
            meta = read_checkpoint_meta(self.last)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: the training state (epoch {epoch}, older layout) has no weights "
                                  f"and last.safetensors is unreadable ({exc}); start the run again") from exc
        if meta.get("epoch") != epoch:
            raise CheckpointError(f"{self.path}: last.safetensors is from epoch {meta.get('epoch')} but the "
                                  f"training state (older layout, without weights) from epoch {epoch}; "
                                  "start the run again")
        history = self.read_metrics()[:epoch]
        meta.pop("format_version", None)
        meta.pop("model", None)
        return dict(state, model=load_file(str(self.last)), meta=meta, metrics_history=history,
                    best_val_accuracy=None, best_epoch=None)

    # --------------------------------------------------------------------------------- exports

    def export(self, model: torch.nn.Module, state: dict[str, Any], best_model: torch.nn.Module | None = None,
               ) -> None:
        """Rewrite the exports from a committed ``state``: ``last``, ``best`` (if a model is given), metrics."""
        epoch = int(state["epoch"])
        save_checkpoint(model, state["meta"], self.last)
        crash_point(self.last.name, epoch)
        if best_model is not None:
            save_checkpoint(best_model, state["best_meta"], self.best)
            crash_point(self.best.name, epoch)
        self.write_metrics(state["metrics_history"])
        crash_point(self.metrics.name, epoch)

    def exports_lag(self, state: dict[str, Any], with_best: bool) -> list[str]:
        """Which exports do not match the committed ``state`` (what a kill between files leaves behind)."""
        lagging = []
        if _epoch_of(self.last) != int(state["epoch"]):
            lagging.append(self.last.name)
        if with_best and state.get("best_epoch") is not None and _epoch_of(self.best) != state["best_epoch"]:
            lagging.append(self.best.name)
        if self.read_metrics() != list(state["metrics_history"]):
            lagging.append(self.metrics.name)
        return lagging

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """``metrics.jsonl``: one JSON line per committed epoch, rewritten whole (never torn, never duplicated)."""
        write_text_atomic(self.metrics, "".join(json.dumps(m) + "\n" for m in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch metrics lines (unreadable lines skipped)."""
        try:
            text = self.metrics.read_text()
        except OSError:
            return []
        rows = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def write_progress(self, progress: dict[str, Any]) -> None:
        write_text_atomic(self.progress, json.dumps(progress))

    def read_progress(self) -> dict[str, Any]:
        try:
            value = json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def clear_outputs(self) -> None:
        """Remove what an earlier, abandoned attempt left (a fresh start owns the folder).

        The training state goes first: it is what makes a folder resumable, so a crash halfway
        leaves a folder that starts fresh again, never one that resumes onto half-deleted files.
        """
        for path in (self.state, self.last, self.best, self.metrics, self.progress):
            path.unlink(missing_ok=True)


def _epoch_of(path: Path) -> int | None:
    try:
        return read_checkpoint_meta(path).get("epoch")
    except CheckpointError:
        return None
