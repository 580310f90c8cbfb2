# iotbridge: one image for the bridge, the worker, the gateway and the simulator (`iotbridge <command>`);
# built with EXTRAS=load it also runs Locust (compose's load profile).
# Build: docker build -t iotbridge . (compose.yaml builds it). Runs as an unprivileged user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies in their own layer, read from pyproject.toml alone: rebuilt only when it changes,
# not on every source edit.
# EXTRAS: optional dependency groups too, comma-separated (compose's load profile: `load`).
COPY pyproject.toml ./
ARG EXTRAS=""
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [d for e in filter(None, os.environ.get('EXTRAS', '').split(',')) for d in p['optional-dependencies'][e]]; print('\n'.join(p['dependencies'] + extras))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY bridge ./bridge
COPY workers ./workers
COPY broker ./broker
COPY simulators ./simulators
COPY config ./config
COPY observability ./observability
COPY gateway ./gateway
# A fixed uid, so files on volumes keep one owner across image rebuilds. The spool directory is
# created here, owned by that user: a new named volume mounted on it takes that ownership.
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin iotbridge \
    && mkdir -p /var/lib/iotbridge/spool \
    && chown -R iotbridge:iotbridge /var/lib/iotbridge
USER iotbridge
ENTRYPOINT ["iotbridge"]
CMD ["--help"]
