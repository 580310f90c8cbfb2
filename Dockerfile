# iotbridge: one image for the bridge, the worker and the simulator (`iotbridge <command>`).
# Build: docker build -t iotbridge . (compose.yaml builds it). Runs as an unprivileged user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies in their own layer, read from pyproject.toml alone: rebuilt only when it changes,
# not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
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
# A fixed uid, so files on volumes keep one owner across image rebuilds. The spool directory is
# created here, owned by that user: a new named volume mounted on it takes that ownership.
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin iotbridge \
    && mkdir -p /var/lib/iotbridge/spool \
    && chown -R iotbridge:iotbridge /var/lib/iotbridge
USER iotbridge
ENTRYPOINT ["iotbridge"]
CMD ["--help"]
