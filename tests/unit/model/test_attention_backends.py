import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_fused_model
from mimo_ray.model.inputs import random_batch
from mimo_ray.model.layers import te_available


def _loss_and_grads(cfg, batch, state=None):
    model = build_fused_model(cfg)
    if state is not None:
        model.load_state_dict(state, strict=False)
    per_token, mask = model(
        batch["input_ids"], batch["position_ids"], None, batch["loss_mask"], batch["labels"], batch["modality_inputs"]
    )
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, model.state_dict()


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_sdpa_and_megatron_local_attention_agree(megatron_world, position):
    base = ["model.lm.position_embedding_type=" + position, "model.attention_dropout=0.0"]
    sdpa = load_config("tiny", [*base, "--attention-backend", "sdpa"])
    local = load_config("tiny", [*base, "--attention-backend", "local"])
    batch = random_batch(sdpa, 2, seed=4)
    loss_s, grads_s, state = _loss_and_grads(sdpa, batch)
    loss_l, grads_l, _ = _loss_and_grads(local, batch, state)
    torch.testing.assert_close(loss_s, loss_l, rtol=1e-5, atol=0)
    assert grads_s.keys() == grads_l.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_l[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not te_available(), reason="transformer-engine is not importable here")
@pytest.mark.gpu
def test_te_backend_agrees_with_sdpa(megatron_world):
    sdpa = load_config("tiny", ["--attention-backend", "sdpa"])
    te = load_config("tiny", ["--attention-backend", "te"])
    batch = random_batch(sdpa, 2, seed=5)
    loss_s, _, _ = _loss_and_grads(sdpa, batch)
    loss_t, _, _ = _loss_and_grads(te, batch)
    torch.testing.assert_close(loss_s, loss_t, rtol=1e-3, atol=0)


def test_te_backend_without_te_names_the_field(megatron_world):
    if te_available():
        pytest.skip("transformer-engine is importable here")
    with pytest.raises(ValueError, match="model.attention_backend='te' needs transformer_engine"):
        build_fused_model(load_config("tiny", ["--attention-backend", "te"]))


def test_sdpa_causal_with_kv_prefix_matches_full():
    from megatron.core.transformer.enums import AttnMaskType

    from mimo_ray.model.attention import SDPAttention

    class _Cfg:
        context_parallel_size = 1
        num_attention_heads = 2
        num_query_groups = 2
        kv_channels = 4
        attention_dropout = 0.0

    class _Tp:
        def size(self):
            return 1

    class _Pg:
        tp = _Tp()

    attn = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attn)
    attn.attn_mask_type = AttnMaskType.causal
    attn.num_heads = attn.num_groups = 2
    attn.softmax_scale = 0.5
    attn.dropout_p = 0.0
    q, k, v = (torch.randn(6, 1, 2, 4) for _ in range(3))
    full = attn(q, k, v, None)
    tail = attn(q[4:], k, v, None)  # the last two queries against all six keys
    torch.testing.assert_close(tail, full[4:])
