"""The student architectures a study may train, what each costs, and which pass the searcher's limits.

A study that searches its student (``search.student_backbone``, ``search.student_output_stride``)
chooses among architectures named ``<backbone>-os<stride>`` (``-deep`` for a ResNet with the deep
stem). Their parameters and FLOPs are counted on the meta device at ``data.crop_size`` in
milliseconds; their latency, when the study asks for it, is measured once per architecture and
machine, in a Ray task on the named device, and cached in ``latency_cache.json`` under the study
storage, so later studies on the same machines reuse it. An architecture over one of the searcher's
limits (``max_gflops``, ``max_params_m``, ``max_latency_ms``) is dropped from the space before the
search starts: it never trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

from mgd_ray.config import ConfigError, ModelConfig
from mgd_ray.models.backbones import RESNETS
from mgd_ray.models.complexity import latency_ms, segmenter_cost
from mgd_ray.study.config import StudyConfig

STUDENT_PARAM = "student"  # the search's one choice among the architectures
COST_KEYS = {"gflops": "gflops", "params": "params_m", "latency": "latency_ms"}  # searcher.cost → Cost's field
COST_METRICS = {kind: f"cost/{key}" for kind, key in COST_KEYS.items()}  # as a trial's run records it
COST_UNITS = {"gflops": "GFLOPs", "params": "M params", "latency": "ms"}
LATENCY_CACHE = "latency_cache.json"
LATENCY_REPS = 20  # timed runs per model (median): two runs of 5 differed by 7 % at 32 px


def architecture_name(model: ModelConfig) -> str:
    deep = "-deep" if model.stem == "deep" and model.backbone in RESNETS else ""
    return f"{model.backbone}-os{model.output_stride}{deep}"


def architectures(study: StudyConfig) -> dict[str, ModelConfig]:
    """Every student the study may train, by name: ``student`` with each searched backbone and output
    stride (its stem, pretrained weights and layout kept; MobileNetV2 takes its own stem)."""
    space = study.search
    backbones = space.student_backbone.choices if space.student_backbone else [study.student.backbone]
    strides = space.student_output_stride.choices if space.student_output_stride else [study.student.output_stride]
    out = {}
    for backbone, stride in product(dict.fromkeys(backbones), dict.fromkeys(strides)):
        stem = study.student.stem if backbone in RESNETS else "plain"
        model = study.student.model_copy(update={"backbone": backbone, "output_stride": stride, "stem": stem})
        out[architecture_name(model)] = model
    return out


def student_model(study: StudyConfig, params: dict[str, Any]) -> ModelConfig:
    """The student a trial trains: the searched architecture (``params["student"]``), else ``student``."""
    if STUDENT_PARAM not in params:
        return study.student
    found = architectures(study).get(params[STUDENT_PARAM])
    if found is None:
        raise ValueError(f"student {params[STUDENT_PARAM]!r} is not one of {', '.join(architectures(study))}")
    return found


@dataclass(frozen=True)
class Cost:
    params_m: float
    gflops: float  # at data.crop_size², flop_counter's count (2 per multiply-add)
    latency_ms: float | None = None  # median, batch 1, on searcher.latency_device

    def value(self, kind: str) -> float:
        """The study's cost objective (``searcher.cost``) of this architecture."""
        value = getattr(self, COST_KEYS[kind])
        if value is None:
            raise ValueError(f"cost {kind}: not measured")
        return value

    def metrics(self) -> dict[str, float]:
        """As a trial's MLflow run records it."""
        values = {COST_METRICS[kind]: getattr(self, key) for kind, key in COST_KEYS.items()}
        return {metric: value for metric, value in values.items() if value is not None}


def counted_costs(models: dict[str, ModelConfig], num_classes: int, size: int) -> dict[str, Cost]:
    """Parameters and GFLOPs of each model at size², counted on the meta device (no latency yet)."""
    return {name: Cost(*segmenter_cost(model, num_classes, size)) for name, model in models.items()}


