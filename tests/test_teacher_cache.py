"""Teacher-signal cache: same loss curve as live teachers, same batch stream, key checks, sizes."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mgd_ray import losses
from mgd_ray.checkpoint import segmenter_record
from mgd_ray.config import parse_job_config
from mgd_ray.data.stream import batches, load_job_data
from mgd_ray.distributed import DistEnv
from mgd_ray.jobs import distill
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teacher_cache.build import build_cache
from mgd_ray.teacher_cache.key import cache_files
from mgd_ray.teacher_cache.read import check_cache
from mgd_ray.teachers import load_teachers, teacher_signals
from mgd_ray.train import JOBS

POOLS = [2, 4]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, tiny_job_data) -> Path:
    """Another (seeded, lighter) teacher, so the two teachers' signals differ."""
    cfg = parse_job_config("baseline", {"student": {"backbone": "mobilenet_v2"}}).student
    torch.manual_seed(7)
    model = build_segmenter("mobilenet_v2", tiny_job_data.num_classes)
    path = tmp_path_factory.mktemp("teacher2") / "model.pt"
    torch.save(segmenter_record(model, cfg, tiny_job_data, 32, "teacher"), path)
    return path


def job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache=None, **schedule) -> dict:
    raw = {
        "data": tiny_data_cfg,
        "schedule": {**tiny_schedule, **schedule},
        "optim": {"lr": 0.01},
        "teachers": {
            "T_D": {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)},
            "T_W": {"model": {"backbone": "mobilenet_v2"}, "checkpoint": str(second_teacher)},
        },
        "student": {"backbone": "mobilenet_v2"},
        "losses": {"pool_size": 4},
    }
    if cache is not None:
        raw["teacher_cache"] = str(cache)
    return raw


def run_job(raw: dict, root: Path) -> list[dict]:
    reports: list[dict] = []
    JOBS["student"](parse_job_config("student", raw), lambda m, _: reports.append(dict(m)), root, None)
    return reports


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher) -> tuple[list[dict], list]:
    """The reference job with live teachers: its reports and the batches its steps saw."""
    seen = []
    original = distill.distill_terms

    def record(student, signals, b, cfg, batch_reduction=None):
        seen.append([b.x_l.clone(), b.y.clone(), b.u0.clone(), b.u1.clone(), b.m.clone()])
        return original(student, signals, b, cfg, batch_reduction)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "distill_terms", record)
        reports = run_job(
            job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher), tmp_path_factory.mktemp("live")
        )
    return reports, seen


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cache")
    cfg = parse_job_config("student", job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher))
    summary = build_cache(cfg, out, pool_sizes=POOLS)
    return out, summary


def test_cache_gives_the_same_loss_curve_without_running_teachers(
    tmp_path, monkeypatch, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache_dir, live_run
):
    live = live_run[0]

    def no_teachers(*args, **kwargs):
        raise AssertionError("a teacher was loaded or ran although the cache serves every step")

    monkeypatch.setattr(distill, "step_signals", no_teachers)
    monkeypatch.setattr(distill, "load_teachers", no_teachers)  # not even loaded (a trial's start-up time)
    cached = run_job(
        job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache=cache_dir[0]), tmp_path / "cached"
    )
    assert [r["step"] for r in cached] == [r["step"] for r in live] == [2, 4]
    for a, b in zip(live, cached, strict=True):
        terms = [k for k in a if k.startswith("loss/")]
        assert {"loss/image/T_D", "loss/region/T_W", "loss/pixel_u/T_W", "loss/pixel_l/T_D"} <= set(terms)
        for k in terms + ["val/mIoU"]:
            assert b[k] == pytest.approx(a[k], rel=1e-6), k
        assert b["cache/hit"] == 1.0 and b["cache/hit_rate"] == 1.0
        assert "cache/hit" not in a  # jobs without a cache report no cache metrics


def test_partial_cache_serves_its_steps_then_loads_and_runs_teachers(
    tmp_path, capsys, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, live_run
):
    raw = job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher)
    build_cache(parse_job_config("student", raw), tmp_path / "c", pool_sizes=[4], iterations=2, verbose=False)
    live = live_run[0]
    cached = run_job(
        job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache=tmp_path / "c"), tmp_path / "cached"
    )
    assert "steps 3..4 run the teachers" in capsys.readouterr().out
    assert [r["cache/hit_rate"] for r in cached] == [1.0, 0.0]
    for a, b in zip(live, cached, strict=True):
        for k in (k for k in a if k.startswith("loss/")):
            assert b[k] == pytest.approx(a[k], rel=1e-6), k


