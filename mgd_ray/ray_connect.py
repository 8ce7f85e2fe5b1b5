"""Join the Ray cluster the user means, and never wait on one that is gone.

With no address, ``ray.init()`` joins the cluster that the last ``ray start`` on this machine
recorded in ``<Ray temp dir>/ray_current_cluster``, whether or not anything still serves it. A head
that crashed, or was killed without ``ray stop``, leaves the file behind, and ``ray.init()`` then
retries for about 13 minutes before a traceback (measured: 829 s). So the recorded address is tried
first, in two seconds, and a dead one is reported and replaced by a local Ray.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

log = logging.getLogger("mgd_ray.ray")


def default_address_file() -> Path:
    """Where ``ray start`` records the cluster that ``ray.init()`` joins (Ray's own rule: its temp dir)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def recorded_address(address_file: Path) -> str | None:
    """The ``host:port`` in ``address_file``, or None when there is none."""
    try:
        text = address_file.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return text or None


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_address(address: str | None, address_file: Path | None = None) -> str | None:
    """The address to give ``ray.init``: the user's (``--address`` or Ray's ``RAY_ADDRESS``) as it is;
    else ``"local"`` when the recorded cluster does not answer; else None (Ray joins the recorded
    cluster, or starts a local one when none is recorded)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return address
    path = address_file or default_address_file()
    recorded = recorded_address(path)
    if recorded is None or answers(recorded):
        return None
    log.warning(
        "%s names the Ray cluster at %s, which does not answer (was its head stopped without `ray stop`?); "
        "starting a local Ray instead. Run `ray stop` or delete that file to stop this warning, "
        "or pass --address to join another cluster.",
        path,
        recorded,
    )
    return "local"


def connect_ray(address: str | None = None, address_file: Path | None = None) -> None:
    """``ray.init`` on ``resolve_address(address)``, unless Ray is already initialised."""
    if ray.is_initialized():
        return
    ray.init(address=resolve_address(address, address_file), logging_level=logging.WARNING, log_to_driver=True)
