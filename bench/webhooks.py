#!/usr/bin/env python3
"""leadsync webhook benchmarks, against the built-in sandbox on loopback.

    python3 bench/webhooks.py            # both (about a minute on 2 cores)
    python3 bench/webhooks.py --quick    # smaller sizes, for a smoke run

Uses the release binary and Python's standard library. The sandbox is the
sender: it delivers NegotiationCreatedV4 (its leads have the schema shape)
to the daemon's receiver and logs, per delivery, how long the receiver took
to answer 200. The receiver answers only after the delivery and the lead are
committed, so that time bounds "visible in the mirror" from above.

1. Latency under load: 20 businesses x 5,000 leads; the daemon starts with
   an empty mirror, so its first full sync (100,000 leads) runs while the
   script adds one lead every 5 ms (200 deliveries/s). Three rounds (one with
   --quick), pooled. Reported: p50/p99/max of the deliveries sent while the
   sync ran, the rate achieved, peak RSS.
2. Throughput: 20,000 leads added at once; the sandbox delivers them with
   --webhook-concurrency 16. Reported: deliveries accepted per second (first
   send to last 200), peak RSS.

The machine is shared: the load average at the start and end of each run is
printed with its results. Results go to bench/out/webhooks.md and .json.
"""

import argparse
import datetime
import http.client
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "leadsync")
PASSWORD = "bench-webhook-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


