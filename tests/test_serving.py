"""The served student: images in, masks out, its code inside the model, public pinned requirements only.

The slow test serves the registered model with ``mlflow models serve`` in an environment that has
every dependency but not mgd_ray, and sends it real image files over HTTP on 127.0.0.1.
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from mgd_ray import tracking
from mgd_ray.checkpoint import segmenter_record
from mgd_ray.config import ModelConfig
from mgd_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgd_ray.metrics import sliding_window_logits
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.predict import load_checkpoint, resolve_model
from mgd_ray.serving import SERVED_DISTRIBUTIONS, URI_VARIABLES, fluent_uris, log_served_model
from mgd_ray.testing import free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_job_data) -> dict:
    """A student checkpoint (32-px crop) registered as models:/s/1 in a SQLite store."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(3)
    model = build_segmenter("mobilenet_v2", tiny_job_data.num_classes)
    ckpt = root / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(segmenter_record(model, ModelConfig(backbone="mobilenet_v2"), tiny_job_data, 32, "student"), ckpt)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = client.create_experiment("e", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), {k: os.environ.get(k) for k in URI_VARIABLES})
    model_uri = log_served_model(uri, run_id, ckpt, 32, "s", "the card")
    # The process's own MLflow URIs and the variables its child processes inherit are left as they were.
    assert (
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        {k: os.environ.get(k) for k in URI_VARIABLES},
    ) == before
    assert before[0] != uri and before[2]["MLFLOW_REGISTRY_URI"] != uri
    with fluent_uris(uri):  # models:/ URIs resolve in the registry of the process's context
        local = Path(mlflow.artifacts.download_artifacts(model_uri, tracking_uri=uri, dst_path=str(root / "dl")))
    return {"root": root, "uri": uri, "ckpt": ckpt, "model_uri": model_uri, "local": local, "client": client}


def _images(tiny_job_data) -> list[bytes]:
    """Two real image files: a 32-px built-in val JPEG/PNG as stored, and one 80×50 (beyond the crop) as JPEG."""
    small = Path(tiny_job_data.val.images[0]).read_bytes()
    buffer = io.BytesIO()
    Image.open(tiny_job_data.val.images[1]).convert("RGB").resize((80, 50)).save(buffer, format="JPEG", quality=95)
    return [small, buffer.getvalue()]


def _expected(ckpt: Path, encoded: bytes) -> np.ndarray:
    """Class ids computed here: decode, ImageNet normalisation by hand, 32-px windows beyond the crop."""
    seg = load_checkpoint(ckpt, device="cpu")
    image = np.array(Image.open(io.BytesIO(encoded)).convert("RGB"))
    x = (image.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    with torch.no_grad():
        if max(x.shape[-2:]) <= 32:
            logits = seg.model(x).logits
        else:
            logits = sliding_window_logits(lambda t: seg.model(t).logits, x, seg.num_classes, 32)
    return logits.argmax(1)[0].numpy()


def _mask(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "P"
        return np.array(image)


def test_the_model_carries_its_code_and_pins_only_public_packages(served):
    local = served["local"]
    lines = (local / "requirements.txt").read_text().split()
    assert sorted(lines) == sorted(
        [f"mlflow=={version('mlflow')}"] + [f"{dist}=={version(dist)}" for dist in SERVED_DISTRIBUTIONS]
    )
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml"):
        assert "mgd" not in (local / name).read_text().lower(), name  # no mgd-ray from an index, no local path
    code = local / "code" / "mgd_ray"
    assert (code / "serving.py").read_bytes() == (Path(__file__).parents[1] / "mgd_ray" / "serving.py").read_bytes()
    assert not list(code.rglob("__pycache__")) and not (code / "data" / "splits").exists()
    assert (local / "artifacts" / "model.pt").read_bytes() == served["ckpt"].read_bytes()
    version_ = served["client"].get_model_version("s", "1")
    assert version_.description == "the card"
    # predict / export find the checkpoint inside the registered model
    found = resolve_model("models:/s/1", served["uri"], dest=served["root"] / "resolved")
    assert found.read_bytes() == served["ckpt"].read_bytes()


def test_pyfunc_segments_encoded_images_at_their_own_size(served, tiny_job_data):
    with fluent_uris(served["uri"]):
        model = mlflow.pyfunc.load_model(served["model_uri"])
    images = _images(tiny_job_data)
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out.columns) == ["mask"] and len(out) == 2
    for png, encoded in zip(out["mask"], images, strict=True):
        np.testing.assert_array_equal(_mask(png), _expected(served["ckpt"], encoded))
    assert _mask(out["mask"][1]).shape == (50, 80)
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 1: column 'image' is not a readable image"):
        model.predict(pd.DataFrame({"image": [images[0], b"not an image"]}))


def _closure(names: list[str]) -> set[str]:
    """The distributions that installing ``names`` brings (their requirements, recursively, for this Python)."""
    environment = default_environment() | {"extra": ""}
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            found = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in map(Requirement, found):
            if req.marker is None or req.marker.evaluate(environment):
                todo.append(canonicalize_name(req.name))
    return seen


def _owners() -> dict[str, str]:
    """Every installed file → the distribution whose RECORD lists it (namespace packages share folders)."""
    from importlib.metadata import distributions

    out = {}
    for dist in distributions():
        name, base = canonicalize_name(dist.metadata["Name"]), str(dist.locate_file(""))
        out |= {os.path.normpath(os.path.join(base, str(file))): name for file in dist.files or []}
    return out


def _environment_own() -> set[str]:
    """pip and setuptools come with every virtual environment (torch's cpp_extension imports setuptools),
    and setuptools imports the packages it vendors from site-packages when they are installed there."""
    import setuptools

    vendored = Path(setuptools.__file__).parent / "_vendor"
    return {"pip", "setuptools"} | {canonicalize_name(d.name.split("-")[0]) for d in vendored.glob("*.dist-info")}


@pytest.mark.slow
def test_requirements_cover_every_module_loading_and_predicting_imports(served, tiny_job_data, tmp_path):
    """Load and run the model in a fresh Python; every module it imports must come with a requirement."""
    image = tmp_path / "in.png"
    image.write_bytes(_images(tiny_job_data)[0])
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(served['local'])!r})\n"
        f"m.predict(pd.DataFrame({{'image': [open({str(image)!r}, 'rb').read()]}}))\n"
        "print('\\n'.join(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    files = [os.path.normpath(line) for line in out.stdout.splitlines() if line]
    code = str(served["local"] / "code" / "mgd_ray")
    assert os.path.join(code, "serving.py") in files  # mgd_ray came from the model, not from this checkout
    owners = _owners()
    imported = {owners[f] for f in files if f in owners} - {"mgd-ray"}
    assert {"torch", "torchvision", "mlflow", "pillow"} <= imported  # the mapping works
    logged = [Requirement(line).name for line in (served["local"] / "requirements.txt").read_text().split()]
    missing = imported - _closure(logged) - _environment_own()
    assert not missing, f"imported when serving but neither required nor brought by a requirement: {missing}"


