"""Ports for embedded servers: free, and out of reach of outgoing connections."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

from cj_assessment import embedded
from cj_assessment.embedded import _ephemeral_ports, free_port


def test_free_ports_lie_below_the_ephemeral_range_and_can_be_bound() -> None:
    first_ephemeral = _ephemeral_ports()[0]
    ports = [free_port() for _ in range(20)]
    assert all(port < first_ephemeral for port in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]

        class TakenFirst:
            """The candidates, with the port in use drawn first."""

            @staticmethod
            def sample(population: Sequence[int], k: int) -> list[int]:
                return [taken, *(p for p in population[:k] if p != taken)]

        monkeypatch.setattr(embedded, "random", TakenFirst)
        port = free_port()

    assert port != taken
