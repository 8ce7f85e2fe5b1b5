import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mgd_ray import tracking
from mgd_ray.cli import main

QUICKSTART = Path(__file__).parents[1] / "studies" / "quickstart.yaml"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(status: int) -> Iterator[str]:
    """A local HTTP server that answers every GET with ``status``; yields its base URI."""

    class Handler(http.server.BaseHTTPRequestHandler):
        paths: list[str] = []

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            Handler.paths.append(self.path)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
    assert Handler.paths, "the check never asked the server"
    assert set(Handler.paths) == {"/health"}


def test_local_stores_need_no_server():
    for uri in ("sqlite:////tmp/x/mlflow.db", "/tmp/x/mlruns", "file:/tmp/x/mlruns"):
        tracking.require_reachable(uri, wait_s=0)


def test_a_healthy_server_passes():
    with http_server(200) as uri:
        tracking.require_reachable(uri, wait_s=0)
        tracking.require_reachable(uri + "/", wait_s=0)


def test_a_dead_server_fails_with_the_uri_and_the_fix_after_retrying():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.require_reachable(uri, wait_s=1.0)
    # Retried (0.5 s, then the next 1 s pause would pass the deadline): 2 tries, within the wait.
    assert time.monotonic() - start < 1.0 + 5.0
    message = str(err.value)
    assert f"MLflow tracking server {uri} is unreachable: GET {uri}/health" in message
    assert "(2 tries in 1 s)" in message
    assert "mlflow server --host 127.0.0.1" in message and "--tracking-uri" in message
    assert "\n" not in message


def test_a_server_that_is_not_mlflow_fails_at_once():
    with http_server(404) as uri, pytest.raises(tracking.TrackingError) as err:
        tracking.require_reachable(uri, wait_s=30)
    assert "answered HTTP 404: is this an MLflow tracking server?" in str(err.value)
    assert "(1 try in 30 s)" in str(err.value)


def test_run_with_an_unreachable_tracking_uri_prints_one_line_before_data_or_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)  # the study's data root and storage would land here
    uri = f"http://127.0.0.1:{closed_port()}"
    # A 0 s wait: the CLI's default waits 15 s, which the test above already covers in small.
    real = tracking.require_reachable
    monkeypatch.setattr(tracking, "require_reachable", lambda u, **kw: real(u, wait_s=0))
    code = main(["run", str(QUICKSTART), "--tracking-uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"MLflow tracking server {uri} is unreachable") and "\n" not in err
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # neither the data nor the storage folder was made
