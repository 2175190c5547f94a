"""Self-test of kafka_env.KafkaEnv against real services: a database of its
own on the shared Postgres (EVICTD_TEST_PG_URL's server), the shared Redis
(EVICTD_TEST_REDIS_URL), its own broker, proxy and Debezium on free ports in
56600-56699, and /work/main/target/debug/evictd (EVICTD_BIN to override).

    python3 scripts/drill/kafka_env_check.py [--storage s3|memory] [--dead-letter-down-s S]

Checks, in order: Debezium's events reach the items topic through the proxy;
a partition cuts evictd's side and not Debezium's; `evictd check` accepts
source_toml(); evictd invalidates a key after an update; the bad message is
dead-lettered; with the dead-letter destination down a bad message waits and
is dead-lettered once it is up, and a change behind it is applied then; after
a broker restart (real with S3 storage, emulated with memory) nothing is
lost, nothing re-read, Debezium is alive, a key is invalidated and a bad
message dead-lettered again.

The dead-letter destination is down 5 s by default. Past the dead-letter
producer's 10 s send timeout (`--dead-letter-down-s 12`) this broker fences
the producer and evictd replaces it: see KafkaEnv.dead_letter_down. Exit 0
and "ok" on the last line when all hold.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kafka_env import KafkaEnv  # noqa: E402

EVICTD = os.environ.get("EVICTD_BIN", "/work/main/target/debug/evictd")
PG_URL = os.environ.get("EVICTD_TEST_PG_URL", "postgres://postgres@127.0.0.1:55432/evictd")
REDIS_URL = os.environ.get("EVICTD_TEST_REDIS_URL", "redis://127.0.0.1:6479")


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def free(port):
    for host in ("127.0.0.1", "127.0.0.2"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n, lo=56600, hi=56700):
    ports = []
    for p in range(lo, hi):
        if free(p):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"fewer than {n} free ports in {lo}-{hi - 1}")


def psql(url, sql):
    out = subprocess.run(["psql", "-X", "-qtA", "-v", "ON_ERROR_STOP=1", url, "-c", sql], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {out.stderr.strip()}")
    return out.stdout.strip()


def redis(*args):
    u = urlsplit(REDIS_URL)
    out = subprocess.run(["redis-cli", "-h", u.hostname, "-p", str(u.port), *args], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip()


def wait_for(what, check, limit=30.0, step=0.2):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what}: not after {limit} s")


def invalidated(db_url, key, item_id, limit=30.0):
    """SET key, UPDATE the row, wait until evictd deleted the key; seconds."""
    redis("SET", key, "cached")
    t0 = time.monotonic()
    psql(db_url, f"UPDATE drill.items SET v = v + 1 WHERE id = {item_id}")
    wait_for(f"{key} invalidated", lambda: redis("EXISTS", key) == "0", limit)
    return time.monotonic() - t0


def main():
    storage = sys.argv[sys.argv.index("--storage") + 1] if "--storage" in sys.argv else "s3"
    down_s = float(sys.argv[sys.argv.index("--dead-letter-down-s") + 1]) if "--dead-letter-down-s" in sys.argv else 5.0
    ports = free_ports(6)
    db = f"kdrill_{ports[0]}"
    base = urlsplit(PG_URL)
    admin_url = PG_URL
    db_url = f"{base.scheme}://{base.netloc}/{db}"
    work = pathlib.Path(tempfile.mkdtemp(prefix="kdrill-check-"))
    log(f"ports {ports}, database {db}, work {work}")
    psql(admin_url, f"DROP DATABASE IF EXISTS {db}")
    psql(admin_url, f"CREATE DATABASE {db}")
    env = KafkaEnv(work / "kafka", db_url, ports[:4], lambda m: log(m), storage=storage)
    evictd = None
    key_prefix = "drill:item:"
    try:
        psql(db_url, "CREATE SCHEMA drill; CREATE TABLE drill.items(id bigint primary key, v bigint not null, "
                     "owner int not null, divisor int not null default 1); "
                     "ALTER TABLE drill.items REPLICA IDENTITY FULL; "
                     "INSERT INTO drill.items(id, v, owner) SELECT g, 0, g % 3 FROM generate_series(1, 10) g")
        t0 = time.monotonic()
        env.start()
        log(f"started in {time.monotonic() - t0:.1f} s; debezium alive: {env.debezium_alive()}")
        assert env.debezium_alive()

        for i in range(1, 11):
            psql(db_url, f"UPDATE drill.items SET v = v + 1 WHERE id = {i}")
        n = wait_for("10 updates in the topic", lambda: env.topic_count() >= 10 and env.topic_count())
        log(f"items topic through the proxy: {n} records")

        env.partition()
        log(f"partitioned: {env.command('stats')}")
        # Debezium reaches the broker directly: it keeps producing.
        psql(db_url, "UPDATE drill.items SET v = v + 1 WHERE id = 1")
        n2 = wait_for("an update during the partition", lambda: env.topic_count() > n and env.topic_count())
        # evictd's side (any client without the drill's client.id) is cut.
        probe = subprocess.run(
            [sys.executable, "-c", "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
             "s.settimeout(2); s.sendall(b'\\0\\0\\0\\x0a\\0\\x12\\0\\0\\0\\0\\0\\x01\\0\\0');"
             "print(len(s.recv(100)))", str(env.proxy_port)], capture_output=True, text=True)
        assert "timed out" in probe.stderr, f"a partitioned client got an answer: {probe.stdout} {probe.stderr}"
        log(f"during the partition: Debezium produced ({n} -> {n2}), an ApiVersions request of another client timed out")
        env.heal()
        log(f"healed: {env.command('stats')}")

        env.inject_bad_message()
        log("bad message injected")

        graph = work / "graph.toml"
        graph.write_text('[tables."drill.items"]\nkey = ["id"]\ncolumns = ["id", "v", "owner", "divisor"]\n\n'
                         '[caches.drill_item]\nkey = "drill:item:{id}"\n[[caches.drill_item.depends]]\n'
                         'table = "drill.items"\n')
        metrics_port = ports[4]
        config = work / "evictd.toml"
        config.write_text(f'[graph]\npaths = ["{graph}"]\n\n' + env.source_toml(f"kdrill-check-{ports[0]}") +
                          f'\n[batch]\nmax_delay_ms = 5\n[run]\nretry_max_ms = 200\n'
                          f'[redis.primary]\nurl = "{REDIS_URL}"\n'
                          f'[server]\nlisten = "127.0.0.1:{metrics_port}"\n'
                          '[log]\nlevel = "info,evictd=debug,librdkafka=warn"\n')
        log("config:\n" + config.read_text())
        check = subprocess.run([EVICTD, "check", "--config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, f"evictd check: {check.returncode}\n{check.stdout}\n{check.stderr}"
        log(f"evictd check --config: ok ({check.stdout.strip().splitlines()[-1] if check.stdout.strip() else ''})")

        evictd_log = open(work / "evictd.log", "wb")
        t0 = time.monotonic()
        evictd = subprocess.Popen([EVICTD, "run", "--config", str(config)], stdout=evictd_log, stderr=evictd_log)
        dl = wait_for("the bad message dead-lettered", lambda: env.dead_letters() >= 1 and env.dead_letters(), 60)
        log(f"dead letters: {dl} ({time.monotonic() - t0:.1f} s after evictd started)")
        # The group read its backlog; a key set from now on is stale only after a new change.
        time.sleep(2)
        redis("SET", "drill:item:9999", "untouched")
        s = invalidated(db_url, f"{key_prefix}3", 3)
        log(f"drill:item:3 invalidated {s * 1000:.0f} ms after its update")
        assert redis("EXISTS", "drill:item:9999") == "1", "a key no change touched is gone"

        env.dead_letter_down()
        t_down = time.monotonic()
        env.inject_bad_message()
        redis("SET", f"{key_prefix}7", "cached")
        psql(db_url, "UPDATE drill.items SET v = v + 1 WHERE id = 7")
        time.sleep(down_s)
        held = env.dead_letters()
        assert held == dl, f"dead letter written with the destination down ({dl} -> {held})"
        log(f"dead-letter destination down {down_s:.0f} s: still {held} dead letters; {env.command('stats')}; "
            f"drill:item:7 (updated after the bad message) exists: {redis('EXISTS', f'{key_prefix}7')}")
        env.dead_letter_up()
        t_up = time.monotonic()
        dl2 = wait_for("the second bad message dead-lettered", lambda: env.dead_letters() > dl and env.dead_letters(),
                       60)
        wait_for("drill:item:7 invalidated", lambda: redis("EXISTS", f"{key_prefix}7") == "0", 30)
        log(f"dead-letter destination up: {dl2} dead letters, drill:item:7 gone {time.monotonic() - t_up:.1f} s "
            f"after (down for {t_up - t_down:.1f} s)")

        before = (env.topic_count(), env.dead_letters())
        described = env.restart_broker(3.0)
        log(described)
        s = invalidated(db_url, f"{key_prefix}5", 5, 60)
        log(f"after the restart: drill:item:5 invalidated {s * 1000:.0f} ms after its update")
        after = (env.topic_count(), env.dead_letters())
        assert after[0] > before[0] and after[1] == before[1], f"(records, dead letters) {before} -> {after}"
        log(f"(records, dead letters) before the restart {before}, after {after}")
        env.inject_bad_message()
        dl3 = wait_for("a bad message dead-lettered after the restart",
                       lambda: env.dead_letters() > after[1] and env.dead_letters(), 60)
        log(f"after the restart: a bad message dead-lettered ({after[1]} -> {dl3})")
        rereads = (work / "evictd.log").read_text().count("no committed offset")
        assert rereads == 3, f"partitions read from their beginning {rereads} times (3 at the first start)"

        assert evictd.poll() is None, f"evictd exited {evictd.returncode}"
        assert env.debezium_alive()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        for line in metrics.splitlines():
            if line.startswith(("evictd_kafka_dead_letters_total", "evictd_kafka_rebalances_total")):
                log(f"metric {line}")
        log("ok")
        return 0
    finally:
        if evictd is not None and evictd.poll() is None:
            evictd.send_signal(signal.SIGTERM)
            try:
                evictd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                evictd.kill()
        env.stop()
        redis("DEL", "drill:item:9999", f"{key_prefix}3", f"{key_prefix}5", f"{key_prefix}7")
        try:
            psql(admin_url, f"DROP DATABASE IF EXISTS {db}")
        except RuntimeError as e:
            log(f"drop database: {e}")
        if os.environ.get("KDRILL_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
