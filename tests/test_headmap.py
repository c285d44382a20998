"""Head maps: the three granularities, the map syntax, and validation against both models."""

from __future__ import annotations

import pytest

from vitkd.errors import ConfigError, IncompatibleModelsError
from vitkd.headmap import (
    HeadGroup,
    HeadMap,
    HeadPair,
    block_to_block,
    encoder_to_encoder,
    even_head_groups,
    head_to_head,
    parse_head_map,
)


def _pairs(rows: list[tuple[int, int, int, int]]) -> tuple[HeadPair, ...]:
    return tuple(HeadPair(*row) for row in rows)


def test_head_to_head() -> None:
    head_map = head_to_head([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert head_map.pairs == _pairs([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert head_map.teacher_blocks == [5] and head_map.student_blocks == [3]
    assert HeadMap.from_list(head_map.to_list()) == head_map
    assert head_map.describe() == "T5.0->S3.1, T5.2->S3.0"


def test_block_to_block() -> None:
    assert block_to_block([4, 5], [2, 3], 2).pairs == _pairs(
        [(4, 0, 2, 0), (4, 1, 2, 1), (5, 0, 3, 0), (5, 1, 3, 1)])
    assert block_to_block([5], [3], 3, teacher_heads=[6, 0, 2]).pairs == _pairs(
        [(5, 6, 3, 0), (5, 0, 3, 1), (5, 2, 3, 2)])


@pytest.mark.parametrize("t_depth, s_depth, teacher_blocks", [
    (4, 4, [0, 1, 2, 3]),
    (12, 4, [2, 5, 8, 11]),
    (17, 7, [1, 4, 6, 9, 11, 14, 16]),  # round((j + 1) * 17 / 7) - 1
    (6, 1, [5]),
])
def test_encoder_to_encoder(t_depth: int, s_depth: int, teacher_blocks: list[int]) -> None:
    head_map = encoder_to_encoder(t_depth, s_depth, 2)
    expected = [(tb, h, sb, h) for sb, tb in enumerate(teacher_blocks) for h in range(2)]
    assert head_map.pairs == _pairs(expected)


def test_encoder_to_encoder_uneven_is_monotonic_and_ends_aligned() -> None:
    for t_depth in range(1, 18):
        for s_depth in range(1, t_depth + 1):
            blocks = [p.teacher_block for p in encoder_to_encoder(t_depth, s_depth, 1).pairs]
            assert blocks[-1] == t_depth - 1
            assert all(a < b for a, b in zip(blocks[:-1], blocks[1:], strict=True))
            assert all(0 <= b < t_depth for b in blocks)


def test_parse_head_map_all_syntaxes() -> None:
    assert parse_head_map("encoder", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4, num_teacher_heads=8)
    assert parse_head_map("encoder", 6, 4, 4, 4) == encoder_to_encoder(6, 4, 4)
    assert parse_head_map(" encoder[0, 2,4,6] ", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4, [0, 2, 4, 6])
    assert parse_head_map("block:4->2;5->3", 6, 8, 4, 4) == block_to_block([4, 5], [2, 3], 4, num_teacher_heads=8)
    assert parse_head_map("block: 5->3[0,2,4,6]", 6, 8, 4, 4) == block_to_block([5], [3], 4, [0, 2, 4, 6])
    assert parse_head_map("head:5.0->3.1; 5.2->3.0", 6, 8, 4, 4).pairs == _pairs([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert parse_head_map("block:5->3[0,2,4,6];4->2[0,2,4,6]", 6, 8, 4, 4) == block_to_block(
        [5, 4], [3, 2], 4, [0, 2, 4, 6])


def test_parse_head_map_block_list_written_once() -> None:
    expected = block_to_block([5, 4], [3, 2], 4, [0, 2, 4, 6])
    assert parse_head_map("block:4->2;5->3[0,2,4,6]", 6, 8, 4, 4).pairs == tuple(
        sorted(expected.pairs, key=lambda p: p.teacher_block))
    assert parse_head_map("block:5->3[0,2,4,6];4->2", 6, 8, 4, 4) == expected


@pytest.mark.parametrize("spec, error, match", [
    ("block:6->3", ConfigError, "teacher block 6 out of range"),
    ("block:5->4", ConfigError, "student block 4 out of range"),
    ("head:5.8->3.0", ConfigError, "teacher head 8 out of range"),
    ("head:5.0->3.4", ConfigError, "student head 4 out of range"),
    ("head:5.0->3.1;4.0->3.1", ConfigError, "mapped twice"),
    ("block:5->3;4->3", ConfigError, "mapped twice"),
    ("encoder[0,1]", ConfigError, "one teacher head per student head"),
    ("encoder[0,0,1,2]", ConfigError, "repeat"),
    ("block:5->3[0,1,2,3];4->2[3,2,1,0]", ConfigError, "one teacher-head list"),
    ("block:5-3", ConfigError, "bad block pair"),
    ("block:", ConfigError, "no block pairs"),
    ("head:5->3", ConfigError, "bad head pair"),
    ("heads:5.0->3.0", ConfigError, "start with"),
    ("", ConfigError, "start with"),
])
def test_parse_head_map_errors(spec: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_head_map(spec, 6, 8, 4, 4)


def test_map_validation_errors() -> None:
    with pytest.raises(ConfigError, match="student depth 5 exceeds teacher depth 4"):
        encoder_to_encoder(4, 5, 2)
    with pytest.raises(ConfigError, match="as many teacher blocks"):
        block_to_block([1, 2], [0], 2)
    with pytest.raises(ConfigError, match="at least one"):
        head_to_head([])
    with pytest.raises(ConfigError, match="negative"):
        head_to_head([(0, -1, 0, 0)])
    with pytest.raises(ConfigError, match="row must be"):
        HeadMap.from_list([[1, 2, 3]])
    head_map = encoder_to_encoder(6, 4, 4)
    with pytest.raises(IncompatibleModelsError, match="65 tokens and student 17"):
        head_map.validate(6, 8, 4, 4, teacher_tokens=65, student_tokens=17)
    assert head_map.validate(6, 8, 4, 4, teacher_tokens=65, student_tokens=65) is head_map




# ------------------------------------------------------------------------------ many-to-one maps

def _groups_by_loop(n: int, m: int) -> list[list[int]]:
    """Reference: hand the n heads out one by one, the first n mod m groups taking one extra."""
    sizes = [n // m + (1 if j < n % m else 0) for j in range(m)]
    out, head = [], 0
    for size in sizes:
        out.append([head + k for k in range(size)])
        head += size
    return out


def test_even_head_groups() -> None:
    assert even_head_groups(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert even_head_groups(6, 4) == [[0, 1], [2, 3], [4], [5]]
    assert even_head_groups(4, 4) == [[0], [1], [2], [3]]
    assert even_head_groups(12, 1) == [list(range(12))]
    for n in range(1, 13):
        for m in range(1, n + 1):
            assert even_head_groups(n, m) == _groups_by_loop(n, m)
    with pytest.raises(ConfigError, match="head:Tb.Th->Sb.Sh"):
        even_head_groups(4, 8)


def test_block_map_groups_teacher_heads_evenly_by_default() -> None:
    head_map = parse_head_map("block:5->3", 6, 8, 4, 4)
    assert head_map.pairs == _pairs([(5, th, 3, th // 2) for th in range(8)])
    assert head_map.groups == tuple(HeadGroup(5, (2 * sh, 2 * sh + 1), 3, sh) for sh in range(4))
    assert head_map.describe() == "T5.{0,1}->S3.0, T5.{2,3}->S3.1, T5.{4,5}->S3.2, T5.{6,7}->S3.3"
    assert head_map.to_list() == [[5, [0, 1], 3, 0], [5, [2, 3], 3, 1], [5, [4, 5], 3, 2], [5, [6, 7], 3, 3]]
    assert HeadMap.from_list(head_map.to_list()) == head_map
    # an explicit head list keeps today's one-to-one map; equal head counts stay one-to-one
    assert parse_head_map("block:5->3[0,2,4,6]", 6, 8, 4, 4).to_list() == [[5, h, 3, i] for i, h in
                                                                          enumerate((0, 2, 4, 6))]
    assert parse_head_map("block:5->3", 6, 4, 4, 4).to_list() == [[5, h, 3, h] for h in range(4)]
    encoder = parse_head_map("encoder", 6, 8, 4, 4)  # teacher blocks 1, 2, 3, 5
    assert [(g.teacher_block, g.teacher_heads, g.student_block, g.student_head) for g in encoder.groups] == [
        (tb, (2 * sh, 2 * sh + 1), sb, sh) for sb, tb in enumerate((1, 2, 3, 5)) for sh in range(4)]
    uneven = parse_head_map("block:5->3", 6, 6, 4, 4)
    assert [g.teacher_heads for g in uneven.groups] == [(0, 1), (2, 3), (4,), (5,)]
    with pytest.raises(ConfigError, match="student block has 8 heads and the teacher block 4"):
        parse_head_map("block:5->3", 6, 4, 4, 8)


def test_head_syntax_with_groups() -> None:
    head_map = parse_head_map("head:5.{0,1}->3.0; 5.2->3.1; 4.{ 7 ,3}->2.2", 6, 8, 4, 4)
    assert head_map.to_list() == [[5, [0, 1], 3, 0], [5, 2, 3, 1], [4, [7, 3], 2, 2]]
    assert head_map.describe() == "T5.{0,1}->S3.0, T5.2->S3.1, T4.{7,3}->S2.2"
    assert head_map.teacher_blocks == [4, 5] and head_map.student_blocks == [2, 3]
    # one-head pairs with the same student head and teacher block are the same group
    assert parse_head_map("head:5.0->3.0;5.1->3.0", 6, 8, 4, 4) == parse_head_map("head:5.{0,1}->3.0", 6, 8, 4, 4)


def test_group_pairs_are_kept_together_in_first_appearance_order() -> None:
    head_map = head_to_head([(5, 0, 3, 0), (5, 3, 3, 1), (5, 2, 3, 0)])
    assert head_map.pairs == _pairs([(5, 0, 3, 0), (5, 2, 3, 0), (5, 3, 3, 1)])
    assert HeadMap.from_list(head_map.to_list()) == head_map


def test_old_checkpoint_rows_still_load() -> None:
    rows = [[4, 0, 2, 0], [4, 1, 2, 1], [5, 0, 3, 0], [5, 1, 3, 1]]  # the bundled head-to-head student's rows
    head_map = HeadMap.from_list(rows)
    assert head_map.pairs == _pairs([tuple(r) for r in rows])
    assert all(len(g.teacher_heads) == 1 for g in head_map.groups)
    assert head_map.to_list() == rows and head_map.describe() == "T4.0->S2.0, T4.1->S2.1, T5.0->S3.0, T5.1->S3.1"
    # several one-head rows for one student head (a group written row by row) read as the group
    assert HeadMap.from_list([[5, 0, 3, 0], [5, 1, 3, 0]]).to_list() == [[5, [0, 1], 3, 0]]


@pytest.mark.parametrize("spec, match", [
    ("head:5.{0,1}->3.0;4.2->3.0", "student block 3 head 0 is mapped twice, to teacher blocks 5 and 4"),
    ("head:5.{0,0}->3.0", "mapped twice to teacher block 5 head 0"),
    ("head:5.0->3.0;5.0->3.0", "mapped twice to teacher block 5 head 0"),
    ("head:5.{0,8}->3.0", "teacher head 8 out of range"),
    ("head:5.{}->3.0", "bad head pair"),
    ("head:5.{,}->3.0", "empty teacher-head group"),
    ("head:5.{0,1->3.0", "bad head pair"),
])
def test_group_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_head_map(spec, 6, 8, 4, 4)


@pytest.mark.parametrize("rows", [[[5, [], 3, 0]], [[5, [0, "x"], 3, 0]], [[5, [0, 1], 3]], [[5, None, 3, 0]]])
def test_bad_group_rows(rows: list) -> None:
    with pytest.raises(ConfigError, match="row must be"):
        HeadMap.from_list(rows)
