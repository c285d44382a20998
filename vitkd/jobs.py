"""Training jobs started from the app: ``python -m vitkd train|distill`` in its own process session.

A job outlives the page (and the server) that started it: its state lives on disk, never in
module variables. ``runs_dir/<job>/`` is a run folder (``vitkd.rundir.RunDir``, the one owner of
its layout) whose ``job_file`` records pid, argv, start time, status and earlier attempts, and
whose ``log`` collects stdout and stderr. At most one job runs per ``runs_dir``:
``runs_dir/.active_job`` is created with ``O_EXCL`` and names the job and its pid; a lock whose
process is gone is stale and cleared by the next reader.

Cancelling sends SIGTERM to the job's process group: training stops at the next step and the
process prints one ``stopped: ...`` line naming the last committed epoch. ``resume_job`` runs the
same command again with ``--resume`` in the same folder, continuing after that epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, VitkdError
from .files import exclusive_lock, write_text_atomic
from .rundir import RunDir

__all__ = ["Job", "JobStatus", "JobBusyError", "start_job", "resume_job", "active_job", "job_status", "cancel_job",
           "list_jobs", "load_job", "config_to_args", "LOCK_NAME", "ModelShape", "preset_shape", "checkpoint_shape",
           "model_shape",
           "student_presets_for", "training_roots", "folder_class_names", "DOWNLOADABLE_SOURCES",
           "training_sources", "source_class_names"]

LOCK_NAME = ".active_job"
_MUTEX_NAME = ".jobs.mutex"
_STOPPED_PREFIX = "stopped: "  # the CLI's one line when SIGTERM/SIGINT stopped training at a step boundary
_RESUME_MARK = "== resume: "  # written to the log before each resumed attempt
# The CLI flag that makes a job wait for ``go`` on stdin: sent once the job file and lock are written,
# so a parent that dies in between leaves no untracked training process (the child reads EOF and exits).
WAIT_FOR_GO_FLAG = "--wait-for-go"
# TrainConfig fields the CLI takes under another name.
_FLAG_NAMES = {"head_map": "--map", "out_dir": "--out"}
_DISTILL_ONLY = ("teacher", "head_map", "loss", "alpha", "gate", "weighting", "kd", "kd_weight", "kd_temperature")


class JobBusyError(VitkdError):
    """A training job is already running for this runs folder."""


@dataclass(frozen=True)
class Job:
    """A started job: its name (the run folder's name), folder, process id, CLI arguments and start time."""

    name: str
    run_dir: Path
    pid: int
    args: tuple[str, ...]
    started: float

    @property
    def command(self) -> str:
        """``train`` or ``distill``."""
        return self.args[0]

    @property
    def resume_args(self) -> tuple[str, ...]:
        """The job's arguments with ``--resume`` (added once, however often the run was resumed)."""
        return self.args if "--resume" in self.args else (*self.args, "--resume")

    @property
    def folder(self) -> RunDir:
        """The run folder: its files, lock and committed epoch."""
        return RunDir(self.run_dir)

    @property
    def log_path(self) -> Path:
        return self.folder.log

    @property
    def checkpoint(self) -> Path:
        return self.folder.last


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands: ``state`` is running, finished, failed or cancelled; progress from the run folder.

    ``committed_epoch`` is what the run folder's state file commits (read only once the process
    has ended; 0 while running). ``message`` is the process's last log line when it failed, or
    its ``stopped`` line (naming the epoch ``--resume`` continues after) when it was cancelled.
    """

    state: str
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    loss: float | None = None
    accuracy: float | None = None
    metrics: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    message: str = ""
    committed_epoch: int = 0

    @property
    def fraction(self) -> float:
        """Share of the whole run done, in [0, 1]."""
        if self.state == "finished":
            return 1.0
        if self.epochs <= 0:
            return 0.0
        within = self.batch / self.batches if self.batches else 0.0
        return max(0.0, min(1.0, (self.epoch + within) / self.epochs))

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def resumable(self) -> bool:
        """Cancelled or crashed with at least one committed epoch.

        Every epoch committed but the run not finished means it died after its last commit, before
        recording the end: resuming repairs the exports and records it, training nothing.
        """
        return self.state in ("cancelled", "failed") and self.committed_epoch > 0


def config_to_args(config: Mapping[str, Any]) -> list[str]:
    """CLI arguments (``train ...`` or ``distill ...``) for a ``TrainConfig``-like dict, validated first.

    ``out_dir`` is left out: the job sets it. A teacher makes it ``distill``. Every value is
    written out, because the CLI's defaults are not ``TrainConfig``'s (``--alpha`` is 0.5 there).
    ``model_overrides`` become one ``--model-override KEY=VALUE`` each (``format_model_overrides``).
    An extra ``threads`` key becomes ``--threads`` (torch CPU threads of the job).
    """
    from .models import format_model_overrides
    from .train import TrainConfig  # checks every value before a process is spawned

    values = dict(config)
    threads = values.pop("threads", None)
    if "out_dir" in values:
        raise ConfigError("a job's out_dir is its run folder; leave out_dir out of the config")
    if values.get("eval_batch_size", 512) != 512:
        raise ConfigError("eval_batch_size cannot be passed to a job; use an experiment config")
    checked = TrainConfig.from_dict(dict(values, out_dir="unused"))
    distill = checked.teacher is not None
    args = ["distill" if distill else "train"]
    for name, value in checked.to_dict().items():
        if name in ("out_dir", "eval_batch_size") or value is None:
            continue
        if name == "model_overrides":
            for item in format_model_overrides(value):
                args += ["--model-override", item]
            continue
        if not distill and name in _DISTILL_ONLY:
            continue
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            if value:
                args.append(flag)
        else:
            args += [flag, str(value)]
    if threads is not None:
        args += ["--threads", str(int(threads))]
    return args


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it first if it is our own finished child (no zombies left behind)."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie someone else must reap is not running
        with contextlib.suppress(OSError, IndexError):
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _job_alive(job: Job) -> bool:
    """The job's process still runs (and the pid was not reused by an unrelated process)."""
    if not _pid_alive(job.pid):
        return False
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # no procfs (macOS): trust the pid
        return True
    # Empty while the process is between fork and exec, or exiting: still ours, not yet reusable.
    return not cmdline or job.run_dir.name in cmdline


