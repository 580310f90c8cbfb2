"""Draw the key panels of a Grafana dashboard as a PNG, from Prometheus's HTTP API, without Grafana.

A dashboard no one can see is no dashboard: this renders what the dashboard shows for the README, a
ticket or a shift report. It reads the same JSON file Grafana provisions, substitutes the template
variables, runs each panel's queries over a time range (`/api/v1/query_range`) and draws them with
matplotlib's Agg backend (no display needed). matplotlib comes with the `dev` extra.

    python -m observability.render --prometheus http://127.0.0.1:9090 --out overview.png --minutes 30

tests/integration/test_observability.py uses `panels`, `expand` and `Prometheus` to check that every
panel's queries return data against a running pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).parent / "grafana" / "dashboards"
OVERVIEW = DASHBOARDS / "overview.json"

# The panels of the overview that tell whether the pipeline is healthy, in reading order.
KEY_PANELS = (
    "Messages received by route",
    "Dead letters by reason",
    "Receive to acknowledgement latency",
    "Consumer lag by route",
    "Anomalies by detector",
    "Spool",
)

# Grafana's $__rate_interval for a 15 s scrape interval: max(4 x scrape, scrape + step).
DEFAULT_RATE_INTERVAL = "1m"

Panel = dict[str, Any]
Series = list[tuple[float, float]]


class PrometheusError(RuntimeError):
    """Prometheus answered with an error, or did not answer."""


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str


def panels(dashboard: Mapping[str, Any]) -> Iterator[Panel]:
    """Every panel with queries, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panels(panel)
        elif panel.get("targets"):
            yield panel


def queries(panel: Panel) -> list[Query]:
    return [Query(t["expr"], t.get("legendFormat", "")) for t in panel["targets"] if t.get("expr")]


def variables_of(dashboard: Mapping[str, Any], value: str = ".*") -> dict[str, str]:
    """Each template variable of the dashboard set to `value` (default: all, as a regex)."""
    return {v["name"]: value for v in dashboard.get("templating", {}).get("list", [])}


def expand(
    expr: str, variables: Mapping[str, str], rate_interval: str = DEFAULT_RATE_INTERVAL
) -> str:
    """Substitute `$name`, `${name}` and Grafana's `$__rate_interval` as Grafana would."""
    values = {"__rate_interval": rate_interval, **variables}
    # Longest names first, so `$instance` is never read as `$inst` + `ance`.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """A series' name from Grafana's legendFormat (`{{route}} {{reason}}`)."""
    if not fmt:
        return (
            ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
        )
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


class Prometheus:
    """The two calls this needs from Prometheus's HTTP API."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """The `data` of a successful answer of an API path (`/api/v1/rules`, ...)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params or {})}"
        if not url.startswith(("http://", "https://")):
            raise PrometheusError(f"not an http(s) URL: {self.url}")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 -- scheme checked above
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry Prometheus's own error in the body
            body = json.load(exc)
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{self.url}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: a list of {metric, value}; [] when the expression has no data."""
        data = self.get("/api/v1/query", {"query": expr})
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[tuple[dict[str, str], Series]]:
        """Range query: (labels, [(time, value)]) per series."""
        data = self.get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"},
        )
        return [
            (item["metric"], [(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]


def _formatter(unit: str) -> Any:
    """Tick labels in the panel's Grafana unit: 1.5 s, 250 ms, 800 kB, 12%, 1.2 k."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, PercentFormatter

    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit in ("s", "bytes"):
        return EngFormatter(unit="s" if unit == "s" else "B")
    eng = EngFormatter()
    return FuncFormatter(lambda value, _: eng(value) if abs(value) >= 1000 else f"{value:g}")


def render(
    prometheus: Prometheus,
    out: Path,
    *,
    dashboard_path: Path = OVERVIEW,
    titles: Sequence[str] = KEY_PANELS,
    minutes: float = 30.0,
    end: float | None = None,
    variables: Mapping[str, str] | None = None,
    rate_interval: str = DEFAULT_RATE_INTERVAL,
    dpi: int = 72,
) -> Path:
    """Draw the panels named `titles` of the dashboard over the last `minutes` into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = json.loads(dashboard_path.read_text())
    by_title = {p["title"]: p for p in panels(dashboard)}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise ValueError(f"{dashboard_path.name} has no panel titled {missing}")
    values = {**variables_of(dashboard), **(variables or {})}
    end = time.time() if end is None else end
    start = end - minutes * 60
    step_s = max(1.0, round(minutes * 60 / 240))

    columns = 2
    rows = math.ceil(len(titles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(12, 2.6 * rows), squeeze=False)
    try:
        for ax, title in zip(axes.flat, titles, strict=False):
            panel = by_title[title]
            drawn = 0
            for query in queries(panel):
                for labels, series in prometheus.query_range(
                    expand(query.expr, values, rate_interval), start, end, step_s
                ):
                    points = [(t, v) for t, v in series if math.isfinite(v)]
                    if points:
                        times = [datetime.fromtimestamp(t) for t, _ in points]
                        ax.plot(times, [v for _, v in points], linewidth=1.2,
                                label=legend(query.legend, labels))  # fmt: skip
                        drawn += 1
            ax.set_title(title, fontsize=10, loc="left")
            ax.yaxis.set_major_formatter(
                _formatter(panel["fieldConfig"]["defaults"].get("unit", ""))
            )
            locator = mdates.AutoDateLocator(maxticks=8)  # type: ignore[no-untyped-call]  # untyped in matplotlib
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=False))  # type: ignore[no-untyped-call]  # untyped in matplotlib
            ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if drawn:
                # Headroom above the lines for the legend.
                ax.set_ylim(top=max(ax.get_ylim()[1], 1e-9) * 1.3)
                ax.legend(fontsize=7, loc="upper left", ncol=3, frameon=False)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        for ax in axes.flat[len(titles) :]:
            ax.set_visible(False)
        stamp = datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M")
        figure.suptitle(f"{dashboard['title']}  (last {minutes:g} min to {stamp})", fontsize=11)
        figure.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m observability.render", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL.")
    parser.add_argument("--out", type=Path, default=Path("overview.png"), help="PNG to write.")
    parser.add_argument("--dashboard", type=Path, default=OVERVIEW, help="Dashboard JSON file.")
    parser.add_argument("--minutes", type=float, default=30.0, help="Time range, ending now.")
    parser.add_argument(
        "--panel",
        action="append",
        dest="titles",
        help="Panel title (repeatable; default: key panels).",
    )
    parser.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="Template variable value."
    )
    parser.add_argument("--rate-interval", default=DEFAULT_RATE_INTERVAL)
    args = parser.parse_args(argv)
    variables = dict(v.split("=", 1) for v in args.var)
    try:
        out = render(
            Prometheus(args.prometheus), args.out, dashboard_path=args.dashboard,
            titles=args.titles or KEY_PANELS, minutes=args.minutes, variables=variables,
            rate_interval=args.rate_interval,
        )  # fmt: skip
    except (PrometheusError, ValueError) as exc:
        parser.exit(1, f"render: {exc}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
