"""Any study shrunk to seconds, for ``mgd-ray run --smoke`` and the tests that dry-run every study file.

Kept apart from ``plan`` so that ``mgd-ray`` can shrink a study without importing torch or MLflow.
"""

from __future__ import annotations

from pathlib import Path

from mgd_ray.config import DataConfig, ModelConfig, ScheduleConfig
from mgd_ray.study.config import Resources, StudyConfig, TeacherRecipe, TeacherSpec


def smoke(study: StudyConfig) -> StudyConfig:
    """The same study shrunk to seconds: tiny built-in data, 4 iterations, 2 trials, one seed.

    Used by ``mgd-ray run --smoke`` and the tests that dry-run every study file in the repository.
    """
    tiny_schedule = ScheduleConfig(iterations=4, eval_every=2, batch_labeled=2, batch_unlabeled=2, eval_batch=4)
    partition = study.data.partition if study.data.partition != "all" else "1/4"  # keep unlabeled images
    # A table study keeps two of its partitions: a table of two columns, each a tiny study.
    labels = {"partitions": study.data.partitions[:2]} if study.data.partitions else {"partition": partition}
    data = DataConfig(
        dataset="builtin",
        root=Path(study.storage_path) / "smoke_data",
        **labels,
        builtin={"num_train": 16, "num_val": 4, "size": 32, "num_classes": 4},
        crop_size=32,
        scales=(1.0,),
    )
    small = {"resnet101": "resnet18", "resnet50": "resnet18", "wide_resnet50_2": "resnet18", "resnet34": "resnet18"}

    def shrink(model: ModelConfig) -> ModelConfig:
        return model.model_copy(update={"backbone": small.get(model.backbone, model.backbone), "pretrained": None})

    teachers = {
        name: TeacherSpec(model=shrink(spec.model), recipe=TeacherRecipe(schedule=tiny_schedule))
        for name, spec in study.teachers.items()
    }
    return study.model_copy(
        update={
            "name": f"{study.name}-smoke",
            "data": data,
            "teachers": teachers,
            "student": shrink(study.student),
            "schedule": tiny_schedule,
            "search": study.search.model_copy(update={"iterations": None}),
            # No warm start: the earlier studies it names are full-size ones, not smoke runs.
            "searcher": study.searcher.model_copy(update={"num_samples": 2, "max_concurrent": 2, "warm_start": ()}),
            "seeds": study.seeds[:1],
            "resources": Resources(),
            "teacher_resources": None,
        }
    )
