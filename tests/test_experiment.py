"""The experiment runner: runs in order, skips finished runs, writes a table from results.json, bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vitkd.checkpoint import load_checkpoint, read_checkpoint_meta
from vitkd.errors import ConfigError
from vitkd.experiment import bundle_checkpoints, experiment_status, load_experiment, results_table, run_experiment
from vitkd.rundir import RunDir
from vitkd.train import train


def _write_config(tmp_path: Path, image_folder: Path) -> Path:
    spec = {
        "out_dir": str(tmp_path / "runs"),
        "data": f"imagefolder:{image_folder}",
        "bundle": {"dir": str(tmp_path / "bundle"), "prefix": "toy"},
        "defaults": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "device": "cpu", "eval_batch_size": 64},
        "runs": [
            {"name": "teacher", "model": "cifar-teacher", "model_overrides": {"depth": 2, "embed_dim": 64}},
            {"name": "baseline", "group": "baseline", "model": "cifar-student", "model_overrides": {"depth": 2}},
            {"name": "distilled", "group": "kl", "model": "cifar-student", "model_overrides": {"depth": 2},
             "teacher": "teacher", "head_map": "block:1->1", "loss": "kl", "alpha": 0.5},
        ],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.timeout(120)
def test_experiment_runs_skips_and_bundles(tmp_path: Path, image_folder: Path) -> None:
    config = _write_config(tmp_path, image_folder)
    results = run_experiment(config, progress=False)
    assert [r["name"] for r in results] == ["teacher", "baseline", "distilled"]
    for r in results:
        meta = read_checkpoint_meta(Path(r["config"]["out_dir"]) / "last.safetensors")
        assert r["accuracy"] == meta["metrics"]["accuracy"]
        assert r["finished"] and r["epoch"] == 1
    distilled = results[2]
    assert distilled["config"]["teacher"] == str(tmp_path / "runs" / "teacher" / "last.safetensors")
    assert distilled["head_map"] == [[1, [2 * h, 2 * h + 1], 1, h] for h in range(4)]  # 8 -> 4 heads: even groups

    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert saved == results
    table = (tmp_path / "runs" / "results.md").read_text()
    assert table == results_table(saved)  # the table regenerates from the JSON alone
    assert "| distilled | kl | block:1->1 | 0.5 |" in table

    # The bundle holds the teacher, the seed-0 baseline and the best distilled student, bit for bit.
    for role, run in (("teacher", "teacher"), ("student-baseline", "baseline"), ("student-distilled", "distilled")):
        bundled = tmp_path / "bundle" / f"toy-{role}.safetensors"
        assert bundled.read_bytes() == (tmp_path / "runs" / run / "last.safetensors").read_bytes()
    load_checkpoint(tmp_path / "bundle" / "toy-student-distilled.safetensors")

    # Rerunning skips finished runs: no checkpoint is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/last.safetensors")}
    run_experiment(config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    status = experiment_status(config)
    for r in results:
        assert f"| {r['name']} | {r.get('group', '-')} | finished (1/1) | {r['accuracy']:.2f} |" in status


def test_status_says_how_far_each_run_got_and_writes_nothing(tmp_path: Path, image_folder: Path) -> None:
    config = _write_config(tmp_path, image_folder)
    runs = tmp_path / "runs"
    (runs / "teacher").mkdir(parents=True)  # mid-way through epoch 1, last written 3 minutes before `now`
    (runs / "teacher" / "progress.json").write_text(json.dumps(
        {"epoch": 0, "epochs": 1, "batch": 5, "batches": 12, "loss": 2.0, "time": 1000.0}))
    (runs / "teacher" / "metrics.jsonl").write_text("".join(  # no checkpoint yet, but a pace to go by
        json.dumps({"epoch": e, "epoch_time_s": t}) + "\n" for e, t in ((1, 999.0), (2, 60.0), (3, 240.0), (4, 120.0))))
    (runs / "baseline").mkdir()
    (runs / "baseline" / "progress.json").write_text("{not json")  # a torn file reads as no progress
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    status = experiment_status(config, now=1000.0 + 180)
    assert status.splitlines()[2:] == [
        # 7/12 of the one epoch left at the median of the last three paces (2 min): 1.17 min, shown rounded.
        "| teacher | - | 0/1 epochs done; epoch 1 was at batch 5/12 3 min ago; about 1 min left at 2.0 min/epoch | - |",
        "| baseline | baseline | not started | - |",
        "| distilled | kl | not started | - |",
    ]
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_experiment_rejects_unknown_teacher_and_keys(tmp_path: Path, image_folder: Path) -> None:
    path = _write_config(tmp_path, image_folder)
    spec = yaml.safe_load(path.read_text())
    spec["runs"][2]["teacher"] = "nope"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="nope"):
        load_experiment(path)
    spec["runs"][2]["teacher"] = "teacher"
    spec["runs"][1]["learning_rate"] = 0.1
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_experiment(path)
    del spec["runs"][1]["learning_rate"]
    spec["runs"].append(dict(spec["runs"][1]))  # a second run writing into the first one's folder
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=f"run name '{spec['runs'][1]['name']}' appears twice"):
        load_experiment(path)


@pytest.mark.parametrize("change, match", [
    ({"runs": ["teacher"]}, "'runs' must be a list of mappings"),
    ({"runs": {"name": "teacher"}}, "'runs' must be a list of mappings"),
    ({"defaults": ["epochs", 3]}, "'defaults' a mapping"),
    ({"out_dir": 3}, "'out_dir' must be a folder path"),
    ({"runs": [{"model": "cifar-student"}]}, "run name None must be"),
    ({"runs": [{"name": "../escape", "model": "cifar-student"}]}, "run name '../escape' must be"),
    ({"runs": [{"name": "a", "model": "cifar-student", "epochs": "30"}]}, "epochs is '30', not an integer"),
    ({"runs": [{"name": "a", "model": "cifar-student", "lr": "1e-3"}]}, "lr is '1e-3', not a number .*1.0e-3"),
    ({"runs": [{"name": "a", "model": "cifar-student", "bf16": "yes please"}]}, "bf16 .* not true or false"),
    ({"runs": [{"name": "a", "model": "cifar-student", "epochs": True}]}, "epochs is True, not an integer"),
    ({"runs": [{"name": "a", "model": "cifar-student", "model_overrides": "depth=2"}]},
     "model_overrides is 'depth=2', not a mapping"),
    ({"runs": [{"name": "a", "model": "cifar-student", "group": ["g"]}]}, "group is \\['g'\\], not a string"),
    ({"runs": [{"name": "a", "model": "cifar-student", "teacher": ["t"]}]}, "teacher is \\['t'\\], not a string"),
])
def test_malformed_experiment_configs_are_one_line_errors(tmp_path: Path, change: dict, match: str) -> None:
    """Each of these raised TypeError, KeyError, ValueError or AttributeError deep inside before."""
    spec = dict({"out_dir": str(tmp_path / "runs"), "data": "imagefolder:/d", "runs": [{"name": "a", "model": "m"}]},
                **change)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_a_student_never_learns_from_an_unfinished_teacher_run(tmp_path: Path, image_folder: Path) -> None:
    """``--only student`` while the teacher's lane is midway would distil from whatever epoch it reached."""
    config = _write_config(tmp_path, image_folder)
    spec = yaml.safe_load(config.read_text())
    spec["defaults"]["epochs"] = 2
    config.write_text(yaml.safe_dump(spec))
    _, runs = load_experiment(config)
    teacher = next(c for n, c, _ in runs if n == "teacher")
    with pytest.raises(ConfigError, match="learns from run 'teacher', which has finished 0 of its 2 epochs"):
        run_experiment(config, only=["distilled"], progress=False)
    train(teacher, stop_after_epochs=1, progress=False)
    with pytest.raises(ConfigError, match="which has finished 1 of its 2 epochs: train 'teacher' first"):
        run_experiment(config, only=["distilled"], progress=False)
    assert not RunDir(tmp_path / "runs" / "distilled").last.exists()


