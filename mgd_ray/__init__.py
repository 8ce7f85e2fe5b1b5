"""mgd_ray: Multi-Granularity Distillation for lightweight semi-supervised segmentation on Ray."""

import os

# MLflow 3's usage telemetry (on by default) runs a thread that, when it cannot reach its endpoint
# (always, offline), unsets an environment variable (_MLFLOW_TELEMETRY_SESSION_ID, inherited from the
# driver by every Ray worker) while other threads' HTTP calls read os.environ: one trial of a
# 32-trial study died of that KeyError (benchmarks/bench_load.py). A user who sets the variable keeps
# their choice; child processes (Ray's workers on a local cluster) inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
