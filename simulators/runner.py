"""Where an engine runs: a thread of this process, or a child process of its own.

Both deliver the engine's messages (`ready`, `progress`, `truth`, `final`) to `deliver` on the
event loop and take `start(at)` and `stop()`. A child process (`python -m simulators.child`)
gets its settings, its share and its events as one JSON line on stdin, then `start <wall time>`
or `stop` lines; it answers with JSON lines on stdout and logs to the inherited stderr. It stops
by itself when stdin closes, so a parent that dies takes its children with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from config.settings import Settings
from simulators.engine import Engine, ShardSpec
from simulators.scenario import Event
from simulators.sparkplug import SparkplugEngine

log = logging.getLogger(__name__)

Deliver = Callable[[int, dict[str, Any]], None]


def make_engine(
    settings: Settings, spec: ShardSpec, events: list[Event], emit: Callable[[dict[str, Any]], None]
) -> Engine | SparkplugEngine:
    """The engine of `simulator.protocol`: JSON on the route, or Sparkplug B edge nodes."""
    if settings.simulator.protocol == "sparkplug":
        return SparkplugEngine(settings, spec, events, emit)
    return Engine(settings, spec, events, emit)


# The final message carries the acknowledged set: several MB at 100K assets.
LINE_LIMIT = 1 << 28


class Runner(Protocol):
    async def launch(self) -> None: ...

    def start(self, at_wall: float) -> None: ...

    def stop(self) -> None: ...

    async def wait(self) -> None: ...


def settings_for_child(settings: Settings) -> dict[str, Any]:
    """The settings as JSON, secrets included (they travel over a pipe, never argv or a log)."""
    data = settings.model_dump(mode="json")
    for section in ("mqtt", "redis"):
        secret = getattr(settings, section).password
        data[section]["password"] = secret.get_secret_value() if secret is not None else None
    return data


def _log_format() -> str:
    """The parent's log format (json or text), so a child's lines look like its parent's."""
    handlers = logging.getLogger().handlers
    json_lines = any(type(h.formatter).__name__ == "JsonFormatter" for h in handlers)
    return "json" if json_lines else "text"


class ThreadRunner:
    """The engine on a thread of this process (`simulator.processes: 1`)."""

    def __init__(self, settings: Settings, spec: ShardSpec, events: list[Event], deliver: Deliver):
        self._spec = spec
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self.engine = make_engine(settings, spec, events, self._emit)
        self._thread = threading.Thread(
            target=self.engine.run, name=f"simulator-{spec.shard}", daemon=True
        )

    def _emit(self, message: dict[str, Any]) -> None:
        # The loop is closed only if run() was abandoned; then nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, self._spec.shard, message)

    async def launch(self) -> None:
        self._thread.start()

    def start(self, at_wall: float) -> None:
        self.engine.start(at_wall)

    def stop(self) -> None:
        self.engine.stop()

    async def wait(self) -> None:
        while self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 0.5)


class ProcessRunner:
    """The engine in a child process (`simulator.processes` > 1)."""

    def __init__(self, settings: Settings, spec: ShardSpec, events: list[Event], deliver: Deliver):
        self._init = {
            "settings": settings_for_child(settings),
            "spec": dataclasses.asdict(spec),
            "events": [e.as_dict() for e in events],
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            "log_format": _log_format(),
        }  # fmt: skip
        self._shard = spec.shard
        self._deliver = deliver
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def launch(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.child",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT,
            # Ctrl-C reaches only the parent, which stops its children in order.
            start_new_session=True,
        )  # fmt: skip
        self._send(json.dumps(self._init))
        self._reader = asyncio.create_task(self._read(), name=f"simulator-child-{self._shard}")

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        proc.stdin.write(line.encode() + b"\n")

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        async for line in self._proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("unreadable line from a simulator process", extra={"line": line[:200]})
                continue
            self._deliver(self._shard, message)

    def start(self, at_wall: float) -> None:
        self._send(f"start {at_wall!r}")

    def stop(self) -> None:
        self._send("stop")

    async def wait(self) -> None:
        if self._proc is None:
            return
        try:
            if self._reader is not None:
                await self._reader
            code = await self._proc.wait()
        finally:
            if self._proc.returncode is None:  # cancelled: do not leave the child behind
                self._proc.kill()
                await self._proc.wait()
        if code != 0:
            log.error("simulator process %d exited with %d", self._shard, code)
