"""The embedded amqtt broker behind `iotbridge broker` and the zero-setup demo (MQTT 3.1.1 only).

A plant runs Mosquitto (`broker/mosquitto.conf`); this broker is for a laptop and for tests where
no mosquitto binary is installed. It listens on `broker.host:broker.port` over plain TCP, accepts
every client without credentials, and keeps persistent sessions (clean session off) of clients
with a client id for `mqtt.session_expiry_s`, so the bridge's QoS 1 queue survives its restart.

What amqtt 0.12 does not do (read in its source, then measured):
- Sessions and queues live in memory only: a broker restart loses them.
- A QoS 1 message sent to a client and not yet acknowledged is never redelivered: amqtt drops it
  after 5 s without PUBACK, or when the client disconnects first (a PUBACK held 2 s, then a
  reconnect with the same session: 0 of 1 redelivered). A bridge that holds PUBACKs while Redis
  is down loses those messages here; the design's at-least-once holds with Mosquitto only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from prometheus_client import CollectorRegistry

from config.errors import IotBridgeError
from config.settings import Settings
from observability.metrics import BrokerMetrics

log = logging.getLogger(__name__)

# Connections per listener: 100K simulated assets at 250 per connection are 400 connections; the
# margin covers several bridges and simulators. Beyond it amqtt queues new connections, it does
# not refuse them.
MAX_CONNECTIONS = 10_000

# amqtt's shutdown waits up to 5 s for its broadcast loop; a little more, then give up.
SHUTDOWN_TIMEOUT_S = 10.0


class _PubackTimeoutFilter(logging.Filter):
    """Drops the traceback amqtt attaches when it reaps a delivery whose PUBACK timed out.

    amqtt has already logged the timeout as one WARNING line; it logs the task again at ERROR with
    a traceback when it cleans up, often only at shutdown, where it looks like a crash.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.exc_info = None
            record.exc_text = None
        return True


_PUBACK_TIMEOUT_FILTER = _PubackTimeoutFilter()


# amqtt ships no type information, so its base class is `Any` to mypy.
class OpenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accepts every client, with or without credentials, and keeps persistent sessions.

    amqtt's own `AnonymousAuthPlugin` marks each session it admits as anonymous, and amqtt then
    neither queues QoS 1 messages for an anonymous session while it is disconnected nor keeps the
    session once it disconnects: clean session off would have no effect.
    """

    @dataclass
    class Config:
        """No options: everyone is admitted."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return True


class EmbeddedBroker:
    """An amqtt broker run as one stage: `await EmbeddedBroker(settings, registry).run(stop)`."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._metrics = BrokerMetrics(registry)
        # Set while the listener accepts connections; the demo awaits it before starting clients.
        self.listening = asyncio.Event()

    @property
    def address(self) -> str:
        return f"mqtt://{self._settings.broker.host}:{self._settings.broker.port}"

    def readiness(self) -> tuple[bool, str]:
        if self.listening.is_set():
            return True, ""
        return False, f"broker not listening on {self.address}"

    def _config(self) -> BrokerConfig:
        broker = self._settings.broker
        listener = ListenerConfig(
            type=ListenerType.TCP,
            # amqtt splits bind at the last colon, so an unbracketed IPv6 address works too.
            bind=f"{broker.host}:{broker.port}",
            max_connections=MAX_CONNECTIONS,
        )
        return BrokerConfig(
            listeners={"default": listener},
            # Only authentication: no $SYS publisher (a topic tree nobody here reads, and a
            # DeprecationWarning about psutil) and no per-packet logging plugins.
            plugins={f"{__name__}.{OpenAuthPlugin.__qualname__}": {}},
            # MQTT 3.1.1 has no session expiry on the wire, so the broker applies the bridge's
            # configured one: a persistent session and its queue outlive an outage that long.
            session_expiry_interval=self._settings.mqtt.session_expiry_s,
        )

    def _watch(self, broker: Broker) -> None:
        """Read the broker's state at scrape time, so no amqtt hook is needed on the hot path."""

        def connected() -> float:
            states = [session.transitions.state for session, _ in broker.sessions.values()]
            return float(states.count("connected"))

        def sessions() -> float:
            return float(len(broker.sessions))

        def queued() -> float:
            counts = [session.retained_messages_count for session, _ in broker.sessions.values()]
            return float(sum(counts))

        self._metrics.clients_connected.set_function(connected)
        self._metrics.sessions.set_function(sessions)
        self._metrics.queued_messages.set_function(queued)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop` is set, then close every session and the listener, and return."""
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_PUBACK_TIMEOUT_FILTER)  # once: addFilter skips one already there
        broker = Broker(self._config())
        try:
            await broker.start()
        except BrokerError as exc:
            reason = exc.__cause__ or exc  # amqtt wraps the OSError ("address already in use")
            raise IotBridgeError(
                f"embedded broker cannot listen on {self.address}: {reason}"
            ) from exc
        self._watch(broker)
        self.listening.set()
        self._metrics.up.set(1)
        log.info("broker listening", extra={"address": self.address})
        try:
            await stop.wait()
        finally:
            self.listening.clear()
            self._metrics.up.set(0)
            await self._shutdown(broker)

    async def _shutdown(self, broker: Broker) -> None:
        log.info("broker stopping", extra={"sessions": len(broker.sessions)})
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await broker.shutdown()
        except TimeoutError:
            log.warning(
                "broker shutdown took longer than %.0f s, abandoning it", SHUTDOWN_TIMEOUT_S
            )
        else:
            log.info("broker stopped")
