"""Benchmark clip decoding: the Ray Data pipeline with W CPUs vs one process, a multiprocessing Pool(W) and Ray's
``read_videos``, on the same synthetic clips; prints clips/s and ratios. A benchmark, not a test.

Every method does the same per-clip work as the pipeline's decoder (``num_frames`` sorted frames resized to
``img_size``, CLIP-normalised; plus the log-mel of the audio with ``--with-audio``), except ``read_videos``, which
decodes every frame of every clip (its only mode). The pipeline runs with its own settings (operator resource
reservation off, up to 15 clips per task, isolated child decoders) and Ray limited to W CPUs. Each method runs
``--repeats`` times and its best pass is reported (other tenants of a small box make single passes noisy).

    python jobs/bench_decode.py --num-clips 128 --workers 2 --size 224x224 --seconds 4
    python jobs/bench_decode.py ... --num-frames 8 --model.vision.img_size=224 --with-audio --skip-read-videos
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import parse_job_args


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--num-clips", type=int, default=128, help="clips to decode (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="W: pool size, Ray CPUs and decode workers")
    parser.add_argument("--size", default="224x224", help="synthetic clip WIDTHxHEIGHT (default 224x224)")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip duration (default 4)")
    parser.add_argument("--fps", type=int, default=8, help="clip frame rate (default 8)")
    parser.add_argument("--with-audio", action="store_true", help="also compute the audio features")
    parser.add_argument("--skip-read-videos", action="store_true", help="leave out the read_videos baseline")
    parser.add_argument("--data-dir", default=None, help="reuse/keep the synthetic clips here")
    parser.add_argument("--repeats", type=int, default=2, help="passes per method; the best one is reported")


def _requests(manifest: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    base = manifest.parent
    return [
        {"video": str(base / r["video"]), "audio": str(base / r["audio"]) if r.get("audio") else None,
         "train": False, "seed": [0, 0, k]}
        for k, r in enumerate(rows)
    ]  # fmt: skip


def _decode_one(args: tuple[dict[str, Any], Any]) -> dict[str, Any]:
    from mimo_ray.data.sample_media import decode_media

    request, spec = args
    return decode_media(request, spec)  # the arrays go back to the parent, as a data loader's would


def bench_raw(requests: list[dict[str, Any]], spec: Any) -> float:
    _decode_one((requests[0], spec))  # warm: imports, decord/FFmpeg
    start = time.perf_counter()
    for r in requests:
        _decode_one((r, spec))
    return len(requests) / (time.perf_counter() - start)


def bench_pool(requests: list[dict[str, Any]], spec: Any, workers: int) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_pool_init) as pool:
        pool.map(_decode_one, [(requests[0], spec)] * workers)  # warm: imports, decord/FFmpeg
        start = time.perf_counter()
        done = sum(1 for _ in pool.imap_unordered(_decode_one, [(r, spec) for r in requests], chunksize=2))
        return done / (time.perf_counter() - start)


def _pool_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def bench_pipeline(cfg: Config, manifest: str, repeats: int) -> dict[str, float]:
    """Clips/s of the pipeline's decode with rows pulled into this process as ``next_step`` does: a cold pass (Ray
    Data workers and their decoder processes start), a warm pass, and a warm pass that also turns the uint8 frames
    into normalised floats here on the CPU (the encoder's share, which on a GPU runs on the device).
    """
    import torch

    from mimo_ray.data.collate import MODALITY_COLUMNS, BatchLayout
    from mimo_ray.data.pipeline import build_dataset
    from mimo_ray.data.sample_media import FRAME_MODALITIES, from_transport
    from mimo_ray.media.frames import normalize_pixels
    from mimo_ray.runtime.placement import stage_cpu_reservation

    layout = BatchLayout.from_config(cfg)
    rates: dict[str, float] = {}
    passes = [("cold", False)] + [("warm", False), ("warm + normalise", True)] * repeats
    for name, normalise in passes:
        start = time.perf_counter()
        ok = total = 0
        ds = build_dataset(cfg, "validate", manifest_path=manifest, reserved_cpus=stage_cpu_reservation(cfg))
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            total += table.num_rows
            ok += sum(table.column("ok").to_pylist())
            for mod in layout.modalities if normalise else ():
                for data in table.column(MODALITY_COLUMNS[mod]).to_pylist():
                    arr = torch.from_numpy(from_transport(mod, layout.media_from_bytes(mod, data, 1)))
                    if mod in FRAME_MODALITIES:
                        normalize_pixels(arr)
        if ok != total:
            raise RuntimeError(f"{total - ok} of {total} clips failed in the pipeline")
        rates[name] = max(rates.get(name, 0.0), total / (time.perf_counter() - start))
    return rates


def bench_read_videos(paths: list[str], workers: int) -> float:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    ds = ray.data.read_videos(paths, include_paths=True, concurrency=workers)
    seen = set()
    for batch in ds.select_columns(["path"]).iter_batches(batch_size=None, batch_format="pyarrow"):
        seen.update(batch.column("path").to_pylist())
    return len(seen) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg, ns = parse_job_args(argv, doc=__doc__, extra=_extra)
    mods = ["video", "audio"] if ns.with_audio else ["video"]
    # Decode only, in the driver's process tree: no stage actors reserve CPUs.
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, modalities=mods),
        data=dataclasses.replace(cfg.data, num_decode_workers=ns.workers, max_bad_fraction=0.0),
        train=dataclasses.replace(cfg.train, runtime="fused"),
    )
    width, height = (int(x) for x in ns.size.lower().split("x"))
    tmp = None if ns.data_dir else tempfile.TemporaryDirectory(prefix="bench_decode_")
    root = Path(ns.data_dir or tmp.name)
    manifest = root / "train.jsonl"
    if not manifest.exists() or len(manifest.read_text().splitlines()) != ns.num_clips:
        import importlib.util

        spec_file = Path(__file__).resolve().parents[1] / "datasets" / "make_synthetic.py"
        module_spec = importlib.util.spec_from_file_location("make_synthetic", spec_file)
        synth = importlib.util.module_from_spec(module_spec)
        sys.modules["make_synthetic"] = synth
        module_spec.loader.exec_module(synth)
        t0 = time.perf_counter()
        synth.make_synthetic(root, ns.num_clips, ns.seconds, ns.fps, (width, height), seed=0, val_fraction=0.0)
        print(f"made {ns.num_clips} clips {width}x{height}, {ns.seconds:g} s at {ns.fps} fps in "
              f"{time.perf_counter() - t0:.1f} s under {root}")  # fmt: skip
    if not ns.with_audio:
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        for r in rows:
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<audio>\n", "")
        manifest = root / "video_only.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from mimo_ray.data.sample_media import MediaSpec

    spec = MediaSpec.from_config(cfg)
    requests = _requests(manifest)
    v = cfg.model.vision
    print(f"decode: {v.num_frames} frames -> {v.img_size}x{v.img_size}, modalities {mods}, W={ns.workers}")
    best = range(max(ns.repeats, 1))
    results: dict[str, float] = {"raw (1 process)": max(bench_raw(requests, spec) for _ in best)}
    results[f"Pool({ns.workers})"] = max(bench_pool(requests, spec, ns.workers) for _ in best)
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=ns.workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=cfg.cluster.object_store_memory_mb * 1024 * 1024)  # fmt: skip
    try:
        for name, rate in bench_pipeline(cfg, str(manifest), ns.repeats).items():
            results[f"Ray Data pipeline, W={ns.workers} ({name})"] = rate
        if not ns.skip_read_videos:
            results["ray.data.read_videos (every frame)"] = bench_read_videos([r["video"] for r in requests],
                                                                              ns.workers)  # fmt: skip
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    raw, pool = results["raw (1 process)"], results[f"Pool({ns.workers})"]
    print(f"\n{'method':<40} {'clips/s':>9} {'x raw':>7} {'x pool':>7}")
    for name, rate in results.items():
        print(f"{name:<40} {rate:9.2f} {rate / raw:7.2f} {rate / pool:7.2f}")
    return results


if __name__ == "__main__":
    main()