def test_group_means_in_table() -> None:
    base = {"teacher": None, "loss": "kl", "head_map": None, "alpha": 1.0, "gate": "none", "epochs": 2}
    rows = [{"name": f"b{s}", "group": "baseline", "config": dict(base, seed=s), "epoch": 2, "finished": True,
             "accuracy": acc, "parameters": 1000, "wall_time_s": 60.0} for s, acc in ((0, 50.0), (1, 53.0))]
    table = results_table(rows)
    assert "| baseline | 2 | 51.50 | 3.00 |" in table
    one_seed = results_table(rows[:1] + [dict(rows[1], finished=False, epoch=1)])
    assert "| baseline | 1 | 50.00 | - (one seed) |" in one_seed  # no spread from a single run


def test_bundle_picks_the_best_distilled_run_of_the_baselines_seed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def row(name: str, seed: int, acc: float, teacher: str | None) -> dict:  # no groups: best seed-0 run
        out = runs / name
        out.mkdir(parents=True)
        (out / "last.safetensors").write_text(name)  # the bundle copies bytes; contents name the run
        return {"name": name, "finished": True, "accuracy": acc,
                "config": {"out_dir": str(out), "seed": seed, "teacher": teacher}}

    teacher = str(runs / "teacher" / "last.safetensors")
    rows = [row("teacher", 0, 80.0, None), row("baseline", 0, 70.0, None), row("baseline-seed1", 1, 71.0, None),
            row("kl", 0, 73.0, teacher), row("mse", 0, 72.0, teacher), row("kl-seed1", 1, 74.0, teacher)]
    bundle_checkpoints(rows, tmp_path / "bundle", "x")
    picked = {p.stem: p.read_text() for p in (tmp_path / "bundle").iterdir()}
    assert picked == {"x-teacher": "teacher", "x-student-baseline": "baseline", "x-student-distilled": "kl"}


