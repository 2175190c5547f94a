"""evictd replicas as a Deployment runs them: each a process with its own
/healthz port, restarted when it dies, and killed by a liveness probe that
fails three times in a row (Kubernetes' `failureThreshold`).

The probe here is quicker than deploy/kubernetes/base/deployment.yaml's
(period 10 s, timeout 2 s, 3 failures): `probe_period` and `probe_timeout`
set it, and the drill reports which of the lease and the probe ended a
freeze. A replica that died is started again after `restart_delay` seconds
(Kubernetes' back-off starts at 10 s; the drill keeps it short so that a
hundred kills fit in minutes — the order of events is the same).
"""

import asyncio
import os
import signal
import subprocess
import time


class Replica:
    def __init__(self, index, binary, config, port, work, env):
        self.index = index
        self.name = f"evictd-{index}"
        self.binary = binary
        self.config = config
        self.port = port
        self.work = work
        self.env = env
        self.proc = None
        self.frozen = False
        self.starts = 0

    def start(self):
        log = open(self.work / f"{self.name}.log", "ab")
        env = dict(os.environ, EVICTD_LOG=os.environ.get("EVICTD_LOG", "info"), **self.env)
        self.proc = subprocess.Popen([self.binary, "run", "--config", str(self.config)], stdout=log, stderr=log,
                                     env=env)
        self.frozen = False
        self.starts += 1

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.frozen = False

    def freeze(self):
        self.signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self):
        self.signal(signal.SIGCONT)
        self.frozen = False

    def stop(self):
        if self.alive():
            if self.frozen:
                self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def http_get(port, path, timeout):
    """(status, body) or None when nothing answered in time."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body.decode(errors="replace")
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return None


async def metric(port, name):
    """The value of an unlabelled metric on /metrics, or None."""
    answer = await http_get(port, "/metrics", 1.0)
    if answer is None:
        return None
    for line in answer[1].splitlines():
        if line.startswith(name + " "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


class Deployment:
    """The replicas, their restarts and their liveness probe."""

    def __init__(self, replicas, events, probe_period=1.0, probe_timeout=1.0, failure_threshold=3,
                 restart_delay=0.3):
        self.replicas = replicas
        self.events = events
        self.probe_period = probe_period
        self.probe_timeout = probe_timeout
        self.failure_threshold = failure_threshold
        self.restart_delay = restart_delay
        self.probing = True
        self.kills = 0
        self.liveness_kills = 0
        self.restarts = 0
        self.paused = set()  # replicas not to restart (scaled down)
        self._tasks = []

    def start(self):
        """Starts every replica not scaled down (`paused`), and the watchers."""
        for r in self.replicas:
            if r.index not in self.paused:
                r.start()
        self._tasks = [asyncio.create_task(self._watch(r)) for r in self.replicas]

    async def _watch(self, replica):
        failures = 0
        while True:
            await asyncio.sleep(self.probe_period)
            if replica.index in self.paused:
                failures = 0
                continue
            if not replica.alive():
                await asyncio.sleep(self.restart_delay)
                if replica.index in self.paused or replica.alive():
                    continue
                replica.start()
                self.restarts += 1
                failures = 0
                continue
            if not self.probing:
                failures = 0
                continue
            answer = await http_get(replica.port, "/healthz", self.probe_timeout)
            if answer is not None and answer[0] == 200:
                failures = 0
                continue
            failures += 1
            if failures >= self.failure_threshold:
                self.events.append((time.monotonic(), "liveness-kill", replica.name))
                replica.kill()
                self.liveness_kills += 1
                failures = 0

    async def roles(self):
        """{index: 'active' | 'standby' | None} from /readyz."""
        out = {}
        for r in self.replicas:
            if not r.alive() or r.frozen:
                out[r.index] = None
                continue
            answer = await http_get(r.port, "/readyz", 0.5)
            if answer is None:
                out[r.index] = None
            elif "active" in answer[1]:
                out[r.index] = "active"
            elif "standby" in answer[1]:
                out[r.index] = "standby"
            else:
                out[r.index] = None
        return out

    async def active(self, limit=30.0):
        """The replica that streams, waiting for one for up to `limit` s."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            roles = await self.roles()
            actives = [i for i, role in roles.items() if role == "active"]
            if len(actives) == 1:
                return self.replicas[actives[0]]
            await asyncio.sleep(0.1)
        return None

    def kill(self, replica):
        self.kills += 1
        replica.kill()

    async def restart_all(self, env):
        """A rolling restart with a new environment (a config change)."""
        for r in self.replicas:
            self.paused.add(r.index)
            r.stop()
            r.env = env
            r.start()
            self.paused.discard(r.index)
            await asyncio.sleep(0.5)

    async def stop(self):
        for t in self._tasks:
            t.cancel()
        for r in self.replicas:
            r.stop()
