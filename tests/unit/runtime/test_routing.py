import pytest

from mimo_ray.runtime.routing import Piece, make_plan, submission_order


def _check_order(plan, order, train=True):
    kinds = {"fwd": plan.num_enc, "lm": plan.num_lm, "bwd": plan.num_enc if train else 0}
    for kind, count in kinds.items():
        assert sorted(i for k, i in order if k == kind) == list(range(count))
    pos = {item: n for n, item in enumerate(order)}
    for p in plan.pieces:
        assert pos["fwd", p.enc_mb] < pos["lm", p.lm_mb]
        if train:
            assert pos["lm", p.lm_mb] < pos["bwd", p.enc_mb]


def test_same_sizes_fan_in_and_fan_out():
    fan_in = make_plan([4, 4, 4, 4], lm_micro_batch=4, encoder_dp=2, lm_dp=1)
    assert fan_in.enc_rank == [0, 1, 0, 1] and fan_in.lm_rank == [0, 0, 0, 0]
    assert fan_in.pieces == [Piece(k, k, 4 * k, 4 * k + 4) for k in range(4)]
    fan_out = make_plan([4, 4], lm_micro_batch=4, encoder_dp=1, lm_dp=2)
    assert fan_out.enc_rank == [0, 0] and fan_out.lm_rank == [0, 1]


def test_split_and_merge_at_sample_boundaries():
    plan = make_plan([3, 3], lm_micro_batch=2, encoder_dp=2, lm_dp=2)
    assert plan.pieces == [Piece(0, 0, 0, 2), Piece(0, 1, 2, 3), Piece(1, 1, 3, 4), Piece(1, 2, 4, 6)]
    assert plan.local_ranges(0) == [(0, 2), (2, 3)] and plan.local_ranges(1) == [(0, 1), (1, 3)]
    assert plan.lm_rank == [0, 1, 0]  # LM micro-batch 1 joins samples of encoder ranks 0 and 1 (fan-in)
    assert plan.piece_index(Piece(1, 2, 4, 6)) == 1
    merged = make_plan([2, 2, 2], lm_micro_batch=6, encoder_dp=3, lm_dp=1)
    assert [p.enc_mb for p in merged.lm_pieces(0)] == [0, 1, 2]
    with pytest.raises(ValueError, match="non-empty"):
        make_plan([], 2, 1, 1)


@pytest.mark.parametrize(
    ("sizes", "lm_mb", "edp", "ldp"), [([4] * 4, 4, 1, 1), ([4] * 4, 4, 2, 1), ([3, 3], 2, 2, 2), ([2] * 3, 6, 3, 1)]
)
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_submission_order_is_causal(sizes, lm_mb, edp, ldp, prefetch):
    plan = make_plan(sizes, lm_mb, edp, ldp)
    _check_order(plan, submission_order(plan, prefetch))
    _check_order(plan, submission_order(plan, prefetch, train=False), train=False)


def test_prefetch_overlaps_next_forward_with_lm():
    plan = make_plan([4] * 3, 4, encoder_dp=1, lm_dp=1)
    assert submission_order(plan, prefetch=1) == [
        ("fwd", 0),
        ("lm", 0),
        ("fwd", 1),
        ("bwd", 0),
        ("lm", 1),
        ("fwd", 2),
        ("bwd", 1),
        ("lm", 2),
        ("bwd", 2),
    ]
    assert submission_order(plan, prefetch=0)[:4] == [("fwd", 0), ("lm", 0), ("bwd", 0), ("fwd", 1)]
