"""`cj-assessment` commands as real child processes, configured from a `Settings`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "cj_assessment.cli"]


class CliProcess:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.env = env
        self._handle = log.open("a")
        self.process = subprocess.Popen(
            [*CLI, *args], env=env, stdout=self._handle, stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def terminate(self, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def output(self) -> str:
        self._handle.flush()
        return self.log.read_text()


def wait_http(port: int, path: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                return int(response.status)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{path} did not answer on port {port}")


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()
