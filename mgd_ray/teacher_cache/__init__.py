"""Teacher-signal cache: the frozen teachers' contributions to every step, computed once per study.

Every trial of a study draws the same batch stream (``data.stream.batches``: data order,
augmentation and CutMix masks are functions of the schedule seed, step, rank and world size only,
never of the global RNG), so the frozen teachers' signals at step k are the same in every trial.
``build.build_cache`` replays that stream, runs each teacher exactly as ``run_distill`` does
(``teachers.step_signals``, same inputs, same batching) and stores per step:

- ``pl_l`` and ``pl_mix``: pixel pseudo labels (uint8; 255 = ignore would be kept as is),
- ``logits_mix``: the teacher's logits on x_mix after global average pooling, (N, C) float32 —
  all the image-level term uses of them (``losses.image_level_loss`` takes pooled logits),
- ``feats_mix@H``: the teacher's decoder features on x_mix adaptive-average-pooled to H×H and
  flattened, (N, 256, H²) float32, for every H_v in ``pool_sizes`` — all the region-level term uses
  (``losses.region_level_loss`` takes pooled vectors).

Layout of a cache directory, one pair of files per rank of the world size it was built for::

    rank{r}-of-{W}.parquet   one row per step: "step" (0-based stream position = fit step - 1)
                             and one binary column per (teacher, signal), raw little-endian
                             array bytes, zstd-compressed, ``ROWS_PER_GROUP`` steps per row group
    rank{r}-of-{W}.json      the key: what the file is valid for (``key.KEY_FIELDS``), steps
                             covered, pool sizes, signals per teacher, column dtypes/shapes, sizes

A job reads it through ``read.open_cache``: when every key field matches the job and the cache
holds every signal the job's losses need, steps are served from the cache
(``read.TeacherCache.signals``); otherwise the job runs its teachers and the returned
``read.CacheStatus.reason`` says why. The ``.json`` key is written last, so a half-built cache is
never taken for a valid one.
"""
