"""A Redis Cluster of the tests' own: masters and replicas of redis-server on loopback ports, made
by `redis-cli --cluster create`, with the faults the cluster tests need: a node killed, frozen
(SIGSTOP) or restarted, a failover, one slot moved to another master while its keys are in use.

Every wait is on what the nodes report (CLUSTER INFO, CLUSTER NODES, CLUSTER SLOTS, INFO
replication) under a timeout. A frozen node is never asked anything: it would not answer.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.services import (
    Service,
    free_port,
    redis_cli_binary,
    redis_service,
    require,
    stop_processes,
    wait_until,
)

# A node's cluster bus listens on its port + 10000 (cluster-port 0, the default).
BUS_OFFSET = 10_000
# A node unreachable this long is failing: a killed master's replica takes over about a second
# after (the election waits 500 ms plus up to 500 ms at random, more for a replica that is behind).
NODE_TIMEOUT_MS = 2000
# CLUSTER GETKEYSINSLOT and MIGRATE batch size while a slot moves.
MIGRATE_BATCH = 100


@dataclass(frozen=True)
class Node:
    """One node as a live node of the cluster sees it (a line of CLUSTER NODES)."""

    port: int
    node_id: str
    role: str  # "master" or "replica"
    master_port: int | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # first and last slot of each range a master serves
    failed: bool  # flagged fail, or fail? (not reachable from the node asked)


def parse_cluster_nodes(text: str) -> list[Node]:
    """CLUSTER NODES: `<id> <ip:port@bus[,hostname]> <flags> <master id|-> <ping> <pong> <epoch>
    <link> <slot ranges...>`; a slot being moved shows as `[slot->-id]` or `[slot-<-id]`."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    ports = {row[0]: int(row[1].split("@")[0].rpartition(":")[2]) for row in rows}
    nodes = []
    for row in rows:
        node_id, flags, master = row[0], set(row[2].split(",")), row[3]
        slots = []
        for token in row[8:]:
            if token.startswith("["):
                continue
            first, _, last = token.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            Node(
                port=ports[node_id],
                node_id=node_id,
                role="master" if "master" in flags else "replica",
                master_port=ports.get(master),
                slots=tuple(sorted(slots)),
                failed=bool(flags & {"fail", "fail?"}),
            )
        )
    return sorted(nodes, key=lambda n: n.port)


