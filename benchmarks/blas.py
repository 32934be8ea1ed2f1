"""BLAS threads of this process: read and limit them, like `threadpoolctl` (not a dependency).

numpy and scipy each load their own OpenBLAS; both export `*openblas_set_num_threads*`. The
service scores in its event loop, so how many threads OpenBLAS spins up for a Cholesky on a
busy 2-core machine decides whether a 500-essay fit takes 0.15 s or several seconds."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


def _libraries() -> list[tuple[str, ctypes.CDLL]]:
    import numpy  # noqa: F401 - load the BLAS libraries before looking for them
    import scipy.linalg  # noqa: F401

    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split()
                path = fields[-1] if len(fields) >= 6 else ""
                if "openblas" in path.lower() and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    libraries = []
    for path in paths:
        with contextlib.suppress(OSError):
            libraries.append((path, ctypes.CDLL(path)))
    return libraries


def _symbol(library: ctypes.CDLL, names: tuple[str, ...]) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    for name in names:
        function = getattr(library, name, None)
        if function is not None:
            return function
    return None


def blas_threads() -> list[int]:
    """Threads each loaded OpenBLAS will use (empty if none can be asked)."""
    counts = []
    for _, library in _libraries():
        getter = _symbol(library, _GETTERS)
        if getter is not None:
            getter.restype = ctypes.c_int
            counts.append(int(getter()))
    return counts


def describe() -> str:
    counts = blas_threads()
    if not counts:
        return "BLAS threads unknown"
    return "OpenBLAS threads " + "/".join(str(c) for c in counts) + " (numpy/scipy)"


@contextlib.contextmanager
def limited_blas_threads(threads: int | None) -> Iterator[bool]:
    """Limit every loaded OpenBLAS to `threads` meanwhile; yields whether that was possible.
    None changes nothing."""
    if threads is None:
        yield True
        return
    undo = []
    for _, library in _libraries():
        setter, getter = _symbol(library, _SETTERS), _symbol(library, _GETTERS)
        if setter is None or getter is None:
            continue
        getter.restype = ctypes.c_int
        before = int(getter())
        setter.argtypes = [ctypes.c_int]
        setter(threads)
        undo.append((setter, before))
    try:
        yield bool(undo)
    finally:
        for setter, before in undo:
            setter(before)
