"""The fault drill's Kafka side: a Kafka-protocol broker (Tansu, through
scripts/services/kafka-start.sh), the proxy evictd reaches it through, real
Debezium streaming `drill.items` into it, and the faults of the broker.

Who talks to what:

    Postgres ──Debezium (own slot)──▶ broker 127.0.0.2:P ◀── proxy 127.0.0.1:P ◀── evictd
                                                                      ▲
                                                  the drill's own clients (never cut)

- The broker listens on 127.0.0.2:P and advertises `localhost:P`, where P is
  the proxy's port. Every client resolves `localhost` through /etc/hosts to
  127.0.0.1, i.e. to the proxy, so after bootstrap evictd's connections all
  go through it; Debezium's Java producer (DBZ_PRODUCER=java) is given a hosts
  file (`-Djdk.net.hosts.file`) that maps `localhost` to 127.0.0.2: it reaches
  the broker directly, and a partition cuts evictd off, not the application
  (the Postgres side of the drill works the same way). Kafka has one
  advertised address per listener and Tansu one listener, hence the two
  loopback addresses on one port number; `ports[0]` serves the S3 storage.
- The proxy is scripts/drill/kafka_proxy.py: proxy.py's commands, plus a
  `produce` class (connections that have produced) and a pass for clients
  whose `client.id` starts with `drill-direct` (the bad-message producer and
  the dead-letter counter here), which no fault touches.

Faults:

- `partition()`/`heal()`: proxy `partition all` / `heal all`.
- `restart_broker(s)`: with `storage="s3"` (the default) a real restart:
  SIGKILL of the broker, `s` seconds down, kafka-start.sh again on the same
  S3 bucket; topics, records, committed offsets and groups survive (checked
  by kafka_env_check.py). This Tansu build stores in memory or S3 only
  (`--storage-engine postgres://…` fails with `FeatureNotEnabled { feature:
  "postgres" }`, `sqlite://…` with `FeatureNotEnabled { feature: "libsql" }`,
  `file://…` with `UnsupportedStorageUrl`); the S3 service is moto's server
  (PyPI `moto[server]`, installed once into $EVICTD_TOOLS/moto-venv) on
  `ports[0]`, loopback only. With `storage="memory"` a real restart would be
  a new, empty broker, so it is emulated at the proxy instead (see
  `restart_broker`).
- `dead_letter_down()`/`dead_letter_up()`: `[dead_letter]` of a Kafka source
  has no brokers of its own: the dead-letter producer is built from
  `source.kafka.brokers` and the source's client properties
  (src/source/kafka/dead_letters.rs, `KafkaDeadLetters::new`). No separate
  proxy can therefore stand in front of it; the proxy cuts the connections
  that produce (`partition produce`) — evictd's only producer is that one —
  while the consumer's connections flow.

Invariants: everything started lives under `work` and on the given ports
(the broker on the proxy's port number at 127.0.0.2); the drill's writer
and checker never go through a fault;
`stop()` stops all of it, drops the Debezium slot and the publication, and
can be called after a failed `start()`.

Standard library only. The Kafka clients (one bad message, the dead-letter
count) run in Debezium's venv, which has confluent_kafka: this file run as
`python kafka_env.py client …` is that helper.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable
from urllib.parse import urlsplit

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SERVICES = ROOT / "scripts" / "services"

TOPIC_PREFIX = "kdrill"
ITEMS_TOPIC = f"{TOPIC_PREFIX}.drill.items"
DEAD_LETTER_TOPIC = f"{TOPIC_PREFIX}.dead-letters"
ITEMS_PARTITIONS = 3
BROKER_HOST = "127.0.0.2"
DIRECT_CLIENT_ID = "drill-direct"
S3_BUCKET = "tansu"
MOTO = "moto[server]==5.2.5"

# The consumer properties the drill's evictd runs with (see source_toml).
CONSUMER_PROPERTIES = {
    # Tansu assigns partitions about half a session timeout after a join;
    # a SIGKILLed replica's partitions move after the session timeout.
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "500",
    # Tansu sleeps in every fetch (all of fetch.wait.max.ms when under
    # 250 ms): the default 500 adds ~250 ms to every change.
    "fetch.wait.max.ms": "10",
}


def venv_python() -> str:
    venv = os.environ.get("EVICTD_TEST_DEBEZIUM_VENV") or os.environ.get("DBZ_VENV") or "/tmp/evictd-tools/debezium-venv"
    return str(pathlib.Path(venv) / "bin" / "python")


def tools_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("EVICTD_TOOLS", "/tmp/evictd-tools"))


def ensure_moto(log: Callable[[str], None]) -> str:
    """The moto_server of $EVICTD_TOOLS/moto-venv, created once (PyPI, a
    lock against concurrent installs); returns its path."""
    venv = tools_dir() / "moto-venv"
    server = venv / "bin" / "moto_server"
    if server.exists():
        return str(server)
    tools_dir().mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not server.exists():
            log(f"kafka: installing {MOTO} into {venv} (S3 storage for the broker)")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            out = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", MOTO], capture_output=True, text=True)
            if out.returncode != 0 or not server.exists():
                raise RuntimeError(f"pip install {MOTO} failed:\n{out.stderr[-2000:]}")
    return str(server)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class KafkaEnv:
    def __init__(self, work: pathlib.Path, pg_url: str, ports: list[int], log: Callable[[str], None],
                 storage: str = "s3"):
        """work: a directory of its own; pg_url: postgres://postgres@127.0.0.1:PORT/DB of the drill's
        Postgres (schema `drill`, table drill.items, REPLICA IDENTITY FULL); ports: 4 free ports
        (the broker's storage (S3), proxy, proxy control, spare); storage: "s3" (restarts keep
        the broker's state: real restarts) or "memory" (restarts emulated at the proxy)."""
        if storage not in ("s3", "memory"):
            raise ValueError(f"storage must be s3 or memory, got {storage!r}")
        self.storage = storage
        self.s3_port = ports[0]
        self.moto_proc: subprocess.Popen | None = None
        if len(ports) < 3:
            raise ValueError(f"KafkaEnv needs 3 ports at least (broker, proxy, control), got {ports}")
        self.work = pathlib.Path(work)
        self.pg_url = pg_url
        self.ports = list(ports)
        self.log = log
        self.proxy_port = ports[1]
        self.control_port = ports[2]
        url = urlsplit(pg_url)
        self.pg = {
            "PGHOST": url.hostname or "127.0.0.1",
            "PGPORT": str(url.port or 5432),
            "PGDATABASE": url.path.lstrip("/") or "postgres",
            "PGUSER": url.username or "postgres",
        }
        # One slot and publication per environment (the work directory's name
        # may repeat across runs; the ports of one run do not collide).
        self.slot = f"kdrill_{self.proxy_port}"
        self.publication = f"kdrill_{self.proxy_port}_pub"
        self.kafka_dir = self.work / "kafka"
        self.dbz_dir = self.work / "debezium"
        self.hosts_file = self.work / "jvm-hosts"
        self.proxy_proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.control_file = None
        self.broker_started = False
        self.debezium_started = False
        self.restarts = 0

    # -- life cycle ----------------------------------------------------------
    def kafka_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            KAFKA_PORT=str(self.proxy_port),
            KAFKA_HOST=BROKER_HOST,
            KAFKA_ADVERTISED=f"localhost:{self.proxy_port}",
            KAFKA_DIR=str(self.kafka_dir),
        )
        if self.storage == "s3":
            # Static keys and a loopback endpoint: the S3 client asks no
            # metadata service and reaches nothing but moto.
            env.update(
                KAFKA_STORAGE=f"s3://{S3_BUCKET}/",
                AWS_ENDPOINT=f"http://127.0.0.1:{self.s3_port}",
                AWS_ALLOW_HTTP="true",
                AWS_ACCESS_KEY_ID="drill",
                AWS_SECRET_ACCESS_KEY="drill",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_REGION="us-east-1",
                AWS_CONDITIONAL_PUT="etag",
                AWS_EC2_METADATA_DISABLED="true",
            )
        return env

    def start_s3(self) -> None:
        server = ensure_moto(self.log)
        self.log(f"kafka: S3 storage (moto) on 127.0.0.1:{self.s3_port}")
        log = open(self.work / "moto.log", "ab")
        self.moto_proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.s3_port)], stdout=log,
                                          stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.s3_port):
            if self.moto_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start; see {self.work / 'moto.log'}")
            time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/{S3_BUCKET}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as answer:
            if answer.status != 200:
                raise RuntimeError(f"moto: creating bucket {S3_BUCKET}: HTTP {answer.status}")

    def start_broker(self, topics: str = "") -> None:
        out = subprocess.run(["bash", str(SERVICES / "kafka-start.sh")], env=dict(self.kafka_env(), KAFKA_TOPICS=topics),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"kafka-start.sh failed:\n{out.stderr[-2000:]}")

    def broker_pid(self) -> int | None:
        try:
            pid = int((self.kafka_dir / "broker.pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def dbz_env(self) -> dict[str, str]:
        env = dict(os.environ, **self.pg)
        env.update(
            KAFKA_BOOTSTRAP=f"localhost:{self.proxy_port}",  # 127.0.0.2 in Debezium's JVM: the broker itself
            DBZ_PRODUCER="java",
            PYDBZ_JVM_OPTS=f"-Djdk.net.hosts.file={self.hosts_file}",
            DBZ_STATE_DIR=str(self.dbz_dir),
            DBZ_SLOT=self.slot,
            DBZ_PUBLICATION=self.publication,
            DBZ_TOPIC_PREFIX=TOPIC_PREFIX,
            DBZ_SNAPSHOT_MODE="no_data",
            DBZ_SCHEMAS="true",
            DBZ_EXTRA="publication.autocreate.mode=disabled;table.include.list=drill.items",
            DBZ_BACKGROUND="1",
            DBZ_VENV=str(pathlib.Path(venv_python()).parent.parent),
        )
        return env

    def psql(self, sql: str) -> str:
        out = subprocess.run(["psql", "-X", "-qtA", "-v", "ON_ERROR_STOP=1", self.pg_url, "-c", sql],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {sql!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        # Leftovers of a run on the same ports that was killed before stop().
        self.stop_debezium(reset=True)
        self.psql(f"DROP PUBLICATION IF EXISTS {self.publication}")

        if self.storage == "s3":
            self.start_s3()
        self.log(f"kafka: broker {BROKER_HOST}:{self.proxy_port} ({self.storage} storage), "
                 f"advertised localhost:{self.proxy_port}")
        self.broker_started = True
        self.start_broker(f"{ITEMS_TOPIC}:{ITEMS_PARTITIONS} {DEAD_LETTER_TOPIC}:1")

        self.log(f"kafka: proxy 127.0.0.1:{self.proxy_port} (control {self.control_port})")
        log = open(self.work / "kafka-proxy.log", "ab")
        self.proxy_proc = subprocess.Popen(
            [sys.executable, str(HERE / "kafka_proxy.py"), "--listen", f"127.0.0.1:{self.proxy_port}",
             "--upstream", f"{BROKER_HOST}:{self.proxy_port}", "--control", f"127.0.0.1:{self.control_port}",
             "--direct-client-id", DIRECT_CLIENT_ID],
            stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.control_port):
            if self.proxy_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kafka proxy did not start; see {self.work / 'kafka-proxy.log'}")
            time.sleep(0.05)
        self.control = socket.create_connection(("127.0.0.1", self.control_port))
        self.control_file = self.control.makefile("rw")

        topics = self.client("topics")
        for topic in (ITEMS_TOPIC, DEAD_LETTER_TOPIC):
            if topic not in topics:
                raise RuntimeError(f"kafka: topic {topic} missing after kafka-start.sh (have {topics})")

        self.log(f"kafka: debezium slot {self.slot}, publication {self.publication} on drill.items")
        self.psql(f"CREATE PUBLICATION {self.publication} FOR TABLE drill.items")
        self.hosts_file.write_text(f"{BROKER_HOST} localhost\n127.0.0.1 {socket.gethostname()}\n")
        self.debezium_started = True
        out = subprocess.run(["bash", str(SERVICES / "debezium-run.sh")], env=self.dbz_env(), capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"debezium-run.sh failed:\n{out.stderr[-2000:]}")

    def stop_debezium(self, reset: bool) -> None:
        env = self.dbz_env()
        if reset:
            env["DBZ_RESET"] = "1"
        out = subprocess.run(["bash", str(SERVICES / "debezium-stop.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            self.log(f"kafka: debezium-stop.sh: {out.stderr.strip()[-500:]}")

    def stop(self) -> None:
        """Everything start() started, in reverse; best effort, never raises."""
        steps = [
            ("debezium", lambda: self.stop_debezium(reset=True)),
            ("publication", lambda: self.psql(f"DROP PUBLICATION IF EXISTS {self.publication}")),
            ("proxy", self.stop_proxy),
            ("broker", self.stop_broker),
            ("S3 storage", self.stop_s3),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                self.log(f"kafka: stopping the {name}: {e}")

    def stop_proxy(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = self.control_file = None
        if self.proxy_proc is not None and self.proxy_proc.poll() is None:
            self.proxy_proc.terminate()
            self.proxy_proc.wait(timeout=10)
        self.proxy_proc = None

    def stop_s3(self) -> None:
        if self.moto_proc is not None and self.moto_proc.poll() is None:
            self.moto_proc.terminate()
            try:
                self.moto_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto_proc.kill()
                self.moto_proc.wait()
        self.moto_proc = None

    def stop_broker(self) -> None:
        if not self.broker_started:
            return
        subprocess.run(["bash", str(SERVICES / "kafka-stop.sh")], env=dict(self.kafka_env(), KAFKA_WIPE="1"),
                       capture_output=True, text=True, timeout=60)
        self.broker_started = False

    # -- what evictd and the drill use --------------------------------------
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def source_toml(self, group: str) -> str:
        """[source] and [source.kafka] (with its properties) and [dead_letter]:
        the caller appends [graph], [redis.*], [server], … but no
        [dead_letter] of its own (TOML refuses a table twice)."""
        props = "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in CONSUMER_PROPERTIES.items())
        return (
            "[source]\n"
            'kind = "kafka"\n'
            "\n"
            "[source.kafka]\n"
            f'brokers = "{self.bootstrap()}"\n'
            f"group_id = {json.dumps(group)}\n"
            f'topics = ["{ITEMS_TOPIC}"]\n'
            "# REPLICA IDENTITY FULL: a delete's before has the whole old row.\n"
            'full_row_deletes = ["drill.items"]\n'
            "\n"
            "[source.kafka.properties]\n"
            f"{props}\n"
            "\n"
            "[dead_letter]\n"
            f'topic = "{DEAD_LETTER_TOPIC}"\n'
        )

    # -- faults --------------------------------------------------------------
    def command(self, line: str) -> str:
        if self.control_file is None:
            raise RuntimeError("kafka proxy: not started")
        self.control_file.write(line + "\n")
        self.control_file.flush()
        answer = self.control_file.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"kafka proxy: {line!r} -> {answer!r}")
        return answer

    def partition(self) -> None:
        """evictd's every connection to the broker goes silent (nothing
        closed); Debezium keeps producing."""
        self.command("partition all")

    def heal(self) -> None:
        self.command("heal all")

    def restart_broker(self, down_seconds: float) -> str:
        """A broker restart; returns one line for the report.

        S3 storage: the real thing. SIGKILL (a crash: what the broker
        acknowledged is in S3 already), `down_seconds` with nothing on the
        port (the proxy accepts and closes at once, as a closed port would
        refuse), then the same binary on the same bucket; every client,
        Debezium included, reconnects.

        Memory storage: a real restart would lose every topic and offset,
        so what evictd sees of a restart is emulated at the proxy: every
        connection closed at once, new ones refused for `down_seconds`, the
        broker and its state untouched, Debezium not affected."""
        if self.storage == "memory":
            self.command("refuse on")
            self.command("reset")
            time.sleep(down_seconds)
            self.command("refuse off")
            self.restarts += 1
            return (f"broker restart emulated at the proxy (memory storage): evictd's connections reset, new ones "
                    f"refused for {down_seconds:.1f} s, broker state kept, Debezium not affected")
        pid = self.broker_pid()
        if pid is None:
            raise RuntimeError("kafka: no broker to restart")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while self.broker_pid() is not None or port_open(BROKER_HOST, self.proxy_port):
            if time.monotonic() - t0 > 10:
                raise RuntimeError(f"kafka: broker {pid} still alive 10 s after SIGKILL")
            time.sleep(0.05)
        gone = time.monotonic() - t0
        time.sleep(down_seconds)
        t1 = time.monotonic()
        self.start_broker()
        up = time.monotonic() - t1
        self.restarts += 1
        return (f"broker restarted for real: SIGKILL (gone in {gone:.2f} s), down {down_seconds:.1f} s, started again "
                f"on its S3 storage in {up:.2f} s (topics, records, offsets and groups kept)")

    def dead_letter_down(self) -> None:
        """evictd's producing connections (its dead-letter producer's) go
        silent; its consumer's flow. See the module docs for why this is the
        fault and not a proxy of the dead-letter brokers.

        Longer than 10 s is the harder case. evictd's dead-letter producer
        is idempotent with message.timeout.ms=10000 (both forced, after the
        operator's properties). A send that times out with its request in
        flight makes librdkafka bump the producer epoch by itself (KIP-360);
        Tansu answers the bumped epoch with PRODUCER_FENCED, for every send
        after it (a plain confluent_kafka producer through this proxy shows
        the same; real Kafka accepts the bump). evictd then replaces the
        producer (src/source/kafka/dead_letters.rs) and the letter goes out
        about a second after `dead_letter_up()`, possibly twice (dead letters
        are at least once)."""
        self.command("partition produce")

    def dead_letter_up(self) -> None:
        # Only this fault's class: a partition of `all` may overlap it.
        self.command("heal produce")

    def inject_bad_message(self) -> None:
        """One record that is not Debezium JSON, produced to the items topic
        as a stray producer would (the drill's own client, never cut)."""
        self.client("produce", ITEMS_TOPIC, "kdrill: not a Debezium event {")

    def dead_letters(self) -> int:
        return int(self.client("count", DEAD_LETTER_TOPIC))

    def topic_count(self, topic: str = ITEMS_TOPIC) -> int:
        """How many records the topic holds (a check, not a fault)."""
        return int(self.client("count", topic))

    def debezium_alive(self) -> bool:
        try:
            pid = int((self.dbz_dir / "runner.pid").read_text().strip())
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return b"debezium_to_kafka.py" in cmdline

    # -- the Kafka clients (in Debezium's venv) -----------------------------
    def client(self, *args: str) -> str:
        out = subprocess.run([venv_python(), str(pathlib.Path(__file__).resolve()), "client", self.bootstrap(), *args],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"kafka client {' '.join(args)}: {out.stderr.strip()[-1000:]}")
        return out.stdout.strip()


def client_main(bootstrap: str, cmd: str, args: list[str]) -> int:
    """The drill's own Kafka client: its client.id lets it through every
    fault of the proxy."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    common = {"bootstrap.servers": bootstrap, "client.id": f"{DIRECT_CLIENT_ID}-{cmd}"}
    if cmd == "topics":
        from confluent_kafka.admin import AdminClient

        print(" ".join(sorted(AdminClient(common).list_topics(timeout=10).topics)))
        return 0
    if cmd == "produce":
        topic, value = args
        errors: list[str] = []
        producer = Producer(dict(common, acks="all"))
        producer.produce(topic, value=value.encode(), on_delivery=lambda err, _m: err and errors.append(str(err)))
        if producer.flush(30) or errors:
            print(f"produce to {topic} failed: {errors}", file=sys.stderr)
            return 1
        return 0
    if cmd == "count":
        # Read until idle, not to the high watermark: Tansu reports it wrong
        # after a multi-record batch (scripts/services/README.md).
        (topic,) = args
        consumer = Consumer(dict(common, **{"group.id": "drill-direct", "enable.auto.commit": False,
                                            "fetch.wait.max.ms": 10}))
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            print(f"{topic}: {meta.error}", file=sys.stderr)
            return 1
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        n, last = 0, time.monotonic()
        while time.monotonic() - last < 1.5:
            for m in consumer.consume(num_messages=10000, timeout=0.2):
                if m.error():
                    continue
                n += 1
                last = time.monotonic()
        consumer.close()
        print(n)
        return 0
    print(f"unknown client command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    print("usage: kafka_env.py client BOOTSTRAP topics|produce TOPIC VALUE|count TOPIC", file=sys.stderr)
    sys.exit(2)
