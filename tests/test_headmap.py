"""Head maps: the three granularities, the map syntax, and validation against both models."""

from __future__ import annotations

import pytest

from vitkd.errors import ConfigError, IncompatibleModelsError
from vitkd.headmap import HeadMap, HeadPair, block_to_block, encoder_to_encoder, head_to_head, parse_head_map


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
    assert parse_head_map("encoder", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4)
    assert parse_head_map(" encoder[0, 2,4,6] ", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4, [0, 2, 4, 6])
    assert parse_head_map("block:4->2;5->3", 6, 8, 4, 4) == block_to_block([4, 5], [2, 3], 4)
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


