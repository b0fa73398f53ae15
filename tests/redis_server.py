"""A real redis-server for tests: started on a free loopback port, AOF on, stopped by its PID.

Use the fixture ``redis_url`` (module scope) in a test module with ``from tests.redis_server import redis_url``,
or :class:`RedisServer` directly when a test must stop and restart the server (same port and AOF directory, so
acknowledged writes come back). Tests skip with the reason when the ``redis-server`` binary is not installed
(Debian package ``redis-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARY = os.environ.get("MMFUSION_TEST_REDIS_SERVER", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 0.2) -> bool:
    """True when a Redis server answers PING on ``port`` (raw RESP: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``start`` / ``stop`` / ``kill`` may be called again to restart it."""

    def __init__(self, dir: Path, port: int | None = None, fsync: str = "always"):
        self.dir, self.port, self.fsync = Path(dir), port or free_port(), fsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        path = shutil.which(BINARY)
        if path is None:
            pytest.skip(f"{BINARY} is not installed (apt-get install redis-server); the Redis tests need a real server")
        self.dir.mkdir(parents=True, exist_ok=True)
        # AOF on, every write fsynced before its reply: a job acknowledged to a client survives a kill -9
        cmd = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
               "--appendfsync", self.fsync, "--dir", str(self.dir), "--protected-mode", "no"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server by its PID (SIGTERM: Redis flushes the AOF and exits; SIGKILL: a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A running :class:`RedisServer` for the module's tests."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    """The URL of a running redis-server (database 0) for the module's tests."""
    return redis_server.url
