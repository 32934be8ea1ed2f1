# CJ Assessment Service image.
#
#   docker build -t cj-assessment .
#   docker run --rm cj-assessment --help
#
# One image serves every role; the compose file picks the subcommand:
#   migrate | serve (default) | provider | submit
# (`demo` embeds its own broker and database, from the `dev` extra, which the image omits.)
#
# Stage 1 builds the package and its runtime dependencies (no `dev` extra) into a
# self-contained virtualenv; stage 2 copies only that venv onto a clean slim base.

ARG PYTHON_IMAGE=python:3.11-slim

###############################################################################
# builder
###############################################################################
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The venv lives at the same path in both stages: its scripts' shebangs are absolute.
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /build

# Only what `pip install .` needs (README.md is the project's `readme`).
COPY pyproject.toml README.md ./
COPY src ./src

# Regular (non-editable) install of the runtime dependencies only.
RUN pip install --upgrade pip \
 && pip install .

###############################################################################
# runtime
###############################################################################
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    PATH="/opt/venv/bin:${PATH}"

# Unprivileged user with a fixed uid/gid (no login shell, no password).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

# `cj-assessment migrate` looks for alembic/ in the working directory when the
# package is not an editable install, so the migrations live next to it in /app.
# The files stay root-owned (read-only for the service user).
WORKDIR /app
COPY alembic.ini ./alembic.ini
COPY alembic ./alembic

USER app:app

# /healthz, /readyz and /metrics (CJ_HTTP_PORT).
EXPOSE 9095

ENTRYPOINT ["cj-assessment"]
CMD ["serve"]
