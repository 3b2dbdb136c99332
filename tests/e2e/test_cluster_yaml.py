import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert {"cpu_decode", "encoder_gpu", "lm_gpu"} <= set(types)
    # The custom resources the stage placement groups and decode tasks ask for exist on exactly their pools, named
    # like the pools; the decode pool's is the one the data pipeline asks for.
    from mimo_ray.data.pipeline import DECODE_POOL

    assert DECODE_POOL == "cpu_decode"
    assert types["cpu_decode"]["resources"]["cpu_decode"] == types["cpu_decode"]["resources"]["CPU"]
    for name, node in types.items():
        custom = set(node["resources"]) - {"CPU", "GPU", "memory", "object_store_memory"}
        assert custom == ({name} if name != "head" else set()), name
    assert types["encoder_gpu"]["resources"]["encoder_gpu"] == types["encoder_gpu"]["resources"]["GPU"]
    assert types["lm_gpu"]["resources"]["lm_gpu"] == types["lm_gpu"]["resources"]["GPU"]
    for name in ("cpu_decode", "encoder_gpu", "lm_gpu"):
        assert types[name]["min_workers"] <= types[name]["max_workers"]
        assert types[name]["max_workers"] > 0
    assert any("pip install" in cmd and "-e ." in cmd for cmd in raw["setup_commands"])


def test_every_ray_start_has_token_auth_and_local_dashboard():
    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
