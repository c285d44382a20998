"""Training and distillation: ``TrainConfig`` (the one config type), the epoch loop, evaluation, resume.

A run lives in ``out_dir``: ``last.safetensors`` and ``best.safetensors`` (vitkd checkpoints),
``last.state.safetensors`` (optimizer, step, RNG: what ``resume`` needs), ``metrics.jsonl``
(one line per epoch) and ``progress.json`` (live position, for the app). Everything is
written atomically every epoch, by rank 0 only under torchrun.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .attention import CaptureModule, capture_attention, token_layout
from .checkpoint import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from .compiling import CompiledOrEager
from .data import AUGMENT_POLICIES, ImageTensors, iterate_batches, load_split, num_batches
from .distill import (
    GATES,
    LOSS_KINDS,
    HeadMap,
    distillation_loss,
    gather_heads,
    logit_distillation_loss,
    parse_head_map,
    per_sample_attention_loss,
)
from .errors import CheckpointError, ConfigError, VitkdError
from .files import write_text_atomic
from .models import build_model, count_parameters, default_img_size

__all__ = ["TrainConfig", "train", "evaluate", "lr_at_step", "resolve_device"]


# Options that change how a run executes, not what it computes: free to change on --resume.
RUNTIME_FIELDS = frozenset({"device", "compile", "eval_batch_size", "cache_dir", "download"})


@dataclass
class TrainConfig:
    """One run: model, data, recipe and (for distillation) teacher, head map, loss and alpha.

    ``teacher=None`` trains the model on labels alone (teacher or baseline student);
    otherwise the loss is ``alpha * CE + (1 - alpha) * L_att`` over the head map.
    """

    model: str
    data: str
    out_dir: str
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    augment: str = "basic"
    seed: int = 0
    img_size: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    head_map: str | None = None
    loss: str = "kl"
    alpha: float = 1.0
    gate: str = "none"
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    device: str = "auto"
    bf16: bool = False
    cache_dir: str | None = None
    download: bool = False
    eval_batch_size: int = 512
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be positive, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.augment not in AUGMENT_POLICIES:
            raise ConfigError(f"unknown augmentation {self.augment!r}: use one of {', '.join(AUGMENT_POLICIES)}")
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"unknown attention loss {self.loss!r}: use one of {', '.join(LOSS_KINDS)}")
        if self.gate not in GATES:
            raise ConfigError(f"unknown gate {self.gate!r}: use one of {', '.join(GATES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.teacher is not None and self.alpha == 1.0 and self.head_map is not None:
            raise ConfigError("alpha 1 gives the attention term no weight: pass --alpha below 1 or no --map "
                              "(logit distillation alone is --alpha 1 --kd-weight W without --map)")
        if self.teacher is not None and self.alpha == 1.0 and self.kd_weight <= 0:
            raise ConfigError("with alpha 1 and no --kd-weight the teacher teaches nothing: lower --alpha for "
                              "attention distillation or set --kd-weight for logit distillation")
        if self.teacher is not None and self.alpha < 1.0 and self.head_map is None:
            self.head_map = "encoder"
        if self.teacher is None and (self.alpha != 1.0 or self.kd_weight > 0):
            raise ConfigError("alpha < 1 and logit distillation need a --teacher checkpoint")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_mismatch(self, saved: Mapping[str, Any]) -> list[str]:
        """Fields that differ from a saved run's config and would change its result.

        Runtime options (``RUNTIME_FIELDS``) may change on resume; a field added to vitkd after
        the run started matches when it holds its default.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        current = self.to_dict()
        return sorted(k for k, v in current.items() if k not in RUNTIME_FIELDS
                      and saved.get(k, defaults.get(k)) != v)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown training config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(data))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but no CUDA GPU is available")
    return resolved


def lr_at_step(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to ``base_lr``, then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageTensors, batch_size: int = 512,
             device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over a split; sums across ranks under torchrun."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for images, labels in iterate_batches(data, batch_size, train=False, rank=rank, world_size=world_size,
                                          device=device):
        logits = model(images).float()
        totals[0] += (logits.argmax(-1) == labels).sum()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum")
        totals[2] += labels.numel()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(1.0, float(totals[2]))
    return {"accuracy": 100.0 * float(totals[0]) / n, "loss": float(totals[1]) / n, "n": int(totals[2])}


def _dist_info() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world_size


