# iotbridge: one image for the bridge, the worker and the simulator (`iotbridge <command>`).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p bridge workers broker simulators config observability \
    && touch bridge/__init__.py workers/__init__.py broker/__init__.py simulators/__init__.py \
             config/__init__.py observability/__init__.py \
    && pip install . && pip uninstall -y iotbridge

COPY bridge ./bridge
COPY workers ./workers
COPY broker ./broker
COPY simulators ./simulators
COPY config ./config
COPY observability ./observability
RUN pip install --no-deps . && useradd --system --uid 10001 --no-create-home iotbridge
USER iotbridge
ENTRYPOINT ["iotbridge"]
CMD ["--help"]