def test_other_seed_falls_back_to_live_teachers_and_says_so(
    tmp_path, capsys, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache_dir
):
    raw = job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache=cache_dir[0], seed=1, iterations=2)
    status, _ = check_cache(parse_job_config("student", raw))
    assert not status.hit
    assert "schedule seed differs (cache 0, job 1)" in status.reason
    reports = run_job(raw, tmp_path)
    out = capsys.readouterr().out
    assert "running the teachers" in out and "schedule seed differs" in out
    assert all(r["cache/hit"] == 0.0 and r["cache/hit_rate"] == 0.0 for r in reports)


def test_key_mismatch_messages(tmp_path, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache_dir):
    base = job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, cache=cache_dir[0])
    ok, _ = check_cache(parse_job_config("student", base))
    assert ok.hit and "serving steps 1..4" in ok.reason
    # A pool size the cache lacks.
    status, _ = check_cache(parse_job_config("student", base | {"losses": {"pool_size": 3}}))
    assert not status.hit and "lacks signals" in status.reason and "T_W pool size 3 (cached: [2, 4])" in status.reason
    # Other teachers (checkpoint swapped), other crop/batch.
    swapped = base | {"teachers": {"T_D": base["teachers"]["T_D"], "T_W": base["teachers"]["T_D"]}}
    status, _ = check_cache(parse_job_config("student", swapped))
    assert not status.hit and "teachers (names, architectures, checkpoint file hashes) differs" in status.reason
    status, _ = check_cache(parse_job_config("student", base | {"schedule": {**tiny_schedule, "batch_unlabeled": 1}}))
    assert "unlabeled batch size differs (cache 2, job 1)" in status.reason
    status, _ = check_cache(parse_job_config("student", base | {"teacher_mode": "train"}))
    assert "teacher mode differs (cache eval, job train)" in status.reason
    status, _ = check_cache(parse_job_config("student", base | {"teacher_precision": "bf16"}))
    assert not status.hit and "teacher precision differs (cache fp32, job bf16)" in status.reason
    status, _ = check_cache(parse_job_config("student", base | {"teacher_channels_last": True}))
    assert not status.hit and "teacher channels_last differs (cache false, job true)" in status.reason
    # Another world size: no key file for it.
    status, _ = check_cache(parse_job_config("student", base), world_size=2, rank=1)
    assert (
        not status.hit and "no key file rank1-of-2.json" in status.reason and "found rank0-of-1.json" in status.reason
    )
    # A missing directory.
    status, _ = check_cache(parse_job_config("student", base | {"teacher_cache": str(tmp_path / "none")}))
    assert not status.hit and "missing or was not finished" in status.reason


def test_stored_signals_sizes_and_values(cache_dir, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher):
    out, summary = cache_dir
    parquet, key_file = cache_files(out, 0, 1)
    key = json.loads(key_file.read_text())
    assert key["iterations"] == 4 and key["pool_sizes"] == POOLS and key["key"]["seed"] == 0
    assert key["signals"] == {
        "T_D": ["pl_l", "pl_mix", "logits_mix"],
        "T_W": ["pl_l", "pl_mix", "feats_mix@2", "feats_mix@4"],
    }
    cols = key["columns"]
    assert cols["T_D/pl_l"] == {"dtype": "uint8", "shape": [2, 32, 32]}
    assert cols["T_W/pl_mix"] == {"dtype": "uint8", "shape": [2, 32, 32]}
    assert cols["T_D/logits_mix"]["dtype"] == "float32" and cols["T_D/logits_mix"]["shape"][0] == 2
    assert len(cols["T_D/logits_mix"]["shape"]) == 2
    assert cols["T_W/feats_mix@4"] == {"dtype": "float32", "shape": [2, 256, 16]}
    table = pq.read_table(parquet)
    assert table.num_rows == 4 and table["step"].to_pylist() == [0, 1, 2, 3]
    assert len(table["T_D/pl_l"][0].as_py()) == 2 * 32 * 32  # one byte per pixel
    assert parquet.stat().st_size == summary["bytes"] == key["bytes"]
    assert summary["bytes_per_step"] == pytest.approx(summary["bytes"] / 4)
    assert summary["bytes_per_training_image"] > 0 and summary["bytes_per_epoch"] > 0
    # Values: step 3 replayed and recomputed live equals the stored signals.
    cfg = parse_job_config("student", job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher))
    data = load_job_data(cfg.data)
    env = DistEnv(0, 1, torch.device("cpu"))
    stream = batches(data, cfg.schedule, 0, env, 2, True)
    next(stream)
    b = next(stream)  # stream step 3
    teachers = load_teachers(cfg, data.num_classes, env.device)
    s_w = teacher_signals(teachers["T_W"], b, pixel=True, image=False, region=True, batched=True)
    s_d = teacher_signals(teachers["T_D"], b, pixel=True, image=True, region=False, batched=True)
    row = table.slice(3, 1).to_pylist()[0]
    stored_pl = np.frombuffer(row["T_W/pl_mix"], np.uint8).reshape(2, 32, 32)
    assert torch.equal(torch.from_numpy(stored_pl.astype(np.int64)), s_w.pl_mix)
    feats = torch.from_numpy(np.frombuffer(row["T_W/feats_mix@2"], np.float32).reshape(2, 256, 4).copy())
    assert torch.equal(feats, losses.region_vectors(s_w.feats_mix, 2))
    logits = torch.from_numpy(np.frombuffer(row["T_D/logits_mix"], np.float32).reshape(2, -1).copy())
    assert torch.equal(logits, losses.global_semantic_vector(s_d.logits_mix))


