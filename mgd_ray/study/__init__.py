"""Studies: a study file's jobs run as Ray Tune stages of Ray Train jobs, searched by Optuna, recorded in MLflow.

``config`` (the study file) → ``plan`` (every job, derived without Ray) → ``trial`` (one Tune trial
= one Train job) → ``stages`` (the Tune experiments) → ``run`` (``run_study``); ``results`` reads
the runs back from MLflow for ``report``.
"""
