"""`cj-assessment` command line: migrate, serve, provider, demo, submit."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

# One BLAS thread per process: scoring matrices are small, and OpenBLAS threads contending
# with the event loop, the database and the broker on a few cores cost 10-100x more than they
# save. Set before numpy is first imported; an explicit environment value still wins.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from cj_assessment.logs import configure_logging  # noqa: E402
from cj_assessment.settings import Settings  # noqa: E402


def _migrate(args: argparse.Namespace) -> int:
    from sqlalchemy import make_url
    from sqlalchemy.exc import DBAPIError

    from cj_assessment.database import migrate
    from cj_assessment.errors import MigrationsNotFound

    settings = Settings()
    try:
        migrate(settings.database_url, settings.alembic_dir)
    except MigrationsNotFound as exc:
        print(f"cj-assessment migrate: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, DBAPIError) as exc:
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        print(
            f"cj-assessment migrate: database {where} unreachable: {type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    print("database migrated to head")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cj_assessment.errors import (
        DependencyUnavailable,
        MigrationsNotFound,
        SchemaNotMigrated,
        ServiceStalled,
        TopicsNotCreated,
    )
    from cj_assessment.service import serve

    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        asyncio.run(serve(settings))
    except (SchemaNotMigrated, MigrationsNotFound, TopicsNotCreated) as exc:
        print(f"cj-assessment serve: {exc}", file=sys.stderr)
        return 2
    except ServiceStalled as exc:
        print(f"cj-assessment serve: stalled, exiting for a restart: {exc}", file=sys.stderr)
        return 1
    except DependencyUnavailable as exc:
        print(f"cj-assessment serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _provider(args: argparse.Namespace) -> int:
    from cj_assessment.llm_provider import SimulatedProvider, provider_config_from_env

    if args.backend != "simulated":
        print(f"unknown provider backend {args.backend!r}", file=sys.stderr)
        return 2
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        config = provider_config_from_env(os.environ)
    except ValueError as exc:
        print(f"cj-assessment provider: invalid setting: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await SimulatedProvider(config).run(stop)

    asyncio.run(run())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cj_assessment.demo import run_demo

    return asyncio.run(run_demo(timeout=args.timeout))


def _submit(args: argparse.Namespace) -> int:
    from cj_assessment.pipeline_client import (
        OutcomeWatcher,
        essays_from_folder,
        format_ranking,
        publish,
        request_envelope,
    )

    settings = Settings()
    essays = essays_from_folder(Path(args.folder))
    bos_batch_id = args.batch_id or f"cli-{uuid.uuid4()}"
    instructions = Path(args.instructions).read_text() if args.instructions else None
    overrides = {
        key: value
        for key, value in {
            "batch_size": args.batch_size,
            "max_concurrent_batches": args.max_concurrent_batches,
            "partial_completion_threshold": args.threshold,
        }.items()
        if value is not None
    }
    envelope = request_envelope(
        bos_batch_id=bos_batch_id,
        essays=essays,
        instructions=instructions,
        batch_config_overrides=overrides or None,
    )

    async def run() -> int:
        watcher = OutcomeWatcher(settings) if args.wait else None
        if watcher:
            await watcher.start()
        try:
            await publish(settings, [envelope])
            print(f"submitted {len(essays)} essays as {bos_batch_id}")
            if watcher:
                outcome = (await watcher.wait_for([bos_batch_id], args.timeout))[bos_batch_id]
                print(format_ranking(outcome))
                return 0 if outcome["data"]["event_name"] == "cj_assessment.completed" else 1
            return 0
        finally:
            if watcher:
                await watcher.stop()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cj-assessment", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)").set_defaults(
        func=_migrate
    )
    sub.add_parser("serve", help="run the service").set_defaults(func=_serve)
    provider = sub.add_parser("provider", help="run the reference LLM provider worker")
    provider.add_argument("--backend", default="simulated", choices=["simulated"])
    provider.set_defaults(func=_provider)
    demo = sub.add_parser("demo", help="rank the bundled sample essays, everything embedded")
    demo.add_argument("--timeout", type=float, default=120.0)
    demo.set_defaults(func=_demo)
    submit = sub.add_parser("submit", help="publish a request built from a folder of .txt essays")
    submit.add_argument("folder")
    submit.add_argument("--batch-id", default=None, help="bos_batch_id (default: random)")
    submit.add_argument("--instructions", default=None, help="file with the essay instructions")
    submit.add_argument("--batch-size", type=int, default=None)
    submit.add_argument("--max-concurrent-batches", type=int, default=None)
    submit.add_argument("--threshold", type=float, default=None)
    submit.add_argument("--wait", action="store_true", help="print the ranking when it arrives")
    submit.add_argument("--timeout", type=float, default=600.0)
    submit.set_defaults(func=_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        # A setting out of its range: one line per setting, not a traceback.
        for error in exc.errors(include_url=False, include_input=False):
            name = "CJ_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"cj-assessment: invalid setting {name}: {error['msg']}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
