"""Cost of the misclassification scan: ``scan_checkpoints`` (both models, every block captured, rollout
divergence) vs ``evaluate_checkpoint`` of the teacher plus ``evaluate_checkpoint`` of the student.

Both sides are what the CLI runs (``python -m vitkd scan`` and two ``python -m vitkd eval``), in one
process, with the same thread count, on a warm decoded-image cache (one untimed round first),
checkpoint loading and split loading included on both sides. Repetitions are interleaved (the order
alternates) and medians reported, of wall-clock time and of this process's CPU time: on a machine shared
with other jobs the CPU-time ratio is the steadier one (it leaves out the time spent waiting for a
core, not the cache and memory contention). Goal: scan <= 1.2x eval + eval over the 10,000 CIFAR-10 test images
with the bundled pair.

    python bench/scan_speed.py --threads 1          # from the repository root
    python bench/scan_speed.py --threads 1 --block-elements 262144 1048576 4194304   # chunk-size sweep
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import vitkd.scan  # noqa: E402
from vitkd.evaluation import evaluate_checkpoint  # noqa: E402
from vitkd.scan import scan_checkpoints  # noqa: E402

GOAL = 1.2


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU (this process, all threads) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(ROOT / "checkpoints" / "cifar10-teacher.safetensors"))
    parser.add_argument("--student", default=str(ROOT / "checkpoints" / "cifar10-student-distilled.safetensors"))
    parser.add_argument("--data", default="imagefolder:../shared/datasets/cifar10",
                        help="as the README's eval commands write it (the cache is keyed by it)")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache (default: vitkd's)")
    parser.add_argument("--block-elements", type=int, nargs="*", default=None,
                        help="scan chunk budgets to compare (attention elements per captured block; "
                             f"default: the scan's own, {vitkd.scan._BLOCK_ATTENTION_ELEMENTS})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = args.block_elements or [vitkd.scan._BLOCK_ATTENTION_ELEMENTS]

    def run_eval() -> dict:
        return {role: evaluate_checkpoint(path, data=args.data, split=args.split, device="cpu",
                                          cache_dir=args.cache_dir)
                for role, path in (("teacher", args.teacher), ("student", args.student))}

    def run_scan(budget: int):
        def scan():
            vitkd.scan._BLOCK_ATTENTION_ELEMENTS = budget
            return scan_checkpoints(args.teacher, args.student, args.data, split=args.split, device="cpu",
                                    cache_dir=args.cache_dir)
        return scan

    print(f"command: python {shlex.join(['bench/scan_speed.py', *sys.argv[1:]])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, {args.reps} interleaved "
          "reps, medians\n")
    evals = run_eval()  # warm-up: builds the cache on a first run, and checks both sides agree
    scanned = run_scan(budgets[0])()
    assert evals["teacher"]["n"] == evals["student"]["n"] == len(scanned.rows)
    sides = [("eval(teacher) + eval(student)", run_eval)] + [(f"scan, {b} elements per block", run_scan(b))
                                                            for b in budgets]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in sides}
    for rep in range(args.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for name, fn in order:
            times[name].append(_timed(fn))
            wall, cpu = times[name][-1]
            print(f"  rep {rep}: {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr, flush=True)
    vitkd.scan._BLOCK_ATTENTION_ELEMENTS = budgets[0]

    base_name = sides[0][0]
    print(f"{len(scanned.rows)} {args.split} images; scan: teacher {scanned.teacher_accuracy:.2f}%, student "
          f"{scanned.student_accuracy:.2f}%; eval: teacher {evals['teacher']['accuracy']:.2f}%, student "
          f"{evals['student']['accuracy']:.2f}%\n")
    print("| side | wall s | / eval + eval | CPU s | / eval + eval | median per-rep ratio (wall, CPU) |")
    print("|---|---|---|---|---|---|")
    for name, _ in sides:
        cells = []
        for k in (0, 1):
            median = statistics.median(t[k] for t in times[name])
            ratio = median / statistics.median(t[k] for t in times[base_name])
            flag = "" if name == base_name else (" (goal met)" if ratio <= GOAL else " (goal missed)")
            cells += [f"{median:.2f}", f"{ratio:.3f}x{flag}"]
        pairs = list(zip(times[name], times[base_name], strict=True))
        per_rep = ", ".join(f"{statistics.median(s[k] / e[k] for s, e in pairs):.3f}x" for k in (0, 1))
        print(f"| {name} | {' | '.join(cells)} | {per_rep if name != base_name else ''} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