def test_pooled_teacher_terms_equal_full_map_terms():
    g = torch.Generator().manual_seed(0)
    s_feats, t_feats = torch.randn(2, 8, 9, 9, generator=g), torch.randn(2, 8, 9, 9, generator=g)
    s_logits, t_logits = torch.randn(2, 5, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g)
    for hv in (2, 3, 7):
        full = losses.region_level_loss(s_feats, t_feats, hv)
        pooled = losses.region_level_loss(s_feats, losses.region_vectors(t_feats, hv), hv)
        assert torch.equal(full, pooled)
    assert torch.equal(
        losses.image_level_loss(s_logits, t_logits),
        losses.image_level_loss(s_logits, losses.global_semantic_vector(t_logits)),
    )


def test_batch_stream_is_independent_of_global_rng_and_matches_the_job(
    live_run, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher
):
    """The stream a job's steps saw equals a replay of ``batches`` (what the cache is built from)
    under any global RNG state: fit's RNG use (student init, loader seeds) does not reach it."""
    seen = live_run[1]
    assert len(seen) == 4
    cfg = parse_job_config("student", job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher))
    data = load_job_data(cfg.data)
    torch.manual_seed(999)  # a different global RNG state than the job's
    torch.rand(17)
    stream = batches(data, cfg.schedule, 0, DistEnv(0, 1, torch.device("cpu")), 0, True)
    for k, want in enumerate(seen):
        b = next(stream)
        for got, w in zip([b.x_l, b.y, b.u0, b.u1, b.m], want, strict=True):
            assert torch.equal(got, w), f"step {k + 1}"


def test_build_for_two_ranks(tmp_path, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher):
    cfg = parse_job_config("student", job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher))
    summary = build_cache(cfg, tmp_path, pool_sizes=[4], iterations=2, world_size=2, verbose=False)
    assert len(summary["files"]) == 2
    keys = [json.loads(cache_files(tmp_path, r, 2)[1].read_text())["key"] for r in range(2)]
    assert [k["rank"] for k in keys] == [0, 1] and {k["world_size"] for k in keys} == {2}
    cfg_c = cfg.model_copy(update={"teacher_cache": tmp_path})
    assert check_cache(cfg_c, rank=1, world_size=2)[0].hit
    assert "rank differs" not in check_cache(cfg_c, rank=1, world_size=2)[0].reason
    # Rank 1's file holds other images than rank 0's.
    t0, t1 = (pq.read_table(cache_files(tmp_path, r, 2)[0]) for r in range(2))
    assert t0["T_D/pl_l"][0].as_py() != t1["T_D/pl_l"][0].as_py()


def test_build_runs_with_the_given_threads_and_restores_the_callers(
    tmp_path, tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher, monkeypatch
):
    import mgd_ray.teacher_cache.build as tc

    during = []
    real = tc._build_rank

    def spy(*args, **kwargs):
        during.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "_build_rank", spy)
    cfg = parse_job_config("student", job_raw(tiny_data_cfg, tiny_schedule, teacher_ckpt, second_teacher))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    build_cache(cfg, tmp_path / "t", pool_sizes=[4], iterations=2, verbose=False, threads=want)
    assert during == [want]
    assert torch.get_num_threads() == before
