"""Training-side costs: a distillation step vs a plain student step, and the data pipeline's images/s.

1. Step time, cifar pair at batch 128 (goal: distill / baseline <= 1.4x). The distill step is
   student capture + teacher no-grad capture + ``distillation_loss`` + backward + AdamW step;
   the baseline is ``model(x)`` + cross-entropy + backward + AdamW step. The teacher's own
   fused forward is timed too, to split the ratio into "a teacher forward" and "vitkd's overhead".
2. Data pipeline (goal: >= 3x): ``iterate_batches`` (tensor augmentation on the uint8 cache from
   ``load_split``) vs torchvision ``ImageFolder`` + ``DataLoader`` with PIL transforms
   (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), on the same images,
   ``num_workers`` 0 and 2. The images are a per-class subset of ../shared/datasets/cifar10/train,
   linked (read-only) into a folder under --work-dir.

Repetitions are interleaved and medians reported; run it on an idle machine for absolute numbers.

    python bench/train_step.py
    python bench/train_step.py --threads 1 --images-per-class 300
"""

from __future__ import annotations

import argparse
import copy
import functools
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from vitkd.attention import capture_attention  # noqa: E402
from vitkd.compiling import CompiledOrEager  # noqa: E402
from vitkd.data import iterate_batches, load_split  # noqa: E402
from vitkd.distill import distillation_loss, gather_heads, per_sample_attention_loss  # noqa: E402
from vitkd.headmap import parse_head_map  # noqa: E402
from vitkd.models import build_model  # noqa: E402

STEP_GOAL = 1.4
PIPELINE_GOAL = 3.0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict[str, callable], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every function ``reps`` times, rotating the order each round; returns seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(fns[name]))
    return times


def bench_steps(batch: int, reps: int, warmup: int, head_map_spec: str, loss: str) -> None:
    torch.manual_seed(0)
    teacher = build_model("cifar-teacher", 10).eval().requires_grad_(False)
    student = build_model("cifar-student", 10).train()
    baseline_student = copy.deepcopy(student)
    compiled_student = copy.deepcopy(student)
    compiled_loss = CompiledOrEager(functools.partial(per_sample_attention_loss, kind=loss), "the attention loss")

    def teacher_outputs(x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        out = capture_attention(teacher, x, head_map.teacher_blocks)
        return out.class_logits, out.attn_logits

    compiled_teacher = CompiledOrEager(teacher_outputs, "the teacher forward")
    head_map = parse_head_map(head_map_spec, len(teacher.blocks), teacher.blocks[0].attn.num_heads,
                              len(student.blocks), student.blocks[0].attn.num_heads)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    distill_opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    baseline_opt = torch.optim.AdamW(baseline_student.parameters(), lr=1e-4)
    compiled_opt = torch.optim.AdamW(compiled_student.parameters(), lr=1e-4)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, teacher_fn, per_sample_fn=None) -> None:
        out = capture_attention(model, images, head_map.student_blocks)
        with torch.no_grad():
            t_logits, t_attn = teacher_fn(images)
        terms = distillation_loss(out.class_logits, labels, gather_heads(out.attn_logits, head_map.pairs, "student"),
                                  gather_heads(t_attn, head_map.pairs, "teacher", kind=loss), loss, 0.5,
                                  teacher_class_logits=t_logits, per_sample_fn=per_sample_fn)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    def distill_step() -> None:
        step(student, distill_opt, teacher_outputs)

    def distill_step_compiled() -> None:
        step(compiled_student, compiled_opt, compiled_teacher, compiled_loss)

    def baseline_step() -> None:
        loss_value = F.cross_entropy(baseline_student(images), labels)
        baseline_opt.zero_grad(set_to_none=True)
        loss_value.backward()
        baseline_opt.step()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(images)

    def teacher_capture() -> None:
        with torch.no_grad():
            capture_attention(teacher, images, head_map.teacher_blocks)

    distill_step_compiled()  # compile once, outside the timing
    times = _interleaved({"distill": distill_step, "distill_compiled": distill_step_compiled,
                          "baseline": baseline_step, "teacher_forward": teacher_forward,
                          "teacher_capture": teacher_capture}, reps, warmup)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ratio = ms["distill"] / ms["baseline"]
    print(f"\n### Step time, cifar-teacher -> cifar-student, batch {batch}, map `{head_map_spec}` "
          f"({len(head_map.pairs)} head pairs), loss {loss}\n")
    print("| step | median ms | / baseline |")
    print("|---|---|---|")
    print(f"| baseline student step (`model(x)` + CE + backward + AdamW) | {ms['baseline']:.1f} | 1.000x |")
    print(f"| distill step (both captures + loss + backward + AdamW) | {ms['distill']:.1f} | {ratio:.3f}x "
          f"({'goal met' if ratio <= STEP_GOAL else 'goal missed'}: <= {STEP_GOAL}x) |")
    ratio_c = ms["distill_compiled"] / ms["baseline"]
    print(f"| distill step with `--compile` (teacher forward and attention loss compiled) | "
          f"{ms['distill_compiled']:.1f} | {ratio_c:.3f}x "
          f"({'goal met' if ratio_c <= STEP_GOAL else 'goal missed'}: <= {STEP_GOAL}x) |")
    print(f"| teacher fused forward alone (no grad) | {ms['teacher_forward']:.1f} | "
          f"{ms['teacher_forward'] / ms['baseline']:.3f}x |")
    print(f"| teacher capture alone (no grad) | {ms['teacher_capture']:.1f} | "
          f"{ms['teacher_capture'] / ms['baseline']:.3f}x |")
    student_side = (ms["distill"] - ms["teacher_capture"]) / ms["baseline"]
    print(f"| distill step minus teacher capture | {ms['distill'] - ms['teacher_capture']:.1f} | "
          f"{student_side:.3f}x |")


