"""A publisher process for tests: QoS 1 telemetry with anomalies in it, the same every run.

`python -m tests.recorded_publisher --mqtt-url URL --client-id ID --assets N --samples S` publishes
sample s of every asset `a<k>` in turn (seq s, device time `--start-ts` + s seconds, so detectors
that look at time see the same spacing every run) on `plant/s1/l1/a<k>/telemetry`, waits for
every PUBACK and prints `{"published": n, "acked": n}`. `rows()` is what it sends, for the test to
rebuild. Every 100 samples: temperature excursions above the default threshold on every fifth
asset, a pressure step that then stays flat on the next, three samples lost upstream on the next.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WINDOW = 10_000  # messages published and not yet acknowledged, at most


def rows(assets: int, samples: int) -> Iterator[tuple[str, int, dict[str, float]]]:
    """(asset, seq, values) in publishing order."""
    for seq in range(samples):
        phase = seq % 100
        for a in range(assets):
            if a % 5 == 2 and phase in (45, 46, 47):
                continue  # lost upstream: a sequence gap
            wobble = ((a * 7919 + seq * 104729) % 1000) / 1000 - 0.5  # the same every run
            temperature = 50.0 + a % 7 + wobble
            pressure = 4.0 + wobble / 20
            if a % 5 == 0 and 30 <= phase < 38:
                temperature = 95.0 + wobble  # threshold, rate, deviation
            if a % 5 == 1 and phase >= 40:
                pressure = 4.8  # deviation, then flat
            yield f"a{a}", seq, {"temperature": temperature, "pressure": pressure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mqtt-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--assets", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--start-ts", type=float, default=time.time() - 3600)
    parser.add_argument("--ack-timeout", type=float, default=120.0)
    args = parser.parse_args()

    host, _, port = args.mqtt_url.removeprefix("mqtt://").partition(":")
    acked = 0
    changed = threading.Condition()

    def on_publish(*_: object) -> None:
        nonlocal acked
        with changed:
            acked += 1
            changed.notify_all()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id)
    client.max_inflight_messages_set(1000)
    client.on_publish = on_publish
    client.connect(host, int(port or 1883))
    client.loop_start()
    published = 0
    deadline = time.monotonic() + args.ack_timeout
    for asset, seq, values in rows(args.assets, args.samples):
        # paho numbers messages 1-65535 and files them by number: with more than that unacked, a
        # new message would take the place of an old one. Publish ahead by a bounded window.
        with changed:
            changed.wait_for(lambda: published - acked < WINDOW, deadline - time.monotonic())  # noqa: B023 -- called at once
        payload = {"ts": args.start_ts + seq, "seq": seq, "values": values}
        client.publish(f"plant/s1/l1/{asset}/telemetry", json.dumps(payload), qos=1)
        published += 1
    with changed:
        changed.wait_for(lambda: acked == published, max(0.0, deadline - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"published": published, "acked": acked}), flush=True)


if __name__ == "__main__":
    main()
