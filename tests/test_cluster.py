"""The files in cluster/: launcher YAMLs through Ray's own validator, Kubernetes and Compose manifests parsed.

Nothing here reaches a cloud; what these files promise (nothing public, no credentials, the project on
every node, one shared file system) is checked on the parsed documents.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
PRIVATE_PORTS = {5000, 6379, 8265, 10001}  # MLflow, GCS, dashboard, Ray client
SECRET_KEY = re.compile(r"secret|passw|token|credential|private_key|access_key|api_key", re.IGNORECASE)


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def walk(node, path=()):
    """Yield (key path, value) for every mapping entry of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, str(key)), value
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))


# ------------------------------------------------------------------ cluster launcher (ray up)
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validator(name):
    config = prepare_config(load(name))  # what `ray up` does before touching the cloud: defaults merged
    validate_config(config)  # Ray's ray-schema.json plus its node-type checks
    assert config["head_node_type"] == "head"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1  # scales from zero
    assert config["available_node_types"]["head"]["max_workers"] == 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_the_validator_is_not_a_rubber_stamp(name):
    broken = copy.deepcopy(load(name))
    broken["available_node_types"]["gpu_worker"]["max_wokers"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_cluster_shape(name):
    config = load(name)
    head, gpu = config["available_node_types"]["head"], config["available_node_types"]["gpu_worker"]
    assert "gpu" in config["docker"]["worker_image"] and "cpu" in config["docker"]["head_image"]
    assert head["resources"].get("GPU", 0) == 0
    if config["provider"]["type"] == "gcp":  # GCP does not detect resources from the machine type
        assert gpu["resources"]["GPU"] == 4
    else:
        assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5"))
    assert config["docker"]["worker_image"].startswith(f"rayproject/ray:{ray.__version__}-")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_the_project_is_installed_on_every_node_from_the_repository(name):
    config = load(name)
    assert config["file_mounts"] == {"~/mgd_ray": "."}
    assert "pip install -q ~/mgd_ray" in config["setup_commands"]  # setup_commands run on head and workers
    assert {".venv", ".git", "data", "mgd_ray_runs"} <= set(config["rsync_exclude"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_shared_storage_is_mounted_on_every_node_and_container(name):
    config = load(name)
    init = " ".join(config["initialization_commands"])
    assert re.search(r"mount -t nfs4? .* /mnt/shared", init)
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    head_start = " ".join(config["head_start_ray_commands"])
    artifacts = re.search(r"start_mlflow\.sh (\S+)", head_start)[1]
    assert artifacts.startswith({"aws": "s3://", "gcp": "gs://"}[config["provider"]["type"]])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_nothing_on_the_head_is_published(name):
    config = load(name)
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        assert not public or (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
        assert not PRIVATE_PORTS & set(range(rule["FromPort"], rule["ToPort"] + 1)), rule
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-host=0.0.0.0" not in head_start
    docker_options = " ".join(config["docker"]["run_options"])
    assert not re.search(r"(^|\s)(-p|--publish)(\s|=)", docker_options)
    if config["provider"]["type"] == "gcp":  # the dedicated VPC whose firewall admits SSH + internal only
        for node_type in config["available_node_types"].values():
            (interface,) = node_type["node_config"]["networkInterfaces"]
            assert interface["subnetwork"].endswith("/subnetworks/mgd-ray")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_no_keys_or_key_files_in_the_launcher_configs(name):
    config = load(name)
    assert set(config["auth"]) == {"ssh_user"}  # Ray generates the key pair
    assert "gcp_credentials" not in config["provider"]
    for path, _value in walk(config):
        assert not SECRET_KEY.search(path[-1]), path


def test_no_credential_material_in_any_cluster_file():
    patterns = [r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY", r"aws_secret_access_key", r"\"private_key\""]
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            text = path.read_text()
            for pattern in patterns:
                assert not re.search(pattern, text), f"{path}: {pattern}"


def test_scripts_parse_and_are_referenced_from_the_configs():
    for script in ("start_mlflow.sh", "run_study.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)
    for name in LAUNCHERS:
        assert "~/mgd_ray/cluster/start_mlflow.sh" in " ".join(load(name)["head_start_ray_commands"])
    run_study = (CLUSTER / "run_study.sh").read_text()
    assert "cd /mnt/shared" in run_study and 'exec mgd-ray run "$study" --tracking-uri' in run_study


# ------------------------------------------------------------------ Kubernetes (KubeRay + MLflow)
def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


API_VERSIONS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "ServiceAccount": "v1",
}
K8S_FILES = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "mlflow/kubernetes.yaml"]


@pytest.mark.parametrize("name", K8S_FILES)
def test_kubernetes_manifests_have_known_kinds_and_stay_inside_the_cluster(name):
    for doc in load_all(name):
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (name, doc["kind"])
        assert doc["metadata"]["namespace"] == "mgd-ray"
        if doc["kind"] == "Service":
            assert doc["spec"]["type"] == "ClusterIP"
        for path, value in walk(doc):
            assert path[-1] not in ("hostPort", "hostNetwork", "nodePort", "loadBalancerIP"), path
            if path[-1] == "env":
                for variable in value:
                    if SECRET_KEY.search(variable["name"]):
                        assert "secretKeyRef" in variable.get("valueFrom", {}), variable


def test_raycluster_head_service_is_cluster_internal_and_gpu_group_autoscales():
    (cluster,) = by_kind(load_all("kuberay/raycluster.yaml"))["RayCluster"]
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
    (claim,) = by_kind(load_all("kuberay/raycluster.yaml"))["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in [spec["headGroupSpec"], gpu]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_rayjob_runs_a_study_with_the_in_cluster_mlflow_service():
    (job,) = load_all("kuberay/rayjob.yaml")
    (cluster,) = by_kind(load_all("kuberay/raycluster.yaml"))["RayCluster"]
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    shell, flag, script = shlex.split(job["spec"]["entrypoint"])
    assert (shell, flag) == ("bash", "-c")
    cd, command = script.split(" && ")
    assert cd == "cd /mnt/shared"
    argv = shlex.split(command)
    assert argv[:2] == ["mgd-ray", "run"]
    assert argv[2] == "/home/ray/mgd_ray/studies/quickstart.yaml" and (REPO / "studies/quickstart.yaml").is_file()
    assert "COPY --chown=ray:users . /home/ray/mgd_ray" in (CLUSTER / "Dockerfile").read_text()
    uri = argv[argv.index("--tracking-uri") + 1]
    mlflow_docs = by_kind(load_all("mlflow/kubernetes.yaml"))
    service = next(s for s in mlflow_docs["Service"] if s["metadata"]["name"] == "mlflow")
    port = service["spec"]["ports"][0]["port"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    assert uri == f"http://{host}"
    (server,) = [d for d in mlflow_docs["Deployment"] if d["metadata"]["name"] == "mlflow"]
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert host in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")  # else MLflow refuses the Host header


def test_mlflow_server_uses_postgres_and_an_object_store():
    docs = by_kind(load_all("mlflow/kubernetes.yaml"))
    assert {d["metadata"]["name"] for d in docs["Deployment"]} == {"mlflow", "mlflow-postgres"}
    server = next(d for d in docs["Deployment"] if d["metadata"]["name"] == "mlflow")
    args = " ".join(server["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri postgresql://mlflow@mlflow-postgres:5432/mlflow" in args
    assert re.search(r"--artifacts-destination (s3|gs)://", args)
    postgres_service = next(s for s in docs["Service"] if s["metadata"]["name"] == "mlflow-postgres")
    assert postgres_service["spec"]["ports"][0]["port"] == 5432


# ------------------------------------------------------------------ docker compose (one VM)
def test_compose_binds_mlflow_to_loopback_and_keeps_secrets_out():
    compose = load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert "ports" not in services["postgres"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    for service in services.values():
        for key, value in service.get("environment", {}).items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), (key, value)
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://mlflow@postgres:5432/mlflow" in command
