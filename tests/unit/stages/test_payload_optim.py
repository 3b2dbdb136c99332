import math

import numpy as np
import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.stages.optim import build_optimizer, clip_coefficient, grad_sq_norm, set_lr, total_norm
from mimo_ray.stages.payload import concat_rows, pack, row_offsets, rows_per_sample, slice_samples, unpack


def test_pack_unpack_roundtrip_numpy_and_bf16():
    tree = {"a": torch.arange(6.0).view(2, 3), "b": [torch.ones(2, dtype=torch.bfloat16), 3], "c": "x"}
    packed = pack(tree, "numpy")
    assert isinstance(packed["a"], np.ndarray)
    assert isinstance(packed["b"][1], int) and packed["c"] == "x"
    assert packed["b"][0].dtype == torch.bfloat16  # no numpy bf16: stays a tensor
    packed["a"].setflags(write=False)  # what the object store hands out
    back = unpack(packed)
    assert torch.equal(back["a"], tree["a"]) and back["a"].data_ptr() != tree["a"].data_ptr()
    back["a"] += 1  # owned copy, writable
    assert pack(tree, "torch")["a"] is not None and isinstance(pack(tree, "torch")["a"], torch.Tensor)


def test_slice_samples_non_uniform_rows():
    ids = torch.tensor([[7, 7, 7, 1], [1, 1, 1, 1], [7, 1, 7, 7], [7, 7, 1, 1]])  # 3, 0, 3, 2 rows of modality 7
    assert rows_per_sample(ids, 7) == [3, 0, 3, 2]
    assert row_offsets([3, 0, 3, 2]) == [0, 3, 3, 6, 8]
    emb = {"video": torch.arange(8.0).unsqueeze(1)}
    pieces = [slice_samples(emb, ids, {"video": 7}, a, b) for a, b in [(0, 1), (1, 3), (3, 4)]]
    assert [p["video"].flatten().tolist() for p in pieces] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(concat_rows(pieces)["video"], emb["video"])
    with pytest.raises(ValueError, match="'video': 8 placeholder tokens in input_ids but 7 embedding rows"):
        slice_samples({"video": torch.zeros(7, 1)}, ids, {"video": 7}, 0, 1)
    with pytest.raises(ValueError, match="missing"):
        concat_rows([{"video": torch.zeros(1, 1)}, {}])


def test_grad_norm_counts_tp_shards_everywhere_and_replicas_once():
    sharded = torch.nn.Parameter(torch.zeros(2))
    sharded.tensor_model_parallel = True
    replicated = torch.nn.Parameter(torch.zeros(2))
    sharded.grad = torch.tensor([3.0, 0.0])
    replicated.grad = torch.tensor([4.0, 0.0])
    named = [("s", sharded), ("r", replicated)]
    assert grad_sq_norm(named, count_replicated=True) == 25.0
    assert grad_sq_norm(named, count_replicated=False) == 9.0
    # TP=2: rank 0 counts both, rank 1 only its shard (here: the same values again).
    assert total_norm([25.0, 9.0]) == math.sqrt(34.0)
    assert clip_coefficient(5.0, 0.0) == 1.0 and clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(1 / (4.0 + 1e-6))


def test_optimizer_uses_train_config():
    cfg = load_config("tiny", ["train.weight_decay=0.1", "train.adam_beta2=0.9"])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.train)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.9) and group["weight_decay"] == 0.1
    set_lr(opt, 0.5)
    assert group["lr"] == 0.5
