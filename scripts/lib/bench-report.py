"""Prints scripts/bench.sh's results as markdown: targets first, then one
table per section. Input: the tab-separated lines bench.sh recorded.

    bench-report.py RESULTS RUNS WRITERS PER_TX LOAD_SECONDS WRITE_SECONDS CORES [before]
"""

import json
import statistics
import sys
from collections import defaultdict

results, runs, writers, per_tx, load_s, write_s, cores = sys.argv[1:8]
has_before = len(sys.argv) > 8 and sys.argv[8] == "before"
rows = [line.rstrip("\n").split("\t") for line in open(results) if line.strip()]
by = defaultdict(list)
for r in rows:
    by[r[0]].append(r[1:])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def spread(xs, digits=0):
    xs = sorted(x for x in xs if x is not None)
    return ", ".join(fmt(x, digits) for x in xs)


targets = []   # (target, measured, verdict)
out = []

# ---------------------------------------------------------------- drain
if by["drain"]:
    changes, wal = (int(v) for v in by["drain_backlog"][0][:2])
    per = defaultdict(list)
    for r in by["drain"]:
        kind, ms, cpu, hwm, effects = r[:5]
        redis = r[5] if len(r) > 5 and r[5] else None
        walsender = r[6] if len(r) > 6 and r[6] else None
        per[kind].append((int(ms) / 1000, float(cpu) if cpu else None, float(hwm) if hwm else None,
                          float(effects) if effects else None, float(redis) if redis else None,
                          float(walsender) if walsender else None))
    names = {"recv": "`pg_recvlogical` (reference: pgoutput, evictd's options)",
             "recvdefault": "`pg_recvlogical`, its defaults (test_decoding)",
             "recvbinary": "`pg_recvlogical`, pgoutput with `binary = true`",
             "evictd": "`evictd run`", "before": "`evictd run`, before"}
    out.append(f"**Catch-up drain** of a backlog of {fmt(changes)} single-row UPDATE transactions "
               f"({fmt(wal / 1e6, 1)} MB of WAL), each consumer from its own slot created at the same LSN; "
               f"median of {len(per['recv'])} interleaved runs.\n")
    out.append("| consumer | changes/s | WAL MB/s | ratio to pg_recvlogical | runs (s) | CPU s | CPU µs/change | "
               "peak RSS MiB | effects/s | Redis CPU s | Redis µs/effect | walsender CPU s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = med([changes / s for s, *_ in per["recv"]])
    rates = {}
    for kind in ("recv", "recvdefault", "recvbinary", "evictd", "before"):
        if not per[kind]:
            continue
        secs = [p[0] for p in per[kind]]
        rate = med([changes / s for s in secs])
        rates[kind] = rate
        mb = med([wal / 1e6 / s for s in secs])
        cpu = med([p[1] for p in per[kind]])
        hwm = max((p[2] for p in per[kind] if p[2] is not None), default=None)
        eff = med([p[3] / p[0] for p in per[kind] if p[3] is not None])
        redis = med([p[4] for p in per[kind]])
        redis_per = med([p[4] / p[3] * 1e6 for p in per[kind] if p[4] is not None and p[3]])
        out.append(f"| {names[kind]} | {fmt(rate)} | {fmt(mb, 1)} | {fmt(rate / ref, 2) if ref else '–'} | "
                   f"{spread(secs, 2)} | {fmt(cpu, 2)} | {fmt(cpu / changes * 1e6, 1) if cpu is not None else '–'} | "
                   f"{fmt(hwm, 1)} | {fmt(eff)} | {fmt(redis, 2)} | {fmt(redis_per, 2)} | "
                   f"{fmt(med([p[5] for p in per[kind]]), 2)} |")
    out.append("")
    if ref and "evictd" in rates:
        ratio = rates["evictd"] / ref
        targets.append(("catch-up drain ≥ 1.0 × `pg_recvlogical` (same pgoutput options; guard and broadcast on)",
                        f"{ratio:.2f} ({fmt(rates['evictd'])} vs {fmt(ref)} changes/s)",
                        "met" if ratio >= 1.0 else "missed"))
    if "recvdefault" in rates and "evictd" in rates:
        ratio = rates["evictd"] / rates["recvdefault"]
        targets.append(("catch-up drain ≥ 1.0 × `pg_recvlogical` at its defaults (test_decoding)",
                        f"{ratio:.2f} ({fmt(rates['evictd'])} vs {fmt(rates['recvdefault'])} changes/s)",
                        "met" if ratio >= 1.0 else "missed"))
    cpus = [p[1] for p in per["evictd"] if p[1] is not None]
    if cpus:
        us = med(cpus) / changes * 1e6
        targets.append(("evictd CPU per change ≤ 3 µs (catch-up drain, CPU time)", f"{us:.1f} µs",
                        "met" if us <= 3 else "missed"))
    hwms = [p[2] for p in per["evictd"] if p[2] is not None]
    if hwms:
        targets.append(("Postgres path peak RSS ≤ 32 MiB (catch-up)", f"{max(hwms):.1f} MiB",
                        "met" if max(hwms) <= 32 else "missed"))

# ------------------------------------------------------------- callgrind
if len(by["callgrind"]) >= 2:
    runs_cg = sorted((int(n), int(ir), int(ms)) for n, ir, ms in (r[:3] for r in by["callgrind"]))
    (n1, ir1, ms1), (n2, ir2, ms2) = runs_cg[0], runs_cg[-1]
    per_change = (ir2 - ir1) / (n2 - n1)
    out.append("**Instructions per change** (`valgrind --tool=callgrind`, all of evictd's threads): a small and a "
               "large catch-up drain, each from its own slot; the slope cancels start-up.\n")
    out.append("| changes | instructions | wall time under valgrind s |")
    out.append("|---|---|---|")
    for n, ir, ms in runs_cg:
        out.append(f"| {fmt(n)} | {fmt(ir)} | {fmt(ms / 1000, 1)} |")
    out.append(f"| **per change** (difference / difference) | **{fmt(per_change)}** | |")
    out.append("")
    targets.append(("evictd instructions per change (callgrind; the repeatable twin of the CPU row)",
                    f"{fmt(per_change)} instructions", "figure"))

# ----------------------------------------------------------------- sink
if by["sink"]:
    out.append("**Sink limit**: `redis-benchmark -P 64 UNLINK` of cached keys, next to evictd's own rate.\n")
    out.append("| | operations/s |")
    out.append("|---|---|")
    for conns, rps in by["sink"]:
        out.append(f"| `redis-benchmark -c {conns} -P 64 UNLINK bench:__rand_int__` | {fmt(float(rps))} |")
    eff = [float(e) / (int(ms) / 1000) for kind, ms, _, _, e in (r[:5] for r in by["drain"]) if kind == "evictd" and e]
    if eff:
        out.append(f"| evictd, catch-up drain: effects applied/s (keys, tags, bumps) | {fmt(med(eff))} |")
    unthrottled = [json.loads(r[1])["invalidation_rate"] for r in by["latency"]
                   if r[0] == "0" and (len(r) < 5 or r[4] in ("", "evictd"))]
    if unthrottled:
        out.append(f"| evictd, unthrottled load: changes invalidated/s | {fmt(med(unthrottled))} |")
    out.append("")

# -------------------------------------------------------------- latency
if by["latency"]:
    per = defaultdict(list)   # (consumer, rate) -> [(figures, cpu, hwm)]
    for row in by["latency"]:
        rate, js, cpu, hwm = row[:4]
        kind = row[4] if len(row) > 4 and row[4] else "evictd"
        per[(kind, int(rate))].append((json.loads(js), float(cpu) if cpu else None, float(hwm) if hwm else None))
    tx = f", {per_tx} rows per transaction" if per_tx != "1" else ""
    out.append(f"**Commit → key gone** (`evictd-load`, {writers} writer connections{tx}, {load_s} s a run; "
               f"medians of {max(len(v) for v in per.values())} runs; CPU s is evictd's over one run). "
               "The script is the hand-written reference: `pg_recvlogical` (test_decoding) | `sed` | `redis-cli`, "
               "deleting only the key the load watches; each round runs every rate with one consumer, "
               "then with the other, each on its own new slot.\n")
    out.append("| consumer | target changes/s | committed/s | invalidated/s | p50 ms | p99 ms | max ms | p99 of each run | "
               "not invalidated | evictd CPU s | evictd peak RSS MiB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"evictd": "`evictd run`", "script": "script (reference)"}
    p99s = {}
    for kind, rate in sorted(per, key=lambda k: (k[1] == 0, k[1], k[0] != "evictd")):
        v = per[(kind, rate)]
        js = [x[0] for x in v]
        label = "unthrottled" if rate == 0 else fmt(rate)
        cpus = [x[1] for x in v if x[1] is not None]
        hwms = [x[2] for x in v if x[2] is not None]
        p99 = med([j["p99_ms"] for j in js])
        p99s[(kind, rate)] = p99
        out.append(
            f"| {names.get(kind, kind)} | {label} | {fmt(med([j['commit_rate'] for j in js]))} | "
            f"{fmt(med([j['invalidation_rate'] for j in js]))} | "
            f"{fmt(med([j['p50_ms'] for j in js]), 2)} | {fmt(p99, 2)} | "
            f"{fmt(med([j['max_ms'] for j in js]), 2)} | {spread([j['p99_ms'] for j in js], 2)} | "
            f"{sum(j['not_invalidated'] for j in js)} | {fmt(med(cpus), 2) if cpus else '–'} | "
            f"{fmt(max(hwms), 1) if hwms else '–'} |")
        limit = {1000: 2.0, 2000: 2.0, 10000: 5.0}.get(rate)
        if limit and kind == "evictd":
            achieved = med([j["commit_rate"] for j in js])
            verdict = "met" if p99 <= limit else "missed"
            note = ""
            if achieved < 0.95 * rate:
                note = f", at {fmt(achieved)} changes/s: the load could not reach {fmt(rate)}"
                verdict = "missed (rate not reached)" if p99 <= limit else "missed"
            targets.append((f"p99 commit → key gone ≤ {limit:g} ms at {fmt(rate)} changes/s",
                            f"{p99:.2f} ms (p50 {med([j['p50_ms'] for j in js]):.2f}{note})", verdict))
    for (kind, rate), p99 in sorted(p99s.items(), key=lambda kv: kv[0][1]):
        script = p99s.get(("script", rate))
        if kind == "evictd" and rate and script:
            ratio = p99 / script
            targets.append((f"p99 commit → key gone ≤ 0.2 × the script's at {fmt(rate)} changes/s",
                            f"{ratio:.2f} ({p99:.2f} vs {script:.2f} ms)", "met" if ratio <= 0.2 else "missed"))
    hwm = max((x[2] for v in per.values() for x in v if x[2] is not None), default=None)
    if hwm is not None:
        targets.append(("peak RSS ≤ 64 MiB (under load)", f"{hwm:.1f} MiB", "met" if hwm <= 64 else "missed"))
    out.append("")

# --------------------------------------------------------------- writes
if by["writes"]:
    per = defaultdict(list)
    lags = []
    for kind, tps, lag in (r[:3] for r in by["writes"]):
        per[kind].append(float(tps))
        if lag:
            lags.append(int(lag))
    out.append(f"**Postgres write throughput**: `pgbench`, the same single-row UPDATE, {writers} connections, "
               f"{write_s} s a run, interleaved; median of {len(per['recv'])} runs each.\n")
    out.append("| consumer of the slot | transactions/s | runs | ratio to pg_recvlogical alone |")
    out.append("|---|---|---|---|")
    ref = med(per["recv"])
    names = {"none": "no slot (no logical decoding)", "recv": "`pg_recvlogical` alone (reference)", "evictd": "`evictd run`"}
    for kind in ("none", "recv", "evictd"):
        if per[kind]:
            out.append(f"| {names[kind]} | {fmt(med(per[kind]))} | {spread(per[kind])} | {fmt(med(per[kind]) / ref, 2)} |")
    out.append("")
    if lags:
        out.append(f"evictd caught up with the writes {spread([l / 1000 for l in lags], 2)} s after they stopped.\n")
    if per["evictd"] and ref:
        ratio = med(per["evictd"]) / ref
        targets.append(("write throughput ≥ 0.95 × with `pg_recvlogical` alone (same pgoutput options)",
                        f"{ratio:.2f} ({fmt(med(per['evictd']))} vs {fmt(ref)} tps)", "met" if ratio >= 0.95 else "missed"))

# -------------------------------------------------------------- restart
if by["restart"]:
    start_gone, commit_gone = [], []
    for t0, js, _ in by["restart"]:
        j = json.loads(js)
        if j["gone_unix_ns"] is None:
            start_gone.append(None)
            continue
        start_gone.append((j["gone_unix_ns"] - int(t0)) / 1e6)
        commit_gone.append(j["commit_to_gone_ms"])
    out.append("**First invalidation after a restart**: SIGTERM, start again, commit one change at once.\n")
    out.append("| | median ms | runs (ms) |")
    out.append("|---|---|---|")
    out.append(f"| process start → key gone | {fmt(med(start_gone))} | {spread(start_gone)} |")
    out.append(f"| commit → key gone | {fmt(med(commit_gone))} | {spread(commit_gone)} |")
    out.append("")
    if None in start_gone:
        targets.append(("first invalidation ≤ 500 ms after a restart", "a key was not invalidated within 30 s", "missed"))
    else:
        m = med(start_gone)
        targets.append(("first invalidation ≤ 500 ms after a restart", f"{m:.0f} ms (worst {max(start_gone):.0f})",
                        "met" if m <= 500 else "missed"))

# ---------------------------------------------------------------- kafka
if by["kafka_set"]:
    changes, messages, written_ms, filled_ms, size = (int(v) for v in by["kafka_set"][0][:5])
    names = {"postgres": "Postgres (`[source] kind = \"postgres\"`, a slot)",
             "kafka": "Kafka (`kind = \"kafka\"`, Debezium's topic)"}
    per = defaultdict(list)
    for kind, ms, first, cpu, hwm, received in (r[:6] for r in by["kafka_drain"]):
        per[kind].append((int(ms) / 1000, int(first) / 1000, float(cpu), float(hwm), float(received)))
    out.append(f"**Kafka path against the Postgres path: catch-up drain** of one change set, {fmt(changes)} "
               f"single-row UPDATE transactions of `shop.products`: evictd's slots and Debezium's were created before "
               f"it was written; Debezium had put it into its topic ({fmt(messages)} messages, 1 partition, "
               f"{fmt(size / 1e6, 1)} MB of JSON: {fmt(size / messages)} bytes a message with its schema) "
               f"{fmt(filled_ms / 1000, 1)} s after the writes began (the writes took {fmt(written_ms / 1000, 1)} s). "
               f"Each run drains from scratch (a fresh slot, a fresh consumer group) until the slot's "
               f"`confirmed_flush_lsn`, or the group's committed offsets, reach the end; "
               f"median of {max(len(v) for v in per.values())} runs, alternating which path goes first.\n")
    out.append("| source | changes/s after the first | changes/s from process start | start → first change s | "
               "runs, start → drained (s) | CPU s | CPU µs a change | peak RSS MiB | changes received |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    rates = {}
    for kind in ("postgres", "kafka"):
        v = per[kind]
        if not v:
            continue
        rates[kind] = med([changes / (s - f) for s, f, *_ in v])
        cpu = med([x[2] for x in v])
        out.append(f"| {names[kind]} | {fmt(rates[kind])} | {fmt(med([changes / x[0] for x in v]))} | "
                   f"{fmt(med([x[1] for x in v]), 2)} | {spread([x[0] for x in v], 2)} | {fmt(cpu, 2)} | "
                   f"{fmt(cpu / changes * 1e6, 1)} | {fmt(max(x[3] for x in v), 1)} | "
                   f"{spread([x[4] for x in v])} |")
    if len(rates) == 2:
        ratio = rates["kafka"] / rates["postgres"]
        targets.append(("Kafka path drain ≥ 0.8 × the Postgres path's, same change set",
                        f"{ratio:.2f} ({fmt(rates['kafka'])} vs {fmt(rates['postgres'])} changes/s)",
                        "met" if ratio >= 0.8 else "missed"))
        hwm = max(x[3] for x in per["kafka"])
        targets.append(("Kafka path peak RSS ≤ 64 MiB (default settings, drain)", f"{hwm:.1f} MiB",
                        "met" if hwm <= 64 else "missed"))
    if len(rates) == 2:
        out.append(f"\nKafka / Postgres: {rates['kafka'] / rates['postgres']:.2f} × the changes/s after the first change, "
                   f"{med([changes / x[0] for x in per['kafka']]) / med([changes / x[0] for x in per['postgres']]):.2f} × "
                   f"from process start, {med([x[2] for x in per['kafka']]) / med([x[2] for x in per['postgres']]):.2f} × "
                   f"the CPU time.")
    out.append("")
    lat = defaultdict(list)
    for kind, rate, js, cpu, hwm in (r[:5] for r in by["kafka_latency"]):
        lat[kind].append((json.loads(js), float(cpu), float(hwm)))
    if lat:
        rate = by["kafka_latency"][0][1]
        out.append(f"**Commit → key gone, each path** (`evictd-load` at {fmt(int(rate))} changes/s, {writers} writer "
                   f"connections, {load_s} s a run; medians of {max(len(v) for v in lat.values())} runs, alternating; "
                   f"Debezium runs throughout). The Kafka path's figure includes Debezium's own delay: decoding, its "
                   f"batching (`poll.interval.ms` 100) and the produce to the broker.\n")
        out.append("| source | committed/s | invalidated/s | p50 ms | p99 ms | max ms | p99 of each run | "
                   "not invalidated | evictd CPU s | evictd peak RSS MiB |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for kind in ("postgres", "kafka"):
            v = lat[kind]
            if not v:
                continue
            js = [x[0] for x in v]
            out.append(
                f"| {names[kind]} | {fmt(med([j['commit_rate'] for j in js]))} | "
                f"{fmt(med([j['invalidation_rate'] for j in js]))} | {fmt(med([j['p50_ms'] for j in js]), 2)} | "
                f"{fmt(med([j['p99_ms'] for j in js]), 2)} | {fmt(med([j['max_ms'] for j in js]), 2)} | "
                f"{spread([j['p99_ms'] for j in js], 2)} | {sum(j['not_invalidated'] for j in js)} | "
                f"{fmt(med([x[1] for x in v]), 2)} | {fmt(max(x[2] for x in v), 1)} |")
        if by["kafka_debezium_delay"]:
            d = json.loads(by["kafka_debezium_delay"][0][0])
            if d["n"]:
                out.append(f"\nOf the Kafka path's figure, Debezium's part (commit → event handed to the producer: the "
                           f"record's CreateTime − `source.ts_us`, {fmt(d['n'])} events of the Kafka runs): "
                           f"p50 {fmt(d['p50_ms'], 1)} ms, p99 {fmt(d['p99_ms'], 1)} ms, max {fmt(d['max_ms'], 1)} ms.")
        out.append("")

# ------------------------------------------------------------- newtopic
if by["newtopic"]:
    ms = [int(r[1]) for r in by["newtopic"]]
    out.append("**A new topic under `topic_pattern`**: a table created after evictd subscribed (default client "
               "settings), its first row inserted; Debezium creates the topic with that event. Commit → key gone, "
               "one new table a run.\n")
    out.append("| | median s | runs (s) |")
    out.append("|---|---|---|")
    out.append(f"| commit of a new table's first change → key gone | {fmt(med(ms) / 1000, 2)} | "
               f"{spread([m / 1000 for m in ms], 2)} |")
    out.append("")
    targets.append(("Kafka path: a new topic under `topic_pattern` → its first change invalidated ≤ 5 s",
                    f"{med(ms) / 1000:.2f} s (worst {max(ms) / 1000:.2f})", "met" if med(ms) <= 5000 else "missed"))

print(f"\n### evictd against the machine's limits\n")
print(f"{cores} cores; Postgres, Redis, evictd and the load on the same machine; medians of {runs} runs.\n")
if targets:
    print("| target | measured | |")
    print("|---|---|---|")
    for t, m, v in targets:
        print(f"| {t} | {m} | {v} |")
    print()
print("\n".join(out))
