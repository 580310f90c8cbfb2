"""Sparkplug B 3.0 host application: the pure core, with no I/O; time is passed in.

- `topic`: `spBv1.0/<group>/<type>/<node>[/<device>]` and `spBv1.0/STATE/<host id>`, parsed or
  refused; the subscriptions of a host.
- `payload`: protobuf bytes to typed metrics (every scalar datatype) and back; the only user of
  the generated `sparkplug_b_pb2` (Eclipse Tahu's `sparkplug_b.proto`, EPL-2.0; `regenerate.sh`).
- `births`: the metric tables of NBIRTH and DBIRTH, seq and bdSeq of a session.
- `sequence`: the per-node seq (0-255, wrapping) with the reorder buffer and its timeout.
- `host`: `Host.handle(topic, payload, now)` -> `records.Outcome` (entries, events, commands,
  refusals); `Host.expire(now)` for the reorder timers; STATE birth, Will and death.
- `records`: the telemetry entries (asset, seq, ts, values, `sp.*` fields) and the per-asset seq.
- `names`: Sparkplug ids and metric names as plain asset ids and value names.
- `publish`: rebirth requests (NCMD) and the host's STATE payloads.
"""
