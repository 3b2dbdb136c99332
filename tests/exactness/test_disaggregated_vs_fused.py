"""C3: the disaggregated step equals the fused MimoModel (fp32, CPU, 1 thread per process, same seed/weights/batch)."""

import pytest

# (overrides, tolerance for loss and grads of step 1): 1e-5 where TP or LM re-batching changes summation order.
CASES = {
    # Two modalities (the preset) on every case but one; both sides on one rank is no case of its own (it is the
    # LM side of enc_dp2_to_lm_dp1 and the encoder side of lm_tp2).
    "lm_tp2": (["parallel.lm_tp=2"], 1e-5),
    "enc_dp2_to_lm_dp1": (["parallel.encoder_dp=2"], 1e-6),
    "one_modality_enc_dp1_to_lm_dp2": (["model.modalities=[video]", "parallel.lm_dp=2"], 1e-6),
    # Two encoder groups, both sides DP=2 and LM micro-batches of 4 samples cut from encoder micro-batches of 2.
    "per_modality_resplit": (
        [
            "parallel.encoder_groups=per_modality",
            "parallel.encoder_dp=2",
            "parallel.lm_dp=2",
            "parallel.lm_micro_batch_size=4",
            "parallel.prefetch_microbatches=2",
        ],
        1e-5,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_fused(ray_local, megatron_world, compare, report, case):
    overrides, tol = CASES[case]
    diffs = compare(overrides, steps=5)
    report(case, diffs)
    assert diffs["loss1"] <= tol and diffs["grad_norm1"] <= tol
    assert diffs["grads1"] <= tol, f"worst parameter gradient differs by {diffs['grads1']:.3g} relative"
    assert diffs["loss_traj"] <= 1e-6, f"5-step loss trajectories differ by {diffs['loss_traj']:.3g} relative"
    assert diffs["eval"] <= tol
    assert diffs["params_end"] <= 1, f"parameters after 5 AdamW steps exceed the bound ({diffs['params_end']:.3g}x)"