def _mutex(runs_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Serialise lock and job-file updates across threads and processes sharing ``runs_dir``."""
    return exclusive_lock(runs_dir / _MUTEX_NAME)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load_job(run_dir: str | Path) -> Job | None:
    """The job recorded in the run folder's job file, or None if there is none (or it is unreadable)."""
    run_dir = Path(run_dir).resolve()
    record = _read_json(RunDir(run_dir).job_file)
    if record is None:
        return None
    try:
        return Job(name=run_dir.name, run_dir=run_dir, pid=int(record["pid"]), args=tuple(record["args"]),
                   started=float(record["started"]))
    except (KeyError, TypeError, ValueError):
        return None


def _active_locked(runs_dir: Path) -> Job | None:
    """The locked job if its process runs; otherwise the lock is stale and removed (caller holds the mutex)."""
    lock = runs_dir / LOCK_NAME
    if not lock.exists():
        return None
    record = _read_json(lock) or {}
    job = load_job(runs_dir / str(record.get("name", ""))) if record.get("name") else None
    if job is not None and _job_alive(job):
        return job
    # Under the mutex a lock is only ever seen complete, so anything else is left by a dead process.
    lock.unlink(missing_ok=True)
    return None


def active_job(runs_dir: str | Path) -> Job | None:
    """The running job of ``runs_dir``, or None; clears a stale lock on the way."""
    runs_dir = Path(runs_dir)
    if not (runs_dir / LOCK_NAME).exists():
        return None
    with _mutex(runs_dir):
        return _active_locked(runs_dir)


@contextlib.contextmanager
def _claim_slot(runs_dir: Path) -> Iterator[Callable[[str, int], None]]:
    """Hold the mutex and ``runs_dir``'s one-job lock while a job is launched.

    Yields ``claim(name, pid)``, which records the launched job in the lock. The lock is
    removed again if the block raises (nothing was launched, or launching failed).
    """
    with _mutex(runs_dir):
        running = _active_locked(runs_dir)
        if running is not None:
            raise JobBusyError(f"training job {running.name} is still running; wait for it or cancel it first")
        lock = runs_dir / LOCK_NAME
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise JobBusyError("another training job is starting; try again in a moment") from None
        try:
            yield lambda name, pid: _write_json(lock, {"name": name, "pid": pid})
        except BaseException:
            lock.unlink(missing_ok=True)
            raise


def _new_run_dir(runs_dir: Path, prefix: str) -> Path:
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix).strip(".-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_dir = runs_dir / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise VitkdError(f"cannot create a new run folder in {runs_dir}")


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment plus this vitkd on ``PYTHONPATH``, so ``-m vitkd`` works from any working directory."""
    child = dict(os.environ if env is None else env)
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p]
    child["PYTHONPATH"] = os.pathsep.join([package_parent, *(p for p in paths if p != package_parent)])
    return child


@contextlib.contextmanager
def _spawn(run: RunDir, argv: Sequence[str], env: Mapping[str, str] | None) -> Iterator[subprocess.Popen]:
    """``python -m vitkd *argv`` in its own session, stdout and stderr appended to the run's log.

    The process trains only once the block ends without an exception (the caller records the
    job in it); otherwise, or if this process dies first, it reads EOF and exits untrained.
    """
    with open(run.log, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "vitkd", *argv, WAIT_FOR_GO_FLAG], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.PIPE, start_new_session=True,
                                   env=_child_env(env))
    assert process.stdin is not None
    try:
        yield process
    except BaseException:
        process.stdin.close()  # EOF: the child exits without training
        raise
    with contextlib.suppress(BrokenPipeError):  # it died already; job_status reports how
        process.stdin.write(b"go\n")
        process.stdin.close()


def start_job(runs_dir: str | Path, config: Mapping[str, Any] | Sequence[str], name: str | None = None,
              env: Mapping[str, str] | None = None) -> Job:
    """Launch ``python -m vitkd train|distill ... --out runs_dir/<job> --no-progress`` detached.

    ``config`` is a ``TrainConfig``-like dict (see ``config_to_args``) or CLI arguments starting
    with ``train`` or ``distill`` (without ``--out``). Raises ``JobBusyError`` while another job runs.
    """
    runs_dir = Path(runs_dir).resolve()
    if isinstance(config, Mapping):
        args = config_to_args(config)
    else:
        args = [str(a) for a in config]
        if not args or args[0] not in ("train", "distill"):
            raise ConfigError(f"job arguments must start with 'train' or 'distill', got {args[:1]}")
        if any(a == "--out" or a.startswith("--out=") for a in args):
            raise ConfigError("a job chooses its own --out (its run folder); drop --out")
    if "--no-progress" not in args:
        args.append("--no-progress")
    with _claim_slot(runs_dir) as claim:
        run = RunDir(_new_run_dir(runs_dir, name or args[0]))
        argv = list(args) + ["--out", str(run.path)]
        with _spawn(run, argv, env) as process:
            started = time.time()
            _write_json(run.job_file, {"pid": process.pid, "args": argv, "started": started, "status": "running",
                                       "python": sys.executable})
            claim(run.name, process.pid)
    return Job(name=run.name, run_dir=run.path, pid=process.pid, args=tuple(argv), started=started)


def resume_job(runs_dir: str | Path, job: Job, env: Mapping[str, str] | None = None) -> Job:
    """Run a cancelled or crashed job's command again with ``--resume``, in its run folder, detached.

    Training continues after the epoch the folder's state file commits. The job file keeps
    each earlier attempt (pid, argv, start, end, status, message) under ``attempts``; the log
    gets a ``== resume:`` line, then the new attempt's output. Raises ``JobBusyError`` while a
    job runs in ``runs_dir`` and ``ConfigError`` when the run has nothing to resume (no committed
    epoch, or every epoch done).
    """
    runs_dir = Path(runs_dir).resolve()
    if job.run_dir.parent != runs_dir:
        raise ConfigError(f"job {job.name} belongs to {job.run_dir.parent}, not to {runs_dir}")
    with _claim_slot(runs_dir) as claim:
        current = load_job(job.run_dir)  # the latest attempt, should another session have resumed it meanwhile
        if current is None:
            raise ConfigError(f"{job.run_dir} has no readable job record; start a new run")
        status = _read_status(current)
        if status.running:  # alive without holding the lock (a lock file removed by hand)
            raise JobBusyError(f"training job {current.name} is still running; wait for it or cancel it first")
        if not status.resumable:
            if status.state == "finished":
                raise ConfigError(f"{current.name} already finished its {status.epochs} epochs; nothing to resume")
            raise ConfigError(f"{current.name} has no committed epoch to resume from; start a new run")
        run = current.folder
        record = _read_json(run.job_file) or {}
        previous = {key: record.get(key) for key in ("pid", "args", "started")}
        previous.update(ended=record.get("ended", time.time()), status=status.state)
        attempts = [*record.get("attempts", []), dict(previous, message=status.message)]
        argv = list(current.resume_args)
        with open(run.log, "a") as log:
            log.write(f"\n{_RESUME_MARK}{time.strftime('%Y-%m-%d %H:%M:%S')}, after epoch "
                      f"{status.committed_epoch}: python -m vitkd {' '.join(argv)}\n")
        with _spawn(run, argv, env) as process:
            started = time.time()
            kept = {k: v for k, v in record.items() if k not in ("ended", "attempts")}
            _write_json(run.job_file, dict(kept, pid=process.pid, args=argv, started=started, status="running",
                                           python=sys.executable, attempts=attempts))
            claim(run.name, process.pid)
    return Job(name=run.name, run_dir=run.path, pid=process.pid, args=tuple(argv), started=started)


def _last_log_line(job: Job) -> str:
    """The log's last non-empty line ("" when the current attempt printed nothing yet)."""
    log = job.log_path
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    last = lines[-1] if lines else ""
    return "" if last.startswith(_RESUME_MARK) else last


def job_status(job: Job) -> JobStatus:
    """Read the job's state from its process and run folder (safe to call from any thread, any time).

    A process that ended with the CLI's ``stopped:`` line (SIGTERM or SIGINT, from ``cancel_job``
    or anyone else) is cancelled, with that line as the message; any other unfinished end failed.
    An ended attempt's state is written to the job file, unless another attempt replaced it meanwhile.
    """
    status = _read_status(job)
    if status.state != "running":
        with _mutex(job.run_dir.parent):  # re-read under the mutex: a resume may have just written its attempt
            record = _read_json(job.folder.job_file) or {}
            if record.get("pid") == job.pid and record.get("status") != status.state:
                with contextlib.suppress(OSError):
                    _write_json(job.folder.job_file, dict(record, status=status.state,
                                                          ended=record.get("ended", time.time())))
    return status


def _read_status(job: Job) -> JobStatus:
    """``job_status`` without writing anything (callers holding the mutex use this)."""
    run = job.folder
    record = _read_json(run.job_file) or {}
    progress = run.read_progress()
    metrics = tuple(run.read_metrics())
    alive = _job_alive(job)
    last_line = "" if alive else _last_log_line(job)
    stopped = last_line.startswith(_STOPPED_PREFIX)
    if record.get("status") == "cancelled" or (not alive and stopped):  # final even while still shutting down
        state = "cancelled"
    elif alive:
        state = "running"
    elif progress.get("done") and run.last.is_file():
        state = "finished"
    else:
        state = "failed"
    epochs = int(progress.get("epochs") or (metrics[-1].get("epochs") if metrics else 0) or 0)
    if "accuracy" in progress or progress.get("done"):  # written at an epoch's end: ``epoch`` epochs complete
        epoch, batch = int(progress.get("epoch", 0)), 0
    else:
        epoch, batch = int(progress.get("epoch", len(metrics))), int(progress.get("batch", 0))
    last = metrics[-1] if metrics else {}
    if state == "failed":
        message = last_line
    elif state == "cancelled" and stopped:
        message = last_line[len(_STOPPED_PREFIX):]
    else:
        message = ""
    committed = 0
    if state in ("cancelled", "failed") and not alive:
        with contextlib.suppress(VitkdError):  # unreadable state: nothing to resume from
            committed = run.committed_epoch()
    return JobStatus(state=state, epoch=epoch, epochs=epochs, batch=batch, batches=int(progress.get("batches") or 0),
                     loss=progress.get("loss"), accuracy=last.get("accuracy"), metrics=metrics, message=message,
                     committed_epoch=committed)


def cancel_job(job: Job, timeout: float = 10.0) -> JobStatus:
    """SIGTERM the job's process group, wait up to ``timeout`` s (then SIGKILL), release the lock.

    Training stops at the next step boundary, so the folder keeps its last committed epoch and
    no temporary file; SIGKILL is the fallback for a process that does not stop in time. A handle
    to an attempt since replaced (another session resumed the run) cancels nothing and returns
    the current attempt's status.
    """
    runs_dir = job.run_dir.parent
    job_file = job.folder.job_file
    with _mutex(runs_dir):
        record = _read_json(job_file) or {}
        if record.get("pid") != job.pid:  # another session resumed the run since this job was read: not ours
            return _read_status(load_job(job.run_dir) or job)
        _write_json(job_file, dict(record, status="cancelled", ended=time.time()))
    if _job_alive(job):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(job.pid) and time.monotonic() < deadline:  # the pid itself, until it has fully exited
            time.sleep(0.05)
        if _pid_alive(job.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)
            while _pid_alive(job.pid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
    with _mutex(runs_dir):
        record = _read_json(runs_dir / LOCK_NAME)
        if record is not None and record.get("name") == job.name and record.get("pid") == job.pid:
            (runs_dir / LOCK_NAME).unlink(missing_ok=True)
    return job_status(job)


def list_jobs(runs_dir: str | Path) -> list[Job]:
    """Every job ever started in ``runs_dir``, newest attempt first (folders without a job file are not jobs)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    jobs = [job for d in runs_dir.iterdir() if d.is_dir() and (job := load_job(d)) is not None]
    return sorted(jobs, key=lambda j: j.started, reverse=True)


# What the training form offers: pure functions over checkpoint metadata, presets and folders.

@dataclass(frozen=True)
class ModelShape:
    """What a head map and a student choice depend on: depth, heads, input size, token grid, prefix tokens.

    ``distillation_token``: a DeiT model (its prefix tokens include one); a plain teacher can teach it,
    its maps losing that token's row and column (``vitkd.train``).
    """

    depth: int
    num_heads: int
    img_size: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    distillation_token: bool = False


def _spec_shape(name: str, spec: Mapping[str, Any], img_size: int | None) -> ModelShape:
    """A preset's shape from its keyword arguments (plus overrides): arithmetic, nothing is built."""
    from .models import DISTILLED_PRESETS

    size = int(img_size or spec["img_size"])
    patch = int(spec["patch_size"])
    distilled = name in DISTILLED_PRESETS
    prefix = int(bool(spec.get("class_token", True))) + int(spec.get("reg_tokens") or 0) + int(distilled)
    return ModelShape(depth=int(spec["depth"]), num_heads=int(spec["num_heads"]), img_size=size,
                      grid=(size // patch, size // patch), num_prefix_tokens=prefix, distillation_token=distilled)


def preset_shape(preset: str, img_size: int | None = None) -> ModelShape:
    """The shape of a preset at ``img_size`` (its own size if None), without building it."""
    from .models import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return _spec_shape(preset, PRESETS[preset], img_size)


def checkpoint_shape(meta: Mapping[str, Any], path: str | Path | None = None) -> ModelShape:
    """The shape of a checkpoint's model from its metadata and header; nothing is allocated, no weights read.

    With ``path``, the model is built on the ``meta`` device and checked against the file's header
    (``vitkd.checkpoint.checkpoint_architecture``); without it a preset's shape is worked out from
    its arguments and a timm name is built on the ``meta`` device. Either way the metadata passes
    ``checkpoint_model_config`` first (architecture keys only).
    """
    import torch

    from .checkpoint import checkpoint_architecture, checkpoint_model_config
    from .models import PRESETS, build_model

    config = checkpoint_model_config(meta, path or "checkpoint")
    if path is not None:
        return _built_shape(checkpoint_architecture(path, meta))
    if config.name in PRESETS:
        return _spec_shape(config.name, dict(PRESETS[config.name], **config.overrides), config.img_size)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return _built_shape(build_model(config))


def model_shape(name: str, img_size: int | None = None, overrides: Mapping[str, Any] | None = None) -> ModelShape:
    """The shape of a preset or timm model (``timm:NAME``) with architecture overrides, built on the ``meta`` device.

    Building is the check: a ``ConfigError`` names an unknown model or overrides it cannot take.
    No memory is allocated and no weights are read.
    """
    import torch

    from .models import build_model, check_model_overrides

    check_model_overrides(overrides or {})
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return _built_shape(build_model(name, num_classes=10, img_size=img_size, **dict(overrides or {})))


def _built_shape(model: Any) -> ModelShape:
    """Depth, heads, input size and token layout of a built ViT (any device)."""
    from .attention import token_layout
    from .models import has_distillation_token

    layout = token_layout(model)
    return ModelShape(depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                      img_size=int(model.patch_embed.img_size[0]), grid=layout.grid_size,
                      num_prefix_tokens=layout.num_prefix_tokens,
                      distillation_token=has_distillation_token(model))


def student_presets_for(teacher: ModelShape) -> list[str]:
    """Presets a student can be distilled into from ``teacher``, trained at the teacher's input size: those
    with the teacher's token grid first, then other grids (the teacher's maps are resampled onto the
    student's grid, ``vitkd.resample``).

    Prefix tokens must line up; a DeiT preset matches a plain teacher with one prefix token fewer: its
    distillation token is dropped from the maps it learns (and it trains with ``--kd deit-hard``).
    """
    from .models import PRESETS

    same, other = [], []
    for name in PRESETS:
        if teacher.img_size % int(PRESETS[name]["patch_size"]):
            continue
        shape = preset_shape(name, teacher.img_size)
        extra = int(shape.distillation_token and not teacher.distillation_token)
        if shape.num_prefix_tokens - extra == teacher.num_prefix_tokens:
            (same if shape.grid == teacher.grid else other).append(name)
    return same + other


def training_roots(data_roots: Sequence[str | Path]) -> list[Path]:
    """The data roots that ``imagefolder:ROOT`` can train on: a ``train/`` and a ``test/`` or ``val/`` folder."""
    return [Path(r) for r in data_roots
            if (Path(r) / "train").is_dir() and ((Path(r) / "test").is_dir() or (Path(r) / "val").is_dir())]


def folder_class_names(root: str | Path) -> list[str]:
    """Class names of ``ROOT/train`` in the order training assigns labels (sorted subfolder names)."""
    train = Path(root) / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []


# torchvision datasets the training form offers where a network exists (trained with ``--download``).
DOWNLOADABLE_SOURCES: tuple[str, ...] = ("cifar10", "cifar100")
# torchvision's CIFAR-10 label order; CIFAR-100's 100 names are checked against a teacher when the run starts.
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def training_sources(data_roots: Sequence[str | Path], downloads: bool) -> list[str]:
    """``--data`` sources the training form offers: ``imagefolder:ROOT`` for each training root, then (with
    ``downloads``, where a network exists) the torchvision datasets."""
    return [f"imagefolder:{root}" for root in training_roots(data_roots)] + \
        (list(DOWNLOADABLE_SOURCES) if downloads else [])


def source_class_names(source: str) -> list[str] | None:
    """A ``--data`` source's class names in label order, or None when only loading it tells (CIFAR-100)."""
    if source.startswith("imagefolder:"):
        return folder_class_names(source.split(":", 1)[1])
    return list(_CIFAR10_CLASSES) if source == "cifar10" else None