class Rig:
    """A sandbox process, a configuration with the receiver on, and the daemon."""

    def __init__(self, businesses, leads, concurrency=16):
        self.dir = tempfile.mkdtemp(prefix="leadsync-bench-wh-")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.sandbox = subprocess.Popen(
            [BIN, "sandbox", "--listen", f"127.0.0.1:{self.port}", "--businesses", str(businesses),
             "--leads-per-business", str(leads), "--max-page-size", "100",
             "--webhook-concurrency", str(concurrency), "--write-config", self.dir, "--static-tokens"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.sandbox.stdout:
            if "configuration written" in line:
                break
        self.receiver = free_port()
        with open(os.path.join(self.dir, "pw"), "w") as f:
            f.write(PASSWORD)
        self.overrides = os.path.join(self.dir, "bench.toml")
        with open(self.overrides, "w") as f:
            f.write(f"""[api]
max_requests_per_second = 100000

[poll]
page_size = 100
schedule = "0 0 0 1 1 *"
full_schedule = "0 0 0 1 1 *"

[webhooks]
listen = "127.0.0.1:{self.receiver}"
public_url = "http://127.0.0.1:{self.receiver}/thumbtack/webhooks"
username = "thumbtack"
password_file = "{os.path.join(self.dir, 'pw')}"
""")
        self.args = ["--config", os.path.join(self.dir, "leadsync.toml"), "--config", self.overrides]
        self.db = os.path.join(self.dir, "leadsync.db")
        self.http = http.client.HTTPConnection("127.0.0.1", self.port)
        self.daemon = None

    def cli(self, *args):
        out = subprocess.run([BIN] + self.args + list(args), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"leadsync {' '.join(args)} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        return out.stdout

    def start_daemon(self):
        env = dict(os.environ, LEADSYNC_LOG="warn")
        self.daemon = subprocess.Popen([BIN] + self.args + ["run"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.receiver), timeout=1).close()
                return
            except OSError:
                time.sleep(0.01)
        sys.exit("the receiver never listened")

    def sql(self, q):
        c = sqlite3.connect(self.db, timeout=10)
        try:
            return c.execute(q).fetchall()
        finally:
            c.close()

    def mutate(self, m):
        body = json.dumps(m)
        self.http.request("POST", "/_sandbox/mutate", body, {"content-type": "application/json"})
        r = self.http.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"mutate failed: {r.status} {data!r}")
        return json.loads(data)["ids"]

    def log(self):
        with urllib.request.urlopen(self.base + "/_sandbox/webhook-deliveries") as r:
            return json.load(r)

    def businesses(self):
        with urllib.request.urlopen(self.base + "/_sandbox/businesses") as r:
            return [b["id"] for b in json.load(r)]

    def wait_delivered(self, n, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if sum(1 for d in log if d["state"] != "pending") >= n:
                return log
            time.sleep(0.2)
        sys.exit("deliveries did not finish in time")

    def stop(self):
        if self.daemon:
            self.daemon.terminate()
            self.daemon.wait()
        self.sandbox.terminate()
        self.sandbox.wait()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency_round(per_business):
    """One daemon start on an empty mirror: its first full sync runs while
    leads are added at 200/s. Returns the deliveries sent during the sync."""
    rig = Rig(20, per_business)
    try:
        rig.cli("webhooks", "register")
        ids = rig.businesses()
        rig.start_daemon()
        deadline = time.monotonic() + 30
        while not rig.sql("SELECT 1 FROM sync_runs WHERE kind = 'full' LIMIT 1"):
            if time.monotonic() > deadline:
                sys.exit("the full sync never started")
            time.sleep(0.005)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < 60:
            due = start + sent * 0.005
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            rig.mutate({"kind": "add_leads", "business_id": ids[sent % len(ids)], "count": 1})
            sent += 1
            if sent % 20 == 0:
                done = rig.sql("SELECT count(*) FROM sync_runs WHERE kind = 'full' AND finished_at IS NOT NULL")[0][0]
                if done >= len(ids):
                    break
        elapsed = time.monotonic() - start
        log = rig.wait_delivered(sent)
        runs = rig.sql("SELECT min(started_at), max(finished_at), sum(seen), count(*), "
                       "sum(outcome = 'ok') FROM sync_runs WHERE kind = 'full'")[0]
        sync_start, sync_end = ts(runs[0]), ts(runs[1])
        during = [d for d in log if d["sent_at"] and sync_start <= ts(d["sent_at"]) <= sync_end]
        visible = rig.sql("SELECT count(*) FROM negotiation_changes WHERE source = 'webhook'")[0][0]
        return {
            "leads_in_full_sync": runs[2],
            "full_sync_s": round(sync_end - sync_start, 2),
            "full_sync_ok": runs[4] == runs[3],
            "sent": sent,
            "rate_per_s": round(sent / elapsed, 1),
            "during": [d["latency_ms"] for d in during],
            "failed": sum(1 for d in log if d["state"] != "delivered"),
            "retried": sum(1 for d in log if d["attempts"] > 1),
            "webhook_leads_in_mirror": visible,
            "rss": peak_rss_mib(rig.daemon.pid),
        }
    finally:
        rig.stop()


def bench_latency(quick):
    load_before = load()
    rounds = [latency_round(1250 if quick else 5000) for _ in range(1 if quick else 3)]
    lat = [x for r in rounds for x in r["during"]]
    result = {
        "rounds": len(rounds),
        "leads_in_full_sync": rounds[0]["leads_in_full_sync"],
        "full_sync_s": [r["full_sync_s"] for r in rounds],
        "full_sync_ok": all(r["full_sync_ok"] for r in rounds),
        "rate_per_s": round(statistics.mean(r["rate_per_s"] for r in rounds), 1),
        "deliveries_sent": sum(r["sent"] for r in rounds),
        "deliveries_during_sync": len(lat),
        "p50_ms": round(pct(lat, 50), 2) if lat else None,
        "p99_ms": round(pct(lat, 99), 2) if lat else None,
        "max_ms": round(max(lat), 2) if lat else None,
        "failed_deliveries": sum(r["failed"] for r in rounds),
        "retried_deliveries": sum(r["retried"] for r in rounds),
        "webhook_leads_in_mirror": sum(r["webhook_leads_in_mirror"] for r in rounds),
        "daemon_peak_rss_mib": max(r["rss"] for r in rounds),
        "load_before": load_before,
        "load_after": load(),
    }
    print("latency:", json.dumps(result, indent=2))
    return result


def bench_throughput(quick):
    total = 5000 if quick else 20000
    rig = Rig(3, 10)
    try:
        load_before = load()
        rig.cli("webhooks", "register")
        rig.start_daemon()
        deadline = time.monotonic() + 30
        while rig.sql("SELECT count(*) FROM businesses WHERE last_sync_finished_at IS NOT NULL")[0][0] < 3:
            if time.monotonic() > deadline:
                sys.exit("the first sync did not finish")
            time.sleep(0.05)
        ids = rig.businesses()
        for n in range(total // 1000):
            rig.mutate({"kind": "add_leads", "business_id": ids[n % 3], "count": 1000})
        log = rig.wait_delivered(total)
        first = min(ts(d["sent_at"]) for d in log if d["sent_at"])
        # delivered_at is taken after the 200 is read.
        last = max(ts(d["delivered_at"]) for d in log if d["delivered_at"])
        events = rig.sql("SELECT count(*), min(received_at), max(received_at) FROM webhook_events")[0]
        lat = [d["latency_ms"] for d in log if d["latency_ms"] is not None]
        result = {
            "deliveries": total,
            "accepted": events[0],
            "wall_s": round(last - first, 2),
            "accepted_per_s": round(events[0] / (last - first), 0),
            "receiver_side_per_s": round(events[0] / max(1e-3, ts(events[2]) - ts(events[1])), 0),
            "p50_ms": round(pct(lat, 50), 2),
            "p99_ms": round(pct(lat, 99), 2),
            "failed_deliveries": sum(1 for d in log if d["state"] != "delivered"),
            "daemon_peak_rss_mib": peak_rss_mib(rig.daemon.pid),
            "load_before": load_before,
            "load_after": load(),
        }
        print("throughput:", json.dumps(result, indent=2))
        return result
    finally:
        rig.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["latency", "throughput"])
    args = p.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: cargo build --release")
    results = {"nproc": os.cpu_count()}
    if args.only != "throughput":
        results["latency"] = bench_latency(args.quick)
    if args.only != "latency":
        results["throughput"] = bench_throughput(args.quick)
    lines = ["| webhook benchmark | result | target |", "|---|---|---|"]
    if "latency" in results:
        r = results["latency"]
        lines.append(
            f"| new lead → 200 (committed), {r['rate_per_s']}/s during a full sync of {r['leads_in_full_sync']:,} leads "
            f"({r['rounds']} rounds, sync {r['full_sync_s']} s, {r['deliveries_during_sync']} deliveries) | p50 {r['p50_ms']} ms, **p99 {r['p99_ms']} ms**, "
            f"max {r['max_ms']} ms; RSS {r['daemon_peak_rss_mib']} MiB; load {r['load_before']} → {r['load_after']} | p99 ≤ 50 ms |")
    if "throughput" in results:
        r = results["throughput"]
        lines.append(
            f"| {r['deliveries']:,} deliveries, sandbox concurrency 16 | **{r['accepted_per_s']:,.0f}/s accepted** "
            f"(p99 {r['p99_ms']} ms), RSS {r['daemon_peak_rss_mib']} MiB; load {r['load_before']} → {r['load_after']} "
            f"| ≥ 2,000/s, ≤ 64 MiB |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "webhooks.md"), "w") as f:
        f.write(table + "\n\n```json\n" + json.dumps(results, indent=2) + "\n```\n")
    with open(os.path.join(ROOT, "bench", "out", "webhooks.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
