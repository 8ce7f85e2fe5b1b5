#!/usr/bin/env bash
# Start (or restart) the MLflow tracking server on a launcher cluster's head, inside its Ray container.
#   bash cluster/start_mlflow.sh ARTIFACT_URI      e.g. s3://my-bucket/mlflow or gs://my-bucket/mlflow
# Tracking database: SQLite in /var/lib/mgd-ray (the head's disk, bind-mounted into the container).
# Artifacts: proxied by this server to ARTIFACT_URI, so only the head needs object-store access.
# It listens on every interface of the head because the GPU workers log to it; the cluster's security
# group / firewall admits only SSH and node-to-node traffic, so from outside it is reached through an
# SSH tunnel (`ray attach CLUSTER.yaml -p 5000`, then http://127.0.0.1:5000).
set -euo pipefail
artifacts=${1:?usage: start_mlflow.sh ARTIFACT_URI (s3://bucket/prefix or gs://bucket/prefix)}
state=/var/lib/mgd-ray
mkdir -p "$state"
if [[ -f $state/mlflow.pid ]] && kill -0 "$(cat "$state/mlflow.pid")" 2>/dev/null; then
  kill "$(cat "$state/mlflow.pid")"
  sleep 2
fi
nohup mlflow server \
  --host 0.0.0.0 --port 5000 \
  --backend-store-uri "sqlite:///$state/mlflow.db" \
  --artifacts-destination "$artifacts" \
  >"$state/mlflow.log" 2>&1 &
echo $! >"$state/mlflow.pid"
echo "MLflow server (pid $!) on port 5000, artifacts in $artifacts, log $state/mlflow.log"
