#!/usr/bin/env bash
# Run a study on a launcher cluster: the entrypoint of `ray job submit` (see README.md, "Scaling out").
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- bash cluster/run_study.sh studies/X.yaml [mgd-ray run options]
# The study runs with /mnt/shared (the shared file system) as working directory, so its relative paths
# (data.root, storage_path) name the same files on every node, and logs to the head's MLflow server at
# the head's private address, which the GPU workers reach too.
set -euo pipefail
study=$(realpath "${1:?usage: run_study.sh STUDY.yaml [mgd-ray run options]}")
shift
head_ip=$(hostname -I | awk '{print $1}')
cd /mnt/shared
exec mgd-ray run "$study" --tracking-uri "http://$head_ip:5000" "$@"
