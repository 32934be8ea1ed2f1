"""The one benchmark runner of issue 5.

    .venv/bin/python -m benchmarks [time-to-result|scoring|throughput|concurrency|pairing|
                                    pairing-service|reliability-stop|query-plans|all]
                                    [--quick]

Convention: every benchmark is a module of this package exposing

    def run(quick: bool = False) -> str

which runs the benchmark (starting whatever it needs, e.g. through `benchmarks.system`),
prints progress to stderr only, and returns its table: its figures and their comparison with
a baseline measured in the same run. Tests never assert timings; benchmarks only print. The
runner prints each table under a header naming the machine, skips a benchmark whose module or
`run` is missing, keeps going after one that fails, and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime

BENCHMARKS: dict[str, str] = {
    "time-to-result": "benchmarks.time_to_result",
    "scoring": "benchmarks.scoring_cost",
    "throughput": "benchmarks.throughput",
    "concurrency": "benchmarks.concurrency",
    "pairing": "benchmarks.pairing",
    "pairing-service": "benchmarks.pairing_service",
    "reliability-stop": "benchmarks.reliability_stop",
    "query-plans": "benchmarks.query_plans",
}


def _meminfo_gib() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown memory"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    return (
        f"{os.cpu_count()} cores ({_cpu_model()}), {_meminfo_gib()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def _call(run: object, quick: bool) -> str:
    result = run(quick)  # type: ignore[operator]
    if inspect.isawaitable(result):
        result = asyncio.run(result)  # type: ignore[arg-type]
    if isinstance(result, list | tuple):
        result = "\n".join(str(line) for line in result)
    return str(result)


def run_one(name: str, quick: bool) -> bool:
    """Run one benchmark and print its table; False if it failed."""
    header = f"== {name}{' (quick)' if quick else ''} =="
    module_name = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"{header}\nskipped: {module_name} does not exist yet\n", flush=True)
            return True
        raise
    run = getattr(module, "run", None)
    if not callable(run):
        print(f"{header}\nskipped: {module_name} has no run(quick) function\n", flush=True)
        return True
    load_before = _load()
    started = time.monotonic()
    print(f"running {name} ...", file=sys.stderr, flush=True)
    try:
        table = _call(run, quick)
    except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
        print(f"{header}\nFAILED after {time.monotonic() - started:.0f} s:", flush=True)
        traceback.print_exc(file=sys.stdout)
        print(flush=True)
        return False
    elapsed = time.monotonic() - started
    print(
        f"{header}\nmachine: {machine()}\n"
        f"started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average before {load_before}, "
        f"after {_load()}; took {elapsed:.0f} s\n\n{table}\n",
        flush=True,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("benchmark", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="the smaller variant of each")
    args = parser.parse_args(argv)

    from cj_assessment.logs import configure_logging

    configure_logging("WARNING", json=False)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    ok = True
    try:
        for name in names:
            ok = run_one(name, args.quick) and ok
    finally:
        from benchmarks.system import shutdown_infrastructure

        shutdown_infrastructure()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