class LocalCluster:
    """Masters and replicas on loopback ports, each a redis-server in its own directory under
    `workdir` (log, nodes.conf, append-only file). `extra` is given to every node (an ACL file,
    masteruser and masterauth); `username` and `password` are what the cluster's own connections
    and redis-cli use when the default user may not run cluster commands."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra = extra
        self.username = username
        self.password = password
        self.replicas_per_master = 0
        self.services: dict[int, Service] = {}
        self.frozen: set[int] = set()
        self._seeds: list[int] = []
        self._clients: dict[int, redis.Redis] = {}
        self._before_kill: dict[int, Node] = {}

    # --- set-up ---------------------------------------------------------------------------------

    def start(
        self, masters: int = 3, replicas_per_master: int = 1, timeout_s: float = 60
    ) -> LocalCluster:
        """Start the nodes, make them a cluster, and return once every node says cluster_state:ok
        and every replica is in sync with its master."""
        try:
            self.spawn(masters * (1 + replicas_per_master))
            self.create(replicas_per_master, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self, count: int) -> list[int]:
        """Start `count` cluster-enabled nodes that know nothing of each other; their ports."""
        require(redis_cli_binary(), "redis-cli")
        for _ in range(count):
            port = free_port(bus_offset=BUS_OFFSET)
            service = redis_service(self.workdir / str(port), port, *self._node_args(port))
            self.services[port] = require(service, "redis-server").start()
        return self.ports

    def create(self, replicas_per_master: int = 1, timeout_s: float = 60) -> None:
        """`redis-cli --cluster create` over the spawned nodes, then wait until it is healthy."""
        cli = require(redis_cli_binary(), "redis-cli")
        # redis-cli waits for the nodes to agree on the configuration before it returns.
        self._redis_cli(
            cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas", str(replicas_per_master), "--cluster-yes",
            timeout_s=timeout_s,
        )  # fmt: skip
        self.created(replicas_per_master, timeout_s)

    def created(self, replicas_per_master: int, timeout_s: float = 60) -> None:
        """Wait until the nodes, made a cluster by whatever means, are healthy; the seeds are the
        masters of the lowest slots."""
        self.replicas_per_master = replicas_per_master
        self.wait_healthy(timeout_s)
        by_slot = sorted((n for n in self.nodes() if n.role == "master"), key=lambda n: n.slots)
        self._seeds = [n.port for n in by_slot[:2]]

    def _node_args(self, port: int) -> tuple[str, ...]:
        # After redis_service's own arguments: a later directive wins (appendonly among them).
        return (
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.workdir / str(port) / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # One replica per master: nothing to gain from waiting for a second one to sync.
            "--repl-diskless-sync-delay", "0",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "no",
            *self.extra,
        )  # fmt: skip

    def _redis_cli(self, cli: str, *args: str, timeout_s: float) -> str:
        auth = ["--user", self.username] if self.username else []
        env = {"REDISCLI_AUTH": self.password} if self.password else {}
        result = subprocess.run(
            [cli, *auth, *args], capture_output=True, text=True, timeout=timeout_s,
            env={"PATH": "/usr/bin:/bin", **env}, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL after 10 s); frozen ones are continued
        first, or they could not act on SIGTERM."""
        for port in list(self.frozen):
            self.thaw(port)
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        stop_processes([s.proc for s in self.services.values() if s.proc is not None], 10)

    # --- addresses and clients ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Seed list of the first two masters (by slot): `redis://127.0.0.1:p1,127.0.0.1:p2/0`."""
        return "redis://" + ",".join(f"127.0.0.1:{port}" for port in self._seeds) + "/0"

    @property
    def seed_url(self) -> str:
        """One node, the master of slot 0 at start: `redis://127.0.0.1:p1/0`."""
        return f"redis://127.0.0.1:{self._seeds[0]}/0"

    @property
    def ports(self) -> list[int]:
        return sorted(self.services)

    def running(self, port: int) -> bool:
        proc = self.services[port].proc
        return proc is not None and proc.poll() is None

    def live_ports(self) -> list[int]:
        """Nodes running and not frozen: the ones that answer."""
        return [port for port in self.ports if self.running(port) and port not in self.frozen]

    def client(self, port: int) -> redis.Redis:
        """A plain connection to one node (redirections are not followed), as the cluster's user;
        closed by stop()."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                port=port, username=self.username, password=self.password,
                socket_timeout=2, socket_connect_timeout=2, decode_responses=True,
            )  # fmt: skip
        return self._clients[port]

    def cluster_client(self, **options: Any) -> RedisCluster:
        """redis-py's cluster client on the seed node, as the cluster's user; the caller closes it."""
        return RedisCluster(
            host="127.0.0.1", port=self._seeds[0], username=self.username,
            password=self.password, decode_responses=True, **options,
        )  # fmt: skip

    # --- what the nodes say ---------------------------------------------------------------------

    def cluster_info(self, port: int) -> dict[str, str]:
        text = str(self.client(port).execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def cluster_ok(self, port: int) -> bool:
        try:
            return self.cluster_info(port).get("cluster_state") == "ok"
        except redis.RedisError:
            return False

    def view(self, port: int) -> list[Node]:
        """The cluster as node `port` sees it (CLUSTER NODES)."""
        return parse_cluster_nodes(str(self.client(port).execute_command("CLUSTER", "NODES")))

    def nodes(self) -> list[Node]:
        """Every node as the first live node sees it now, in port order."""
        for port in self.live_ports():
            try:
                return self.view(port)
            except redis.ConnectionError:
                continue
        raise RuntimeError("no node of the cluster answers")

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes() if n.port == port)

    def masters(self) -> list[int]:
        return [n.port for n in self.nodes() if n.role == "master" and not n.failed]

    def role(self, port: int) -> str:
        """What the node says it is (INFO replication): master or replica."""
        return "master" if self.client(port).info("replication")["role"] == "master" else "replica"

    def master_of_slot(self, slot: int, *, asked: int | None = None) -> int:
        """The port of the master that serves `slot` (CLUSTER SLOTS of node `asked`, by default
        the first live node)."""
        port = asked if asked is not None else self.live_ports()[0]
        for first, last, master, *_ in self.client(port).execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def master_of_key(self, key: str | bytes) -> int:
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def replica_of(self, master_port: int) -> int:
        """The port of a replica of the master, one not failing."""
        for node in self.nodes():
            if node.master_port == master_port and node.role == "replica" and not node.failed:
                return node.port
        raise LookupError(f"the master on port {master_port} has no replica")

    # --- waiting for states ---------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every node answers and says cluster_state:ok, each sees the same masters and no node
        failing, the masters cover every slot, and each has its replicas in sync."""
        try:
            if self.live_ports() != self.ports or not all(self.cluster_ok(p) for p in self.ports):
                return False
            views = [self.view(port) for port in self.ports]
            masters = {n.port for n in views[0] if n.role == "master"}
            for view in views:
                if (
                    any(n.failed for n in view)
                    or {n.port for n in view if n.role == "master"} != masters
                ):
                    return False
            covered = sum(last - first + 1 for n in views[0] for first, last in n.slots)
            if covered != REDIS_CLUSTER_HASH_SLOTS:
                return False
            return all(self._in_sync(n) for n in views[0])
        except redis.RedisError:
            return False

    def _in_sync(self, node: Node) -> bool:
        info = self.client(node.port).info("replication")
        if node.role == "replica":
            return info["role"] == "slave" and info.get("master_link_status") == "up"
        online = [
            v for k, v in info.items() if re.fullmatch(r"slave\d+", k) and v["state"] == "online"
        ]
        return info["role"] == "master" and len(online) == self.replicas_per_master

    def wait_healthy(self, timeout_s: float = 30) -> None:
        wait_until(self.healthy, timeout_s, "a healthy cluster", poll_s=0.05)

    def heal(self, timeout_s: float = 60) -> None:
        """Thaw frozen nodes, start killed ones again, and wait until the cluster is healthy."""
        for port in list(self.frozen):
            self.thaw(port)
        for port in self.ports:
            if not self.running(port):
                self.restart(port, timeout_s)
        self.wait_healthy(timeout_s)

    # --- faults ---------------------------------------------------------------------------------

    def kill(self, port: int, sig: int = signal.SIGKILL, timeout_s: float = 10) -> None:
        """Send `sig` to the node and wait for it to exit (a frozen one is continued to act on it)."""
        self._before_kill[port] = self.node(port)
        service = self.services[port]
        service.signal(sig)
        if port in self.frozen:
            self.thaw(port)
        assert service.proc is not None
        service.proc.wait(timeout_s)

    def freeze(self, port: int) -> None:
        """SIGSTOP: the process holds its sockets open and answers nothing, like a hung host."""
        self.services[port].signal(signal.SIGSTOP)
        self.frozen.add(port)

    def thaw(self, port: int) -> None:
        self.services[port].signal(signal.SIGCONT)
        self.frozen.discard(port)

    def restart(self, port: int, timeout_s: float = 30) -> None:
        """Stop the node (SIGTERM) if it runs, start it with the same configuration, and wait until
        it has rejoined: cluster_state:ok, the others no longer see it failing, and as a replica
        (a master that was failed over comes back as one) it is in sync."""
        service = self.services[port]
        if port in self.frozen:
            self.thaw(port)
        service.stop()
        if client := self._clients.pop(port, None):
            client.close()
        service.start(timeout_s)
        wait_until(lambda: self._rejoined(port), timeout_s, f"node {port} to rejoin", poll_s=0.05)

    def _rejoined(self, port: int) -> bool:
        try:
            if not self.cluster_ok(port):
                return False
            own = self.role(port)
            for other in self.live_ports():
                seen = next(n for n in self.view(other) if n.port == port)
                if seen.failed or seen.role != own:
                    return False
            return (
                own == "master"
                or self.client(port).info("replication").get("master_link_status") == "up"
            )
        except redis.RedisError:
            return False

    def _agreed_master(self, port: int) -> bool:
        """Every live node says cluster_state:ok and sees `port` as a master, not failing."""
        try:
            for other in self.live_ports():
                if not self.cluster_ok(other):
                    return False
                seen = next(n for n in self.view(other) if n.port == port)
                if seen.role != "master" or seen.failed or not seen.slots:
                    return False
        except redis.RedisError:
            return False
        return True

    def failover(self, replica_port: int, *, force: bool = False, timeout_s: float = 30) -> None:
        """CLUSTER FAILOVER [FORCE] on the replica; returns once it says it is master, every live
        node is ok and sees it as the master of its slots, and the former master (if it runs) has
        become its replica, in sync."""
        former = self.node(replica_port).master_port
        self.client(replica_port).execute_command(
            "CLUSTER", "FAILOVER", *(("FORCE",) if force else ())
        )
        wait_until(
            lambda: self._is_master(replica_port) and self._agreed_master(replica_port),
            timeout_s, f"the replica on {replica_port} to take over", poll_s=0.05,
        )  # fmt: skip
        if former is not None and former in self.live_ports():
            wait_until(
                lambda: self._rejoined(former), timeout_s, f"{former} to follow", poll_s=0.05
            )

    def _is_master(self, port: int) -> bool:
        try:
            return self.role(port) == "master"
        except redis.RedisError:
            return False

    def wait_promoted(self, old_master_port: int, timeout_s: float = 30) -> int:
        """After kill(): wait until a replica serves the old master's slots and the cluster is ok
        on every live node; the port of the new master."""
        old = self._before_kill.get(old_master_port) or self.node(old_master_port)
        if not old.slots:
            raise ValueError(f"the node on {old_master_port} served no slots")
        slot = old.slots[0][0]
        promoted: list[int] = []

        def taken_over() -> bool:
            try:
                owners = {self.master_of_slot(slot, asked=port) for port in self.live_ports()}
            except (redis.RedisError, LookupError):
                return False
            owner = owners.pop()
            if owners or owner == old_master_port or not self._agreed_master(owner):
                return False
            promoted.append(owner)
            return True

        wait_until(taken_over, timeout_s, f"a replica to take over from {old_master_port}")
        return promoted[-1]

    # --- slots ----------------------------------------------------------------------------------

    def reshard(self, slot_or_key: int | str | bytes, to_port: int, timeout_s: float = 30) -> int:
        """Move one slot, with its keys, to the master on `to_port`, live; returns the slot once
        every live node says `to_port` serves it.

        redis-cli --cluster reshard moves a number of slots of its own choosing, so one given
        slot is moved the way it does it: IMPORTING on the target, MIGRATING on the source,
        MIGRATE of its keys in batches, then SETSLOT NODE on the target, the source and the other
        masters (the cluster spec's order)."""
        slot = (
            slot_or_key
            if isinstance(slot_or_key, int)
            else key_slot(slot_or_key.encode() if isinstance(slot_or_key, str) else slot_or_key)
        )
        source = self.master_of_slot(slot)
        if source != to_port:
            target_id, source_id = self.node(to_port).node_id, self.node(source).node_id
            self.client(to_port).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            self.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            auth = ["AUTH2", self.username, self.password] if self.username else []
            while keys := self.client(source).execute_command(
                "CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH
            ):
                self.client(source).execute_command(
                    "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, *auth, "KEYS", *keys
                )
            others = [p for p in self.masters() if p not in {source, to_port}]
            for port in (to_port, source, *others):
                self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(
            lambda: self._everyone_says(slot, to_port), timeout_s, f"slot {slot} on {to_port}"
        )
        return slot

    def _everyone_says(self, slot: int, port: int) -> bool:
        try:
            return all(self.master_of_slot(slot, asked=p) == port for p in self.live_ports())
        except (redis.RedisError, LookupError):
            return False
