"""connect_ray: a dead cluster recorded by an earlier `ray start` is reported and replaced by a local
Ray, in seconds; a live one, or an address the user gave, is joined as it is."""

import logging
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import ray

from mgd_ray.ray_connect import answers, connect_ray, default_address_file, recorded_address, resolve_address


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def listener():
    """A port that accepts connections for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def dead_address():
    """A port nothing listens on: bound once, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def _recorded(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ray_current_cluster"
    path.write_text(text + "\n")
    return path


def test_answers_tells_a_live_port_from_a_dead_or_malformed_one(listener, dead_address):
    assert answers(listener)
    assert not answers(dead_address, timeout=0.5)
    assert not answers("no-port-here")
    assert not answers("127.0.0.1:http")


def test_recorded_address_reads_the_file_and_none_when_missing_or_empty(tmp_path):
    assert recorded_address(_recorded(tmp_path, "10.0.0.5:6379")) == "10.0.0.5:6379"
    assert recorded_address(tmp_path / "missing") is None
    assert recorded_address(_recorded(tmp_path, "  ")) is None


def test_a_dead_recorded_cluster_is_named_and_replaced_by_a_local_ray(tmp_path, dead_address, no_ray_address, caplog):
    path = _recorded(tmp_path, dead_address)
    with caplog.at_level(logging.WARNING, logger="mgd_ray.ray"):
        assert resolve_address(None, path) == "local"
    (message,) = [r.getMessage() for r in caplog.records if r.name == "mgd_ray.ray"]
    assert str(path) in message and dead_address in message and "ray stop" in message


def test_a_live_recorded_cluster_or_no_record_lets_ray_choose(tmp_path, listener, no_ray_address, caplog):
    with caplog.at_level(logging.WARNING, logger="mgd_ray.ray"):
        assert resolve_address(None, _recorded(tmp_path, listener)) is None
        assert resolve_address(None, tmp_path / "missing") is None
    assert not [r for r in caplog.records if r.name == "mgd_ray.ray"]


def test_the_users_address_is_kept_without_reading_the_record(tmp_path, dead_address, monkeypatch, caplog):
    path = _recorded(tmp_path, dead_address)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address("10.0.0.7:6379", path) == "10.0.0.7:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.8:6379")  # Ray's own variable: ray.init reads it
    with caplog.at_level(logging.WARNING, logger="mgd_ray.ray"):
        assert resolve_address(None, path) is None
    assert not [r for r in caplog.records if r.name == "mgd_ray.ray"]


def test_connect_ray_starts_a_local_ray_when_rays_own_record_is_stale(
    dead_address, no_ray_address, monkeypatch, caplog
):
    """End to end, through Ray's own lookup: RAY_TMPDIR points Ray's temp dir (and so its
    ray_current_cluster) at a folder of the test's; plain ray.init() would retry the dead address
    for minutes."""
    if ray.is_initialized():
        ray.shutdown()
    temp = Path(tempfile.mkdtemp(prefix="r-"))  # short: Ray's socket paths live under it
    try:
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
        record = default_address_file()
        assert record == temp / "ray" / "ray_current_cluster"
        record.parent.mkdir()
        record.write_text(dead_address)
        with caplog.at_level(logging.WARNING, logger="mgd_ray.ray"):
            connect_ray()
        assert ray.is_initialized()
        assert ray.get(ray.put(41)) + 1 == 42
        assert any(str(record) in r.getMessage() for r in caplog.records if r.name == "mgd_ray.ray")
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
