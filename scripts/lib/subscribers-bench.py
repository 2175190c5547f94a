#!/usr/bin/env python3
"""Driver of scripts/subscribers-bench.sh: N subscriber agents of one
language (the end-to-end agents of tests/it/clients.rs, same line
protocol), evictd-load at a rate, then each agent's own commit → local drop
histogram (from the messages' committed_at_ms), CPU time and peak RSS.

    subscribers-bench.py --language L --n N --agent-json '["node", ...]' --cwd DIR \\
        --redis URL --channel C --transport T --heartbeat-ms H -- LOAD_COMMAND...

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reply(agent: subprocess.Popen, deadline: float) -> str:
    """The agent's next reply line (events skipped)."""
    while True:
        line = agent.stdout.readline()
        if not line:
            raise SystemExit(f"agent {agent.pid} exited (stderr above)")
        line = line.rstrip("\n")
        if not line.startswith("dropped "):
            return line
        if time.time() > deadline:
            raise SystemExit(f"agent {agent.pid}: no reply")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--language", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--agent-json", required=True)
    p.add_argument("--cwd", default=None)
    p.add_argument("--redis", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--transport", required=True)
    p.add_argument("--heartbeat-ms", required=True)
    p.add_argument("load", nargs=argparse.REMAINDER)
    a = p.parse_args()
    load = a.load[1:] if a.load[:1] == ["--"] else a.load
    argv = json.loads(a.agent_json) + [
        "--redis", a.redis, "--channel", a.channel, "--transport", a.transport, "--heartbeat-ms", a.heartbeat_ms,
    ]
    agents = [
        subprocess.Popen(argv, cwd=a.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        for _ in range(a.n)
    ]
    try:
        deadline = time.time() + 120
        for agent in agents:
            first = reply(agent, deadline)
            if first != "ready":
                raise SystemExit(f"agent {agent.pid}: {first}")
        time.sleep(1.0)  # start-up work out of the measurement
        before = [cpu_s(agent.pid) for agent in agents]
        started = time.time()
        out = subprocess.run(load, check=True, capture_output=True, text=True).stdout
        wall = time.time() - started
        after = [cpu_s(agent.pid) for agent in agents]
        figures = json.loads(out.strip().splitlines()[-1])
        stats = []
        for agent in agents:
            agent.stdin.write("stats\n")
            agent.stdin.flush()
            line = reply(agent, time.time() + 30)
            stats.append(json.loads(line.removeprefix("stats ")))
        rss = [hwm_mib(agent.pid) for agent in agents]
        for agent in agents:
            agent.stdin.write("quit\n")
            agent.stdin.flush()
        for agent in agents:
            agent.wait(timeout=30)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    drops = [s["commit_to_drop"] for s in stats]
    p50s = [d["p50_ms"] for d in drops if d.get("p50_ms") is not None]
    p99s = [d["p99_ms"] for d in drops if d.get("p99_ms") is not None]
    cpu = [y - x for x, y in zip(before, after)]
    print(json.dumps({
        "language": a.language,
        "subscribers": a.n,
        "transport": a.transport,
        "commit_rate": figures.get("commit_rate"),
        "redis_p50_ms": figures.get("p50_ms"),
        "redis_p99_ms": figures.get("p99_ms"),
        "batches_per_agent": statistics.median(d["count"] for d in drops),
        "local_p50_ms": statistics.median(p50s) if p50s else None,
        "local_p99_ms": max(p99s) if p99s else None,
        "gaps": sum(s["gaps"] for s in stats),
        "flushes": sum(s["flushes"] for s in stats),
        "cpu_s_per_agent": statistics.mean(cpu),
        "peak_rss_mib_max": max(rss),
        "wall_s": wall,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
