"""Live progress on the terminal (rich): connections, achieved against target rate, acks
outstanding, failures. Off when stderr is not a terminal, so logs and pipes stay clean."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from simulators.app import SimulatorApp

WINDOW_S = 2.0  # the achieved rate is measured over this trailing window


class Progress:
    def __init__(self, app: SimulatorApp, *, enabled: bool) -> None:
        self._app = app
        self._enabled = enabled
        self._live: Live | None = None
        self._samples: list[tuple[float, int]] = []

    async def __aenter__(self) -> Progress:
        if self._enabled:
            console = Console(stderr=True)
            self._live = Live(self._table(), console=console, auto_refresh=False, transient=False)
            self._live.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.stop()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._table(), refresh=True)

    def _rate(self, sent: int) -> float:
        now = time.monotonic()
        self._samples.append((now, sent))
        while len(self._samples) > 2 and now - self._samples[0][0] > WINDOW_S:
            self._samples.pop(0)
        first_t, first_sent = self._samples[0]
        return (sent - first_sent) / (now - first_t) if now > first_t else 0.0

    def _table(self) -> Table:
        app, totals = self._app, self._app.totals
        _, status = app.readiness()
        sent = totals.total("sent")
        table = Table(title="iotbridge simulate", show_header=False, box=None)
        table.add_row("connections", status)
        table.add_row("rate", f"{self._rate(sent):,.0f} / {app.target_rate:,.0f} msg/s")
        table.add_row("sent / acked", f"{sent:,} / {totals.total('acked'):,}")
        table.add_row("outstanding", f"{totals.outstanding:,}")
        failed = totals.kinds("failed_by_kind")
        table.add_row("failed", ", ".join(f"{k} {v:,}" for k, v in failed.items()) or "0")
        faults = totals.kinds("faults")
        table.add_row("faults sent", ", ".join(f"{k} {v:,}" for k, v in faults.items()) or "0")
        anomalies = totals.kinds("anomalies")
        table.add_row("anomalies", ", ".join(f"{k} {v:,}" for k, v in anomalies.items()) or "0")
        return table
