"""Latency of the Explore page's analysis of one image: is the explorer interactive (goal < 150 ms)?

Times what the page computes for a new image with the CIFAR-10 pair: both models' predictions,
every block's attention, both attention rollouts (``analyze_pair``) and the per-head overlays of
one teacher and one student block (``compare_heads``); the on-demand class-specific gradient
rollouts of both models are timed separately. Uses ``checkpoints/cifar10-teacher.safetensors`` and
``checkpoints/cifar10-student-distilled.safetensors`` when present, else the ``cifar-teacher`` /
``cifar-student`` presets with random weights (same shapes, same cost).

    python bench/app_latency.py [--runs 30] [--threads 1,2] [--device cpu] [--pair cifar10|imagenette]

The app analyses with one intra-op thread by default (``VITKD_TORCH_THREADS``); the bench
reports that and torch's default thread count, since on a busy machine they differ a lot.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from vitkd.analysis import analyze_pair, class_rollout  # noqa: E402
from vitkd.images import load_image  # noqa: E402
from vitkd.maps import compare_heads  # noqa: E402
from vitkd.models import build_model  # noqa: E402
from vitkd.pairs import ModelPair, check_pair, load_pair  # noqa: E402

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def bundled_pair(prefix: str, device: str) -> tuple[ModelPair, str] | None:
    teacher = REPO_ROOT / "checkpoints" / f"{prefix}-teacher.safetensors"
    student = REPO_ROOT / "checkpoints" / f"{prefix}-student-distilled.safetensors"
    if teacher.is_file() and student.is_file():
        return load_pair(teacher, student, device), f"bundled checkpoints {teacher.name}, {student.name}"
    return None


def cifar_pair(device: str) -> tuple[ModelPair, str]:
    bundled = bundled_pair("cifar10", device)
    if bundled is not None:
        return bundled
    torch.manual_seed(0)
    meta = dict(class_names=CIFAR, mean=[0.4912, 0.4821, 0.4465], std=[0.2452, 0.2428, 0.2606], img_size=32)
    t = build_model("cifar-teacher", 10).to(device).eval()
    s = build_model("cifar-student", 10).to(device).eval()
    head_map = [[4, h, 2, h] for h in range(4)] + [[5, h, 3, h] for h in range(4)]
    return check_pair(t, meta, s, dict(meta, head_map=head_map)), "random-weight presets"


def timed(fn, runs: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="comma-separated torch intra-op thread counts to time (default: 1 and torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pair", default="cifar10", choices=["cifar10", "imagenette"],
                        help="which bundled pair (imagenette needs its bundled checkpoints)")
    args = parser.parse_args()
    if args.pair == "imagenette":
        found = bundled_pair("imagenette", args.device)
        if found is None:
            raise SystemExit("checkpoints/imagenette-teacher and -student-distilled are not bundled yet")
        pair, source = found
        image = load_image(REPO_ROOT / "app" / "examples" / "church_0001.jpg")
    else:
        pair, source = cifar_pair(args.device)
        image = load_image(REPO_ROOT / "app" / "examples" / "cat_0001.jpg")

    def page_analysis() -> None:
        analysis = analyze_pair(pair, image, true_label=3)
        compare_heads(analysis, len(pair.teacher.blocks) - 1, len(pair.student.blocks) - 1, alpha=0.55,
                      scale="model", size=150)

    analysis = analyze_pair(pair, image, true_label=3)

    def class_rollouts() -> None:
        for model, result in ((pair.teacher, analysis.teacher), (pair.student, analysis.student)):
            class_rollout(model, result.inputs, result.predicted)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"models: {source}; device {args.device}; torch {torch.__version__}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {platform.machine()}")
    medians = {}
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        torch.set_num_threads(threads)
        core = timed(page_analysis, args.runs)
        grad = timed(class_rollouts, args.runs)
        medians[threads] = statistics.median(core)
        for name, times in (("predictions + all blocks' maps + both rollouts + one block's overlays", core),
                            ("class-specific gradient rollout, both models (on demand)", grad)):
            print(f"[{threads} thread(s)] {name}: median {statistics.median(times):.1f} ms, "
                  f"min {min(times):.1f} ms, max {max(times):.1f} ms over {len(times)} runs")
    core_median = medians.get(1, min(medians.values()))
    print(f"goal < 150 ms (app setting, 1 thread): {'met' if core_median < 150 else 'NOT met'} "
          f"({core_median:.1f} ms)")


if __name__ == "__main__":
    main()
