# digitserve container images.
#
#   docker build -t digitserve .                          # serving image (default target)
#   docker build -t digitserve-train --target train .     # training image
#
# BASE_IMAGE: any Debian bookworm image with Python 3.11 as `python3` (with venv);
# without a registry, scripts/make-base-image.sh makes one locally.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: OS libraries, the unprivileged user, the environment ----------------
FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
# MXNet's wheel links against the system's OpenMP and quad-precision runtimes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libquadmath0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app

# ---- builder: a virtualenv with the serving dependencies of pyproject.toml ------
FROM base AS builder
COPY pyproject.toml /src/pyproject.toml
# Requirement lists straight from pyproject.toml: [project] dependencies (serving)
# and the [train] extra; the project itself runs from /app, not from site-packages.
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
open('/src/serve.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('/src/train.txt', 'w').write('\n'.join(p['optional-dependencies']['train']) + '\n')" \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /src/serve.txt \
 && /opt/venv/bin/python -c "import mxnet, numpy, flask, gunicorn, PIL, prometheus_client"

# ---- builder-train: the same plus the [train] extra -----------------------------
FROM builder AS builder-train
RUN /opt/venv/bin/pip install --no-cache-dir -r /src/serve.txt -r /src/train.txt \
 && /opt/venv/bin/python -c "import tqdm, matplotlib"

# ---- runtime: what the serving and training images share ------------------------
FROM base AS runtime
# The model store: the shipped default version (SHIPPED_MODEL, as <name>/<version>)
# at /app/model_store, where a named volume mounted over it is seeded from.
ARG SHIPPED_MODEL=mnist/1
ENV DIGITSERVE_STORE=/app/model_store
WORKDIR /app
COPY --chown=app:app model_store/${SHIPPED_MODEL} /app/model_store/${SHIPPED_MODEL}
COPY store /app/store
COPY pyproject.toml /app/pyproject.toml

# ---- train: `python -m training.train`, publishing into $DIGITSERVE_STORE -------
FROM runtime AS train
ENV MNIST_DIR=/data/mnist
COPY --from=builder-train /opt/venv /opt/venv
COPY training /app/training
# /data/mnist: MNIST's IDX files (a bind mount or a volume; downloaded there if
# missing and the network allows it). Owned by the user so a fresh volume is writable.
RUN install -d -o app -g app /data/mnist
USER 10001:10001
ENTRYPOINT ["python", "-m", "training.train"]
CMD ["--no-progress"]

# ---- serve (default): gunicorn as PID 1, so SIGTERM stops it gracefully ----------
FROM runtime AS serve
COPY --from=builder /opt/venv /opt/venv
COPY service /app/service
USER 10001:10001
ENV DIGITSERVE_BIND=0.0.0.0:8000
EXPOSE 8000
# /ready answers 200 once a model is loaded. Port from DIGITSERVE_BIND; proxies
# from the environment are bypassed (the check is local). The shell form on purpose
# (CMD-SHELL): the exec form breaks through podman's Docker-compatible API.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request as r; port = os.environ.get('DIGITSERVE_BIND', '').rpartition(':')[2] or '8000'; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:' + port + '/ready', timeout=4)" || exit 1
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]
