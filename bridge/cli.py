"""The `iotbridge` command: broker, bridge, worker, gateway, token, simulate, audit, demo,
check-config.

Each long-running command is built the same way: settings, logging, metrics registry, then the
component's `run(stop)` beside the /metrics /healthz /readyz server (`observability.lifecycle`).
Components are imported inside their command so `check-config` starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer
from prometheus_client import CollectorRegistry

from config import loader
from config.errors import ConfigError, IotBridgeError
from config.settings import Settings
from observability.lifecycle import serve
from observability.logs import setup_logging
from observability.metrics import readiness_gauge

log = logging.getLogger("iotbridge")

app = typer.Typer(
    name="iotbridge",
    help="MQTT-native edge-to-cloud bridge for industrial telemetry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: the shipped settings.yaml)."),
]
LogFormatOption = Annotated[
    str | None, typer.Option("--log-format", help="text or json (default: logging.format).")
]
LogLevelOption = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING.")]


class Component(Protocol):
    """What every long-running part offers the command line."""

    def readiness(self) -> tuple[bool, str]: ...

    async def run(self, stop: asyncio.Event) -> None: ...


def _settings(config: Path | None) -> Settings:
    try:
        return loader.load(config)
    except ConfigError as exc:
        _refuse(exc)


def _refuse(exc: ConfigError) -> NoReturn:
    """Each problem on one line, then exit 2."""
    for problem in exc.problems:
        typer.echo(f"{exc.source}: {problem}" if exc.source else str(problem), err=True)
    raise typer.Exit(2) from exc


def _logging(settings: Settings, log_format: str | None, log_level: str | None) -> None:
    setup_logging(log_level or settings.logging.level, log_format or settings.logging.format)


def _run(
    component: Component, section: str, settings: Settings, registry: CollectorRegistry
) -> None:
    """Serve `component` beside /metrics on its section's metrics address (`<section>.metrics_*`)."""
    own = getattr(settings, section)
    host, port = own.metrics_host, own.metrics_port
    readiness_gauge(registry, section, component.readiness)
    # What exists by now (modules, settings, compiled contracts) lives as long as the process:
    # frozen out of the collector's reach, so a full collection scans only what came after.
    # Measured in the bridge: full collections of 50-107 ms, each a stall of every message.
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(
            serve(
                host=host,
                port=port,
                registry=registry,
                readiness=component.readiness,
                body=component.run,
                http=settings.http,
            )
        )
    except (IotBridgeError, OSError) as exc:
        # A port in use, a refused configuration: one line, not a traceback.
        log.error("cannot run: %s", exc)  # noqa: TRY400 -- the message is the whole answer
        raise typer.Exit(2) from exc


@app.command("check-config")
def check_config(
    file: Annotated[Path | None, typer.Argument(help="Settings file to check.")] = None,
    config: ConfigOption = None,
) -> None:
    """Validate a settings file: each problem with its YAML path, or a one-line summary."""
    path = file or config
    try:
        settings = loader.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        typer.echo(f"{len(exc.problems)} problem(s) in {exc.source}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{path or loader.default_settings_path()}: {loader.summary(settings)}")