# ---------------------------------------------------------------------------- a clean environment, over HTTP
def _environment_without_mgd_ray(root: Path) -> Path:
    """A venv that sees this one's packages except mgd_ray (through a .pth file), with mlflow and uvicorn."""
    site = Path(sysconfig.get_paths()["purelib"])
    shim = root / "site"
    shim.mkdir()
    for entry in site.iterdir():
        if "mgd_ray" not in entry.name.lower().replace("-", "_") and entry.suffix != ".pth":
            (shim / entry.name).symlink_to(entry)
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    env_site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (env_site / "dependencies.pth").write_text(f"{shim}\n")
    for script in ("mlflow", "uvicorn"):
        body = (Path(sys.executable).parent / script).read_text().split("\n", 1)[1]
        (env / "bin" / script).write_text(f"#!{python}\n{body}")
        (env / "bin" / script).chmod(0o755)
    return env


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_mlflow_models_serve_in_an_environment_without_mgd_ray(served, tiny_job_data, tmp_path):
    env = _environment_without_mgd_ray(tmp_path)
    python = env / "bin" / "python"
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "VIRTUAL_ENV")
    }
    clean |= {"PATH": f"{env / 'bin'}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": served["uri"]}
    probe = subprocess.run(
        [python, "-c", "import mlflow, torch, mgd_ray"], capture_output=True, text=True, env=clean, cwd=tmp_path
    )
    assert "No module named 'mgd_ray'" in probe.stderr  # the premise: only the model can bring mgd_ray here
    requirements = served["local"] / "requirements.txt"
    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index", "-r", str(requirements)],
        capture_output=True, text=True, env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    assert "Would install" not in resolved.stdout  # every pin is met without this checkout

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [env / "bin" / "mlflow", "models", "serve", "-m", "models:/s/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=clean, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        images = _images(tiny_job_data)
        records = [{"image": base64.b64encode(data).decode()} for data in images]
        status, body = _post(port, {"dataframe_records": records})
        assert status == 200, body
        masks = [_mask(base64.b64decode(row["mask"])) for row in body["predictions"]]
        for mask, encoded in zip(masks, images, strict=True):
            np.testing.assert_array_equal(mask, _expected(served["ckpt"], encoded))
        status, body = _post(port, {"dataframe_records": [{"image": base64.b64encode(b"no image").decode()}]})
        assert status == 400 and "row 0: column 'image' is not a readable image" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
