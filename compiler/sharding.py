"""Where a compile computes its calibration statistics: in its own process (the default),
in N forked worker processes (`--workers N`), or as tasks on a Ray cluster (`--ray ADDRESS`,
`auto` for a local one). passes/stream_workers.py runs the shards; this module holds the
choice and the connection to Ray (an optional extra: `pip install 'qcompile[ray]'`)."""

from __future__ import annotations

import dataclasses
import socket
from urllib.parse import urlsplit

from .errors import UsageError

CONNECT_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Sharding:
    workers: int = 1                 # shards (processes or Ray tasks); under Ray 0: one per CPU of the cluster
    ray: str | None = None           # a Ray cluster address, "auto", or None: forked processes

    def __post_init__(self):
        if self.workers < (0 if self.ray is not None else 1):
            raise UsageError(f"--workers must be at least 1, got {self.workers}")

    @property
    def sharded(self) -> bool:
        return self.ray is not None or self.workers > 1

    def describe(self) -> dict:
        return {"workers": self.workers, "ray": self.ray}


def connect_ray(address: str):
    """The `ray` module, initialised against `address` ("auto": a local cluster, started if
    none runs). An address that does not answer is refused at once: ray.init itself retries
    a dead address for minutes, and a silent fallback to local work would hide it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, an optional extra", hint="pip install 'qcompile[ray]'") from None
    if address != "auto":
        _check_answers(address)
    if ray.is_initialized():      # this process already joined a cluster (a library caller's, an earlier compile)
        return ray
    try:
        ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except Exception as err:   # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        raise UsageError(f"cannot join the Ray cluster at {address}: {type(err).__name__}: {err}",
                         hint="check the address (ray status on the head node), or use --workers N") from None
    return ray


def _check_answers(address: str) -> None:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UsageError(f"--ray {address!r} is not HOST:PORT, ray://HOST:PORT or auto",
                         hint="e.g. --ray 10.0.0.5:6379, or --ray auto for a local cluster")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UsageError(f"the Ray cluster at {address} does not answer ({err.strerror or err})",
                         hint="start it (ray start --head) or check the address; "
                              "nothing falls back to local workers") from None
