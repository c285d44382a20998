"""Resampling a teacher's attention onto a student's patch grid, against hand computations,
plain loops and ``torch.nn.functional``'s interpolation and pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkd.attention import TokenLayout
from vitkd.distill import attention_loss
from vitkd.errors import IncompatibleModelsError
from vitkd.resample import (
    axis_resample_matrix,
    grid_resample_matrix,
    resample_attention,
    token_resample_matrix,
)

pytestmark = pytest.mark.timeout(30)

CLS = 1
T8 = TokenLayout(CLS, (8, 8))  # a cifar preset's tokens: CLS + 8x8 patches
S4 = TokenLayout(CLS, (4, 4))  # patch 8 on 32 px: CLS + 4x4 patches


def _token(layout: TokenLayout, y: int, x: int) -> int:
    return layout.num_prefix_tokens + y * layout.grid_size[1] + x


def _random_logits(layout: TokenLayout, b: int = 2, p: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, layout.num_tokens, layout.num_tokens, generator=gen, dtype=torch.float64) * 2


# ------------------------------------------------------------------ the per-axis operator


@pytest.mark.parametrize("src, dst", [(2, 4), (4, 8), (3, 7), (4, 6), (1, 3)])
def test_finer_axis_is_bilinear_like_f_interpolate(src: int, dst: int) -> None:
    images = torch.eye(src, dtype=torch.float64)[:, None, None, :]  # each src cell alone: [src, 1, 1, src]
    reference = F.interpolate(images, size=(1, dst), mode="bilinear", align_corners=False)[:, 0, 0, :]  # [src, dst]
    torch.testing.assert_close(axis_resample_matrix(src, dst), reference.T)


@pytest.mark.parametrize("src, dst", [(8, 4), (14, 7), (8, 1), (6, 2)])
def test_coarser_axis_dividing_evenly_is_avg_pool(src: int, dst: int) -> None:
    images = torch.eye(src, dtype=torch.float64)[:, None, None, :]
    reference = F.avg_pool1d(images[:, 0], kernel_size=src // dst)[:, 0, :]
    torch.testing.assert_close(axis_resample_matrix(src, dst), reference.T)


def test_coarser_axis_not_dividing_splits_a_straddling_cell_by_length() -> None:
    # 3 -> 2: student cell 0 covers [0, 1.5), cell 1 covers [1.5, 3), each 1.5 cells long
    torch.testing.assert_close(axis_resample_matrix(3, 2), torch.tensor([[1 / 1.5, 0.5 / 1.5, 0.0],
                                                                          [0.0, 0.5 / 1.5, 1 / 1.5]],
                                                                         dtype=torch.float64))
    # 8 -> 3 by a loop over covered lengths; every teacher cell keeps some weight (bilinear would skip 2 and 5)
    w = axis_resample_matrix(8, 3)
    length = 8 / 3
    for j in range(3):
        for i in range(8):
            covered = max(0.0, min((j + 1) * length, i + 1) - max(j * length, i))
            assert w[j, i].item() == pytest.approx(covered / length)
    assert (w.sum(0) > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))


def test_grid_matrix_is_separable_on_the_row_major_grid() -> None:
    image = torch.randn(8, 6, dtype=torch.float64)
    out = (grid_resample_matrix((8, 6), (4, 9)) @ image.flatten()).reshape(4, 9)
    torch.testing.assert_close(out, axis_resample_matrix(8, 4) @ image @ axis_resample_matrix(6, 9).T)
    # 2-D pooling and interpolation from torch agree on the whole grid
    torch.testing.assert_close((grid_resample_matrix((8, 8), (4, 4)) @ image[:, :4].repeat(1, 2).flatten()),
                               F.avg_pool2d(image[:, :4].repeat(1, 2)[None, None], 2).flatten())
    small = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(grid_resample_matrix((3, 4), (6, 8)) @ small.flatten(),
                               F.interpolate(small[None, None], size=(6, 8), mode="bilinear",
                                             align_corners=False).flatten())


# ------------------------------------------------------------------ attention maps


@pytest.mark.parametrize("kind", ["mse", "ce", "kl"])
def test_same_grid_is_the_identity(kind: str) -> None:
    logits = _random_logits(T8)
    assert resample_attention(logits, T8, T8, kind) is logits
    # the operator itself is the identity too
    torch.testing.assert_close(token_resample_matrix(T8, T8), torch.eye(T8.num_tokens, dtype=torch.float64))


def test_uniform_attention_stays_uniform() -> None:
    plain_t, plain_s = TokenLayout(0, (8, 8)), TokenLayout(0, (4, 4))
    out = resample_attention(torch.zeros(1, 1, 64, 64), plain_t, plain_s, "kl").exp()
    torch.testing.assert_close(out, torch.full((1, 1, 16, 16), 1 / 16))
    # with a CLS token: it keeps its 1/65, the 64/65 on patches spread evenly over the 16 student patches
    out = resample_attention(torch.zeros(1, 1, 65, 65), T8, S4, "ce").exp()
    expected = torch.cat([torch.full((1, 1, 17, 1), 1 / 65), torch.full((1, 1, 17, 16), 4 / 65)], dim=-1)
    torch.testing.assert_close(out, expected)
    # and the logits of a uniform map stay constant under the MSE resampling
    torch.testing.assert_close(resample_attention(torch.full((1, 1, 65, 65), 0.7), T8, S4, "mse"),
                               torch.full((1, 1, 17, 17), 0.7))


def _one_hot_rows(layout: TokenLayout, targets: dict[int, int], default: int) -> torch.Tensor:
    """Logits whose softmax puts all mass on ``targets[query]`` (else ``default``) for each query token."""
    t = layout.num_tokens
    logits = torch.full((1, 1, t, t), -1e4, dtype=torch.float64)
    for q in range(t):
        logits[0, 0, q, targets.get(q, default)] = 0.0
    return logits


def test_one_hot_key_gives_the_area_weighted_result_by_hand() -> None:
    # Teacher patch query (2, 2) looks only at teacher patch (3, 5); every other query looks at CLS.
    # 8x8 -> 4x4: student query cell (1, 1) averages teacher queries (2..3, 2..3): 1 of 4 looks at the patch,
    # whose key falls in student cell (1, 2). So that row is CLS 3/4, patch (1, 2) 1/4; every other row CLS 1.
    logits = _one_hot_rows(T8, {_token(T8, 2, 2): _token(T8, 3, 5)}, default=0)
    probs = resample_attention(logits, T8, S4, "kl").exp()[0, 0]
    expected = torch.zeros(17, 17, dtype=torch.float64)
    expected[:, 0] = 1.0
    expected[_token(S4, 1, 1), 0] = 0.75
    expected[_token(S4, 1, 1), _token(S4, 1, 2)] = 0.25
    torch.testing.assert_close(probs, expected, atol=1e-12, rtol=0)


def test_one_hot_key_on_a_straddling_cell_splits_by_covered_length() -> None:
    # 8x8 -> 3x3 (no even division): the CLS row looks only at teacher patch (0, 2). Along x, teacher cell 2
    # ([2, 3)) lies 2/3 in student cell 0 ([0, 8/3)) and 1/3 in cell 1; along y, teacher row 0 is in cell 0.
    s3 = TokenLayout(CLS, (3, 3))
    logits = _one_hot_rows(T8, {0: _token(T8, 0, 2)}, default=0)
    probs = resample_attention(logits, T8, s3, "kl").exp()[0, 0]
    expected_cls_row = torch.zeros(10, dtype=torch.float64)
    expected_cls_row[_token(s3, 0, 0)], expected_cls_row[_token(s3, 0, 1)] = 2 / 3, 1 / 3
    torch.testing.assert_close(probs[0], expected_cls_row, atol=1e-12, rtol=0)


def test_one_hot_key_bilinear_onto_a_finer_grid_by_hand() -> None:
    # 2x2 -> 4x4, the CLS row looks only at teacher patch (0, 0). Bilinear weights of teacher cell 0 along
    # one axis (half-pixel centres 0, 0.25, 0.75, 1.25 clamped): [1, 0.75, 0.25, 0]; the 2-D weights are
    # their outer product (sum 4), so the row's mass 1 spreads as outer / 4.
    t2, s4 = TokenLayout(CLS, (2, 2)), TokenLayout(CLS, (4, 4))
    logits = _one_hot_rows(t2, {0: _token(t2, 0, 0)}, default=0)
    probs = resample_attention(logits, t2, s4, "ce").exp()[0, 0]
    axis = torch.tensor([1.0, 0.75, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(probs[0, 1:], (torch.outer(axis, axis) / 4).flatten(), atol=1e-12, rtol=0)
    assert probs[0, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_two_by_two_onto_one_by_one_by_hand() -> None:
    # Tokens: teacher [CLS, p00, p01, p10, p11], student [CLS, p].
    probs = torch.tensor([[0.2, 0.1, 0.3, 0.4, 0.0],
                          [0.5, 0.5, 0.0, 0.0, 0.0],
                          [0.1, 0.2, 0.3, 0.2, 0.2],
                          [0.3, 0.0, 0.0, 0.0, 0.7],
                          [0.1, 0.6, 0.1, 0.1, 0.1]], dtype=torch.float64)
    out = resample_attention(probs.log()[None, None], TokenLayout(1, (2, 2)), TokenLayout(1, (1, 1)), "kl")
    # CLS row: CLS keeps 0.2, the one student patch gets all of the teacher's patch mass, 0.8.
    # patch row: mean of the four patch rows, CLS = (0.5 + 0.1 + 0.3 + 0.1) / 4 = 0.25, patch 0.75.
    torch.testing.assert_close(out.exp()[0, 0], torch.tensor([[0.2, 0.8], [0.25, 0.75]], dtype=torch.float64))
    # MSE on logits: CLS-CLS kept, CLS row's patch keys averaged, patch rows averaged, patch block 16-mean
    logits = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)
    mse = resample_attention(logits, TokenLayout(1, (2, 2)), TokenLayout(1, (1, 1)), "mse")[0, 0]
    torch.testing.assert_close(mse, torch.tensor([[0.0, (1 + 2 + 3 + 4) / 4],
                                                  [(5 + 10 + 15 + 20) / 4, sum(5 * r + c for r in range(1, 5)
                                                                               for c in range(1, 5)) / 16]],
                                                 dtype=torch.float64))


def test_prefix_rows_and_columns_are_kept() -> None:
    t, s = TokenLayout(2, (8, 8)), TokenLayout(2, (4, 4))  # CLS + a register token
    logits = _random_logits(t, b=1, p=1)
    probs = logits.softmax(-1)[0, 0]
    out = resample_attention(logits, t, s, "kl").exp()[0, 0]
    r = grid_resample_matrix((8, 8), (4, 4))
    torch.testing.assert_close(out[:2, :2], probs[:2, :2])  # prefix x prefix untouched
    # prefix rows: patch keys resampled along keys only: each student key sums its four teacher keys
    torch.testing.assert_close(out[:2, 2:], probs[:2, 2:] @ (4 * r).T)
    # prefix columns: resampled along queries only (mean of the four teacher query rows)
    torch.testing.assert_close(out[2:, :2], r @ probs[2:, :2])
    mse = resample_attention(logits, t, s, "mse")[0, 0]
    torch.testing.assert_close(mse[:2, :2], logits[0, 0, :2, :2])
    torch.testing.assert_close(mse[:2, 2:], logits[0, 0, :2, 2:] @ r.T)
    torch.testing.assert_close(mse[2:, :2], r @ logits[0, 0, 2:, :2])


@pytest.mark.parametrize("t_grid, s_grid", [((8, 8), (4, 4)), ((8, 8), (3, 3)), ((4, 4), (8, 8)), ((8, 6), (4, 9)),
                                            ((14, 14), (7, 7))])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_rows_are_distributions_the_loss_gives_back_unchanged(t_grid, s_grid, kind: str) -> None:
    t, s = TokenLayout(CLS, t_grid), TokenLayout(CLS, s_grid)
    out = resample_attention(_random_logits(t), t, s, kind)
    assert out.shape == (2, 3, s.num_tokens, s.num_tokens) and out.dtype == torch.float64
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3, s.num_tokens, dtype=torch.float64))
    torch.testing.assert_close(F.log_softmax(out, -1), out)  # what attention_loss's softmax sees


def test_probabilities_match_a_loop_reference() -> None:
    """Each student entry from the teacher's probabilities, entry by entry with plain Python loops."""
    t, s = TokenLayout(CLS, (4, 4)), TokenLayout(CLS, (3, 2))
    logits = _random_logits(t, b=1, p=1, seed=3)
    probs = logits.softmax(-1)[0, 0].tolist()
    wy, wx = axis_resample_matrix(4, 3).tolist(), axis_resample_matrix(4, 2).tolist()

    def weight(student_token: int, teacher_token: int) -> float:  # Q: identity on CLS, R on patches
        if student_token == 0 or teacher_token == 0:
            return float(student_token == teacher_token)
        (sy, sx), (ty, tx) = divmod(student_token - 1, 2), divmod(teacher_token - 1, 4)
        return wy[sy][ty] * wx[sx][tx]

    expected = []
    for a in range(s.num_tokens):
        row = [sum(weight(a, i) * probs[i][k] for i in range(t.num_tokens)) for k in range(t.num_tokens)]
        keys = [sum(weight(b, k) * row[k] for k in range(1, t.num_tokens)) for b in range(1, s.num_tokens)]
        mass = sum(row[1:])
        expected.append([row[0]] + [v * mass / sum(keys) for v in keys])
    out = resample_attention(logits, t, s, "kl").exp()[0, 0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_mse_resamples_logits_linearly_like_a_loop() -> None:
    t, s = TokenLayout(CLS, (4, 4)), TokenLayout(CLS, (2, 3))
    logits = _random_logits(t, b=1, p=1, seed=5)
    q = token_resample_matrix(t, s).tolist()
    x = logits[0, 0].tolist()
    expected = [[sum(q[a][i] * q[b][j] * x[i][j] for i in range(t.num_tokens) for j in range(t.num_tokens))
                 for b in range(s.num_tokens)] for a in range(s.num_tokens)]
    torch.testing.assert_close(resample_attention(logits, t, s, "mse")[0, 0], torch.tensor(expected,
                                                                                           dtype=torch.float64))


def test_mse_leaves_masked_teacher_keys_out_of_the_means() -> None:
    """An LSA teacher (diagonal at -inf): each entry is the weighted mean of the finite logits it covers."""
    t, s = TokenLayout(CLS, (4, 4)), TokenLayout(CLS, (2, 2))
    logits = _random_logits(t, b=1, p=1, seed=7)
    logits[0, 0].fill_diagonal_(-math.inf)
    out = resample_attention(logits, t, s, "mse")[0, 0]
    q = token_resample_matrix(t, s)
    x = logits[0, 0]
    for a in range(s.num_tokens):
        for b in range(s.num_tokens):
            num = den = 0.0
            for i in range(t.num_tokens):
                for j in range(t.num_tokens):
                    w = q[a, i].item() * q[b, j].item()
                    if w > 0 and math.isfinite(x[i, j].item()):
                        num, den = num + w * x[i, j].item(), den + w
            expected = num / den if den > 0 else -math.inf
            assert out[a, b].item() == pytest.approx(expected), (a, b)
    assert out[0, 0].item() == -math.inf and torch.isfinite(out[1:, 1:]).all()  # only CLS-CLS is all masked
    # the probability path needs no special case: -inf is probability 0
    assert torch.isfinite(resample_attention(logits, t, s, "kl").exp()).all()


@pytest.mark.parametrize("kind", ["mse", "ce", "kl"])
def test_gradients_reach_the_student_only(kind: str) -> None:
    teacher = _random_logits(T8, seed=1).float().requires_grad_(True)
    student = torch.randn(2, 3, 17, 17, requires_grad=True)
    target = resample_attention(teacher, T8, S4, kind)
    assert not target.requires_grad  # a fixed target, computed without gradient
    attention_loss(student, target, kind).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_float32_and_bf16_inputs_resample_in_float32() -> None:
    logits = _random_logits(T8, seed=2)
    ref = resample_attention(logits, T8, S4, "kl")
    for dtype in (torch.float32, torch.bfloat16):
        out = resample_attention(logits.to(dtype), T8, S4, "kl")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.01)
    # under bf16 autocast (--bf16) the matmuls stay float32: same values as without autocast
    for kind in ("mse", "kl"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = resample_attention(logits.float(), T8, S4, kind)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, resample_attention(logits.float(), T8, S4, kind))


def test_a_prebuilt_matrix_gives_the_same_result() -> None:
    logits = _random_logits(T8, seed=4)
    for kind in ("mse", "kl"):
        torch.testing.assert_close(resample_attention(logits, T8, S4, kind, matrix=token_resample_matrix(T8, S4)),
                                   resample_attention(logits, T8, S4, kind))


def test_refuses_what_cannot_be_resampled() -> None:
    with pytest.raises(IncompatibleModelsError, match="1 prefix token.*student's 2"):
        resample_attention(_random_logits(T8), T8, TokenLayout(2, (4, 4)), "kl")
    with pytest.raises(IncompatibleModelsError, match="do not match the teacher's 17 tokens"):
        resample_attention(_random_logits(T8), S4, T8, "kl")
    with pytest.raises(ValueError, match="unknown attention loss"):
        resample_attention(_random_logits(T8), T8, S4, "l1")
