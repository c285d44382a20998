"""Head maps: which teacher head teaches which student head, for the three granularities.

Its own module because the app, the scan and the checkpoints read head maps without
needing the distillation losses.

A student head follows one teacher head, or a group of heads of one teacher block (many-to-one:
it follows the group's mean attention, ``vitkd.distill.gather_heads``). A group is stored as
several ``HeadPair``s with the same student head; ``HeadMap.groups`` gives one ``HeadGroup`` per
student head. Block maps between blocks with different head counts group the teacher's heads
evenly by default (8 teacher heads -> 4 student heads: {0,1}->0, {2,3}->1, ...).

Checkpoints store one row per student head: ``[teacher_block, teacher_head, student_block,
student_head]``, or ``[teacher_block, [teacher_head, ...], student_block, student_head]`` for a
group. Rows written before groups existed load unchanged, and so do several one-head rows with
the same student head (read as one group).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, IncompatibleModelsError

__all__ = ["HeadPair", "HeadGroup", "HeadMap", "head_to_head", "block_to_block", "encoder_to_encoder",
           "even_head_groups", "parse_head_map"]


@dataclass(frozen=True)
class HeadPair:
    """Head ``teacher_head`` of teacher block ``teacher_block`` teaches ``student_head`` of ``student_block``."""

    teacher_block: int
    teacher_head: int
    student_block: int
    student_head: int


@dataclass(frozen=True)
class HeadGroup:
    """Head ``student_head`` of student block ``student_block`` follows the mean of ``teacher_heads`` of
    teacher block ``teacher_block`` (one head: a plain one-to-one pair)."""

    teacher_block: int
    teacher_heads: tuple[int, ...]
    student_block: int
    student_head: int


@dataclass(frozen=True)
class HeadMap:
    """An ordered, declarative list of ``HeadPair``; stored in the student's checkpoint as JSON.

    A student head may appear in several pairs only as a group: every pair from the same teacher
    block, each teacher head once. The pairs of a group are kept together, where the group's
    student head first appears (so ``to_list``/``from_list`` round-trip the order).
    """

    pairs: tuple[HeadPair, ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("a head map needs at least one (teacher head -> student head) pair")
        groups: dict[tuple[int, int], list[HeadPair]] = {}
        for p in self.pairs:
            if min(p.teacher_block, p.teacher_head, p.student_block, p.student_head) < 0:
                raise ConfigError(f"negative index in {p}")
            key = (p.student_block, p.student_head)
            group = groups.setdefault(key, [])
            if group and group[0].teacher_block != p.teacher_block:
                raise ConfigError(f"student block {key[0]} head {key[1]} is mapped twice, to teacher blocks "
                                  f"{group[0].teacher_block} and {p.teacher_block}; a student head follows one "
                                  "teacher head or a group of heads of one teacher block")
            if any(q.teacher_head == p.teacher_head for q in group):
                raise ConfigError(f"student block {key[0]} head {key[1]} is mapped twice to teacher block "
                                  f"{p.teacher_block} head {p.teacher_head}")
            group.append(p)
        object.__setattr__(self, "pairs", tuple(p for group in groups.values() for p in group))

    @property
    def groups(self) -> tuple[HeadGroup, ...]:
        """One ``HeadGroup`` per mapped student head, in pair order."""
        out: dict[tuple[int, int], HeadGroup] = {}
        for p in self.pairs:
            key = (p.student_block, p.student_head)
            heads = out[key].teacher_heads if key in out else ()
            out[key] = HeadGroup(p.teacher_block, (*heads, p.teacher_head), p.student_block, p.student_head)
        return tuple(out.values())

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

    def to_list(self) -> list[list[Any]]:
        """One row per student head: ``[tb, th, sb, sh]``, or ``[tb, [th, ...], sb, sh]`` for a group."""
        return [[g.teacher_block, g.teacher_heads[0] if len(g.teacher_heads) == 1 else list(g.teacher_heads),
                 g.student_block, g.student_head] for g in self.groups]

    @classmethod
    def from_list(cls, rows: Iterable[Sequence[Any]]) -> HeadMap:
        """Read ``to_list``'s rows (and one-head rows, several of them with one student head forming a group)."""
        pairs = []
        for row in rows:
            try:
                tb, th, sb, sh = row
                heads = th if isinstance(th, list | tuple) else [th]
                if not heads:
                    raise ValueError("an empty teacher-head group")
                pairs.extend(HeadPair(int(tb), int(h), int(sb), int(sh)) for h in heads)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"a head map row must be [teacher_block, teacher_head, student_block, "
                                  f"student_head] (teacher_head an index or a list of indices), got {row!r}: "
                                  f"{exc}") from exc
        return cls(tuple(pairs))

    def describe(self) -> str:
        """``T5.0->S3.1, T5.{2,3}->S3.0``: the ``head:`` syntax, one entry per student head."""
        return ", ".join(f"T{g.teacher_block}.{_heads_text(g.teacher_heads)}->S{g.student_block}.{g.student_head}"
                         for g in self.groups)


