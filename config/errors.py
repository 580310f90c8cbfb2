"""The one exception tree of iotbridge.

    IotBridgeError
     +-- ConfigError            bad settings file or environment; exit non-zero, never retried
     +-- PayloadRejected        a message that can never be accepted; dead-lettered with a reason
     +-- DependencyUnavailable  a server (Redis, the MQTT broker) is down or stalled; retried
          +-- SinkUnavailable   Redis refused or did not answer a write
          +-- SourceUnavailable the MQTT broker refused or dropped the connection

Library errors are translated at the boundary (`raise SinkUnavailable(...) from exc`), and retry
decisions depend on the class, never on the message text.
"""

from __future__ import annotations

from dataclasses import dataclass


class IotBridgeError(Exception):
    """Root of every error iotbridge raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a settings file: where (a YAML path such as `bridge.batch.max_size`) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(IotBridgeError):
    """The settings file or the environment is invalid; carries every problem found."""

    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = "; ".join(str(p) for p in problems)
        super().__init__(f"{source}: {lines}" if source else lines)


class PayloadRejected(IotBridgeError):
    """A message that will never be valid; it goes to the dead-letter stream with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class DependencyUnavailable(IotBridgeError):
    """A server the process depends on is down or stalled; the caller retries with backoff."""


class SinkUnavailable(DependencyUnavailable):
    """Redis refused or did not answer; nothing in the failed batch may be acknowledged."""


class SourceUnavailable(DependencyUnavailable):
    """The MQTT broker refused the connection or dropped it."""
