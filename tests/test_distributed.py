"""Training under torchrun: two CPU processes with gloo, launched the way a user would.

A small driver (written below) runs ``python -m vitkd`` inside each torchrun worker while
wrapping ``vitkd.train.build_model``, so every rank can save the weights of the model it
trained; comparing the ranks' files shows DDP kept them in step, and comparing them with
``last.safetensors`` shows rank 0 wrote what was trained. Step counts are checked against a
hand count (64 images, batch 8: 8 steps on one process, 4 per rank on two).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitkd.checkpoint import load_checkpoint, read_checkpoint_meta

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, BATCH = 4, 16, 8, 8
TRAIN_IMAGES = NUM_CLASSES * TRAIN_PER_CLASS  # 64: 8 steps of 8 on one process, 4 per rank on two

DRIVER = textwrap.dedent('''
    """torchrun worker: run `python -m vitkd ARGS`; save this rank's trained weights and batch losses to OUT."""
    import json
    import os
    import sys
    import types
    from unittest import mock

    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors.torch import save_file

    import vitkd.train
    from vitkd.cli import main

    out, argv = sys.argv[1], sys.argv[2:]
    rank = os.environ["RANK"]
    built, batch_losses = [], []
    real_build_model = vitkd.train.build_model


    def build_and_keep(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        if next(model.parameters()).device.type != "meta":  # meta builds: shape checks before the data loads
            built.append(model)
        return model


    def cross_entropy_and_record(*args, **kwargs):
        loss = F.cross_entropy(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training batches; evaluation sums
            batch_losses.append(float(loss.detach()))
        return loss


    functional = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    functional.cross_entropy = cross_entropy_and_record
    with mock.patch.object(vitkd.train, "build_model", side_effect=build_and_keep), \
            mock.patch.object(vitkd.train, "F", functional):
        code = main(argv)
    assert len(built) == 1, f"train() built {len(built)} models, expected the one student"
    weights = {k: v.detach().cpu().contiguous() for k, v in built[0].state_dict().items()}
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.losses.json"), "w") as f:
        json.dump(batch_losses, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv: list[str], timeout: float = 180) -> str:
    """Run a command from the repo root; kill its whole process group if it hangs (a stuck rank)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback even where the hostname resolves nowhere
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} hung for {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def torchrun(driver: Path, out: Path, args: list[str]) -> str:
    return run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(driver), str(out), *args])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_ranks_agree_with_checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    """Both ranks hold identical weights, and rank 0's are what ``last.safetensors`` stores."""
    rank0, rank1 = load_file(run_dir / "rank0.safetensors"), load_file(run_dir / "rank1.safetensors")
    assert_same_weights(rank0, rank1)
    model, _ = load_checkpoint(run_dir / "last.safetensors")
    assert_same_weights(rank0, {k: v.detach() for k, v in model.state_dict().items()})
    return rank0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-class 32x32 image folder, the torchrun driver and a teacher trained on one process."""
    base = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    colors = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, color in enumerate(colors):
            folder = base / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(color + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    ws = {"base": base, "driver": driver, "data": base / "images", "cache": base / "cache"}
    teacher_dir = base / "teacher"
    run([sys.executable, "-m", "vitkd", "train", "--model", "cifar-teacher", *common_args(ws, teacher_dir),
         "--epochs", "1"])
    ws["teacher"] = teacher_dir / "last.safetensors"
    return ws


def common_args(ws: dict[str, Path], out: Path) -> list[str]:
    return ["--data", f"imagefolder:{ws['data']}", "--out", str(out), "--cache-dir", str(ws["cache"]),
            "--batch-size", str(BATCH), "--device", "cpu", "--no-progress", "--warmup-epochs", "0"]


def test_single_process_reference_counts_every_batch(workspace: dict[str, Path]) -> None:
    (line,) = metrics(workspace["teacher"].parent)
    assert line["step"] == TRAIN_IMAGES // BATCH == 8
    assert line["n"] == NUM_CLASSES * TEST_PER_CLASS


def test_torchrun_train_shards_data_and_resumes(workspace: dict[str, Path]) -> None:
    run_dir = workspace["base"] / "train-ddp"
    run_dir.mkdir()
    args = ["train", "--model", "cifar-student", *common_args(workspace, run_dir), "--epochs", "2"]

    torchrun(workspace["driver"], run_dir, [*args, "--stop-after", "1"])
    first = metrics(run_dir)
    assert [m["epoch"] for m in first] == [1], "one line per epoch: only rank 0 writes metrics"
    assert first[0]["step"] == TRAIN_IMAGES // BATCH // 2, "each rank takes half the single-process steps"
    assert first[0]["n"] == NUM_CLASSES * TEST_PER_CLASS, "evaluation sums both ranks' shares of the test set"
    after_epoch_1 = assert_ranks_agree_with_checkpoint(run_dir)
    rank_losses = [json.loads((run_dir / f"rank{r}.losses.json").read_text()) for r in (0, 1)]
    assert [len(losses) for losses in rank_losses] == [4, 4]
    assert rank_losses[0] != rank_losses[1], "the ranks saw different shards"
    assert first[0]["train_loss"] == pytest.approx(np.mean(rank_losses[0] + rank_losses[1]), rel=1e-6), \
        "train_loss averages every rank's batches, not rank 0's share"

    torchrun(workspace["driver"], run_dir, [*args, "--resume"])
    lines = metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["step"] for m in lines] == [4, 8]
    assert read_checkpoint_meta(run_dir / "last.safetensors")["epoch"] == 2
    after_epoch_2 = assert_ranks_agree_with_checkpoint(run_dir)
    assert any(not torch.equal(after_epoch_1[k], after_epoch_2[k]) for k in after_epoch_1), "epoch 2 trained nothing"


def test_torchrun_distill_keeps_ranks_identical(workspace: dict[str, Path]) -> None:
    run_dir = workspace["base"] / "distill-ddp"
    run_dir.mkdir()
    torchrun(workspace["driver"], run_dir, [
        "distill", "--model", "cifar-student", "--teacher", str(workspace["teacher"]),
        "--map", "block:5->3[0,2,4,6]", "--alpha", "0.5", *common_args(workspace, run_dir), "--epochs", "1"])
    (line,) = metrics(run_dir)
    assert line["step"] == TRAIN_IMAGES // BATCH // 2
    assert line["train_att"] > 0, "the attention term was part of the loss"
    assert_ranks_agree_with_checkpoint(run_dir)
    meta = read_checkpoint_meta(run_dir / "last.safetensors")
    assert meta["kind"] == "distilled"
    assert meta["head_map"] == [[5, h, 3, i] for i, h in enumerate((0, 2, 4, 6))]
    produced = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("rank"))  # rank*: the driver's
    # No best.safetensors: there is no validation split, and best is never chosen on test.
    assert produced == [".train.lock", "last.safetensors", "last.state.safetensors", "metrics.jsonl",
                        "progress.json"], "stray files: a rank other than 0 wrote to the run directory"


NAN_DRIVER = textwrap.dedent('''
    """torchrun worker: rank 1 alone gets a NaN loss at its second step; record each rank's dropout seeds."""
    import json
    import os
    import sys
    from unittest import mock

    import torch
    import vitkd.train
    from vitkd.cli import main

    out, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    calls, seeds = [0], []
    real_step, real_epoch = vitkd.train._step_terms, vitkd.train._train_epoch


    def step(run, images, labels):
        terms = real_step(run, images, labels)
        calls[0] += 1
        if rank == 1 and calls[0] == int(os.environ.get("NAN_AT_STEP", "0")):
            terms = dict(terms, loss=terms["loss"] * float("nan"))
        return terms


    def epoch(run, position, idx, stop, show):
        result = real_epoch(run, position, idx, stop, show)
        seeds.append(torch.initial_seed())
        return result


    with mock.patch.object(vitkd.train, "_step_terms", step), mock.patch.object(vitkd.train, "_train_epoch", epoch):
        code = main(argv)
    with open(os.path.join(out, f"seeds{rank}.json"), "w") as f:
        json.dump(seeds, f)
    raise SystemExit(code)
''')


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(workspace: dict[str, Path]) -> None:
    run_dir = workspace["base"] / "nan-ddp"
    run_dir.mkdir()
    driver = workspace["base"] / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    args = ["train", "--model", "cifar-student", *common_args(workspace, run_dir), "--epochs", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NAN_AT_STEP="2", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(driver), str(run_dir),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr  # both ranks write to one pipe: their lines may run together
    assert output.count("error: loss became non-finite") == 2, output[-3000:]  # both ranks stop
    assert output.count("error: loss became non-finite at epoch 1 step ") == 2, output[-3000:]  # the same line

    torchrun(driver, run_dir, args)  # no NaN: dropout seeds are per (seed, epoch, rank)
    seeds = [json.loads((run_dir / f"seeds{r}.json").read_text()) for r in (0, 1)]
    assert len(seeds[0]) == len(seeds[1]) == 2
    assert all(a != b for a, b in zip(*seeds, strict=True)), "ranks drew the same dropout masks"
    assert seeds[0][0] != seeds[0][1], "epochs drew the same dropout masks"