def _heads_text(heads: tuple[int, ...]) -> str:
    return str(heads[0]) if len(heads) == 1 else "{" + ",".join(str(h) for h in heads) + "}"


def head_to_head(pairs: Iterable[Sequence[Any]]) -> HeadMap:
    """Explicit (teacher_block, teacher_head, student_block, student_head) rows; ``teacher_head`` may be a
    list of heads of that block (a group whose mean attention the student head follows)."""
    return HeadMap.from_list(pairs)


def even_head_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Teacher heads split into ``num_student_heads`` contiguous groups, in order, sizes differing by at most 1.

    8 -> 4: ``[[0, 1], [2, 3], [4, 5], [6, 7]]``; 6 -> 4: ``[[0, 1], [2, 3], [4], [5]]`` (the first
    ``n mod m`` groups get one head more). Refuses a student with more heads than the teacher.
    """
    n, m = num_teacher_heads, num_student_heads
    if m < 1 or n < 1:
        raise ConfigError(f"head counts must be positive, got {n} teacher and {m} student heads")
    if m > n:
        raise ConfigError(f"the student block has {m} heads and the teacher block {n}: teacher heads cannot be "
                          "grouped onto more student heads; map heads one by one with 'head:Tb.Th->Sb.Sh;...'")
    size, extra = divmod(n, m)
    bounds = [j * size + min(j, extra) for j in range(m + 1)]
    return [list(range(bounds[j], bounds[j + 1])) for j in range(m)]


def block_to_block(teacher_blocks: Sequence[int], student_blocks: Sequence[int], num_student_heads: int,
                   teacher_heads: Sequence[int] | None = None, num_teacher_heads: int | None = None) -> HeadMap:
    """All ``m`` heads of student block ``student_blocks[j]`` follow teacher block ``teacher_blocks[j]``.

    ``teacher_heads`` picks one teacher head per student head (in student-head order). Without
    it, a teacher with ``num_teacher_heads == m`` (or ``None``: taken as ``m``) teaches head to
    head (``i -> i``); with ``n != m`` heads its heads are grouped evenly (``even_head_groups``)
    and student head ``j`` follows the mean of group ``j`` (8 -> 4: {0,1}->0, {2,3}->1, ...).
    """
    if len(teacher_blocks) != len(student_blocks):
        raise ConfigError(f"block_to_block needs as many teacher blocks as student blocks, got "
                          f"{list(teacher_blocks)} and {list(student_blocks)}")
    if teacher_heads is not None:
        heads = [int(h) for h in teacher_heads]
        if len(heads) != num_student_heads:
            raise ConfigError(f"block_to_block needs one teacher head per student head ({num_student_heads}), "
                              f"got {heads}")
        if len(set(heads)) != len(heads):
            raise ConfigError(f"teacher heads {heads} repeat a head")
        groups = [[h] for h in heads]
    elif num_teacher_heads is None or num_teacher_heads == num_student_heads:
        groups = [[h] for h in range(num_student_heads)]
    else:
        groups = even_head_groups(num_teacher_heads, num_student_heads)
    return HeadMap(tuple(HeadPair(int(t), th, int(s), sh)
                         for t, s in zip(teacher_blocks, student_blocks, strict=True)
                         for sh, group in enumerate(groups) for th in group))


def encoder_to_encoder(teacher_depth: int, student_depth: int, num_student_heads: int,
                       teacher_heads: Sequence[int] | None = None, num_teacher_heads: int | None = None) -> HeadMap:
    """Every student block follows a teacher block, spaced uniformly (last follows last) when depths differ.

    Heads as in ``block_to_block``: one-to-one, or grouped evenly when the head counts differ.
    """
    if student_depth > teacher_depth:
        raise ConfigError(f"student depth {student_depth} exceeds teacher depth {teacher_depth}")
    teacher_blocks = [round((j + 1) * teacher_depth / student_depth) - 1 for j in range(student_depth)]
    return block_to_block(teacher_blocks, list(range(student_depth)), num_student_heads, teacher_heads,
                          num_teacher_heads)


_PAIR_RE = re.compile(r"^\s*(\d+)\.(?:(\d+)|\{([\d,\s]+)\})\s*->\s*(\d+)\.(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*(\d+)\s*->\s*(\d+)\s*(?:\[([\d,\s]+)\])?\s*$")


def parse_head_map(spec: str, teacher_depth: int, teacher_heads: int, student_depth: int,
                   student_heads: int) -> HeadMap:
    """Parse the CLI/app form of a head map and validate it against both models.

    - ``encoder`` or ``encoder[0,2,4,6]``: encoder-to-encoder (optionally choosing teacher heads);
    - ``block:5->3;4->2`` or ``block:5->3[0,2,4,6]``: block-to-block;
    - ``head:5.0->3.1;5.2->3.0``: head-to-head (teacher block.head -> student block.head);
      ``head:5.{0,1}->3.0``: student head 3.0 follows the mean of teacher heads 0 and 1 of block 5.

    Without a head list, blocks with different head counts group the teacher's heads evenly
    (``block_to_block``); with one, each student head follows the listed head.
    """
    spec = spec.strip()
    kind, _, body = spec.partition(":")
    kind = kind.strip().lower()
    if kind.startswith("encoder"):
        m = re.fullmatch(r"encoder(?:\[([\d,\s]+)\])?", kind + (":" + body if body else ""))
        if m is None:
            raise ConfigError(f"bad head map {spec!r}: expected 'encoder' or 'encoder[h0,h1,...]'")
        heads = [int(h) for h in m.group(1).split(",")] if m.group(1) else None
        head_map = encoder_to_encoder(teacher_depth, student_depth, student_heads, heads, teacher_heads)
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
        head_map = block_to_block(t_blocks, s_blocks, student_heads, heads_seen, teacher_heads)
    elif kind == "head":
        rows = []
        for part in filter(None, (p.strip() for p in body.split(";"))):
            m = _PAIR_RE.match(part)
            if m is None:
                raise ConfigError(f"bad head pair {part!r} in {spec!r}: expected 'Tblock.Thead->Sblock.Shead' or "
                                  "'Tblock.{Th0,Th1,...}->Sblock.Shead'")
            t_block, t_head, t_group, s_block, s_head = m.groups()
            heads = [int(t_head)] if t_head is not None else [int(h) for h in t_group.split(",") if h.strip()]
            rows.append([int(t_block), heads, int(s_block), int(s_head)])
        head_map = head_to_head(rows)
    else:
        raise ConfigError(f"bad head map {spec!r}: start with 'encoder', 'block:' or 'head:'")
    return head_map.validate(teacher_depth, teacher_heads, student_depth, student_heads)
