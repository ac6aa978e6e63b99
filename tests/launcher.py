"""Run `mlip serve` as a child process on a free loopback port: for the tests, the benchmarks and the demo.

Not part of the installed package (it needs the repository); only the standard library and httpx.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mlip serve ARGS` on 127.0.0.1:port; ``start`` returns once /health/ready answers 200, ``stop`` reaps it.
    ``program``: another server taking the same ``--host`` and ``--port`` (a benchmark's reference server)."""

    def __init__(
        self, args: list[str], log_path: Path | None = None, port: int | None = None, env: dict[str, str] | None = None,
        program: list[str] | None = None,
    ):
        self.args, self.port = args, port or free_port()
        self.program = program or [sys.executable, "-m", "mlip.cli", "serve"]
        self.own_log = log_path is None  # a temporary log of ours is removed by stop(); its text goes into errors
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="mlip-serve-", suffix=".log")[1])
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "ServerProcess":
        """Launch (again, on the same port) and wait until the models are loaded and warmed up."""
        command = [*self.program, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failed(RuntimeError, f"mlip serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise self._failed(TimeoutError, f"mlip serve not ready after {timeout_s} s")

    def _failed(self, kind: type[Exception], what: str) -> Exception:
        """Stop the server and return ``kind`` with ``what`` and the server's log."""
        log = self.log_path.read_text()
        self.stop()
        return kind(f"{what}:\n{log}")

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 15 s), wait for the process, remove our temporary log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
