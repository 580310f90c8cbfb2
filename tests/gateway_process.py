"""The HTTP gateway as a real process (`python -m bridge.cli gateway`) for the integration tests,
with its device tokens made by the real `token create` command and its /metrics read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.services import Service, free_port, http_get, metric_total, scrape, wait_until


class GatewayProcess:
    def __init__(
        self, workdir: Path, *, redis_url: str, name: str, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "IOTBRIDGE_REDIS__URL": redis_url,
            "IOTBRIDGE_REDIS__KEY_PREFIX": name,
            "IOTBRIDGE_REDIS__SOCKET_TIMEOUT_S": "0.5",
            "IOTBRIDGE_REDIS__CONNECT_TIMEOUT_S": "0.5",
            "IOTBRIDGE_BACKOFF__INITIAL_S": "0.05",
            "IOTBRIDGE_BACKOFF__MAX_S": "0.5",
            "IOTBRIDGE_GATEWAY__PORT": str(self.port),
            **(env or {}),
        }
        argv = [sys.executable, "-m", "bridge.cli", "gateway"]
        self.service = Service("gateway", argv, self.port, workdir, self.env)

    @property
    def alive(self) -> bool:
        return self.service.proc is not None and self.service.proc.poll() is None

    def start(self, timeout_s: float = 30) -> GatewayProcess:
        self.service.start(timeout_s)
        try:
            wait_until(lambda: self.ready() or not self.alive, timeout_s, "the gateway's /readyz")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        assert self.alive, f"the gateway exited:\n{self.tail()}"
        return self

    def ready(self) -> bool:
        return http_get(self.port, "/readyz")[0] == 200

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`iotbridge <args>` with the gateway's settings (environment)."""
        return subprocess.run(
            [sys.executable, "-m", "bridge.cli", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def token(self, asset: str) -> str:
        result = self.cli("token", "create", "--asset", asset)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def total(self, name: str, metrics: dict[str, float] | None = None, **labels: str) -> float:
        """A metric summed over its label sets that have `labels`."""
        return metric_total(self.metrics() if metrics is None else metrics, name, **labels)

    def tail(self, lines: int = 30) -> str:
        return self.service.tail(lines)

    def stop(self) -> int | None:
        return self.service.stop(15)