@app.command()
def broker(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run the embedded amqtt broker (MQTT 3.1.1) on broker.host:broker.port."""
    from broker.embedded import EmbeddedBroker

    settings = _settings(config)
    _logging(settings, log_format, log_level)
    registry = CollectorRegistry()
    component = EmbeddedBroker(settings, registry)
    _run(component, "broker", settings, registry)


@app.command()
def bridge(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Subscribe to the routes' topics, validate, and append to Redis Streams."""
    from bridge.app import BridgeApp

    settings = _settings(config)
    _logging(settings, log_format, log_level)
    registry = CollectorRegistry()
    component = BridgeApp(settings, registry)
    _run(component, "bridge", settings, registry)


@app.command()
def worker(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Read telemetry in a consumer group, run the detectors, write anomalies."""
    from workers.app import WorkerApp

    settings = _settings(config)
    _logging(settings, log_format, log_level)
    registry = CollectorRegistry()
    component = WorkerApp(settings, registry)
    _run(component, "worker", settings, registry)


@app.command()
def gateway(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Serve the HTTP ingest gateway and admin API (with /docs, /metrics) on gateway.host:port."""
    from gateway.server import GatewayApp
    from observability.lifecycle import install_signal_handlers

    settings = _settings(config)
    _logging(settings, log_format, log_level)
    registry = CollectorRegistry()
    component = GatewayApp(settings, registry)
    readiness_gauge(registry, "gateway", component.readiness)
    # As in _run: what exists by now lives as long as the process, out of the collector's reach.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await component.run(stop)

    try:
        asyncio.run(main())
    except (IotBridgeError, OSError) as exc:
        log.error("cannot run: %s", exc)  # noqa: TRY400 -- the message is the whole answer
        raise typer.Exit(2) from exc


token_app = typer.Typer(help="Device tokens of the HTTP gateway.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@contextlib.contextmanager
def _redis(
    settings: Settings, *, decode_responses: bool = False, socket_timeout_s: float | None = None
) -> Iterator[Any]:
    """A blocking client of `settings.redis` (one Redis, or the cluster:
    `redis_nodes.connect_sync`), closed after; a Redis error is one line and exit 2."""
    from bridge.redis_nodes import connect_sync
    from bridge.shard_reads import REDIS_ERRORS

    client = None
    try:
        client = connect_sync(
            settings.redis, decode_responses=decode_responses, socket_timeout_s=socket_timeout_s
        )
        yield client
    except REDIS_ERRORS as exc:
        typer.echo(f"redis {settings.redis.url.split('@')[-1]}: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        if client is not None:
            client.close()


@token_app.command("create")
def token_create(
    asset: Annotated[
        str,
        typer.Option(help="Asset id, or an fnmatch pattern of them ('press-*'), it may post for."),
    ],
    config: ConfigOption = None,
) -> None:
    """Create a device token and print it (once: only its hash is kept)."""
    from config.keys import Keys
    from gateway import tokens

    settings = _settings(config)
    token, record = tokens.new_token(asset)
    with _redis(settings) as client:
        client.hset(Keys.of(settings.redis).gateway_tokens, record.id, tokens.encode(record))
    typer.echo(token)
    typer.echo(f"id {record.id}, asset {asset!r}: store it now, it is not shown again", err=True)


@token_app.command("list")
def token_list(config: ConfigOption = None) -> None:
    """List device tokens: id, asset pattern, creation time (JSON lines; never the token)."""
    from config.keys import Keys
    from gateway import tokens

    settings = _settings(config)
    with _redis(settings) as client:
        raw = client.hgetall(Keys.of(settings.redis).gateway_tokens)
    records = sorted(
        (tokens.decode(k.decode(), v) for k, v in raw.items()), key=lambda r: r.created
    )
    for record in records:
        typer.echo(json.dumps({"id": record.id, "asset": record.asset, "created": record.created}))


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (token list).")],
    config: ConfigOption = None,
) -> None:
    """Revoke a device token (running gateways stop accepting it within gateway.token_refresh_s). Exit 1 if unknown."""
    from config.keys import Keys

    settings = _settings(config)
    with _redis(settings) as client:
        removed = client.hdel(Keys.of(settings.redis).gateway_tokens, token_id)
    if not removed:
        typer.echo(f"no token {token_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {token_id}")


@app.command()
def simulate(
    config: ConfigOption = None,
    scenario: Annotated[
        Path | None, typer.Option(help="Scenario file (simulators/scenarios/*.yaml).")
    ] = None,
    assets: Annotated[int | None, typer.Option(help="Virtual assets.")] = None,
    rate: Annotated[float | None, typer.Option(help="Messages per second per asset.")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds to run.")] = None,
    qos: Annotated[int | None, typer.Option(help="Publish QoS (0 or 1).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    processes: Annotated[int | None, typer.Option(help="Publishing processes.")] = None,
    ground_truth: Annotated[
        Path | None, typer.Option(help="Write each injection as a JSON line to this file.")
    ] = None,
    acked: Annotated[
        Path | None, typer.Option(help="Write what the broker acknowledged here, for `audit`.")
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Live progress (default: on a terminal)."),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Drive a fleet of virtual assets over MQTT; print what was sent and acknowledged (JSON).

    Options given here win over the scenario's, which win over the settings file."""
    from simulators.app import SimulatorApp
    from simulators.scenario import load_scenario

    settings = _settings(config)
    plan = None
    try:
        if scenario is not None:
            plan = load_scenario(scenario)
            settings = _with_simulator(settings, plan.apply(settings.simulator).model_dump())
        settings = _with_simulator(settings, {
            "assets": assets, "rate_hz": rate, "duration_s": duration, "qos": qos, "seed": seed,
            "processes": processes,
        })  # fmt: skip
        _logging(settings, log_format, log_level)
        registry = CollectorRegistry()
        show = sys.stderr.isatty() if progress is None else progress
        component = SimulatorApp(settings, registry, scenario=plan, ground_truth=ground_truth,
                                 acked=acked, progress=show)  # fmt: skip
    except ConfigError as exc:
        _refuse(exc)
    _run(component, "simulator", settings, registry)
    report = component.report()
    typer.echo(json.dumps(report, sort_keys=True))
    if report.get("failed", 0):
        raise typer.Exit(1)


def _with_simulator(settings: Settings, values: dict[str, Any]) -> Settings:
    """`settings` with simulator fields replaced (None: kept); ConfigError with YAML paths."""
    from pydantic import ValidationError

    from config.errors import ConfigProblem
    from config.settings import SimulatorSettings

    data = settings.simulator.model_dump()
    data.update({k: v for k, v in values.items() if v is not None})
    try:
        sim = SimulatorSettings.model_validate(data)
    except ValidationError as exc:
        problems = [ConfigProblem(f"simulator.{p.path}", p.message)
                    for p in loader.problems_from(exc)]  # fmt: skip
        raise ConfigError(problems) from exc
    return settings.model_copy(update={"simulator": sim})


@app.command()
def audit(
    acked: Annotated[
        list[Path],
        typer.Option(
            help="The file `simulate --acked` wrote; repeated for the files of one run's "
            "processes (Locust's workers).",
            exists=True,
            dir_okay=False,
        ),
    ],
    config: ConfigOption = None,
    accept_reason: Annotated[
        list[str] | None,
        typer.Option(help="A dead-letter reason that accounts for an acknowledged message."),
    ] = None,
    examples: Annotated[int, typer.Option(help="Examples listed per finding.")] = 5,
) -> None:
    """Check a simulator run against Redis: every acknowledged (asset, seq) must be in the
    telemetry streams once. Prints lost / duplicated / unexpected (JSON); exit 1 on loss."""
    import itertools

    from config.keys import Keys
    from simulators import acked as acked_file
    from simulators.audit import asset_level_of, read_stream
    from simulators.audit import audit as check

    settings = _settings(config)
    try:
        loaded = acked_file.load_all(acked)
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"{' '.join(map(str, acked))}: cannot read: {exc}", err=True)
        raise typer.Exit(2) from exc
    name = loaded.header.get("route")
    route = next((r for r in settings.bridge.routes if r.name == name), settings.bridge.routes[0])
    keys = Keys.of(settings.redis)
    # Each stream alone (on a cluster the shards' streams are on several masters), read page by
    # page: a longer command timeout than the bridge's.
    streams = keys.telemetry_streams(route.name)
    skipped = [0]
    with _redis(settings, decode_responses=True, socket_timeout_s=30) as client:
        entries = itertools.chain.from_iterable(read_stream(client, key) for key in streams)
        letters = itertools.chain.from_iterable(
            read_stream(client, key) for key in keys.dead_letter_streams()
        )
        report = check(
            loaded.acked,
            loaded.telemetry(entries, skipped),
            letters,
            accept_reasons=accept_reason or (),
            asset_level=asset_level_of(route.topic, route.asset_level),
            examples=examples,
        )
    result = {**report.as_dict(), "ok": report.ok, "bad_skipped": skipped[0], "streams": streams,
              "dead_letter_stream": keys.dead_letters}  # fmt: skip
    typer.echo(json.dumps(result, sort_keys=True))
    if report.lost:
        raise typer.Exit(1)


@app.command()
def demo(
    config: ConfigOption = None,
    assets: Annotated[int, typer.Option(help="Virtual assets of the simulator.")] = 1000,
    duration: Annotated[float, typer.Option(help="Seconds to run (0: until Ctrl-C).")] = 0,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the demo keeps its files (default: a temp dir).")
    ] = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run everything on this machine: broker, Redis, bridge, worker and simulator."""
    from bridge.demo import run_demo

    settings = _settings(config)
    _logging(settings, log_format, "WARNING")
    raise typer.Exit(
        run_demo(settings, config, assets=assets, duration_s=duration, workdir=workdir)
    )


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers are installed
        sys.exit(130)


if __name__ == "__main__":
    main()
