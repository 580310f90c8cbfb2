"""A TCP fault proxy for tests: put it between the bridge and the broker, or the bridge (or a
worker) and Redis, then change its mode while traffic flows. No netem or toxiproxy here.

Modes: pass; latency (added delay with jitter, per chunk, order kept); blackhole (accept and
read, forward nothing); trickle (forward a few bytes at a time); and `reset_all()` drops every
connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass


@dataclass
class Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    blackhole: bool = False
    trickle_bytes: int = 0  # > 0: forward this many bytes per 10 ms


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, seed: int = 7) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random(seed)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def reset_all(self) -> None:
        """Drop every proxied connection with a TCP reset (RST, as a crashed peer or a firewall
        sends): both sides see ECONNRESET, not an orderly end of stream."""
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                sock = writer.transport.get_extra_info("socket")
                if sock is not None:
                    # Linger on, timeout 0: close() discards what is unsent and sends RST.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        # A queue keeps chunk order while each chunk waits out its own delay.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst))
        try:
            while chunk := await src.read(65536):
                if self.faults.blackhole:
                    continue
                delay = self.faults.latency_s + self._rng.uniform(
                    -self.faults.jitter_s, self.faults.jitter_s
                )
                await queue.put((asyncio.get_running_loop().time() + max(0.0, delay), chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((0.0, b""))
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                dst.transport.abort()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await queue.get()
            if not chunk:
                return
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            while chunk:
                step = self.faults.trickle_bytes or len(chunk)
                dst.write(chunk[:step])
                chunk = chunk[step:]
                await dst.drain()
                if chunk:
                    await asyncio.sleep(0.01)
