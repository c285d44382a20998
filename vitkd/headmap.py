"""Head maps: which teacher head teaches which student head, for the three granularities.

Its own module because the app, the scan and the checkpoints read head maps without
needing the distillation losses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError, IncompatibleModelsError

__all__ = ["HeadPair", "HeadMap", "head_to_head", "block_to_block", "encoder_to_encoder", "parse_head_map"]


@dataclass(frozen=True)
class HeadPair:
    """Head ``teacher_head`` of teacher block ``teacher_block`` teaches ``student_head`` of ``student_block``."""

    teacher_block: int
    teacher_head: int
    student_block: int
    student_head: int


@dataclass(frozen=True)
class HeadMap:
    """An ordered, declarative list of ``HeadPair``; stored in the student's checkpoint as JSON."""

    pairs: tuple[HeadPair, ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("a head map needs at least one (teacher head -> student head) pair")
        seen: set[tuple[int, int]] = set()
        for p in self.pairs:
            if min(p.teacher_block, p.teacher_head, p.student_block, p.student_head) < 0:
                raise ConfigError(f"negative index in {p}")
            key = (p.student_block, p.student_head)
            if key in seen:
                raise ConfigError(f"student block {key[0]} head {key[1]} is mapped twice; each student head "
                                  "follows at most one teacher head")
            seen.add(key)

    @property
    def teacher_blocks(self) -> list[int]:
        return sorted({p.teacher_block for p in self.pairs})

    @property
    def student_blocks(self) -> list[int]:
        return sorted({p.student_block for p in self.pairs})

    def validate(self, teacher_depth: int, teacher_heads: int, student_depth: int, student_heads: int,
                 teacher_tokens: int | None = None, student_tokens: int | None = None) -> HeadMap:
        """Check every index against the two models; raise ``ConfigError`` naming the first bad pair."""
        if teacher_tokens is not None and student_tokens is not None and teacher_tokens != student_tokens:
            raise IncompatibleModelsError(
                f"teacher has {teacher_tokens} tokens and student {student_tokens}; attention maps can only be "
                "distilled between models with the same patch grid and prefix tokens")
        for p in self.pairs:
            for what, value, limit in (("teacher block", p.teacher_block, teacher_depth),
                                       ("teacher head", p.teacher_head, teacher_heads),
                                       ("student block", p.student_block, student_depth),
                                       ("student head", p.student_head, student_heads)):
                if value >= limit:
                    raise ConfigError(f"{what} {value} out of range in {p}: the model has {limit} (0-based)")
        return self

    def to_list(self) -> list[list[int]]:
        return [[p.teacher_block, p.teacher_head, p.student_block, p.student_head] for p in self.pairs]

    @classmethod
    def from_list(cls, rows: Iterable[Sequence[int]]) -> HeadMap:
        try:
            return cls(tuple(HeadPair(*(int(v) for v in row)) for row in rows))
        except TypeError as exc:
            raise ConfigError(f"a head map row must be [teacher_block, teacher_head, student_block, "
                              f"student_head]: {exc}") from exc

    def describe(self) -> str:
        return ", ".join(f"T{p.teacher_block}.{p.teacher_head}->S{p.student_block}.{p.student_head}"
                         for p in self.pairs)


def head_to_head(pairs: Iterable[Sequence[int]]) -> HeadMap:
    """Explicit (teacher_block, teacher_head, student_block, student_head) pairs."""
    return HeadMap.from_list(pairs)


def block_to_block(teacher_blocks: Sequence[int], student_blocks: Sequence[int], num_student_heads: int,
                   teacher_heads: Sequence[int] | None = None) -> HeadMap:
    """All ``m`` heads of student block ``student_blocks[j]`` follow ``m`` heads of teacher block ``teacher_blocks[j]``.

    ``teacher_heads`` picks which teacher heads (in student-head order); default the first ``m``.
    """
    if len(teacher_blocks) != len(student_blocks):
        raise ConfigError(f"block_to_block needs as many teacher blocks as student blocks, got "
                          f"{list(teacher_blocks)} and {list(student_blocks)}")
    heads = list(range(num_student_heads)) if teacher_heads is None else [int(h) for h in teacher_heads]
    if len(heads) != num_student_heads:
        raise ConfigError(f"block_to_block needs one teacher head per student head ({num_student_heads}), "
                          f"got {heads}")
    if len(set(heads)) != len(heads):
        raise ConfigError(f"teacher heads {heads} repeat a head")
    return HeadMap(tuple(HeadPair(int(t), th, int(s), sh)
                         for t, s in zip(teacher_blocks, student_blocks, strict=True) for sh, th in enumerate(heads)))


def encoder_to_encoder(teacher_depth: int, student_depth: int, num_student_heads: int,
                       teacher_heads: Sequence[int] | None = None) -> HeadMap:
    """Every student block follows a teacher block, spaced uniformly (last follows last) when depths differ."""
    if student_depth > teacher_depth:
        raise ConfigError(f"student depth {student_depth} exceeds teacher depth {teacher_depth}")
    teacher_blocks = [round((j + 1) * teacher_depth / student_depth) - 1 for j in range(student_depth)]
    return block_to_block(teacher_blocks, list(range(student_depth)), num_student_heads, teacher_heads)


_PAIR_RE = re.compile(r"^\s*(\d+)\.(\d+)\s*->\s*(\d+)\.(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*(\d+)\s*->\s*(\d+)\s*(?:\[([\d,\s]+)\])?\s*$")


def parse_head_map(spec: str, teacher_depth: int, teacher_heads: int, student_depth: int,
                   student_heads: int) -> HeadMap:
    """Parse the CLI/app form of a head map and validate it against both models.

    - ``encoder`` or ``encoder[0,2,4,6]``: encoder-to-encoder (optionally choosing teacher heads);
    - ``block:5->3;4->2`` or ``block:5->3[0,2,4,6]``: block-to-block;
    - ``head:5.0->3.1;5.2->3.0``: head-to-head (teacher block.head -> student block.head).
    """
    spec = spec.strip()
    kind, _, body = spec.partition(":")
    kind = kind.strip().lower()
    if kind.startswith("encoder"):
        m = re.fullmatch(r"encoder(?:\[([\d,\s]+)\])?", kind + (":" + body if body else ""))
        if m is None:
            raise ConfigError(f"bad head map {spec!r}: expected 'encoder' or 'encoder[h0,h1,...]'")
        heads = [int(h) for h in m.group(1).split(",")] if m.group(1) else None
        head_map = encoder_to_encoder(teacher_depth, student_depth, student_heads, heads)
    elif kind == "block":
        t_blocks, s_blocks, heads_seen = [], [], None
        for part in filter(None, (p.strip() for p in body.split(";"))):
            m = _BLOCK_RE.match(part)
            if m is None:
                raise ConfigError(f"bad block pair {part!r} in {spec!r}: expected 'T->S' or 'T->S[h0,h1,...]'")
            t_blocks.append(int(m.group(1)))
            s_blocks.append(int(m.group(2)))
            heads = [int(h) for h in m.group(3).split(",")] if m.group(3) else None
            if heads is not None:  # one teacher-head list, written on any one pair, applies to all
                if heads_seen is not None and heads != heads_seen:
                    raise ConfigError(f"{spec!r}: give one teacher-head list for all block pairs")
                heads_seen = heads
        if not t_blocks:
            raise ConfigError(f"bad head map {spec!r}: no block pairs after 'block:'")
        head_map = block_to_block(t_blocks, s_blocks, student_heads, heads_seen)
    elif kind == "head":
        rows = []
        for part in filter(None, (p.strip() for p in body.split(";"))):
            m = _PAIR_RE.match(part)
            if m is None:
                raise ConfigError(f"bad head pair {part!r} in {spec!r}: expected 'Tblock.Thead->Sblock.Shead'")
            rows.append([int(g) for g in m.groups()])
        head_map = head_to_head(rows)
    else:
        raise ConfigError(f"bad head map {spec!r}: start with 'encoder', 'block:' or 'head:'")
    return head_map.validate(teacher_depth, teacher_heads, student_depth, student_heads)
