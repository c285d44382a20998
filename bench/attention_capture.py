"""Cost of exact attention capture: ``forward_with_attention`` (every block) vs timm's fused ``model(x)``.

Both run on the same model and batch, in eval mode under ``torch.no_grad()``; repetitions
are interleaved (the order alternates) so background load hits both sides alike, and the
ratio of medians is reported. Goal: <= 1.15x for the seed presets at batch 256 on CPU.

    python bench/attention_capture.py                 # all three cases
    python bench/attention_capture.py --threads 1 --reps 15
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitkd.attention import forward_with_attention  # noqa: E402
from vitkd.models import build_model  # noqa: E402

GOAL = 1.15


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    img_size: int | None
    num_classes: int


CASES = {
    "seed-teacher": Case("seed-teacher", 256, None, 100),
    "seed-student": Case("seed-student", 256, None, 100),
    "vit_tiny_patch16_224": Case("vit_tiny_patch16_224", 8, 224, 1000),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(case: Case, reps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(case.name, case.num_classes, img_size=case.img_size).eval()
    size = case.img_size or model.patch_embed.img_size[0]
    images = torch.randn(case.batch, 3, size, size)
    fused_times, capture_times = [], []
    with torch.no_grad():
        fused = lambda: model(images)
        capture = lambda: forward_with_attention(model, images)
        for _ in range(warmup):
            fused()
            capture()
        for rep in range(reps):
            if rep % 2 == 0:
                fused_times.append(_timed(fused))
                capture_times.append(_timed(capture))
            else:
                capture_times.append(_timed(capture))
                fused_times.append(_timed(fused))
    fused_ms = 1000 * statistics.median(fused_times)
    capture_ms = 1000 * statistics.median(capture_times)
    per_rep = statistics.median(c / f for c, f in zip(capture_times, fused_times, strict=True))
    return {"fused_ms": fused_ms, "capture_ms": capture_ms, "ratio": capture_ms / fused_ms, "ratio_per_rep": per_rep,
            "blocks": len(model.blocks), "tokens": model.patch_embed.num_patches + model.num_prefix_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"command: python {shlex.join(['bench/attention_capture.py', *sys.argv[1:]])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, eval + no_grad, "
          f"{args.reps} interleaved reps, medians\n")
    print("| model | batch | blocks | tokens | fused `model(x)` ms | `forward_with_attention` ms | ratio "
          "| median per-rep ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        case = CASES[name]
        r = measure(case, args.reps, args.warmup)
        flag = "" if not name.startswith("seed") else (" (goal met)" if r["ratio"] <= GOAL else " (goal missed)")
        print(f"| {name} | {case.batch} | {r['blocks']} | {r['tokens']} | {r['fused_ms']:.1f} | "
              f"{r['capture_ms']:.1f} | {r['ratio']:.3f}x{flag} | {r['ratio_per_rep']:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