def allowed(study: StudyConfig, costs: dict[str, Cost]) -> tuple[list[str], dict[str, str]]:
    """(the architectures within the searcher's limits, name → why each other one is out).

    Raises ``ConfigError`` naming the limit when none is left: the study cannot train a student.
    """
    searcher = study.searcher
    limits = [
        ("max_gflops", searcher.max_gflops, lambda c: c.gflops, "GFLOPs"),
        ("max_params_m", searcher.max_params_m, lambda c: c.params_m, "M params"),
        ("max_latency_ms", searcher.max_latency_ms, lambda c: c.latency_ms, "ms"),
    ]
    kept, out = [], {}
    for name, cost in costs.items():
        over = [
            f"{get(cost):.3g} {unit} > searcher.{field} {limit:g}"
            for field, limit, get, unit in limits
            if limit is not None and get(cost) is not None and get(cost) > limit
        ]
        if over:
            out[name] = "; ".join(over)
        else:
            kept.append(name)
    if not kept:
        listed = ", ".join(f"{name} ({why})" for name, why in out.items())
        raise ConfigError(
            f"searcher limits: no student architecture is within them at {study.data.crop_size}x{study.data.crop_size}: "
            f"{listed}. Raise the limit, or add smaller choices to search.student_backbone / student_output_stride"
        )
    return kept, out


def hardware(device: str) -> str:
    """What a latency was measured on, for the cache key and the report."""
    import torch

    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()}"
    return f"cpu {platform.processor() or platform.machine()} ({platform.node()})"


def latency_key(model: ModelConfig, num_classes: int, size: int, device: str, threads: int, where: str) -> str:
    import torch

    blob = {
        "model": model.model_dump(mode="json", exclude={"pretrained"}),
        "classes": num_classes,
        "size": size,
        "device": device,
        "threads": threads if device == "cpu" else None,
        "hardware": where,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def measure_latencies(
    models: dict[str, ModelConfig], num_classes: int, size: int, device: str, threads: int, cached: dict[str, float]
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Run where the latency is to be measured (a Ray task on ``device``): (this machine, name →
    latency in ms, key → latency of what was measured now). ``cached`` (key → ms) is not measured again."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("searcher.latency_device: cuda, but the task that measures latency sees no CUDA device")
    where = hardware(device)
    out, new = {}, {}
    for name, model in models.items():
        key = latency_key(model, num_classes, size, device, threads, where)
        if key not in cached and key not in new:  # one measurement per model, under any number of names
            new[key] = latency_ms(model, num_classes, size, reps=LATENCY_REPS, device=device, threads=threads)
        out[name] = cached.get(key, new.get(key))
    return where, out, new


def reference_models(study: StudyConfig) -> dict[str, ModelConfig]:
    """The models beside the searched students on the accuracy–cost figure: the baselines' student
    (``student``) and each teacher (``teacher <name>``)."""
    return {"student": study.student} | {f"teacher {name}": spec.model for name, spec in study.teachers.items()}


def with_latency(
    study: StudyConfig, models: dict[str, ModelConfig], costs: dict[str, Cost], num_classes: int, storage: Path
) -> tuple[dict[str, Cost], str]:
    """``costs`` (of ``models``, same names) with each one's latency, measured in one Ray task on the
    named device or read from ``storage/latency_cache.json``; returns them and the machine measured on."""
    import ray

    searcher = study.searcher
    cache_file = storage / LATENCY_CACHE
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cuda = searcher.latency_device == "cuda"
    task = ray.remote(num_cpus=0 if cuda else searcher.latency_threads, num_gpus=1 if cuda else 0)(measure_latencies)
    where, measured, new = ray.get(
        task.remote(
            models, num_classes, study.data.crop_size, searcher.latency_device, searcher.latency_threads, cached
        )
    )
    if new:
        storage.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached | new, indent=1, sort_keys=True))
        tmp.replace(cache_file)
    return {name: Cost(c.params_m, c.gflops, measured[name]) for name, c in costs.items()}, where


def costs_to_json(costs: dict[str, Cost]) -> dict[str, dict[str, float | None]]:
    return {name: asdict(cost) for name, cost in costs.items()}
