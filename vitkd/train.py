"""Training and distillation: ``TrainConfig`` (the one config type), the epoch loop, evaluation, resume.

``train`` reads as set-up -> restore -> epoch -> commit. A run lives in a ``RunDir``
(``vitkd.rundir``: the folder's layout, its lock and the one commit point per epoch);
rank 0 alone writes under torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from .attention import CaptureModule, TokenLayout, capture_attention, token_layout
from .checkpoint import checkpoint_architecture, load_checkpoint, read_checkpoint_meta
from .compiling import CompiledOrEager
from .data import AUGMENT_POLICIES, ImageTensors, iterate_batches, load_split, num_batches
from .distill import (
    GATES,
    LOSS_KINDS,
    WEIGHTINGS,
    deit_hard_loss,
    distillation_loss,
    drop_distillation_token,
    gather_heads,
    logit_distillation_loss,
    per_sample_attention_loss,
)
from .errors import ConfigError, IncompatibleModelsError, VitkdError
from .files import file_sha256
from .headmap import HeadMap, parse_head_map
from .models import build_model, check_model_overrides, count_parameters, default_img_size, has_distillation_token
from .pairs import norm_stats
from .resample import check_resamplable, resample_attention, token_resample_matrix
from .rundir import RunDir

__all__ = ["TrainConfig", "TrainingStopped", "train", "evaluate", "lr_at_step", "resolve_device"]

KD_KINDS: tuple[str, ...] = ("none", "deit-hard")

# Fixed, independent of the run seed: every run and seed of a study holds out the same images.
_VAL_SPLIT_SEED = 20_251_129


# Options that change how a run executes, not what it computes: free to change on --resume.
RUNTIME_FIELDS = frozenset({"device", "compile", "eval_batch_size", "cache_dir", "download"})


@dataclass
class TrainConfig:
    """One run: model, data, recipe and (for distillation) teacher, head map, loss and alpha.

    ``teacher=None`` trains the model on labels alone (teacher or baseline student);
    otherwise the loss is ``alpha * CE + (1 - alpha) * L_att`` over the head map.
    ``val_fraction`` holds out that share of train (the same images for every seed) to choose
    ``best.safetensors``; with 0 (the default) no best checkpoint is written.
    ``model_overrides`` are architecture keys (``vitkd.models.ARCHITECTURE_KEYS``, ``--model-override``).
    A timm model may start from timm's weights (``pretrained``, downloaded) or a local timm weights
    file (``pretrained_file``); the checkpoints record which (``init_weights``), never to be reopened.
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
    pretrained: bool = False
    pretrained_file: str | None = None
    teacher: str | None = None
    head_map: str | None = None
    loss: str = "kl"
    alpha: float = 1.0
    gate: str = "none"
    weighting: str = "none"
    kd: str = "none"
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    device: str = "auto"
    bf16: bool = False
    cache_dir: str | None = None
    download: bool = False
    eval_batch_size: int = 512
    compile: bool = False
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_model_overrides(self.model_overrides)
        if self.pretrained and self.pretrained_file is not None:
            raise ConfigError("--pretrained downloads timm's weights and --pretrained-file reads a local file: "
                              "pass one")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be positive, got {self.epochs} and {self.batch_size}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs} with {self.epochs} "
                              "epochs: the learning rate would never decay")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.augment not in AUGMENT_POLICIES:
            raise ConfigError(f"unknown augmentation {self.augment!r}: use one of {', '.join(AUGMENT_POLICIES)}")
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"unknown attention loss {self.loss!r}: use one of {', '.join(LOSS_KINDS)}")
        if self.gate not in GATES:
            raise ConfigError(f"unknown gate {self.gate!r}: use one of {', '.join(GATES)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if self.kd not in KD_KINDS:
            raise ConfigError(f"unknown --kd {self.kd!r}: use one of {', '.join(KD_KINDS)}")
        if self.kd == "deit-hard" and self.kd_weight > 0:
            raise ConfigError("--kd deit-hard already distils the teacher's decisions: drop --kd-weight")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.teacher is not None and self.alpha == 1.0 and self.head_map is not None:
            raise ConfigError("alpha 1 gives the attention term no weight: pass --alpha below 1 or no --map "
                              "(logit distillation alone is --alpha 1 --kd-weight W without --map)")
        if self.teacher is not None and self.alpha == 1.0 and self.kd_weight <= 0 and self.kd == "none":
            raise ConfigError("with alpha 1 and no --kd-weight the teacher teaches nothing: lower --alpha for "
                              "attention distillation or set --kd-weight for logit distillation")
        if self.teacher is not None and self.alpha < 1.0 and self.head_map is None:
            self.head_map = "encoder"
        if self.teacher is None and (self.alpha != 1.0 or self.kd_weight > 0 or self.kd != "none"):
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
        """The config a mapping (YAML, JSON, a form) describes; unknown keys and ill-typed values are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown training config keys {sorted(unknown)}; known: {sorted(names)}")
        for f in dataclasses.fields(cls):
            if f.name in data:
                _check_field_type(f.name, str(f.type), data[f.name])
        return cls(**dict(data))


# TrainConfig's annotations (strings under ``from __future__ import annotations``) -> accepted types, in words.
_FIELD_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"), "dict[str, Any]": ((dict,), "a mapping")}


def _check_field_type(name: str, annotation: str, value: Any) -> None:
    if value is None and annotation.endswith(" | None"):
        return
    allowed, words = _FIELD_KINDS[annotation.removesuffix(" | None")]
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and float in allowed else ""
        raise ConfigError(f"training config {name} is {value!r:.60}, not {words}{hint}")


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


class TrainingStopped(VitkdError):
    """SIGTERM or SIGINT stopped the run at a step boundary; ``--resume`` continues from ``resume_epoch``."""

    def __init__(self, signum: int, epoch: int, resume_epoch: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} during epoch {epoch}; --resume continues after epoch {resume_epoch} "
                         f"(the last committed)")
        self.signum = signum
        self.resume_epoch = resume_epoch


class _StopOnSignals:
    """SIGTERM/SIGINT only set a flag; the loop checks it between steps (no half-written file)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Run:
    """What the epochs of one run share: set up once, read-only afterwards (except the optimizer)."""

    config: TrainConfig
    run_dir: RunDir
    rank: int
    world_size: int
    device: torch.device
    train_data: ImageTensors
    val_data: ImageTensors | None
    test_data: ImageTensors
    student: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_meta: dict[str, Any]
    teacher: torch.nn.Module | None = None
    head_map: HeadMap | None = None
    # images -> (teacher class logits, teacher targets [B, P, T_s, T_s] on the student's tokens, or None)
    teacher_capture: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    per_sample_fn: Callable[..., torch.Tensor] | None = None
    data_fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def data_fingerprint(train_data: ImageTensors) -> dict[str, Any]:
    """What a resume must find unchanged in the training split: image count, classes, and a hash of the pixels
    and labels (a changed folder would silently shift the schedule, batch order and validation split)."""
    digest = hashlib.sha256()
    digest.update(train_data.labels.numpy().tobytes())
    for part in train_data.images.split(4096):  # bounded extra memory, whatever the split's size
        digest.update(part.contiguous().numpy().tobytes())
    return {"train_images": len(train_data), "classes": list(train_data.class_names),
            "sha256": digest.hexdigest()}


@dataclass
class _Position:
    """Where the run stands; everything here goes into the commit."""

    epoch: int = 0
    step: int = 0
    wall_before: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_meta: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------- set-up

def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    rank, world_size = _dist_info()
    device = resolve_device(config.device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _check_before_data(config: TrainConfig) -> dict[str, Any] | None:
    """Cheap checks that need no decoded data: the teacher file, the head map, the token layouts.

    Both models are built on the meta device (no memory, no RNG draws). Returns the teacher's metadata.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a weights file: its header's shapes only
        student = build_model(config.model, num_classes=10, img_size=config.img_size, pretrained=config.pretrained,
                              pretrained_file=config.pretrained_file, **config.model_overrides)
    if float(getattr(student.patch_drop, "prob", 0.0) or 0.0) > 0 and config.teacher is not None:
        raise ConfigError("patch_drop_rate > 0 drops student tokens the teacher keeps; attention maps would not "
                          "line up: use patch_drop_rate 0 for distillation")
    deit = has_distillation_token(student)
    if config.kd == "deit-hard" and not deit:
        raise ConfigError(f"--kd deit-hard needs a student with a distillation token (e.g. cifar-student-deit), "
                          f"not {config.model}")
    if deit and config.kd != "deit-hard":
        raise ConfigError(f"{config.model} has a distillation token: train it with --teacher and --kd deit-hard "
                          "(its second head learns the teacher's decisions)")
    if config.teacher is None:
        return None
    teacher_meta = read_checkpoint_meta(config.teacher)
    with torch.random.fork_rng(devices=[]):  # whitelisted metadata, meta device, checked against the header
        teacher = checkpoint_architecture(config.teacher, teacher_meta)
    token_layout(teacher), token_layout(student)  # both must be ViTs vitkd can capture
    _check_teacher_input(teacher, student)
    if config.head_map is not None:  # the attention term compares maps: their tokens must line up
        _resolve_head_map(config, teacher, student)
    return teacher_meta


def _check_teacher_input(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """The teacher reads the student's images: refuse a fixed input size it cannot take."""
    t_embed, s_embed = teacher.patch_embed, student.patch_embed
    t_size, s_size = getattr(t_embed, "img_size", None), getattr(s_embed, "img_size", None)
    if getattr(t_embed, "dynamic_img_size", False) or t_size is None or s_size is None:
        return
    if tuple(t_size) != tuple(s_size):
        raise IncompatibleModelsError(f"the teacher reads {t_size[0]}x{t_size[1]} images and the student "
                                      f"{s_size[0]}x{s_size[1]}: distil at the teacher's input size (--img-size)")


def _check_layouts(t_layout: TokenLayout, s_layout: TokenLayout) -> None:
    """Maps line up when the token layouts match, or after resampling the teacher's patch grid onto the student's."""
    if t_layout == s_layout:
        return
    try:
        check_resamplable(t_layout, s_layout)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(
            f"teacher tokens ({t_layout.num_prefix_tokens} prefix + {t_layout.grid_size[0]}x{t_layout.grid_size[1]} "
            f"grid) and student tokens ({s_layout.num_prefix_tokens} prefix + "
            f"{s_layout.grid_size[0]}x{s_layout.grid_size[1]} grid) cannot be compared: {exc}") from exc


def _drops_distillation_token(teacher: torch.nn.Module, student: torch.nn.Module) -> bool:
    """A DeiT student follows a plain teacher: its maps lose the distillation token's row and column."""
    return has_distillation_token(student) and not has_distillation_token(teacher)


def _compared_layout(s_layout: TokenLayout, teacher: torch.nn.Module, student: torch.nn.Module) -> TokenLayout:
    if _drops_distillation_token(teacher, student):
        return TokenLayout(s_layout.num_prefix_tokens - 1, s_layout.grid_size)
    return s_layout


def _split_validation(train_data: ImageTensors, fraction: float) -> tuple[ImageTensors, ImageTensors | None]:
    """Hold out ``fraction`` of train, the same images for every run and seed (a fixed generator)."""
    if fraction <= 0:
        return train_data, None
    n = len(train_data)
    n_val = max(1, round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_VAL_SPLIT_SEED))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values

    def subset(idx: torch.Tensor, split: str) -> ImageTensors:
        return dataclasses.replace(train_data, images=train_data.images[idx], labels=train_data.labels[idx],
                                   split=split)
    return subset(train_idx, "train"), subset(val_idx, "val")


def _make_optimizer(student: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # timm's grouping (no decay on 1-d params, biases, pos_embed and prefix tokens), decay group first
    # so optimizer states saved by earlier vitkd versions load into the same groups.
    groups = param_groups_weight_decay(student, config.weight_decay, no_weight_decay_list=student.no_weight_decay())
    return torch.optim.AdamW(list(reversed(groups)), lr=config.lr)


def _teacher_inputs(train_data: ImageTensors, teacher_meta: Mapping[str, Any]) -> Callable[[torch.Tensor],
                                                                                              torch.Tensor]:
    """Re-normalise batches (normalised with the data's mean/std) as the teacher takes them (``norm_stats``)."""
    data_mean, data_std = tuple(train_data.mean), tuple(train_data.std)
    t_mean, t_std = norm_stats(teacher_meta)
    if (t_mean, t_std) == (data_mean, data_std):
        return lambda images: images
    scale = torch.tensor(data_std) / torch.tensor(t_std)
    shift = (torch.tensor(data_mean) - torch.tensor(t_mean)) / torch.tensor(t_std)
    return lambda images: images * scale.to(images.device).view(1, 3, 1, 1) + shift.to(images.device).view(1, 3, 1, 1)


def _setup(config: TrainConfig, run_dir: RunDir, rank: int, world_size: int, device: torch.device,
           teacher_meta: dict[str, Any] | None, progress: bool) -> _Run:
    img_size = config.img_size or default_img_size(config.model)
    show = progress and rank == 0
    full_train = load_split(config.data, "train", img_size, config.cache_dir, config.download, show)
    test_data = load_split(config.data, "test", img_size, config.cache_dir, config.download, show)
    train_data, val_data = _split_validation(full_train, config.val_fraction)
    if teacher_meta is not None:
        teacher_classes = tuple(teacher_meta.get("class_names") or ())
        if teacher_classes and teacher_classes != tuple(train_data.class_names):
            raise IncompatibleModelsError(
                f"the teacher's classes ({_preview(teacher_classes)}) differ from the data's "
                f"({_preview(train_data.class_names)}): distil on the data the teacher was trained on")

    torch.manual_seed(config.seed)
    student = build_model(config.model, num_classes=len(train_data.class_names), img_size=config.img_size,
                          pretrained=config.pretrained, pretrained_file=config.pretrained_file,
                          **config.model_overrides).to(device)
    teacher, head_map, teacher_capture, per_sample_fn = None, None, None, None
    if config.teacher is not None:
        teacher, _ = load_checkpoint(config.teacher, device=device)
        teacher.requires_grad_(False).eval()
        if config.kd == "deit-hard":  # the student's forward returns (class head, distillation head) in training
            student.set_distilled_training(True)
        layouts, resample_matrix = None, None
        if config.head_map is not None:  # None: logit distillation alone, no attention term
            head_map = _resolve_head_map(config, teacher, student)
            layouts = (token_layout(teacher), _compared_layout(token_layout(student), teacher, student))
            if layouts[0] != layouts[1]:  # different patch grids: teacher maps resampled onto the student's
                resample_matrix = token_resample_matrix(*layouts).to(device)
        capture = functools.partial(_teacher_outputs, teacher, _teacher_inputs(train_data, teacher_meta or {}),
                                    head_map, config.loss, layouts, resample_matrix)
        teacher_capture = capture
        if config.compile:  # the teacher's no-grad forward and the attention loss; the student stays eager
            teacher_capture = CompiledOrEager(capture, "the teacher forward")
            if head_map is not None:
                per_sample_fn = CompiledOrEager(functools.partial(per_sample_attention_loss, kind=config.loss),
                                                "the attention loss")
    optimizer = _make_optimizer(student, config)
    steps_per_epoch = num_batches(len(train_data), config.batch_size, train=True, world_size=world_size)
    base_meta = {
        "kind": "distilled" if teacher is not None else "supervised",
        "class_names": list(train_data.class_names),
        "mean": list(train_data.mean),
        "std": list(train_data.std),
        "img_size": img_size,
        "data": config.data,
        "train_config": config.to_dict(),
        "parameters": count_parameters(student),
        "init_weights": _init_weights(config, student),
        "head_map": head_map.to_list() if head_map else None,
        "teacher": None if teacher_meta is None else {
            "path": str(config.teacher), "model": teacher_meta.get("model"),
            "accuracy": teacher_meta.get("metrics", {}).get("accuracy"),
            "sha256": file_sha256(config.teacher)},  # which teacher, whatever its path: resume checks it
    }
    return _Run(config=config, run_dir=run_dir, rank=rank, world_size=world_size, device=device,
                train_data=train_data, val_data=val_data, test_data=test_data, student=student,
                forward=CaptureModule(student, head_map.student_blocks if head_map else []), optimizer=optimizer,
                steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * config.epochs,
                warmup_steps=round(config.warmup_epochs * steps_per_epoch), base_meta=base_meta, teacher=teacher,
                head_map=head_map, teacher_capture=teacher_capture, per_sample_fn=per_sample_fn,
                data_fingerprint=data_fingerprint(full_train))


def _init_weights(config: TrainConfig, student: torch.nn.Module) -> dict[str, Any] | None:
    """Which weights the student started from, for the record: timm's (name and tag) or a file (name, sha256).

    Provenance only: loading a checkpoint never reads this (its weights are in the file).
    """
    if config.pretrained:
        return {"source": "timm", "model": student.pretrained_cfg.get("architecture"),
                "tag": student.pretrained_cfg.get("tag")}
    if config.pretrained_file is None:
        return None
    digest = hashlib.sha256()
    with open(config.pretrained_file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"source": "file", "file": os.path.basename(config.pretrained_file), "sha256": digest.hexdigest()}


def _preview(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _teacher_outputs(teacher: torch.nn.Module, inputs: Callable[[torch.Tensor], torch.Tensor],
                     head_map: HeadMap | None, kind: str, layouts: tuple[TokenLayout, TokenLayout] | None,
                     resample_matrix: torch.Tensor | None,
                     images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's class logits and its targets for the mapped student heads, on the student's tokens.

    Targets: the mapped heads gathered (a group of teacher heads merged, ``gather_heads``), then,
    when the patch grids differ, resampled onto the student's grid (``resample_attention``).
    """
    out = capture_attention(teacher, inputs(images), tuple(head_map.teacher_blocks) if head_map else ())
    if head_map is None:
        return out.class_logits, None
    targets = gather_heads(out.attn_logits, head_map.pairs, "teacher", kind)
    if resample_matrix is not None:
        assert layouts is not None
        targets = resample_attention(targets, *layouts, kind, matrix=resample_matrix)
    return out.class_logits, targets


def _resolve_head_map(config: TrainConfig, teacher: torch.nn.Module, student: torch.nn.Module) -> HeadMap:
    """Parse the map against both models and check their maps can be compared (same tokens, or resampled)."""
    t_layout, s_layout = token_layout(teacher), _compared_layout(token_layout(student), teacher, student)
    _check_layouts(t_layout, s_layout)
    t_depth, s_depth = len(teacher.blocks), len(student.blocks)
    t_heads, s_heads = teacher.blocks[0].attn.num_heads, student.blocks[0].attn.num_heads
    head_map = parse_head_map(config.head_map or "encoder", t_depth, t_heads, s_depth, s_heads)
    return head_map.validate(t_depth, t_heads, s_depth, s_heads)


# ---------------------------------------------------------------------------------------- restore

def _restore(run: _Run, resume: bool) -> _Position:
    """Load the committed state (weights first, before any DDP wrap) and repair lagging exports."""
    if not resume or not run.run_dir.state.is_file():
        if run.is_main:
            run.run_dir.clear_outputs()  # a fresh start: nothing of an abandoned attempt survives
        return _Position()
    state = run.run_dir.load_state()
    assert state is not None
    changed = run.config.resume_mismatch(state["config"])
    recorded = (state.get("meta") or {}).get("head_map")
    if recorded is not None and run.head_map is not None:
        # The run's head pairs are what counts: a map spelled differently but with the same pairs
        # resumes, and a spelling whose meaning changed (e.g. a default) is refused.
        same_pairs = set(HeadMap.from_list(recorded).pairs) == set(run.head_map.pairs)
        if same_pairs and "head_map" in changed:
            changed.remove("head_map")
        elif not same_pairs:
            raise ConfigError(f"--resume: the map {run.config.head_map!r} now means {run.head_map.describe()}, but "
                              f"the run in {run.run_dir.path} trained {HeadMap.from_list(recorded).describe()}: "
                              "spell the heads out (e.g. block:T->S[h,...])")
    if changed:
        raise ConfigError(f"--resume with a different config than the run in {run.run_dir.path} (changed: {changed})")
    # The teacher's content, not its path (a bundled or re-trained teacher is rewritten in place); absent
    # in states written before vitkd recorded it.
    was_teacher = ((state.get("meta") or {}).get("teacher") or {}).get("sha256")
    if was_teacher is not None and was_teacher != run.base_meta["teacher"]["sha256"]:
        raise ConfigError(f"--resume: the teacher {run.config.teacher} is not the file the run in "
                          f"{run.run_dir.path} learned from until epoch {state['epoch']} (its content changed): "
                          "restore it, or start the run again without --resume")
    recorded_data = state.get("data")  # absent in states written before vitkd recorded it
    if recorded_data is not None and recorded_data != run.data_fingerprint:
        was, now = recorded_data.get("train_images"), run.data_fingerprint["train_images"]
        what = f"{was} images then, {now} now" if was != now else "same image count, other pixels, labels or classes"
        raise ConfigError(f"--resume: the training data of the run in {run.run_dir.path} changed since epoch "
                          f"{state['epoch']} ({what}): restore it, or start the run again without --resume")
    run.student.load_state_dict({k: v.to(run.device) for k, v in state["model"].items()})
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device=run.device)
    position = _Position(epoch=int(state["epoch"]), step=int(state["step"]), wall_before=float(state["wall_time_s"]),
                         history=list(state["metrics_history"]), best_val_accuracy=state.get("best_val_accuracy"),
                         best_epoch=state.get("best_epoch"), best_state=state.get("best_model"),
                         best_meta=state.get("best_meta"))
    if run.is_main:
        with_best = run.val_data is not None
        if run.run_dir.exports_lag(state, with_best):
            run.run_dir.export(run.student, state, _best_model(run, position) if with_best else None)
        if not with_best:
            run.run_dir.best.unlink(missing_ok=True)  # chosen on test by older versions: never silently kept
    return position


def _best_model(run: _Run, position: _Position) -> torch.nn.Module | None:
    if position.best_state is None:
        return None
    model = copy.deepcopy(run.student)
    model.load_state_dict(position.best_state)
    return model


# ------------------------------------------------------------------------------------------ epoch

def _step_terms(run: _Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    config = run.config
    class_logits, student_attn = run.forward(images)
    dist_logits = None
    if isinstance(class_logits, tuple):  # a DeiT student in distilled training: (class head, distillation head)
        class_logits, dist_logits = class_logits
    if run.teacher is None:
        ce = F.cross_entropy(class_logits.float(), labels, label_smoothing=config.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}
    assert run.teacher_capture is not None
    with torch.no_grad():  # the teacher's targets are fixed: gathered, merged and resampled without gradient
        t_class_logits, t_maps = run.teacher_capture(images)
    if run.head_map is None and dist_logits is not None:
        return deit_hard_loss(class_logits, dist_logits, labels, t_class_logits, config.label_smoothing)
    if run.head_map is None:
        return logit_distillation_loss(class_logits, labels, t_class_logits, config.label_smoothing,
                                       config.kd_weight, config.kd_temperature)
    student_maps = gather_heads(student_attn, run.head_map.pairs, "student")
    if _drops_distillation_token(run.teacher, run.student):
        student_maps = drop_distillation_token(student_maps)
    assert t_maps is not None
    return distillation_loss(
        class_logits, labels, student_maps, t_maps, config.loss,
        config.alpha, teacher_class_logits=t_class_logits, gate=config.gate, label_smoothing=config.label_smoothing,
        kd_weight=config.kd_weight, kd_temperature=config.kd_temperature, per_sample_fn=run.per_sample_fn,
        weighting=config.weighting, student_dist_logits=dist_logits)


def _agree(run: _Run, stop: bool, nonfinite: bool) -> tuple[bool, bool]:
    """Every rank learns whether any rank must stop, so none is left waiting in an all-reduce."""
    if run.world_size == 1:
        return stop, nonfinite
    flags = torch.tensor([float(stop), float(nonfinite)], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 63)


def _train_epoch(run: _Run, position: _Position, epoch: int, stop: _StopOnSignals,
                 show: bool) -> dict[str, float]:
    """One epoch of steps; raises ``TrainingStopped`` at a step boundary when a stop signal arrived."""
    config = run.config
    run.forward.train()
    if run.world_size > 1:  # dropout differs per rank, and a resumed rank replays its own draws
        torch.manual_seed(_rank_seed(config.seed, epoch, run.rank))
    sums = {"loss": 0.0, "ce": 0.0, "att": 0.0, "kd": 0.0}
    batches = iterate_batches(run.train_data, config.batch_size, train=True, seed=config.seed, epoch=epoch,
                              augment=config.augment, rank=run.rank, world_size=run.world_size, device=run.device)
    bar = tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not (show and run.is_main), mininterval=1.0)
    last_progress_write, lr = 0.0, config.lr
    try:
        for batch_idx, (images, labels) in enumerate(bar):
            stopping, _ = _agree(run, stop.signum is not None, False)
            if stopping:
                raise TrainingStopped(stop.signum or signal.SIGTERM, epoch + 1, position.epoch)
            lr = lr_at_step(position.step, run.total_steps, run.warmup_steps, config.lr, config.min_lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                terms = _step_terms(run, images, labels)
            loss = terms["loss"]
            _, nonfinite = _agree(run, False, not bool(torch.isfinite(loss)))
            if nonfinite:
                raise VitkdError(f"loss became non-finite at epoch {epoch + 1} step {position.step} (on at least "
                                 f"one rank); lower --lr or check the data")
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            position.step += 1
            for key in sums:
                if key in terms:
                    sums[key] += float(terms[key].detach())
            if run.is_main and time.time() - last_progress_write > 2.0:
                last_progress_write = time.time()
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                run.run_dir.write_progress({
                    "epoch": epoch, "epochs": config.epochs, "batch": batch_idx + 1,
                    "batches": run.steps_per_epoch, "loss": loss.item(), "time": time.time()})
    finally:
        bar.close()
    if stop.signum is not None:  # the signal came during the last step: the epoch is not committed
        raise TrainingStopped(stop.signum, epoch + 1, position.epoch)
    if run.world_size > 1:  # train_* metrics average every rank's batches, not only rank 0's share
        totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=run.device)
        dist.all_reduce(totals)
        sums = {key: total / run.world_size for key, total in zip(sums, totals.tolist(), strict=True)}
    sums["lr"] = lr
    return sums


# ----------------------------------------------------------------------------------------- commit

def _commit_epoch(run: _Run, position: _Position, epoch: int, sums: dict[str, float], epoch_time: float,
                  wall: float) -> dict[str, Any]:
    """Evaluate, then make this epoch current with one commit (the state file), then refresh the exports."""
    config = run.config
    test_metrics = evaluate(run.student, run.test_data, config.eval_batch_size, run.device, run.rank,
                            run.world_size)
    n_steps = max(1, run.steps_per_epoch)
    metrics: dict[str, Any] = {
        "epoch": epoch + 1, "epochs": config.epochs, "step": position.step, "lr": sums.pop("lr"),
        **{f"train_{k}": v / n_steps for k, v in sums.items() if v or k in ("loss", "ce")},
        "accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"], "n": test_metrics["n"],
    }
    is_best = False
    if run.val_data is not None:  # model selection on held-out train images, never on test
        val_metrics = evaluate(run.student, run.val_data, config.eval_batch_size, run.device, run.rank,
                               run.world_size)
        metrics.update(val_accuracy=val_metrics["accuracy"], val_loss=val_metrics["loss"])
        is_best = position.best_val_accuracy is None or val_metrics["accuracy"] > position.best_val_accuracy
        if is_best:
            position.best_val_accuracy, position.best_epoch = val_metrics["accuracy"], epoch + 1
        metrics["best_val_accuracy"] = position.best_val_accuracy
    metrics.update(epoch_time_s=round(epoch_time, 2), wall_time_s=round(wall, 2))
    position.epoch, position.wall_before = epoch + 1, wall
    position.history.append(metrics)
    meta = dict(run.base_meta, epoch=epoch + 1, metrics=metrics, wall_time_s=round(wall, 2))
    if is_best:
        position.best_state = {k: v.detach().cpu().clone() for k, v in run.student.state_dict().items()}
        position.best_meta = meta
    if run.is_main:
        state = {
            "config": config.to_dict(), "epoch": epoch + 1, "step": position.step,
            "model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "wall_time_s": wall, "meta": meta, "metrics_history": position.history,
            "best_val_accuracy": position.best_val_accuracy, "best_epoch": position.best_epoch,
            "best_model": position.best_state, "best_meta": position.best_meta, "data": run.data_fingerprint,
        }
        run.run_dir.commit(state)
        run.run_dir.export(run.student, state, run.student if is_best else None)
        _report_epoch_end(run, epoch + 1, metrics)
    return metrics


def _report_epoch_end(run: _Run, epochs_done: int, metrics: dict[str, Any]) -> None:
    """Progress after a committed epoch (advisory: the state file is what counts); ``done`` after the last."""
    run.run_dir.write_progress({
        "epoch": epochs_done, "epochs": run.config.epochs, "batch": run.steps_per_epoch,
        "batches": run.steps_per_epoch, "loss": metrics.get("train_loss"), "accuracy": metrics.get("accuracy"),
        "time": time.time(), "done": epochs_done == run.config.epochs})


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or distill) per ``config``; returns the last epoch's metrics.

    Set-up -> restore -> epochs, each ending in one commit. ``resume`` continues from the
    committed state so an interrupted (even SIGKILLed) run ends with the same weights as an
    uninterrupted one. SIGTERM/SIGINT stop at a step boundary with ``TrainingStopped``.
    ``stop_after_epochs`` ends this call early (the schedule still spans ``config.epochs``).
    """
    teacher_meta = _check_before_data(config)
    rank, world_size, device = _init_distributed(config)
    run_dir = RunDir(config.out_dir)
    lock = run_dir.lock() if rank == 0 else contextlib.nullcontext()
    with lock, _StopOnSignals() as stop:
        if rank == 0:
            run_dir.remove_temp_files()
        run = _setup(config, run_dir, rank, world_size, device, teacher_meta, progress)
        position = _restore(run, resume)
        if world_size > 1:
            run.forward = torch.nn.parallel.DistributedDataParallel(
                run.forward, device_ids=[device.index] if device.type == "cuda" else None)
        if position.epoch >= config.epochs:  # already finished: report what the run recorded
            last = dict(position.history[-1]) if position.history else {}
            if run.is_main:  # the first end may have died between its commit and this record
                _report_epoch_end(run, position.epoch, last)
            return last
        end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs,
                                                                         position.epoch + stop_after_epochs)
        metrics: dict[str, Any] = {}
        run_start = time.time()
        for epoch in range(position.epoch, end_epoch):
            epoch_start = time.time()
            sums = _train_epoch(run, position, epoch, stop, progress)
            metrics = _commit_epoch(run, position, epoch, sums, time.time() - epoch_start,
                                    position.wall_before + (time.time() - run_start))
            run_start = time.time()
            if on_epoch_end is not None:
                on_epoch_end(metrics)
        if world_size > 1:
            dist.barrier()
        return metrics
