"""A TCP proxy the fault drill puts between evictd and a service, so that it
can cut one kind of connection without touching the others.

    python3 proxy.py --listen 127.0.0.1:P --upstream 127.0.0.1:Q --control 127.0.0.1:C [--postgres]

Connections are sorted into classes. With `--postgres` the proxy reads the
client's startup packet: a connection asking for `replication` is class
`replication`, any other is `session` (evictd's slot lock, look-ups and the
dead-letter writes). Without it every connection is class `all`.

Control: one command per line on the control port, answered `ok` or `error …`:

    partition CLASS[,CLASS…]   stop forwarding for those classes, both ways, like a
                               network that drops packets: bytes already read wait,
                               TCP back-pressure holds the rest, a new connection of
                               the class is accepted but not connected upstream, and
                               nothing is closed — the peers see silence, not a reset
    heal                       forward again (what waited is delivered; a side that
                               closed meanwhile is closed now, as after a real
                               partition the first packet meets a reset)
    upstream HOST:PORT         new connections go there (a failover's new primary);
                               open ones are left alone, use `reset` to cut them
    reset                      close every open connection at once (a restart)
    refuse on|off              close new connections at once (a server that is down)
    stats                      `ok open=N partitioned=CLASSES upstream=HOST:PORT`

Invariant: the proxy never changes, reorders or invents bytes; in a partition
it only delays them. What a fault does to a connection is exactly what a
network or a restarted server would do.
"""

import argparse
import asyncio
import struct
import sys

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CHUNK = 65536


class Gate:
    """Open unless its class is partitioned."""

    def __init__(self):
        self.event = asyncio.Event()
        self.event.set()

    async def wait(self):
        await self.event.wait()


class Proxy:
    def __init__(self, upstream, postgres):
        self.upstream = upstream
        self.postgres = postgres
        self.gates = {}
        self.refusing = False
        self.open = set()

    def gate(self, name):
        if name not in self.gates:
            self.gates[name] = Gate()
        return self.gates[name]

    def partitioned(self):
        return sorted(n for n, g in self.gates.items() if not g.event.is_set())

    async def classify(self, reader, writer):
        """Reads a Postgres client's startup packet (answering an SSL or GSS
        request with `N`: the drill's connections are plain); returns the
        class and the bytes to send upstream."""
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!II", head)
            if code in (SSL_REQUEST, GSSENC_REQUEST) and length == 8:
                writer.write(b"N")
                await writer.drain()
                continue
            body = await reader.readexactly(length - 8)
            params = body.split(b"\0")
            keys = params[0::2]
            cls = "replication" if b"replication" in keys else "session"
            return cls, head + body

    async def handle(self, client_reader, client_writer):
        if self.refusing:
            client_writer.close()
            return
        task = asyncio.current_task()
        self.open.add(task)
        upstream_writer = None
        try:
            first = b""
            cls = "all"
            if self.postgres:
                cls, first = await self.classify(client_reader, client_writer)
            gate = self.gate(cls)
            await gate.wait()
            host, port = self.upstream
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            if first:
                upstream_writer.write(first)
                await upstream_writer.drain()
            await asyncio.gather(
                pump(client_reader, upstream_writer, gate),
                pump(upstream_reader, client_writer, gate),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            for w in (client_writer, upstream_writer):
                if w is not None:
                    w.close()
            self.open.discard(task)

    async def control(self, reader, writer):
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode().split()
            try:
                answer = self.command(words)
            except (ValueError, IndexError) as e:
                answer = f"error {e}"
            writer.write((answer + "\n").encode())
            await writer.drain()
        writer.close()

    def command(self, words):
        if not words:
            return "error empty command"
        verb = words[0]
        if verb == "partition":
            for name in words[1].split(","):
                self.gate(name).event.clear()
            return "ok"
        if verb == "heal":
            for gate in self.gates.values():
                gate.event.set()
            return "ok"
        if verb == "upstream":
            host, port = words[1].rsplit(":", 1)
            self.upstream = (host, int(port))
            return "ok"
        if verb == "reset":
            for task in list(self.open):
                task.cancel()
            return "ok"
        if verb == "refuse":
            self.refusing = words[1] == "on"
            return "ok"
        if verb == "stats":
            host, port = self.upstream
            return f"ok open={len(self.open)} partitioned={','.join(self.partitioned()) or '-'} upstream={host}:{port}"
        return f"error unknown command {verb}"


async def pump(reader, writer, gate):
    """Copies one direction; waits at the gate before every write and before
    passing a close on."""
    while True:
        data = await reader.read(CHUNK)
        await gate.wait()
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def arguments(extra):
    """The command line every proxy takes, plus `extra(parser)`'s options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--upstream", type=address, required=True)
    parser.add_argument("--control", type=address, required=True)
    extra(parser)
    return parser.parse_args()


async def serve(proxy, listen, control):
    """Serves `proxy` on `listen` and its commands on `control`, for ever."""
    server = await asyncio.start_server(proxy.handle, *listen)
    commands = await asyncio.start_server(proxy.control, *control)
    print("ready", flush=True)
    async with server, commands:
        await asyncio.gather(server.serve_forever(), commands.serve_forever())


def run(make_proxy, extra=lambda parser: None):
    """A proxy process: parses the command line, serves until interrupted."""
    args = arguments(extra)
    try:
        asyncio.run(serve(make_proxy(args), args.listen, args.control))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    run(lambda args: Proxy(args.upstream, args.postgres),
        lambda parser: parser.add_argument("--postgres", action="store_true"))
