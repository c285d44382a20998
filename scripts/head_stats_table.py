"""Per-block head summaries of checkpoints over a test split, as a Markdown table (README numbers).

    python scripts/head_stats_table.py runs/cifar10/teacher/last.safetensors \\
        runs/cifar10-sl/teacher-sl/last.safetensors --data imagefolder:../shared/datasets/cifar10 --limit 1000

For each checkpoint and block: the mean attention distance in input pixels (mean over heads, and
the nearest- and farthest-looking head), the attention a patch gives itself and the CLS token, and
the entropy, each averaged over ``--limit`` evenly spaced test images (``vitkd.head_stats``, the
numbers the explorer's Agreement tab shows for one image).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitkd.attention import TokenLayout, capture_attention, token_layout  # noqa: E402
from vitkd.checkpoint import load_checkpoint  # noqa: E402
from vitkd.data import evenly_spaced, load_split, normalize  # noqa: E402
from vitkd.head_stats import head_stats, uniform_stats  # noqa: E402
from vitkd.pairs import model_img_size, norm_stats  # noqa: E402


def block_stats(path: str, data: str, limit: int, batch_size: int) -> tuple[dict[str, np.ndarray], str]:
    """``{field: [blocks, heads]}`` averaged over ``limit`` evenly spaced images of the test split, and the
    model's uniform-attention reference line."""
    model, meta = load_checkpoint(path)
    size = model_img_size(model, meta)
    split = load_split(data, "test", size, progress=False)
    picks = np.asarray(evenly_spaced(len(split), limit))
    mean, std = norm_stats(meta)
    layout = token_layout(model)
    sums: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(picks), batch_size):
            images = normalize(split.images[torch.from_numpy(picks[start:start + batch_size])], mean, std)
            out = capture_attention(model, images)
            probs = torch.stack([out.attn_probs[b] for b in sorted(out.attn_probs)], 1).double().numpy()
            stats = head_stats(probs, layout, (size, size))  # each field [B, L, H]
            for name, value in stats._asdict().items():
                sums[name] = sums.get(name, 0) + value.sum(0)
    return {name: total / len(picks) for name, total in sums.items()}, uniform_reference(layout, size)


def uniform_reference(layout: TokenLayout, size: int) -> str:
    """What attention spread evenly over every token would score on the same model (the flat baseline)."""
    stats = uniform_stats(layout, (size, size))
    return (f"(uniform attention over all {layout.num_tokens} tokens: {float(stats.distance_px):.1f} px, "
            f"{float(stats.self_share):.1%} to itself, {float(stats.prefix_share):.1%} to CLS, "
            f"{float(stats.entropy_bits):.2f} bits)")


def table(name: str, stats: dict[str, np.ndarray], reference: str) -> str:
    lines = [f"**{name}** {reference}", "",
             "| block | distance px (mean; nearest-farthest head) | to itself | to CLS | entropy bits |",
             "|---|---|---|---|---|"]
    for b, dist in enumerate(stats["distance_px"]):
        lines.append(f"| {b} | {dist.mean():.1f} ({dist.min():.1f}-{dist.max():.1f}) | "
                     f"{stats['self_share'][b].mean():.1%} | {stats['prefix_share'][b].mean():.1%} | "
                     f"{stats['entropy_bits'][b].mean():.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, help="e.g. imagefolder:../shared/datasets/cifar10")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.checkpoints:
        print(table(path, *block_stats(path, args.data, args.limit, args.batch_size)) + "\n")


if __name__ == "__main__":
    main()
