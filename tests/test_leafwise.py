"""``nytorch/_leafwise.py``: the per-leaf rules every operation shares."""
import pytest
import torch

from nytorch import _scalars as scalars


def _never_called() -> list[str]:
    raise AssertionError("the names are read only when a leaf has to be checked")


def test_check_scalar_lets_real_numbers_pass_without_reading_names() -> None:
    leaves = [torch.zeros(2), torch.zeros(1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)]
    for scalar in (True, 3, 0.5):
        scalars.check_scalar("add", scalar, _never_called, leaves, [True, True, False])


def test_check_scalar_judges_complex_leaves_one_by_one() -> None:
    leaves = [torch.zeros(2), torch.zeros(2, dtype=torch.complex64)]
    scalars.check_scalar("mul", 0.5, ["w", "z"], leaves, [True, True])  # a real number keeps complex64
    scalars.check_scalar("mul", 1j, ["w", "z"], leaves, [False, True])  # the float leaf takes no part
    with pytest.raises(TypeError, match=r"mul: the scalar 1j would turn parameter 'w' \(shape \(2,\) float32\) "
                                        r"into complex64"):
        scalars.check_scalar("mul", 1j, ["w", "z"], leaves, [True, True])


def test_check_scalar_judges_0_dim_tensors_like_numbers_of_their_kind() -> None:
    leaves = [torch.zeros(2, dtype=torch.float16)]
    scalars.check_scalar("add", torch.tensor(2.0, dtype=torch.float64), ["w"], leaves, [True])
    with pytest.raises(TypeError, match=r"parameter 'w' \(shape \(2,\) float16\) into complex"):
        scalars.check_scalar("add", torch.tensor(1j), ["w"], leaves, [True])
