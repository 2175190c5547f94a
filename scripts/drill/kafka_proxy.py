"""proxy.py for a Kafka-protocol broker: the same proxy, which also knows
which connections produce, and lets the drill's own clients through.

    python3 kafka_proxy.py --listen 127.0.0.1:P --upstream 127.0.0.1:Q --control 127.0.0.1:C \
        [--direct-client-id PREFIX]

The control commands are proxy.py's (`partition CLASS`, `heal`, `reset`,
`refuse on|off`, `upstream`, `stats`), and `heal CLASS[,CLASS…]`, which
reopens only those (faults of different classes overlap). Classes:

- `all`: every connection of evictd (consumer, group coordinator and the
  dead-letter producer alike);
- `produce`: a connection that has sent a Produce (api key 0) or an
  InitProducerId (22) request. evictd's only producer is its dead-letter
  producer, and `[dead_letter]` has no brokers of its own (it reuses
  `source.kafka.brokers`), so `partition produce` is "the dead-letter
  destination is unreachable while the source stays up". A connection is
  classified by what it sends, so one not yet known as a producer flows
  until its first such request, which then waits.

A connection whose first request carries a `client.id` starting with
PREFIX (default `drill-direct`) is never partitioned, reset or refused: the
drill's own producer and checker, like the application, reach the broker
whatever happens to evictd's network.

Invariant (proxy.py's): bytes are never changed, reordered or invented; the
request stream is only read to classify the connection.
"""

import asyncio
import pathlib
import struct
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from proxy import CHUNK, Proxy, run  # noqa: E402  (the drill's own proxy, next to this file)

PRODUCE, INIT_PRODUCER_ID = 0, 22


class Requests:
    """Follows the client's request frames (int32 size, then the body, which
    starts with the int16 api key) across reads; `producing` once a Produce
    or InitProducerId went by."""

    def __init__(self):
        self.head = b""
        self.left = 0
        self.producing = False

    def feed(self, data):
        i = 0
        while i < len(data):
            if self.left:
                n = min(self.left, len(data) - i)
                self.left -= n
                i += n
                continue
            take = min(6 - len(self.head), len(data) - i)
            self.head += data[i:i + take]
            i += take
            if len(self.head) == 6:
                size, api_key = struct.unpack("!ih", self.head)
                if api_key in (PRODUCE, INIT_PRODUCER_ID):
                    self.producing = True
                self.left = max(size - 2, 0)
                self.head = b""


def client_id(frame):
    """The client.id of a request (header v1 or later: api key, version,
    correlation id, then an int16-length string; -1 = null)."""
    if len(frame) < 14:
        return b""
    (length,) = struct.unpack("!h", frame[12:14])
    return b"" if length < 0 else frame[14:14 + length]


class KafkaProxy(Proxy):
    def __init__(self, upstream, direct_prefix):
        super().__init__(upstream, postgres=False)
        self.direct_prefix = direct_prefix.encode()

    def command(self, words):
        if len(words) == 2 and words[0] == "heal":
            for name in words[1].split(","):
                self.gate(name).event.set()
            return "ok"
        return super().command(words)

    def gates_of(self, requests):
        gates = [self.gate("all")]
        if requests.producing:
            gates.append(self.gate("produce"))
        return gates

    async def handle(self, client_reader, client_writer):
        task = asyncio.current_task()
        upstream_writer = None
        try:
            head = await client_reader.readexactly(4)
            (size,) = struct.unpack("!i", head)
            first = head + await client_reader.readexactly(max(size, 0))
            direct = client_id(first).startswith(self.direct_prefix)
            requests = Requests()
            requests.feed(first)
            if direct:
                gates = lambda: []  # noqa: E731
            else:
                if self.refusing:
                    return
                self.open.add(task)
                gates = lambda: self.gates_of(requests)  # noqa: E731
                for gate in gates():
                    await gate.wait()
            host, port = self.upstream
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            upstream_writer.write(first)
            await upstream_writer.drain()
            await asyncio.gather(
                pump(client_reader, upstream_writer, gates, requests),
                pump(upstream_reader, client_writer, gates, None),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            for w in (client_writer, upstream_writer):
                if w is not None:
                    w.close()
            self.open.discard(task)


async def pump(reader, writer, gates, requests):
    """proxy.pump, with the gates read again before every write (a
    connection joins `produce` when it first produces)."""
    while True:
        data = await reader.read(CHUNK)
        if requests is not None:
            requests.feed(data)
        for gate in gates():
            await gate.wait()
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


if __name__ == "__main__":
    run(lambda args: KafkaProxy(args.upstream, args.direct_client_id),
        lambda parser: parser.add_argument("--direct-client-id", default="drill-direct"))