def _subset_folder(source: Path, dest: Path, per_class: int) -> Path:
    """Symlink the first ``per_class`` files of each class of ``source/train`` into ``dest/train``."""
    for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
        out = dest / "train" / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(class_dir.iterdir())[:per_class]:
            link = out / file.name
            if not link.exists():
                link.symlink_to(file.resolve())
    return dest


def bench_pipeline(source: Path, work_dir: Path, per_class: int, batch: int, reps: int) -> None:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    folder = _subset_folder(source, work_dir / f"cifar10_{per_class}", per_class)
    start = time.perf_counter()
    data = load_split(f"imagefolder:{folder}", "train", 32, cache_dir=work_dir / "cache", progress=False)
    first_load = time.perf_counter() - start
    start = time.perf_counter()
    data = load_split(f"imagefolder:{folder}", "train", 32, cache_dir=work_dir / "cache", progress=False)
    cached_load = time.perf_counter() - start
    n = len(data)

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])
    image_folder = datasets.ImageFolder(str(folder / "train"), transform=tf)
    assert len(image_folder) == n
    loaders = {w: DataLoader(image_folder, batch_size=batch, shuffle=True, num_workers=w, drop_last=True,
                             persistent_workers=w > 0) for w in (0, 2)}
    epoch_counter = iter(range(10**9))

    def vitkd_epoch() -> None:
        for _images, _labels in iterate_batches(data, batch, train=True, seed=0, epoch=next(epoch_counter),
                                                augment="basic"):
            pass

    def loader_epoch(workers: int):
        def run() -> None:
            for _images, _labels in loaders[workers]:
                pass
        return run

    per_epoch = (n // batch) * batch
    times = _interleaved({"vitkd": vitkd_epoch, "tv0": loader_epoch(0), "tv2": loader_epoch(2)}, reps, warmup=1)
    rate = {k: per_epoch / statistics.median(v) for k, v in times.items()}
    print(f"\n### Data pipeline, {n} CIFAR-10 train images (32x32), batch {batch}, basic augmentation\n")
    print("| pipeline | images/s (median of epochs) | vitkd speed-up |")
    print("|---|---|---|")
    print(f"| vitkd `iterate_batches` on the uint8 cache | {rate['vitkd']:,.0f} | |")
    for w in (0, 2):
        speedup = rate["vitkd"] / rate[f"tv{w}"]
        print(f"| torchvision ImageFolder + DataLoader, num_workers={w} | {rate[f'tv{w}']:,.0f} | {speedup:.1f}x "
              f"({'goal met' if speedup >= PIPELINE_GOAL else 'goal missed'}: >= {PIPELINE_GOAL}x) |")
    print(f"\nOne-time decode into the cache: {first_load:.1f} s ({n / first_load:,.0f} images/s); "
          f"loading the cached split: {cached_load * 1000:.0f} ms.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--step-reps", type=int, default=9)
    parser.add_argument("--map", default="encoder", help="head map for the distill step")
    parser.add_argument("--loss", default="kl", choices=["mse", "ce", "kl"])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10",
                        help="image folder with train/<class>/ (read-only; only linked)")
    parser.add_argument("--images-per-class", type=int, default=400)
    parser.add_argument("--pipeline-reps", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vitkd_bench"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip", choices=["steps", "pipeline"], default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: python {shlex.join(['bench/train_step.py', *sys.argv[1:]])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    if args.skip != "steps":
        bench_steps(args.batch, args.step_reps, 1, args.map, args.loss)
    if args.skip != "pipeline":
        if not (args.data / "train").is_dir():
            print(f"\n(no {args.data}/train: pipeline benchmark skipped)")
        else:
            bench_pipeline(args.data, args.work_dir, args.images_per_class, args.batch, args.pipeline_reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
