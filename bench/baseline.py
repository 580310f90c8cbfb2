"""The naive lossless bridge the benchmark measures against: one message, one XADD, one PUBACK.

Same delivery guarantee as iotbridge (persistent session, QoS 1, PUBACK only after Redis has the
entry), none of its work: no batching, no validation beyond json.loads, no dedup, no metrics.
Prints `ready` once subscribed. Stops on SIGTERM.
"""

import argparse
import json
import signal
import sys

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from redis.typing import EncodableT, FieldT

parser = argparse.ArgumentParser()
for option in ("--mqtt-url", "--redis-url", "--prefix", "--client-id"):
    parser.add_argument(option, required=True)
args = parser.parse_args()
host, port = args.mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
r = redis.Redis.from_url(args.redis_url)
stream = f"{args.prefix}:tel:telemetry"


def on_message(client, _userdata, msg):
    body = json.loads(msg.payload)
    fields: dict[FieldT, EncodableT] = {
        "asset": msg.topic.split("/")[3],
        "seq": body["seq"],
        "ts": repr(body["ts"]),
    }
    fields.update({f"v.{k}": repr(v) for k, v in body["values"].items()})
    r.xadd(stream, fields)
    client.ack(msg.mid, msg.qos)


client = mqtt.Client(CallbackAPIVersion.VERSION2, args.client_id, protocol=mqtt.MQTTv5)
client.manual_ack_set(True)
client.on_message = on_message
client.on_connect = lambda c, *_: c.subscribe("plant/+/+/+/telemetry", qos=1)
client.on_subscribe = lambda *_: print("ready", flush=True)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval, props.ReceiveMaximum = 7200, 1000
client.connect(host, int(port), clean_start=False, properties=props)
signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
client.loop_forever()
sys.exit(0)
