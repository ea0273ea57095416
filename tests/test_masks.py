import torch

from trimode import masks

T, F = True, False


def test_causal_and_bidirectional():
    assert masks.causal(3).tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    assert masks.bidirectional(2).tolist() == [[T, T], [T, T]]


def test_with_prefix_places_pattern_after_each_rows_prefix():
    got = masks.with_prefix(masks.causal(2), torch.tensor([1, 3]), 5)
    # row 0: prefix slot 0, new tokens at slots 1-2; row 1: prefix 0-2, new at 3-4.
    assert got[0].tolist() == [[T, T, F, F, F], [T, T, T, F, F]]
    assert got[1].tolist() == [[T, T, T, T, F], [T, T, T, T, T]]
    bid = masks.with_prefix(masks.bidirectional(2), torch.tensor([0]), 3)
    assert bid[0].tolist() == [[T, T, F], [T, T, F]]


def test_quadratic_k2():
    # sub-blocks [d0 m m][d1 m m]; heads see heads up to their own, masks see heads up to their own + own block
    expected = [
        [T, F, F, F, F, F],  # d0
        [T, T, T, F, F, F],  # m (block 0)
        [T, T, T, F, F, F],  # m (block 0)
        [T, F, F, T, F, F],  # d1: d0, d1
        [T, F, F, T, T, T],  # m (block 1)
        [T, F, F, T, T, T],
    ]
    assert masks.quadratic(2).tolist() == expected
    assert masks.quadratic_positions(2).tolist() == [0, 1, 2, 1, 2, 3]


def test_dual_stream_L4_block2():
    # order: noisy 0..3, clean 0..3; blocks of 2
    n = [
        [T, T, F, F, F, F, F, F],
        [T, T, F, F, F, F, F, F],
        [F, F, T, T, T, T, F, F],  # noisy block 1 sees itself and clean block 0
        [F, F, T, T, T, T, F, F],
    ]
    c = [
        [F, F, F, F, T, F, F, F],
        [F, F, F, F, T, T, F, F],
        [F, F, F, F, T, T, T, F],
        [F, F, F, F, T, T, T, T],
    ]
    assert masks.dual_stream(4, 2).tolist() == n + c


def test_segments_prompt_then_block():
    got = masks.segments(torch.tensor([2]), 2, 5)[0]
    expected = [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, T, T, T, F],  # block sees prompt + block
        [T, T, T, T, F],
        [T, T, T, T, T],  # padding: causal
    ]
    assert got.tolist() == expected
