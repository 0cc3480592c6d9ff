import pytest
import torch

from megatron_mtp.layers import roll_left


def test_roll_left_zero_fills_the_tail():
    x = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert roll_left(x, 0).tolist() == x.tolist()
    assert roll_left(x, 2).tolist() == [[7, 8, 0, 0], [3, 4, 0, 0]]
    assert roll_left(x, 4).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert roll_left(torch.ones(2, 3, 4), 1, dim=1)[:, -1].abs().sum() == 0


def test_roll_left_rejects_out_of_range_shift():
    with pytest.raises(ValueError, match=r"shift must be in \[0, 4\]"):
        roll_left(torch.zeros(1, 4), 5)