def _load_teacher(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    teacher, teacher_meta = load_checkpoint(config.teacher, device=device)
    teacher.requires_grad_(False)
    return teacher.eval(), teacher_meta


def _teacher_outputs(teacher: torch.nn.Module, blocks: tuple[int, ...],
                     images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    out = capture_attention(teacher, images, blocks)
    return out.class_logits, out.attn_logits


def _resolve_head_map(config: TrainConfig, teacher: torch.nn.Module, student: torch.nn.Module) -> HeadMap:
    t_layout, s_layout = token_layout(teacher), token_layout(student)
    t_depth, s_depth = len(teacher.blocks), len(student.blocks)
    t_heads, s_heads = teacher.blocks[0].attn.num_heads, student.blocks[0].attn.num_heads
    head_map = parse_head_map(config.head_map or "encoder", t_depth, t_heads, s_depth, s_heads)
    return head_map.validate(t_depth, t_heads, s_depth, s_heads, t_layout.num_tokens, s_layout.num_tokens)


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or distill) per ``config``; returns the last epoch's metrics.

    ``resume`` continues from ``out_dir/last.state.safetensors`` so an interrupted run ends
    with the same weights as an uninterrupted one. ``stop_after_epochs`` ends this call early
    (the schedule still spans ``config.epochs``), which is how an interruption is simulated.
    """
    rank, world_size = _dist_info()
    device = resolve_device(config.device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    out_dir = Path(config.out_dir)
    state_path = out_dir / "last.state.safetensors"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    img_size = config.img_size or default_img_size(config.model)
    train_data = load_split(config.data, "train", img_size, config.cache_dir, config.download, progress and is_main)
    test_data = load_split(config.data, "test", img_size, config.cache_dir, config.download, progress and is_main)

    teacher, teacher_meta, head_map = None, None, None
    torch.manual_seed(config.seed)
    student = build_model(config.model, num_classes=len(train_data.class_names), img_size=config.img_size,
                          **config.model_overrides).to(device)
    if config.teacher is not None:
        teacher, teacher_meta = _load_teacher(config, device)
        if teacher.num_classes != student.num_classes:
            raise ConfigError(f"teacher has {teacher.num_classes} classes, the data {student.num_classes}")
        if config.head_map is not None:  # None: logit distillation alone, no attention term
            head_map = _resolve_head_map(config, teacher, student)
    student_blocks = head_map.student_blocks if head_map else []
    teacher_blocks = head_map.teacher_blocks if head_map else []
    per_sample_fn, teacher_capture = None, None
    if teacher is not None:
        teacher_capture = functools.partial(_teacher_outputs, teacher, tuple(teacher_blocks))
        if config.compile:  # the teacher's no-grad forward and the attention loss; the student stays eager
            teacher_capture = CompiledOrEager(teacher_capture, "the teacher forward")
            per_sample_fn = None if head_map is None else CompiledOrEager(functools.partial(per_sample_attention_loss, kind=config.loss),
                                            "the attention loss")
    forward: torch.nn.Module = CaptureModule(student, student_blocks)
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    decay = [p for n, p in student.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    no_decay = [p for n, p in student.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n
                                                                   and "token" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = num_batches(len(train_data), config.batch_size, train=True, world_size=world_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)

    start_epoch, step, best_acc, wall_before = 0, 0, -1.0, 0.0
    if resume and state_path.is_file():
        state = load_training_state(state_path)
        changed = config.resume_mismatch(state["config"])
        if changed:
            raise ConfigError(f"--resume with a different config than the run in {out_dir} (changed: {changed})")
        resumed, resumed_meta = load_checkpoint(out_dir / "last.safetensors", device=device)
        if resumed_meta.get("epoch") != state["epoch"]:
            raise CheckpointError(f"{out_dir}: last.safetensors is from epoch {resumed_meta.get('epoch')} but the "
                                  f"training state from epoch {state['epoch']} (interrupted while saving); "
                                  "restore a consistent pair or start the run again")
        student.load_state_dict(resumed.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_acc, wall_before = float(state["best_accuracy"]), float(state["wall_time_s"])
    elif is_main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()

    base_meta = {
        "kind": "distilled" if teacher is not None else "supervised",
        "class_names": list(train_data.class_names),
        "mean": list(train_data.mean),
        "std": list(train_data.std),
        "img_size": img_size,
        "data": config.data,
        "train_config": config.to_dict(),
        "parameters": count_parameters(student),
        "head_map": head_map.to_list() if head_map else None,
        "teacher": None if teacher_meta is None else {
            "path": str(config.teacher), "model": teacher_meta.get("model"),
            "accuracy": teacher_meta.get("metrics", {}).get("accuracy")},
    }
    last_metrics: dict[str, Any] = {}
    if start_epoch >= config.epochs:  # already finished: report what the run recorded
        from .checkpoint import read_checkpoint_meta
        return dict(read_checkpoint_meta(out_dir / "last.safetensors").get("metrics", {}))
    end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
    run_start = time.time()
    for epoch in range(start_epoch, end_epoch):
        forward.train()
        epoch_start = time.time()
        sums = {"loss": 0.0, "ce": 0.0, "att": 0.0, "kd": 0.0}
        batches = iterate_batches(train_data, config.batch_size, train=True, seed=config.seed, epoch=epoch,
                                  augment=config.augment, rank=rank, world_size=world_size, device=device)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (progress and is_main), mininterval=1.0)
        last_progress_write = 0.0
        for batch_idx, (images, labels) in enumerate(bar):
            lr = lr_at_step(step, total_steps, warmup_steps, config.lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                class_logits, student_attn = forward(images)
                if teacher is not None and head_map is None:
                    with torch.no_grad():
                        t_class_logits, _ = teacher_capture(images)
                    terms = logit_distillation_loss(class_logits, labels, t_class_logits, config.label_smoothing,
                                                    config.kd_weight, config.kd_temperature)
                elif teacher is not None:
                    with torch.no_grad():
                        t_class_logits, t_attn = teacher_capture(images)
                    terms = distillation_loss(
                        class_logits, labels, gather_heads(student_attn, head_map.pairs, "student"),
                        gather_heads(t_attn, head_map.pairs, "teacher"), config.loss, config.alpha,
                        teacher_class_logits=t_class_logits, gate=config.gate,
                        label_smoothing=config.label_smoothing, kd_weight=config.kd_weight,
                        kd_temperature=config.kd_temperature, per_sample_fn=per_sample_fn)
                else:
                    ce = F.cross_entropy(class_logits.float(), labels, label_smoothing=config.label_smoothing)
                    terms = {"loss": ce, "ce": ce.detach()}
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise VitkdError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                 "lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            for key in sums:
                if key in terms:
                    sums[key] += float(terms[key].detach())
            if is_main and time.time() - last_progress_write > 2.0:
                last_progress_write = time.time()
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                write_text_atomic(out_dir / "progress.json", json.dumps({
                    "epoch": epoch, "epochs": config.epochs, "batch": batch_idx + 1,
                    "batches": steps_per_epoch, "loss": loss.item(), "time": time.time()}))
        bar.close()
        if world_size > 1:  # train_* metrics average every rank's batches, not only rank 0's share
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            sums = {key: total / world_size for key, total in zip(sums, totals.tolist(), strict=True)}
        eval_metrics = evaluate(student, test_data, config.eval_batch_size, device, rank, world_size)
        epoch_time = time.time() - epoch_start
        wall = wall_before + (time.time() - run_start)
        n_steps = max(1, steps_per_epoch)
        last_metrics = {
            "epoch": epoch + 1, "epochs": config.epochs, "step": step, "lr": lr,
            **{f"train_{k}": v / n_steps for k, v in sums.items() if v or k in ("loss", "ce")},
            "accuracy": eval_metrics["accuracy"], "test_loss": eval_metrics["loss"], "n": eval_metrics["n"],
            "epoch_time_s": round(epoch_time, 2), "wall_time_s": round(wall, 2),
        }
        is_best = eval_metrics["accuracy"] > best_acc
        best_acc = max(best_acc, eval_metrics["accuracy"])
        last_metrics["best_accuracy"] = best_acc
        if is_main:
            meta = dict(base_meta, epoch=epoch + 1, metrics=last_metrics, wall_time_s=round(wall, 2))
            save_checkpoint(student, meta, out_dir / "last.safetensors")
            if is_best:
                shutil.copyfile(out_dir / "last.safetensors", out_dir / "best.safetensors.tmp")
                os.replace(out_dir / "best.safetensors.tmp", out_dir / "best.safetensors")
            save_training_state({
                "config": config.to_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best_accuracy": best_acc, "wall_time_s": wall}, state_path)
            with open(out_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(last_metrics) + "\n")
            write_text_atomic(out_dir / "progress.json", json.dumps({
                "epoch": epoch + 1, "epochs": config.epochs, "batch": steps_per_epoch, "batches": steps_per_epoch,
                "loss": last_metrics["train_loss"], "accuracy": last_metrics["accuracy"], "time": time.time(),
                "done": epoch + 1 == config.epochs}))
        if on_epoch_end is not None:
            on_epoch_end(last_metrics)
    if world_size > 1:
        dist.barrier()
    return last_metrics
