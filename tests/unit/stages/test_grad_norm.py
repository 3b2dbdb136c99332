"""The global grad-norm share: one ``torch._foreach_norm`` per device (issue 22 item 6), equal to the per-parameter
float64 reference, TP-replicated parameters counted once."""

import math

import torch

from mimo_ray.stages import optim


def test_foreach_norm_once_per_device_equals_the_per_parameter_sum(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    params = []
    for k, shape in enumerate([(64, 32), (32,), (7, 5, 3), (128,)]):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=gen) * (k + 1)
        params.append((f"p{k}", p))
    bf = torch.nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    bf.main_grad = torch.randn(16, generator=gen)  # fp32 main gradient of a bf16 parameter
    params.append(("bf", bf))
    params.append(("nograd", torch.nn.Parameter(torch.zeros(3))))
    calls = []
    real = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    got = optim.grad_sq_norm(params, count_replicated=True)
    want = math.fsum(float(optim.param_grad(p).double().pow(2).sum()) for _, p in params
                     if optim.param_grad(p) is not None)
    assert calls == [5]  # one call for the five gradients on the CPU
    assert abs(got - want) <= 1e-12 * want
    # Replicated parameters only count on TP rank 0: a TP rank > 0 without sharded parameters contributes 0.
    assert optim.grad_sq_norm(params, count_replicated=False) == 0.0
