"""The bridge's PUBLISH fast path: packets parsed straight from the receive buffer."""

from __future__ import annotations

import socket
import struct
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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


class _Encoder(mqtt.Client):
    """paho's own PUBLISH encoder, its packets kept instead of sent."""

    def __init__(self, protocol: int) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id="enc", protocol=protocol)
        self.packets: list[bytes] = []
        # paho encodes only with a socket; one end of a pair, closed with the client.
        self._sock, self._peer = socket.socketpair()

    def _packet_queue(self, command: int, packet: bytes | bytearray, *_: Any) -> MQTTErrorCode:
        self.packets.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


@st.composite
def _properties(draw: st.DrawFn) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if draw(st.booleans()):
        props.UserProperty = draw(st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)),
                                           max_size=3))  # fmt: skip
    if draw(st.booleans()):
        props.ContentType = draw(st.text(max_size=20))
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=200))
    return props


_topics = st.text(st.characters(exclude_characters="#+\x00", exclude_categories=["Cs"]),
                  min_size=1, max_size=40)  # fmt: skip


# Building the text strategies' character tables can take a second on a busy shared machine.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data(), st.sampled_from([mqtt.MQTTv5, mqtt.MQTTv311]))
def test_publishes_encoded_by_paho_are_read_back_whatever_the_reads_cut(
    data: st.DataObject, protocol: int
) -> None:
    """Any QoS 0/1 PUBLISH paho encodes (MQTT 5 properties included, which the bridge skips),
    split across reads anywhere, is delivered once, whole, in order."""
    publishes = []
    for _ in range(data.draw(st.integers(1, 8))):
        topic, payload = data.draw(_topics).encode(), data.draw(st.binary(max_size=400))
        qos, retain, mid = (
            data.draw(st.integers(0, 1)),
            data.draw(st.booleans()),
            data.draw(st.integers(1, 65535)),
        )
        props = data.draw(_properties()) if protocol == mqtt.MQTTv5 else None
        publishes.append((mid, topic, payload, qos, retain, props))
    encoder = _Encoder(protocol)  # after every draw: a draw may end the example
    try:
        for mid, topic, payload, qos, retain, props in publishes:
            encoder._send_publish(mid, topic, payload, qos, retain, properties=props)
    finally:
        encoder._sock_close()
        encoder._peer.close()
    stream = b"".join(encoder.packets)
    expected = [(mid if qos else 0, qos, retain, topic, payload)
                for mid, topic, payload, qos, retain, _ in publishes]  # fmt: skip
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    client, seen = _client(protocol)
    rest = b""
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        client._rbuf, client._rpos = rest + stream[start:stop], 0
        while client._buffered_publishes(3):
            pass
        rest = client._rbuf[client._rpos :]
    assert seen == expected
    assert rest == b""


@given(st.binary(max_size=60))
def test_a_publish_whose_lengths_overrun_it_closes_the_connection(body: bytes) -> None:
    """Whatever follows a PUBLISH fixed header, it is delivered only if its topic, packet id and
    properties fit in it; otherwise it is refused (a protocol error), never read past its end."""
    client, seen = _client(mqtt.MQTTv5)
    closed: list[bool] = []
    client._sock_close = lambda: closed.append(True)  # type: ignore[method-assign]
    follower = publish(b"next", b"x", 9)
    client._rbuf, client._rpos = b"\x32" + _varint(len(body)) + body + follower, 0
    client._buffered_publishes(1)
    if closed:
        assert seen == []
    else:
        ((_mid, qos, _retain, topic, payload),) = seen
        size = int.from_bytes(body[:2]) if len(body) >= 2 else -1
        assert (qos, topic) == (1, body[2 : 2 + size])
        assert len(body) >= 2 + size + 2 + 1
        assert payload == body[len(body) - len(payload) :]


def test_pubacks_go_out_in_one_write_in_the_order_given() -> None:
    client, _ = _client()
    client._sock, peer = socket.socketpair()
    try:
        client.ack_many([1, 0x1234, 65535, 7])
        assert peer.recv(100) == bytes.fromhex("40020001400212344002ffff40020007")
    finally:
        client._sock_close()
        peer.close()
