"""kernels/cpu/argmax.py equals torch.argmax: first maximum on ties, first NaN, -inf rows, strides."""

from __future__ import annotations

import pytest
import torch

from batonserve.kernels.cpu import argmax as am

pytestmark = pytest.mark.skipif(am._library() is None, reason="no C compiler for the CPU kernel")


def test_matches_torch_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1001, generator=g)
    x[1, 5] = x[1, 900] = 100.0  # tie: the first wins
    x[2] = float("-inf")  # all -inf: index 0
    x[3, 7] = float("nan")  # a NaN is the maximum, as in torch
    x[4, 0] = float("nan")
    x[4, 3] = float("nan")
    x[5, 1000] = 1e30  # the last column
    torch.testing.assert_close(am.argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
    wide = torch.randn(6, 64, generator=g)[:, 5:40]  # rows with a stride larger than the width
    torch.testing.assert_close(am.argmax_rows(wide), wide.argmax(dim=-1), rtol=0, atol=0)


def test_other_dtypes_fall_back_to_torch() -> None:
    x = torch.randn(3, 50).bfloat16()
    torch.testing.assert_close(am.argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
