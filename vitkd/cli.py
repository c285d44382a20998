"""``python -m vitkd``: parse arguments into configs and call the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .distill import GATES, WEIGHTINGS
from .errors import VitkdError
from .jobs import WAIT_FOR_GO_FLAG

__all__ = ["main", "build_parser"]


def _add_run_args(p: argparse.ArgumentParser, distill: bool) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="preset (see `python -m vitkd presets`) or a timm ViT: timm:NAME (or bare NAME)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE", dest="model_overrides",
                   help="architecture argument, repeatable (e.g. patch_size=8, depth=2); VALUE is JSON when it parses "
                        "(8, 0.1, true), else a string")
    g.add_argument("--pretrained", action="store_true", help="start a timm model from timm's weights (downloads)")
    g.add_argument("--pretrained-file", default=None, metavar="PATH",
                   help="start a timm model from a local timm weights file (.safetensors, or .pth/.bin read with "
                        "weights_only); the classifier is re-initialised when its class count differs")
    g.add_argument("--data", required=True, help="cifar10, cifar100 or imagefolder:PATH")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--cache-dir", default=None, help="where decoded datasets are cached (default ~/.cache/vitkd)")
    g.add_argument("--download", action="store_true", help="let torchvision download cifar10/100 (needs network)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup epochs (default 2, or a tenth of --epochs when that is smaller)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--augment", default="basic", choices=["none", "basic", "strong"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this share of train (same images for every seed) to choose best.safetensors; "
                        "0 (default): train on all of it and write no best checkpoint")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the teacher forward and the attention loss (several times faster on CPU; "
                        "the first step compiles)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N epochs of this call")
    g.add_argument("--no-progress", action="store_true")
    # Jobs started by the app: train only once the parent has recorded the job (see vitkd.jobs).
    g.add_argument(WAIT_FOR_GO_FLAG, action="store_true", help=argparse.SUPPRESS)
    if distill:
        g = p.add_argument_group("distillation")
        g.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors)")
        g.add_argument("--map", default=None, dest="head_map",
                       help="encoder | encoder[h,...] | block:T->S[h,...];T->S | head:Tb.Th->Sb.Sh;... | "
                            "head:Tb.{h,h}->Sb.Sh (a group's mean); without [h,...] fewer student heads follow "
                            "even groups of teacher heads (default encoder; none with --alpha 1: logits only)")
        g.add_argument("--loss", default="kl", choices=["mse", "ce", "kl"])
        g.add_argument("--alpha", type=float, default=0.5, help="weight of label CE; 1-alpha on attention")
        g.add_argument("--gate", default="none", choices=list(GATES),
                       help="attention term only for images the teacher (or the student) classifies correctly")
        g.add_argument("--weighting", default="none", choices=list(WEIGHTINGS),
                       help="per-image attention weight: the student's probability of the true class (confidence) "
                            "or one minus it (doubt), normalised so alpha keeps its meaning")
        g.add_argument("--kd", default="none", choices=["none", "deit-hard"],
                       help="deit-hard: DeiT hard-label distillation through the student's distillation token")
        g.add_argument("--kd-weight", type=float, default=0.0, help="extra Hinton logit-KD term weight")
        g.add_argument("--kd-temperature", type=float, default=4.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_args(sub.add_parser("train", help="train a teacher or a baseline student on labels"), distill=False)
    _add_run_args(sub.add_parser("distill", help="train a student from a teacher's attention heads"), distill=True)
    p = sub.add_parser("eval", help="accuracy of a checkpoint on a split")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="defaults to the data the checkpoint was trained on")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("scan", help="both models over a split: who is right, and how differently they look")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors)")
    p.add_argument("--student", required=True, help="student checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="cifar10, cifar100 or imagefolder:PATH (classes: the models')")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images, evenly spaced")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="write one row per image (path, label, predictions, confidences, group, divergence)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("heads", help="rank a checkpoint's attention heads: the loss when each is switched off")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="defaults to the data the checkpoint was trained on")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="rank on training images (default): choosing distillation heads on test chooses on test")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N images, evenly spaced")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("experiment", help="run every run of an experiment config and write the results table")
    p.add_argument("config", help="YAML file, e.g. configs/cifar10.yaml")
    p.add_argument("--only", nargs="*", default=None, help="run only these run names")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--status", action="store_true",
                   help="print how far each run got (read-only, safe while the study trains) and exit")
    sub.add_parser("presets", help="list model presets with parameter counts")
    return parser


def _run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command in ("train", "distill"):
        from .models import parse_model_overrides
        from .train import TrainConfig, train

        warmup = min(2.0, args.epochs / 10) if args.warmup_epochs is None else args.warmup_epochs
        fields = dict(model=args.model, data=args.data, out_dir=args.out, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                      warmup_epochs=warmup, label_smoothing=args.label_smoothing, augment=args.augment,
                      val_fraction=args.val_fraction,
                      seed=args.seed, img_size=args.img_size, device=args.device, bf16=args.bf16, compile=args.compile,
                      cache_dir=args.cache_dir, download=args.download,
                      model_overrides=parse_model_overrides(args.model_overrides), pretrained=args.pretrained,
                      pretrained_file=args.pretrained_file)
        if args.command == "distill":
            fields.update(teacher=args.teacher, head_map=args.head_map, loss=args.loss, alpha=args.alpha,
                          gate=args.gate, weighting=args.weighting, kd=args.kd, kd_weight=args.kd_weight,
                          kd_temperature=args.kd_temperature)
        metrics = train(TrainConfig(**fields), resume=args.resume, stop_after_epochs=args.stop_after,
                        progress=not args.no_progress)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps({"out": args.out, **metrics}))
    elif args.command == "eval":
        from .evaluation import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split,
                                     batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['checkpoint']}: {result['accuracy']:.2f}% top-1 on {result['n']} {args.split} images")
    elif args.command == "scan":
        from .scan import GROUP_TITLES, scan_checkpoints

        result = scan_checkpoints(args.teacher, args.student, args.data, split=args.split, limit=args.limit,
                                  batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir)
        if args.csv:
            result.write_csv(args.csv)
        summary = result.summary()
        if args.json:
            print(json.dumps({"teacher": args.teacher, "student": args.student, "data": args.data,
                              "split": args.split, **summary, "csv": args.csv}))
        else:
            print(f"{summary['n']} {args.split} images of {args.data}: teacher {summary['teacher_accuracy']:.2f}% "
                  f"top-1, student {summary['student_accuracy']:.2f}% top-1, mean rollout divergence "
                  f"{summary['mean_divergence']:.4f} bits")
            for group, count in summary["counts"].items():
                print(f"  {GROUP_TITLES[group]}: {count}")
            if args.csv:
                print(f"per-image rows: {args.csv}")
    elif args.command == "heads":
        from tqdm import tqdm

        from .importance import head_importance_checkpoint

        with tqdm(total=None, desc="heads switched off", disable=args.json, leave=False) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = head_importance_checkpoint(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                                                batch_size=args.batch_size, device=args.device,
                                                cache_dir=args.cache_dir, progress=progress)
        if args.json:
            print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                              **result.to_dict()}))
        else:
            print(result.to_text())
    elif args.command == "experiment":
        from .experiment import experiment_status, run_experiment

        if args.status:
            print(experiment_status(args.config), end="")
        else:
            run_experiment(args.config, only=args.only)
    elif args.command == "presets":
        from .models import PRESETS, build_model, describe_model

        for name in PRESETS:
            info = describe_model(build_model(name, num_classes=100 if name.startswith("seed") else 10))
            print(f"{name:14s} {info['parameters'] / 1e6:5.2f}M params  {info['blocks']} blocks x "
                  f"{info['heads']} heads  embed {info['embed_dim']}  grid {info['grid'][0]}x{info['grid'][1]}  "
                  f"input {info['img_size'][0]}")
    return 0


def _wait_for_go() -> bool:
    """True once the parent writes ``go`` on stdin; EOF first means it died before recording the job."""
    return sys.stdin.readline().strip() == "go"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "wait_for_go", False) and not _wait_for_go():
        print("error: the app that started this job stopped before recording it; nothing was trained",
              file=sys.stderr)
        return 2
    from .train import TrainingStopped

    try:
        return _run(args)
    except TrainingStopped as exc:  # SIGTERM/SIGINT: stopped cleanly at a step boundary
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except VitkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
