"""Which samples go where in one step, and in what order the driver submits the actor calls. Integers only.

The global batch is the concatenation of the step's encoder micro-batches (samples ``0..G-1``). Encoder
micro-batch ``k`` runs on encoder rank ``k % encoder_dp``; the LM re-cuts the same sample sequence into LM
micro-batches of ``lm_micro_batch`` samples, LM micro-batch ``j`` on LM data-parallel rank ``j % lm_dp``. A *piece*
is the overlap of one encoder and one LM micro-batch: the unit of embedding/gradient transfer. When
``encoder_dp != lm_dp`` this gives fan-in (several encoder ranks feed one LM rank) and fan-out (one encoder rank feeds
several), and with different micro-batch sizes a micro-batch's rows are split at sample boundaries.

    plan = make_plan([4, 4], lm_micro_batch=2, encoder_dp=1, lm_dp=2)
    for kind, index in submission_order(plan, prefetch=1): ...   # ("fwd", 0), ("fwd", 1), ("lm", 0), ...
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Piece:
    """Samples ``start:stop`` (global indices) of encoder micro-batch ``enc_mb`` inside LM micro-batch ``lm_mb``."""

    enc_mb: int
    lm_mb: int
    start: int
    stop: int


@dataclass
class StepPlan:
    """Routing of one step.

    Attributes:
        enc_starts: first global sample of each encoder micro-batch, plus the total at the end.
        enc_rank: encoder data-parallel rank of each encoder micro-batch.
        lm_rank: LM data-parallel rank of each LM micro-batch.
        pieces: all pieces in sample order.
    """

    enc_starts: list[int]
    enc_rank: list[int]
    lm_rank: list[int]
    pieces: list[Piece]
    _by_enc: dict[int, list[Piece]] = field(default_factory=dict, repr=False)
    _by_lm: dict[int, list[Piece]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for piece in self.pieces:
            self._by_enc.setdefault(piece.enc_mb, []).append(piece)
            self._by_lm.setdefault(piece.lm_mb, []).append(piece)

    @property
    def num_enc(self) -> int:
        """Encoder micro-batches in the step."""
        return len(self.enc_rank)

    @property
    def num_lm(self) -> int:
        """LM micro-batches in the step."""
        return len(self.lm_rank)

    def enc_pieces(self, k: int) -> list[Piece]:
        """Pieces of encoder micro-batch ``k`` in sample order (its forward's outputs, its backward's inputs)."""
        return self._by_enc[k]

    def lm_pieces(self, j: int) -> list[Piece]:
        """Pieces of LM micro-batch ``j`` in sample order (its inputs)."""
        return self._by_lm[j]

    def local_ranges(self, k: int) -> list[tuple[int, int]]:
        """Sample ranges of encoder micro-batch ``k``'s pieces, relative to the micro-batch."""
        base = self.enc_starts[k]
        return [(p.start - base, p.stop - base) for p in self.enc_pieces(k)]

    def piece_index(self, piece: Piece) -> int:
        """Position of ``piece`` among its encoder micro-batch's outputs."""
        return self._by_enc[piece.enc_mb].index(piece)


def make_plan(enc_sizes: list[int], lm_micro_batch: int, encoder_dp: int, lm_dp: int) -> StepPlan:
    """Route one step.

    Args:
        enc_sizes: samples of each encoder micro-batch, in global order.
        lm_micro_batch: samples per LM micro-batch (the last one may be smaller).
        encoder_dp: encoder data-parallel ranks.
        lm_dp: LM data-parallel ranks.

    Returns:
        The :class:`StepPlan`.

    Raises:
        ValueError: empty step, empty micro-batch or a non-positive size.
    """
    if not enc_sizes or min(enc_sizes) <= 0:
        raise ValueError(f"a step needs at least one non-empty micro-batch, got sizes {enc_sizes}")
    if lm_micro_batch <= 0 or encoder_dp <= 0 or lm_dp <= 0:
        raise ValueError(f"sizes must be positive: lm_micro_batch={lm_micro_batch}, dp={encoder_dp}/{lm_dp}")
    starts = [0]
    for size in enc_sizes:
        starts.append(starts[-1] + size)
    total = starts[-1]
    lm_starts = list(range(0, total, lm_micro_batch)) + [total]
    pieces = []
    k = 0
    for j in range(len(lm_starts) - 1):
        lo, hi = lm_starts[j], lm_starts[j + 1]
        while lo < hi:
            while starts[k + 1] <= lo:
                k += 1
            stop = min(hi, starts[k + 1])
            pieces.append(Piece(enc_mb=k, lm_mb=j, start=lo, stop=stop))
            lo = stop
    return StepPlan(
        enc_starts=starts,
        enc_rank=[k % encoder_dp for k in range(len(enc_sizes))],
        lm_rank=[j % lm_dp for j in range(len(lm_starts) - 1)],
        pieces=pieces,
    )


def submission_order(plan: StepPlan, prefetch: int = 1, train: bool = True) -> list[tuple[str, int]]:
    """The order in which the driver submits calls (each actor runs its calls in this order).

    LM micro-batches go in order; each encoder forward is submitted as soon as an LM micro-batch needs it and, with
    ``prefetch`` = p, each encoder rank's next p forwards are queued before a backward, so the encoder forward of
    micro-batch i+1 runs while the LM works on micro-batch i. An encoder backward follows the last LM call that
    returns gradients for it.

    Args:
        plan: the step's routing.
        prefetch: encoder forwards per rank queued ahead of a backward (0: strictly forward, LM, backward).
        train: with ``False`` there are no backwards.

    Returns:
        ``[("fwd", k) | ("lm", j) | ("bwd", k), …]`` covering every micro-batch once per kind.
    """
    order: list[tuple[str, int]] = []
    num_ranks = max(plan.enc_rank) + 1
    next_fwd = 0
    next_bwd = 0

    def forward_through(k: int) -> None:
        nonlocal next_fwd
        while next_fwd <= min(k, plan.num_enc - 1):
            order.append(("fwd", next_fwd))
            next_fwd += 1

    for j in range(plan.num_lm):
        forward_through(max(p.enc_mb for p in plan.lm_pieces(j)))
        order.append(("lm", j))
        if not train:
            continue
        while next_bwd < plan.num_enc and max(p.lm_mb for p in plan.enc_pieces(next_bwd)) <= j:
            forward_through(next_bwd + num_ranks * prefetch)
            order.append(("bwd", next_bwd))
            next_bwd += 1
    return order
