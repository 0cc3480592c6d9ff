import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_mtp.layers import PackedSequences, roll_left


def test_roll_left_zero_fills_the_tail():
    x = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert roll_left(x, 0).tolist() == x.tolist()
    assert roll_left(x, 2).tolist() == [[7, 8, 0, 0], [3, 4, 0, 0]]
    assert roll_left(x, 4).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert roll_left(torch.ones(2, 3, 4), 1, dim=1)[:, -1].abs().sum() == 0


def test_roll_left_rejects_out_of_range_shift():
    with pytest.raises(ValueError, match=r"shift must be in \[0, 4\]"):
        roll_left(torch.zeros(1, 4), 5)


def _documents(cu_seqlens, cu_seqlens_padded=None) -> PackedSequences:
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    padded = None if cu_seqlens_padded is None else torch.tensor(cu_seqlens_padded, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_q_padded=padded)
    return PackedSequences.from_packed_seq_params(params)


def test_packed_roll_stays_within_each_document_and_out_of_padding():
    x = torch.tensor([[5, 6, 7, 8, 9]])
    assert roll_left(x, 1, sequences=_documents([0, 3, 5])).tolist() == [[6, 7, 0, 9, 0]]
    assert roll_left(x, 2, sequences=_documents([0, 3, 5])).tolist() == [[7, 0, 0, 0, 0]]
    # documents [5, 6] and [8, 9]; position 2 is the first document's padding, position 4 comes after the last
    padded = _documents([0, 2, 4], [0, 3, 5])
    x = torch.tensor([[5, 6, 1, 8, 9, 1]])
    assert roll_left(x, 1, sequences=padded).tolist() == [[6, 0, 0, 9, 0, 0]]
    assert padded.same_sequence(1, 6).tolist() == [True, False, False, True, False, False]


def test_packed_roll_reads_the_fill_past_each_document_end():
    embeddings = torch.arange(5.0).view(5, 1, 1).expand(5, 1, 2)  # [s, b, h]
    tail = torch.full((5, 1, 2), -1.0)
    rolled = roll_left(embeddings, 1, dim=0, sequences=_documents([0, 3, 5]), fill=tail)
    assert rolled[:, 0, 0].tolist() == [1.0, 2.0, -1.0, 4.0, -1.0]
    assert roll_left(embeddings, 2, dim=0, fill=tail)[:, 0, 0].tolist() == [2.0, 3.0, 4.0, -1.0, -1.0]


def test_packed_sequences_reject_padding_shorter_than_a_document():
    with pytest.raises(ValueError, match="at least its own length"):
        _documents([0, 3, 5], [0, 2, 5])
