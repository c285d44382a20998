"""Experiment runner: train every run of a YAML config in order, then write the results table.

Rerunning skips finished runs and resumes partial ones (each run is a ``train`` with
``resume=True`` in its own folder). ``results.json`` lists every run with its full config
and metrics, so ``results.md`` can be regenerated from it alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import read_checkpoint_meta
from .errors import ConfigError
from .files import atomic_target, exclusive_lock, write_text_atomic
from .rundir import RunDir
from .train import TrainConfig, train

__all__ = ["load_experiment", "run_experiment", "results_table", "experiment_status"]

_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_PUBLISH_LOCK = ".publish.lock"  # in the study's out_dir: one lane at a time writes results and the bundle


def load_experiment(path: str | Path) -> tuple[dict[str, Any], list[tuple[str, TrainConfig, dict[str, Any]]]]:
    """Parse the YAML into ``(header, [(run name, TrainConfig, extra)])``.

    ``teacher: NAME`` refers to an earlier run of the study; ``teacher: PATH.safetensors`` is a
    checkpoint file (relative to the working directory, like ``out_dir``), e.g. another study's run.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read experiment config {path}: {exc}") from exc
    if not isinstance(spec, dict) or "runs" not in spec or "out_dir" not in spec:
        raise ConfigError(f"{path}: an experiment config needs 'out_dir' and 'runs'")
    if not isinstance(spec["out_dir"], str) or not isinstance(spec.get("defaults", {}), dict):
        raise ConfigError(f"{path}: 'out_dir' must be a folder path and 'defaults' a mapping of training options")
    if not isinstance(spec["runs"], list) or not all(isinstance(r, dict) for r in spec["runs"]):
        raise ConfigError(f"{path}: 'runs' must be a list of mappings (- name: ..., model: ...)")
    out_dir = Path(spec["out_dir"])
    defaults = dict(spec.get("defaults", {}))
    runs: list[tuple[str, TrainConfig, dict[str, Any]]] = []
    names: set[str] = set()
    for raw in spec["runs"]:
        raw = dict(raw)
        name = raw.pop("name", None)
        if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):  # it names a folder under out_dir
            raise ConfigError(f"{path}: run name {name!r} must be letters, digits, '.', '_' or '-' "
                              "(not starting with '.')")
        if name in names:  # two runs would share one folder: the second would resume or overwrite the first
            raise ConfigError(f"{path}: run name {name!r} appears twice; each run needs its own name")
        extra = {k: raw.pop(k) for k in ("group", "label") if k in raw}
        fields = dict(defaults, **raw)
        fields.setdefault("data", spec.get("data"))
        teacher = fields.get("teacher")
        for key, value in (*extra.items(), ("teacher", teacher)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{path}: run {name!r}: {key} is {value!r:.60}, not a string")
        if teacher is not None and not str(teacher).endswith(".safetensors"):  # a path is used as given
            if teacher not in names:
                raise ConfigError(f"{path}: run {name!r} names teacher {teacher!r}, which is not an earlier run "
                                  "(or give a checkpoint path ending in .safetensors)")
            fields["teacher"] = str(RunDir(out_dir / teacher).last)
        fields["out_dir"] = str(out_dir / name)
        runs.append((name, TrainConfig.from_dict(fields), extra))
        names.add(name)
    return spec, runs


def _run_summary(name: str, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any] | None:
    ckpt = RunDir(config.out_dir).last
    if not ckpt.is_file():
        return None
    meta = read_checkpoint_meta(ckpt)
    return {"name": name, **extra, "config": config.to_dict(), "epoch": meta.get("epoch"),
            "finished": meta.get("epoch") == config.epochs, "accuracy": meta["metrics"]["accuracy"],
            "parameters": meta.get("parameters"), "wall_time_s": meta.get("wall_time_s"),
            "head_map": meta.get("head_map")}


def _recipe_cells(c: dict[str, Any]) -> tuple[str, str, str, str]:
    """(attention loss, map, gate/weighting, logit KD) of a run's config, ``-`` where not used."""
    if c["teacher"] is None:
        return "-", "-", "-", "-"
    attention = c.get("head_map") is not None
    selection = [v for v in (c.get("gate", "none"), c.get("weighting", "none")) if v != "none"]
    if c.get("kd", "none") == "deit-hard":
        kd = "deit-hard"
    elif c.get("kd_weight", 0) > 0:
        kd = f"{c['kd_weight']} x KD (T={c.get('kd_temperature', 4.0):g})"
    else:
        kd = "-"
    return (c["loss"] if attention else "-", c["head_map"] if attention else "-",
            " + ".join(selection) or "-", kd)


def results_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, then one row per group (mean +- spread over seeds)."""
    lines = ["| run | loss | map | alpha | gate / weighting | logit KD | seed | epochs | params | top-1 % "
             "| wall time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["config"]
        loss, head_map, selection, kd = _recipe_cells(c)
        lines.append(
            f"| {r['name']} | {loss} | {head_map} | {c['alpha']} | {selection} | {kd} | {c['seed']} | "
            f"{r['epoch']}/{c['epochs']} | {r['parameters'] / 1e6:.2f}M | {r['accuracy']:.2f} | "
            f"{r['wall_time_s'] / 60:.0f} min |")
    return "\n".join(lines + _group_lines(results)) + "\n"


def _group_lines(results: list[dict[str, Any]]) -> list[str]:
    """The group table (mean +- spread over finished seeds), after a blank line; empty without groups."""
    groups = _group_stats(results)
    if not groups:
        return []
    lines = ["", "| group | seeds | mean top-1 % | spread (max - min) |", "|---|---|---|---|"]
    for group, (mean, spread, seeds) in groups.items():
        spread_text = f"{spread:.2f}" if seeds > 1 else "- (one seed)"
        lines.append(f"| {group} | {seeds} | {mean:.2f} | {spread_text} |")
    return lines


def _run_state(summary: dict[str, Any] | None, run_dir: RunDir, epochs: int, now: float) -> str:
    """Where a run stands, from its checkpoint and its progress file (written every few seconds)."""
    if summary is not None and summary["finished"]:
        return f"finished ({epochs}/{epochs})"
    done = summary["epoch"] if summary is not None else 0
    progress = run_dir.read_progress()
    batch, batches, stamp = progress.get("batch"), progress.get("batches"), progress.get("time")
    state = f"{done}/{epochs} epochs done" if done else "not started"
    left = float(epochs - done)
    if (progress.get("epoch") == done and isinstance(batch, int) and isinstance(batches, int)
            and isinstance(stamp, (int, float)) and 0 < batch < batches):
        minutes = max(0.0, now - stamp) / 60
        state = f"{done}/{epochs} epochs done; epoch {done + 1} was at batch {batch}/{batches} {minutes:.0f} min ago"
        left -= batch / batches
    # The recent epochs' pace (the last three, median: one slow epoch under load does not skew it).
    times = [m["epoch_time_s"] for m in run_dir.read_metrics()[-3:] if isinstance(m.get("epoch_time_s"), (int, float))]
    if times:
        pace = statistics.median(times) / 60
        state += f"; about {left * pace:.0f} min left at {pace:.1f} min/epoch"
    return state


def experiment_status(path: str | Path, now: float | None = None) -> str:
    """Markdown: every run of the config in order, how far it got and its last test accuracy.

    Read-only (safe while the study trains): it writes nothing and takes no lock.
    """
    _, runs = load_experiment(path)
    now = time.time() if now is None else now
    lines = ["| run | group | state | top-1 % (last epoch) |", "|---|---|---|---|"]
    results = []
    for name, config, extra in runs:
        summary = _run_summary(name, config, extra)
        state = _run_state(summary, RunDir(config.out_dir), config.epochs, now)
        accuracy = f"{summary['accuracy']:.2f}" if summary is not None else "-"
        lines.append(f"| {name} | {extra.get('group', '-')} | {state} | {accuracy} |")
        if summary is not None:
            results.append(summary)
    return "\n".join(lines + _group_lines(results)) + "\n"


def run_experiment(path: str | Path, only: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    spec, runs = load_experiment(path)
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs_of = {str(RunDir(c.out_dir).last): (n, c.epochs) for n, c, _ in runs}  # teachers named by run
    for name, config, _ in runs:
        if only and name not in only:
            continue
        if config.teacher in epochs_of:
            _check_teacher_finished(config.teacher, *epochs_of[config.teacher], student=name)
        print(f"== {name}", flush=True)
        train(config, resume=True, progress=progress)
        _publish(spec, runs)
    return _publish(spec, runs)


def _group_stats(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """``group -> (mean, spread, seeds)`` over finished runs, in the order groups first appear."""
    accs: dict[str, list[float]] = {}
    for r in runs:
        if r.get("group") and r["finished"]:
            accs.setdefault(r["group"], []).append(r["accuracy"])
    return {g: (statistics.mean(a), max(a) - min(a), len(a)) for g, a in accs.items()}


def pick_distilled(distilled: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The distilled run to bundle, chosen on test accuracies (there is no validation split).

    Among groups with at least two finished seeds, the first in config order is the incumbent;
    a later group replaces it only if its mean is higher by more than the larger of the two
    seed spreads (a gap within the seed noise keeps the incumbent). The chosen group's seed-0
    run is bundled. Without any multi-seed group, the best seed-0 run is bundled.
    """
    if not distilled:
        return None
    champion: tuple[str, float, float] | None = None
    for group, (mean, spread, seeds) in _group_stats(distilled).items():
        if seeds < 2:
            continue
        if champion is None or mean - champion[1] > max(spread, champion[2]):
            champion = (group, mean, spread)
    if champion is not None:
        members = [r for r in distilled if r.get("group") == champion[0]]
        return min(members, key=lambda r: r["config"]["seed"])
    seed0 = [r for r in distilled if r["config"]["seed"] == 0]  # like with like: the bundled baseline's seed
    return max(seed0 or distilled, key=lambda r: r["accuracy"])


def bundle_checkpoints(results: list[dict[str, Any]], bundle_dir: Path, prefix: str) -> list[Path]:
    """Copy the finished teacher, seed-0 baseline student and chosen distilled student (``pick_distilled``)."""
    finished = [r for r in results if r["finished"]]
    supervised = [r for r in finished if r["config"]["teacher"] is None]
    distilled = [r for r in finished if r["config"]["teacher"] is not None]
    picks: dict[str, dict[str, Any]] = {}
    teachers = {r["config"]["teacher"] for r in distilled}
    for r in supervised:
        ckpt = str(RunDir(r["config"]["out_dir"]).last)
        if ckpt in teachers or r["name"] == "teacher":
            picks.setdefault("teacher", r)
        elif r["config"]["seed"] == 0:
            picks.setdefault("student-baseline", r)
    chosen = pick_distilled(distilled)
    if chosen is not None:
        picks["student-distilled"] = chosen
    written = []
    # Every copy is made before any file is replaced (the stack renames on exit), so a failed copy
    # changes nothing. The renames follow one another (three files cannot be swapped by one rename):
    # a kill in those microseconds leaves old and new files side by side until the next publish.
    with contextlib.ExitStack() as renames:
        for role, r in picks.items():
            target = bundle_dir / f"{prefix}-{role}.safetensors"
            shutil.copyfile(RunDir(r["config"]["out_dir"]).last, renames.enter_context(atomic_target(target)))
            written.append(target)
    return written


def _check_teacher_finished(path: str, teacher: str, epochs: int, student: str) -> None:
    """A teacher run's ``last.safetensors`` changes every epoch until it finishes: never distil from it midway."""
    done = read_checkpoint_meta(path).get("epoch") if Path(path).is_file() else 0
    if done != epochs:
        raise ConfigError(f"run {student!r} learns from run {teacher!r}, which has finished {done or 0} of its "
                          f"{epochs} epochs: train {teacher!r} first (--only {teacher})")


def _publish(spec: dict[str, Any], runs: list[tuple[str, TrainConfig, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Write results.json, results.md and the bundle from every run's folder as it is now.

    Lanes finish runs concurrently: under the lock, whoever writes last has read the latest runs,
    so a lane that read earlier cannot overwrite a newer table or bundle with an older one.
    """
    out_dir = Path(spec["out_dir"])
    with exclusive_lock(out_dir / _PUBLISH_LOCK):
        results = [r for r in (_run_summary(n, c, e) for n, c, e in runs) if r is not None]
        write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1))
        write_text_atomic(out_dir / "results.md", results_table(results))
        if "bundle" in spec:
            bundle_checkpoints(results, Path(spec["bundle"]["dir"]), spec["bundle"]["prefix"])
    return results
