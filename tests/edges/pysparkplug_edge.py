"""An edge node built with pysparkplug (https://pypi.org/project/pysparkplug/), which this project
did not write: one device with 20 metrics of mixed datatypes, `count` DDATA, then it waits to be
killed. Run by tests/integration/test_sparkplug_pysparkplug.py with the interpreter of a virtual
environment of its own (pysparkplug pins paho-mqtt below 2; iotbridge uses 2).

    python pysparkplug_edge.py HOST PORT GROUP NODE COUNT KEEPALIVE_S
"""

import sys
import time
import uuid

import pysparkplug as psp

D = psp.DataType
# (name, datatype, value of message i): 20 metrics, every scalar datatype, negatives included.
METRICS = [
    ("Int8", D.INT8, lambda i: i % 256 - 128),
    ("Int16", D.INT16, lambda i: -31 * i),
    ("Int32", D.INT32, lambda i: -1_000_003 * i),
    ("Int64", D.INT64, lambda i: -(2**62) + i),
    ("UInt8", D.UINT8, lambda i: i % 256),
    ("UInt16", D.UINT16, lambda i: 65_535 - i),
    ("UInt32", D.UINT32, lambda i: 2**32 - 1 - i),
    ("UInt64", D.UINT64, lambda i: 2**64 - 1 - i),
    ("Float", D.FLOAT, lambda i: i + 0.5),
    ("Double", D.DOUBLE, lambda i: i / 8),
    ("Boolean", D.BOOLEAN, lambda i: i % 2 == 0),
    ("String", D.STRING, lambda i: f"s{i}"),
    ("Text", D.TEXT, lambda i: f"line {i}\nnext"),
    ("UUID", D.UUID, lambda i: str(uuid.UUID(int=i))),
    ("Motor 1/Speed", D.DOUBLE, lambda i: i * 0.25),
    ("Motor 1/Running", D.BOOLEAN, lambda i: i % 3 == 0),
    ("Count", D.UINT32, lambda i: i),
    ("Temp", D.FLOAT, lambda i: -i - 0.25),
    ("Mode", D.STRING, lambda i: "auto" if i % 2 else "manual"),
    ("Level", D.INT16, lambda i: -1),
]


def metrics(i: int) -> list:
    now = psp.get_current_timestamp()
    return [
        psp.Metric(timestamp=now, name=name, datatype=kind, value=value(i), alias=alias)
        for alias, (name, kind, value) in enumerate(METRICS, start=1)
    ]


def main() -> None:
    host, port, group, node = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    count, keepalive = int(sys.argv[5]), int(sys.argv[6])
    edge = psp.EdgeNode(
        group,
        node,
        [
            psp.Metric(
                timestamp=psp.get_current_timestamp(), name="Uptime", datatype=D.UINT64, value=0
            )
        ],
    )
    edge.register(psp.Device("Line 1", metrics(0)))  # its DBIRTH follows the NBIRTH
    edge.connect(host, port=port, keepalive=keepalive, blocking=False)
    # Connected and born: the connect callback publishes NBIRTH and DBIRTH, then sets the Will of
    # the next connection (bdSeq 1). DDATA before that would race the births for their seqs.
    deadline = time.monotonic() + 10
    while edge._bd_seq_metric.value != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, count + 1):
        edge.update_device("Line 1", metrics(i))
    print("published", flush=True)
    while True:
        time.sleep(1)  # until killed: its Will (NDEATH) tells the host


if __name__ == "__main__":
    main()
