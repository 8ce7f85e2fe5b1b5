"""The best student as an MLflow model: pinned requirements (no inference), a signature, loadable."""

from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch

from mgd_ray import tracking
from mgd_ray.models.deeplab import build_segmenter


def test_served_model_pins_its_requirements_and_loads_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    torch.manual_seed(0)
    net = build_segmenter("mobilenet_v2", 3).eval()
    model_uri = tracking.log_served_model(uri, run_id, net, 32, "s", "card")
    assert model_uri == "models:/s/1"
    local = Path(mlflow.artifacts.download_artifacts(model_uri, tracking_uri=uri, dst_path=str(tmp_path / "dl")))
    lines = set((local / "requirements.txt").read_text().split())
    assert {
        f"torch=={version('torch')}",
        f"mgd-ray=={version('mgd-ray')}",
        f"torchvision=={version('torchvision')}",
    } <= lines
    loaded = mlflow.pytorch.load_model(model_uri)
    x = torch.rand(2, 3, 40, 24)  # another batch and size than the signature's example: dynamic shapes
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), net(x).logits.numpy(), rtol=1e-5, atol=1e-5)
