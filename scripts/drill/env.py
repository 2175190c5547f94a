"""The drill's own services: a Postgres cluster, a Redis primary with a
replica, a Redis Cluster, and the proxies evictd reaches them through.

Everything runs on 127.0.0.1 from ports `base`…`base+39` (the Cluster on
`base-11000`…, so that its bus ports, +10000, stay below 65536) and lives
under one work directory; `stop()` removes what `start()` made. The project's
own service scripts (scripts/services/) start Postgres and the Cluster.

Who talks to what:
- each evictd replica reaches Postgres through a proxy of its own (`pg-N`:
  replication and session connections told apart), the dead-letter table
  through `dead_letter`, and the
  standalone Redis through `redis_proxy`, which points at the current primary:
  a failover moves the proxy, as a Sentinel-managed address or a Kubernetes
  Service would.
- The drill's writer and checker talk to the servers directly: a partition
  cuts evictd off, not the application.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SERVICES = ROOT / "scripts" / "services"
PG_REPLICAS = 2


def wait_port(port, limit=20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit} s")


class ProxyProcess:
    """One scripts/drill/proxy.py process and its control connection."""

    def __init__(self, name, listen, upstream, control, work, postgres=False):
        self.name = name
        self.listen = listen
        self.control_port = control
        log = open(work / f"proxy-{name}.log", "ab")
        args = [sys.executable, str(HERE / "proxy.py"), "--listen", f"127.0.0.1:{listen}",
                "--upstream", f"127.0.0.1:{upstream}", "--control", f"127.0.0.1:{control}"]
        if postgres:
            args.append("--postgres")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        wait_port(control)
        self.sock = socket.create_connection(("127.0.0.1", control))
        self.file = self.sock.makefile("rw")

    def command(self, line):
        self.file.write(line + "\n")
        self.file.flush()
        answer = self.file.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"proxy {self.name}: {line!r} → {answer!r}")
        return answer

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Redis:
    """One redis-server process, AOF with fsync always: a kill and restart
    loses no write it answered."""

    def __init__(self, port, work):
        self.port = port
        self.dir = work / f"redis-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.replica_of = None

    def start(self):
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log")]
        if self.replica_of:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        # Listening is not serving: wait until the AOF is loaded.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "loading:0" in self.cli("INFO", "persistence"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis {self.port}: still loading after 20 s")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        return out.stdout

    def url(self):
        return f"redis://127.0.0.1:{self.port}"


class Environment:
    def __init__(self, work, base, log):
        self.work = pathlib.Path(work)
        self.base = base
        self.log = log
        self.pg_port = base
        self.pg_data = self.work / "pg" / "data"
        self.db = "drill"
        self.cluster_ports = [base - 11000 + i for i in range(3)]
        self.redis_a = Redis(base + 3, self.work)
        self.redis_b = Redis(base + 4, self.work)
        self.primary, self.replica = self.redis_a, self.redis_b
        self.proxies = {}

    # -- ports evictd uses -------------------------------------------------
    def evictd_pg_url(self, replica=0):
        """Each replica reaches Postgres through a proxy of its own, so that
        one replica can be cut off while the other is not."""
        return f"postgres://postgres@127.0.0.1:{self.base + 22 + 2 * replica}/{self.db}"

    def evictd_dead_letter_url(self):
        return f"postgres://postgres@127.0.0.1:{self.base + 20}/{self.db}"

    def evictd_redis_url(self):
        return f"redis://127.0.0.1:{self.base + 5}"

    def cluster_url(self):
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.cluster_ports)

    def pg_url(self):
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/{self.db}"

    def replica_port(self, index):
        return self.base + 10 + index

    # -- life cycle --------------------------------------------------------
    def pg_env(self):
        return dict(os.environ, PGPORT=str(self.pg_port), PGDATA=str(self.pg_data), PGDATABASE=self.db,
                    PG_WAL_SENDER_TIMEOUT="10s")

    def pg_start(self):
        out = subprocess.run(["bash", str(SERVICES / "pg-start.sh")], env=self.pg_env(), capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"pg-start.sh failed:\n{out.stderr[-2000:]}")

    def pg_stop(self, wipe=False):
        env = self.pg_env()
        if wipe:
            env["PG_WIPE"] = "1"
        subprocess.run(["bash", str(SERVICES / "pg-stop.sh")], env=env, capture_output=True, text=True)

    def pg_crash(self):
        """SIGKILL of the postmaster: a crash, recovery at the next start."""
        pid_file = self.pg_data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        # Backends outlive a killed postmaster for a moment; the next start
        # waits for them (it refuses while the old shared memory is in use).
        time.sleep(1.0)

    def cluster_env(self):
        return dict(os.environ, REDIS_CLUSTER_PORTS=" ".join(map(str, self.cluster_ports)),
                    REDIS_CLUSTER_DIR=str(self.work / "cluster"), REDIS_CLUSTER_AOF="1")

    def cluster_start(self):
        out = subprocess.run(["bash", str(SERVICES / "redis-cluster-start.sh")], env=self.cluster_env(),
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cluster-start.sh failed:\n{out.stderr[-2000:]}")

    def cluster_node_restart(self, index, down_seconds):
        """One Cluster primary is killed and started again on its own data
        (AOF, fsync always); its slots are down meanwhile."""
        port = self.cluster_ports[index]
        info = subprocess.run(["redis-cli", "-p", str(port), "INFO", "server"], capture_output=True, text=True,
                              timeout=10).stdout
        pid = next((int(line.split(":")[1]) for line in info.splitlines() if line.startswith("process_id:")), None)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        time.sleep(down_seconds)
        self.cluster_start()

    def start(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.log(f"postgres on {self.pg_port}")
        self.pg_stop(wipe=True)
        self.pg_start()
        self.log(f"redis primary {self.redis_a.port}, replica {self.redis_b.port}")
        self.redis_a.start()
        self.redis_b.replica_of = self.redis_a.port
        self.redis_b.start()
        self.log(f"redis cluster {self.cluster_ports}")
        env = self.cluster_env()
        env["REDIS_CLUSTER_WIPE"] = "1"
        subprocess.run(["bash", str(SERVICES / "redis-cluster-stop.sh")], env=env, capture_output=True)
        self.cluster_start()
        for i in range(PG_REPLICAS):
            self.proxies[f"pg-{i}"] = ProxyProcess(f"pg-{i}", self.base + 22 + 2 * i, self.pg_port, self.base + 23 + 2 * i,
                                                   self.work, postgres=True)
        self.proxies["redis"] = ProxyProcess("redis", self.base + 5, self.primary.port, self.base + 6, self.work)
        self.proxies["dead_letter"] = ProxyProcess("dead_letter", self.base + 20, self.pg_port, self.base + 21,
                                                   self.work)

    def stop(self):
        for proxy in self.proxies.values():
            try:
                proxy.stop()
            except Exception as e:  # noqa: BLE001 - best effort at the end
                self.log(f"proxy {proxy.name}: {e}")
        for redis in (self.redis_a, self.redis_b):
            redis.kill()
        env = self.cluster_env()
        env["REDIS_CLUSTER_WIPE"] = "1"
        subprocess.run(["bash", str(SERVICES / "redis-cluster-stop.sh")], env=env, capture_output=True)
        self.pg_stop(wipe=True)

    def wait_replica_in_sync(self, limit=30.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            info = self.primary.cli("INFO", "replication")
            if "connected_slaves:1" in info and "state=online" in info:
                return True
            time.sleep(0.1)
        return False

    # -- faults ------------------------------------------------------------
    def redis_restart(self, down_seconds):
        """The primary is killed and started again on its own data (AOF)."""
        self.primary.kill()
        time.sleep(down_seconds)
        self.primary.start()
        self.wait_replica_in_sync()

    def redis_promote(self, down_seconds):
        """The primary dies; its replica is promoted and the proxy moved to it;
        the old primary comes back as a replica of the new one."""
        old, new = self.primary, self.replica
        old.kill()
        new.cli("REPLICAOF", "NO", "ONE")
        new.replica_of = None
        self.proxies["redis"].command(f"upstream 127.0.0.1:{new.port}")
        self.proxies["redis"].command("reset")
        self.primary, self.replica = new, old
        time.sleep(down_seconds)
        old.replica_of = new.port
        old.start()
        self.wait_replica_in_sync()
