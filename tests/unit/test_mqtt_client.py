"""The bridge's PUBLISH fast path: packets parsed straight from the receive buffer."""

from __future__ import annotations

import struct

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.mqtt_client import BufferedClient


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: bytes, payload: bytes, mid: int, qos: int = 1, v5: bool = True, retain: bool = False
) -> bytes:
    body = struct.pack(">H", len(topic)) + topic + (struct.pack(">H", mid) if qos else b"")
    body += (b"\x00" if v5 else b"") + payload
    return bytes([0x30 | qos << 1 | int(retain)]) + _varint(len(body)) + body


def _client(
    protocol: int = mqtt.MQTTv5,
) -> tuple[BufferedClient, list[tuple[int, int, bool, bytes, bytes]]]:
    client = BufferedClient(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol
    )
    seen: list[tuple[int, int, bool, bytes, bytes]] = []
    client.on_publish_raw = lambda *args: seen.append(args)
    return client, seen


@pytest.mark.parametrize(("protocol", "v5"), [(mqtt.MQTTv5, True), (mqtt.MQTTv311, False)])
def test_complete_publishes_are_handled_and_a_partial_one_is_left_for_the_next_read(
    protocol: int, v5: bool
) -> None:
    client, seen = _client(protocol)
    big = b"x" * 300  # a two-byte remaining length
    data = publish(b"a/1", b"{}", 1, v5=v5) + publish(b"a/2", big, 2, v5=v5, retain=True)
    data += publish(b"a/3", b"q0", 0, qos=0, v5=v5)
    partial = publish(b"a/4", b"later", 4, v5=v5)
    client._rbuf, client._rpos = data + partial[:5], 0
    assert client._buffered_publishes(100) == 3
    assert seen == [
        (1, 1, False, b"a/1", b"{}"),
        (2, 1, True, b"a/2", big),
        (0, 0, False, b"a/3", b"q0"),
    ]
    assert client._rbuf[client._rpos :] == partial[:5]


def test_a_non_publish_packet_stops_the_fast_path() -> None:
    client, seen = _client()
    pingresp = b"\xd0\x00"
    client._rbuf, client._rpos = publish(b"a", b"1", 1) + pingresp + publish(b"b", b"2", 2), 0
    assert client._buffered_publishes(100) == 1
    assert [s[3] for s in seen] == [b"a"]
    assert client._rbuf[client._rpos :].startswith(pingresp)


def test_the_limit_is_respected() -> None:
    client, seen = _client()
    client._rbuf, client._rpos = b"".join(publish(b"a", b"%d" % i, i + 1) for i in range(10)), 0
    assert client._buffered_publishes(4) == 4
    assert [s[0] for s in seen] == [1, 2, 3, 4]