def test_bundle_finds_the_teacher_by_the_checkpoint_its_students_learned_from(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def row(name: str, acc: float, teacher: str | None) -> dict:
        run = RunDir(runs / name)
        run.path.mkdir(parents=True)
        run.last.write_text(name)  # the bundle copies the run's last checkpoint; contents name the run
        return {"name": name, "finished": True, "accuracy": acc,
                "config": {"out_dir": str(run.path), "seed": 0, "teacher": teacher}}

    # "big" is not named teacher: only the distilled run's teacher path says what it is.
    rows = [row("baseline", 70.0, None), row("big", 80.0, None), row("kl", 73.0, str(RunDir(runs / "big").last))]
    bundle_checkpoints(rows, tmp_path / "bundle", "x")
    picked = {p.stem: p.read_text() for p in (tmp_path / "bundle").iterdir()}
    assert picked == {"x-teacher": "big", "x-student-baseline": "baseline", "x-student-distilled": "kl"}


def test_a_bundle_that_fails_midway_leaves_the_old_one_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher and student are a pair: a copy that fails after the first leaves all three old files."""
    import shutil

    from vitkd import experiment

    runs, bundle = tmp_path / "runs", tmp_path / "bundle"

    def row(name: str, teacher: str | None) -> dict:
        run = RunDir(runs / name)
        run.path.mkdir(parents=True)
        run.last.write_text(f"new {name}")
        return {"name": name, "finished": True, "accuracy": 70.0,
                "config": {"out_dir": str(run.path), "seed": 0, "teacher": teacher}}

    rows = [row("teacher", None), row("baseline", None), row("kl", str(RunDir(runs / "teacher").last))]
    bundle.mkdir()
    old = {f"x-{role}.safetensors": f"old {role}" for role in ("teacher", "student-baseline", "student-distilled")}
    for name, text in old.items():
        (bundle / name).write_text(text)
    copies, copyfile = [], shutil.copyfile

    def copy_then_fail(src: Path, dst: Path) -> None:
        copies.append(src)
        if len(copies) == 2:
            raise OSError(28, "No space left on device")
        copyfile(src, dst)

    monkeypatch.setattr(experiment.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        bundle_checkpoints(rows, bundle, "x")
    assert {p.name: p.read_text() for p in bundle.iterdir()} == old  # and no temp file left
    monkeypatch.undo()
    bundle_checkpoints(rows, bundle, "x")
    assert {p.name: p.read_text() for p in bundle.iterdir()} == {
        "x-teacher.safetensors": "new teacher", "x-student-baseline.safetensors": "new baseline",
        "x-student-distilled.safetensors": "new kl"}


def test_lanes_publish_results_one_at_a_time(tmp_path: Path) -> None:
    """A lane that finished a run waits while another writes results and the bundle (it would otherwise
    overwrite a newer table with the one it read earlier)."""
    import threading

    from vitkd.experiment import _PUBLISH_LOCK, _publish
    from vitkd.files import exclusive_lock

    out = tmp_path / "runs"
    publisher = threading.Thread(target=_publish, args=({"out_dir": str(out)}, []))
    with exclusive_lock(out / _PUBLISH_LOCK):  # another lane publishing
        publisher.start()
        publisher.join(timeout=1.0)
        assert publisher.is_alive() and not (out / "results.json").exists()
    publisher.join(timeout=30)
    assert json.loads((out / "results.json").read_text()) == []


def test_bundle_replaces_the_variant_only_beyond_the_seed_spread(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def row(name: str, group: str, seed: int, acc: float) -> dict:
        out = runs / name
        out.mkdir(parents=True)
        (out / "last.safetensors").write_text(name)
        return {"name": name, "group": group, "finished": True, "accuracy": acc,
                "config": {"out_dir": str(out), "seed": seed, "teacher": "t"}}

    incumbent = [row("a", "a", 0, 74.2), row("a1", "a", 1, 73.8)]  # mean 74.0, spread 0.4
    within = [row("b", "b", 0, 74.3), row("b1", "b", 1, 74.5)]  # mean 74.4: +0.4, not above 0.4
    beyond = [row("c", "c", 0, 75.1), row("c1", "c", 1, 74.9)]  # mean 75.0: +1.0 > 0.4
    one_seed = [row("d", "d", 0, 90.0)]  # a single seed never replaces a two-seed variant

    def picked(rows: list[dict]) -> str:
        (tmp_path / "bundle").mkdir(exist_ok=True)
        bundle_checkpoints(rows, tmp_path / "bundle", "x")
        return (tmp_path / "bundle" / "x-student-distilled.safetensors").read_text()

    assert picked(incumbent + within + one_seed) == "a"
    assert picked(incumbent + beyond) == "c"
    assert picked(incumbent + [dict(beyond[0]), dict(beyond[1], finished=False)]) == "a"


def test_table_names_each_recipe() -> None:
    base = {"teacher": "t", "loss": "kl", "head_map": "head:4.0->2.0", "alpha": 0.5, "gate": "none",
            "weighting": "none", "kd": "none", "kd_weight": 0.0, "kd_temperature": 4.0, "epochs": 2, "seed": 0}
    configs = {"kd": dict(base, head_map=None, alpha=1.0, kd_weight=1.0),
               "both": dict(base, kd_weight=0.5, gate="student-correct", weighting="student-confidence"),
               "deit": dict(base, head_map=None, alpha=1.0, kd="deit-hard")}
    rows = [{"name": n, "config": c, "epoch": 2, "finished": True, "accuracy": 50.0, "parameters": 1000,
             "wall_time_s": 60.0} for n, c in configs.items()]
    table = results_table(rows)
    assert "| kd | - | - | 1.0 | - | 1.0 x KD (T=4) | 0 |" in table
    assert "| both | kl | head:4.0->2.0 | 0.5 | student-correct + student-confidence | 0.5 x KD (T=4) | 0 |" in table
    assert "| deit | - | - | 1.0 | - | deit-hard | 0 |" in table


def test_every_shipped_config_loads_and_its_head_maps_fit_its_models() -> None:
    """configs/*.yaml: each loads, and each distilled run's map fits its teacher and student (built on the meta
    device, as training checks before any data), so a study never fails hours in on a typo."""
    import torch

    from vitkd.models import build_model
    from vitkd.train import _resolve_head_map

    root = Path(__file__).resolve().parents[1]
    runs = {}
    for path in sorted((root / "configs").glob("*.yaml")):
        for name, config, _ in load_experiment(path)[1]:
            runs[str(RunDir(config.out_dir).last)] = (f"{path.name}:{name}", config)
    assert len(runs) >= 20 and {p.split(":")[0] for p, _ in runs.values()} >= {
        "cifar10.yaml", "cifar10_grid.yaml", "cifar10_sl.yaml", "imagenette.yaml"}
    checked = 0
    for label, config in runs.values():
        with torch.device("meta"):
            student = build_model(config.model, 10, img_size=config.img_size, **config.model_overrides)
            if config.teacher is None:
                continue
            assert config.teacher in runs, f"{label}: teacher {config.teacher} is no shipped run"
            teacher_config = runs[config.teacher][1]
            teacher = build_model(teacher_config.model, 10, img_size=teacher_config.img_size,
                                  **teacher_config.model_overrides)
        if config.head_map is not None:
            _resolve_head_map(config, teacher, student)
            checked += 1
    assert checked >= 12
