#!/usr/bin/env python3
"""Renders the dashboard's panels from a live Prometheus into one PNG: each
panel's targets (variables as "All", `$__rate_interval` as --rate-interval)
through `/api/v1/query_range` over the last --minutes, one small chart per
panel, in the dashboard's order. For reports without a Grafana at hand
(scripts/monitoring-test.sh with MONITORING_PNG=1); not a Grafana renderer.

    render-dashboard.py --prometheus http://127.0.0.1:9600 --start UNIX --end UNIX --out dashboard.png

Needs matplotlib (the test makes a venv for it).
"""

import argparse
import importlib.util
import json
import math
import pathlib
import re
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("check_queries", HERE / "check-queries.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def query_range(base, expr, start, end, step):
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=20) as resp:
        body = json.load(resp)
    return body["data"]["result"] if body.get("status") == "success" else []


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "") or \
        ",".join(f"{k}={v}" for k, v in metric.items() if k != "__name__")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--rate-interval", default="10s")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    dash = json.loads(check.DASHBOARD.read_text())
    panels = [p for p in check.all_panels(dash["panels"]) if p["type"] != "row"]
    exprs = dict(check.dashboard_queries(dash, args.rate_interval))
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5, rows * 3.1))
    step = max(1, int((args.end - args.start) / 200))
    for ax, p in zip(axes.flat, panels):
        ax.set_title(p["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        drawn = 0
        for t in p["targets"]:
            expr = exprs[f"panel {p['title']!r} {t['refId']}"]
            for s in query_range(args.prometheus.rstrip("/"), expr, args.start, args.end, step)[:8]:
                xs = [float(v[0]) - args.start for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                ax.plot(xs, ys, linewidth=1, label=legend(t.get("legendFormat"), s["metric"])[:40])
                drawn += 1
        if drawn:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("s since start", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("evictd dashboard (deploy/monitoring/evictd-dashboard.json), live test run", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
