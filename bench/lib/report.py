#!/usr/bin/env python3
"""Helpers for bench/gateway_load.sh (Python 3 standard library only).

    report.py ports N                      N free loopback TCP ports, space separated
    report.py entra-fixtures --key PEM --public JSON --authority URL --tenant T --audience A --out DIR
                                           a signed Entra-style v2 access token (RS256, with
                                           openssl) and the discovery document and JWKS that
                                           verify it, for the gateway-jwt variants
    report.py line RESULT.json             one-line summary of one measured run
    report.py post --port P --path PATH --body FILE --header "NAME: VALUE" --count N
                                           N POSTs over one keep-alive connection; prints how many
                                           were answered 200 (exit status 1 unless all were)
    report.py summarize --results DIR --meta META.json --out OUT.json
                                           table, ratios and targets on stdout; everything as JSON;
                                           exit status 3 when a run had request errors

A result file (written by the shell script, one per target and concurrency) holds wrk's numbers
(from the `done` hook of bench's Lua script: requests, duration in µs, error counts, latency
percentiles in µs) and the /proc figures of the proxy processes (utime and stime clock ticks over
the measured run, VmHWM/VmRSS in kB after it).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

TARGETS = ("direct", "nginx", "gateway")
# The gateway with the identity pipeline on, each compared with the key-only gateway.
IDENTITY_TARGETS = ("gateway-jwt", "gateway-jwt-limits", "gateway-jwt-limits-redis")
# The gateway recording full capture into a store, each compared with capture off (key-only).
CAPTURE_TARGETS = ("gateway-capture-sqlite", "gateway-capture-postgres")
VARIANTS = CAPTURE_TARGETS + IDENTITY_TARGETS
# A bare pass-through proxy on the gateway's parts (bench/src/bin/hyper_floor.rs): what any
# gateway built on them pays per call; compared with nginx as a figure, not a target.
FLOOR = "floor"
ALL_TARGETS = ("direct", "nginx", FLOOR, "gateway") + VARIANTS

# The targets the gateway is held to.
MAX_ADDED_P50_RATIO = 1.5  # gateway added p50 <= 1.5 x nginx added p50, at every concurrency
MIN_RPS_RATIO = 0.7  # gateway RPS >= 0.7 x nginx RPS, at the highest concurrency
MAX_RSS_MB = 60.0  # gateway peak RSS < 60 MB (10^6 bytes), at the highest concurrency
MAX_IDENTITY_P50_RATIO = 1.15  # with a JWT (and limits): added p50 <= 1.15 x key-only added p50
MAX_CAPTURE_P50_RATIO = 1.10  # full capture into a store: added p50 <= 1.10 x capture off ...
CAPTURE_CONCURRENCY = (16, 64)  # ... at these concurrencies


# The identity issue's target is a JWT on every call with limits on, counters in-process; the
# token alone and the Redis counters are reported as figures beside it.
HELD_IDENTITY_TARGETS = ("gateway-jwt-limits",)


def variant_limit(variant: str) -> float:
    return MAX_CAPTURE_P50_RATIO if variant in CAPTURE_TARGETS else MAX_IDENTITY_P50_RATIO


def variant_held(variant: str, concurrency: int) -> bool:
    """Whether the variant's ratio at this concurrency is a target (else a figure)."""
    if variant in CAPTURE_TARGETS:
        return concurrency in CAPTURE_CONCURRENCY
    return variant in HELD_IDENTITY_TARGETS


def b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def entra_fixtures(key: Path, public: Path, authority: str, tenant: str, audience: str, out: Path) -> None:
    """Token, discovery document and JWKS of a one-key, one-tenant Entra stand-in."""
    import subprocess
    import time

    kid = "bench-kid"
    issuer = f"{authority}/{tenant}/v2.0"
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    claims = {
        "aud": audience, "iss": issuer, "iat": now, "nbf": now - 60, "exp": now + 4 * 3600,
        "ver": "2.0", "tid": tenant, "oid": "00000000-0000-0000-0000-0000000be4c0",
        "preferred_username": "bench@contoso.example", "name": "Bench User",
        "scp": "user_impersonation", "groups": ["bench-group"],
        "azp": "00000000-0000-0000-0000-00000000c11e",
    }
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key), "-binary"],
        input=signing_input.encode(), capture_output=True, check=True,
    ).stdout
    out.mkdir(parents=True, exist_ok=True)
    (out / "token.txt").write_text(f"{signing_input}.{b64url(signature)}")
    keys = json.loads(public.read_text())["a"]
    (out / "jwks.json").write_text(json.dumps(
        {"keys": [{"kty": "RSA", "use": "sig", "kid": kid, "n": keys["n"], "e": keys["e"]}]}))
    (out / "discovery.json").write_text(json.dumps(
        {"issuer": issuer, "jwks_uri": f"{authority}/{tenant}/discovery/v2.0/keys"}))


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for 127.0.0.1:0, all held at once so they differ."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def post(port: int, path: str, body: Path, header: str, count: int, connections: int = 1) -> int:
    """POSTs `body` `count` times, spread over `connections` keep-alive connections used at once
    (one thread each); the number answered 200."""
    import http.client
    import threading

    name, _, value = header.partition(":")
    headers = {"Content-Type": "application/json", name.strip(): value.strip()}
    payload = body.read_bytes()
    connections = max(1, min(connections, count)) if count else 1
    answered = [0] * connections

    def run(slot: int, calls: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for _ in range(calls):
                connection.request("POST", path, body=payload, headers=headers)
                response = connection.getresponse()
                response.read()
                answered[slot] += response.status == 200
        except (OSError, http.client.HTTPException) as error:
            print(f"post: connection {slot}: {error}", file=sys.stderr)
        finally:
            connection.close()

    share, rest = divmod(count, connections)
    threads = [
        threading.Thread(target=run, args=(slot, share + (slot < rest)))
        for slot in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(answered)


def derive(run: dict, clk_tck: int) -> dict:
    """The figures of one run, in the units the report uses."""
    wrk = run["wrk"]
    seconds = wrk["duration_us"] / 1e6
    requests = wrk["requests"]
    errors = wrk["errors"]
    lat = wrk["latency_us"]
    out = {
        "target": run["target"],
        "concurrency": run["concurrency"],
        "requests": requests,
        "seconds": round(seconds, 3),
        "rps": round(requests / seconds, 1) if seconds > 0 else 0.0,
        "latency_ms": {k: round(lat[k] / 1000, 4) for k in ("p50", "p75", "p90", "p99", "max", "mean")},
        "errors": errors,
        "error_count": sum(errors.values()),
        "mock_cpu_us_per_request": None,
        "proxy_cpu_us_per_request": None,
        "proxy_cpu_cores": None,
        "proxy_cpu_sys_pct": None,
        "proxy_peak_rss_mb": None,
        "proxy_rss_after_mb": None,
        "host_cpu_busy_pct": None,
        "raw": run,
    }
    if requests > 0:
        out["mock_cpu_us_per_request"] = round(run["mock_cpu_ticks"] / clk_tck * 1e6 / requests, 2)
    if run.get("proxy_cpu_user_ticks") is not None and requests > 0:
        ticks = run["proxy_cpu_user_ticks"] + run["proxy_cpu_sys_ticks"]
        cpu_s = ticks / clk_tck
        out["proxy_cpu_sys_pct"] = round(100 * run["proxy_cpu_sys_ticks"] / ticks, 1) if ticks else None
        out["proxy_cpu_us_per_request"] = round(cpu_s * 1e6 / requests, 2)
        out["proxy_cpu_cores"] = round(cpu_s / seconds, 3) if seconds > 0 else None
    if run.get("proxy_vmhwm_kb") is not None:
        out["proxy_peak_rss_mb"] = round(run["proxy_vmhwm_kb"] * 1024 / 1e6, 2)
        out["proxy_rss_after_mb"] = round(run["proxy_vmrss_kb"] * 1024 / 1e6, 2)
    out["own_overhead_ms"] = None
    if run.get("overhead_buckets_after"):
        before, after = run.get("overhead_buckets_before") or [], run["overhead_buckets_after"]
        quantiles = {name: histogram_quantile(q, before, after) for name, q in (("p50", 0.5), ("p99", 0.99))}
        if quantiles["p50"] is not None:
            out["own_overhead_ms"] = {name: round(v * 1000, 4) for name, v in quantiles.items()}
    if run.get("host_total_jiffies"):
        out["host_cpu_busy_pct"] = round(100 * run["host_busy_jiffies"] / run["host_total_jiffies"], 1)
    return out


def histogram_quantile(q: float, before: list, after: list) -> float | None:
    """The q-quantile of what a cumulative Prometheus histogram counted between two scrapes
    (lists of [upper bound, cumulative count]), interpolated within its bucket as Prometheus's
    `histogram_quantile` does; None when it counted nothing."""
    start = {le: count for le, count in before}
    buckets = sorted(((float(le), count - start.get(le, 0)) for le, count in after), key=lambda b: b[0])
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1)
        lower, below = upper, cumulative
    return lower


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def mark(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def line(path: Path) -> str:
    d = derive(json.loads(path.read_text()), clk_tck=100)  # CLK_TCK is 100 on Linux
    parts = [
        f"p50 {d['latency_ms']['p50']:.3f} ms",
        f"p99 {d['latency_ms']['p99']:.3f} ms",
        f"{d['rps']:.0f} req/s",
    ]
    if d["proxy_cpu_us_per_request"] is not None:
        parts.append(f"proxy CPU {d['proxy_cpu_us_per_request']:.1f} µs/req")
        parts.append(f"peak RSS {d['proxy_peak_rss_mb']:.1f} MB")
    if d["own_overhead_ms"] is not None:
        own = d["own_overhead_ms"]
        parts.append(f"own overhead p50 {own['p50'] * 1000:.0f} µs, p99 {own['p99'] * 1000:.0f} µs")
    parts.append(f"errors {d['error_count']}")
    return ", ".join(parts)


def compare(runs: dict[tuple[str, int], dict], concurrency: list[int]) -> tuple[list, list]:
    """Per-concurrency ratios, and the targets with their verdicts."""
    comparisons = []
    for c in concurrency:
        direct, nginx, gateway = (runs.get((t, c)) for t in TARGETS)
        row: dict = {"concurrency": c}
        if direct and nginx:
            row["nginx_added_p50_ms"] = round(nginx["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 4)
        if direct and gateway:
            row["gateway_added_p50_ms"] = round(gateway["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 4)
        if "nginx_added_p50_ms" in row and "gateway_added_p50_ms" in row:
            n, g = row["nginx_added_p50_ms"], row["gateway_added_p50_ms"]
            # A ratio means nothing when nginx adds nothing measurable (p50 at or below direct's).
            row["added_p50_ratio"] = round(g / n, 3) if n > 0 else None
            row["added_p50_ok"] = g <= MAX_ADDED_P50_RATIO * n if n > 0 else g <= 0
        if nginx and gateway and nginx["rps"] > 0:
            row["rps_ratio"] = round(gateway["rps"] / nginx["rps"], 3)
        floor = runs.get((FLOOR, c))
        if direct and floor:
            row["floor_added_p50_ms"] = round(floor["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 4)
            n = row.get("nginx_added_p50_ms")
            row["floor_added_p50_ratio"] = round(row["floor_added_p50_ms"] / n, 3) if n and n > 0 else None
        if nginx and floor and nginx["rps"] > 0:
            row["floor_rps_ratio"] = round(floor["rps"] / nginx["rps"], 3)
        for variant in VARIANTS:
            measured = runs.get((variant, c))
            if direct and gateway and measured:
                base = gateway["latency_ms"]["p50"] - direct["latency_ms"]["p50"]
                added = measured["latency_ms"]["p50"] - direct["latency_ms"]["p50"]
                row[f"{variant}_added_p50_ms"] = round(added, 4)
                row[f"{variant}_ratio"] = round(added / base, 3) if base > 0 else None
        comparisons.append(row)

    targets = []
    top = max(concurrency)
    for row in comparisons:
        targets.append({
            "name": f"gateway added p50 <= {MAX_ADDED_P50_RATIO}x nginx added p50 at c={row['concurrency']}",
            "value": row.get("added_p50_ratio"),
            "ok": row.get("added_p50_ok"),
        })
    top_row = comparisons[-1] if comparisons else {}
    rps_ratio = top_row.get("rps_ratio")
    targets.append({
        "name": f"gateway RPS >= {MIN_RPS_RATIO}x nginx RPS at c={top}",
        "value": rps_ratio,
        "ok": None if rps_ratio is None else rps_ratio >= MIN_RPS_RATIO,
    })
    for variant in VARIANTS:
        limit = variant_limit(variant)
        for row in comparisons:
            if f"{variant}_ratio" not in row:
                continue
            if not variant_held(variant, row["concurrency"]):
                continue
            ratio = row[f"{variant}_ratio"]
            targets.append({
                "name": f"{variant} added p50 <= {limit}x key-only gateway added p50 at c={row['concurrency']}",
                "value": ratio,
                "ok": None if ratio is None else ratio <= limit,
            })
    gateway_top = runs.get(("gateway", top))
    rss = gateway_top["proxy_peak_rss_mb"] if gateway_top else None
    targets.append({
        "name": f"gateway peak RSS < {MAX_RSS_MB:g} MB at c={top}",
        "value": rss,
        "ok": None if rss is None else rss < MAX_RSS_MB,
    })
    return comparisons, targets


def summarize(results: Path, meta_path: Path, out: Path) -> int:
    """Print the report and write it as JSON; 3 when a run had request errors, else 0."""
    meta = json.loads(meta_path.read_text())
    clk_tck = meta.get("clk_tck", 100)
    runs: dict[tuple[str, int], dict] = {}
    for path in sorted(results.glob("*.json")):
        d = derive(json.loads(path.read_text()), clk_tck)
        runs[(d["target"], d["concurrency"])] = d
    concurrency = meta["concurrency"]
    comparisons, targets = compare(runs, concurrency)

    w = sys.stdout.write
    w(
        f"duration {meta['duration_s']} s per run after a {meta['warmup_s']} s warm-up; "
        f"POST {meta['request_body_bytes']} B body; nginx proxy worker_processes "
        f"{meta['nginx_proxy_worker_processes']}; {meta['cpus']} CPUs; gateway: {meta['gateway']['status']}"
        + (f" ({meta['gateway']['skip_reason']})" if meta["gateway"]["skip_reason"] else "")
        + "\n"
    )
    busy = meta.get("host_busy_before_pct")
    if busy is not None and busy > 10:
        w(f"WARNING: the machine was {busy}% busy before the benchmark (other work running): figures are noisy\n")
    header = (
        f"{'c':>3}  {'target':<24} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} "
        f"{'CPU µs/req':>10} {'sys %':>5} {'CPU cores':>9} {'peak RSS MB':>11} {'mock µs/req':>11} {'host busy':>9} {'errors':>6}\n"
    )
    for c, row in zip(concurrency, comparisons):
        w("\n" + header)
        for t in ALL_TARGETS:
            d = runs.get((t, c))
            if not d:
                if t in TARGETS:
                    w(f"{c:>3}  {t:<24} {'(not measured)':>8}\n")
                continue
            w(
                f"{c:>3}  {t:<24} {d['latency_ms']['p50']:>8.3f} {d['latency_ms']['p99']:>8.3f} "
                f"{d['rps']:>9.0f} {fmt(d['proxy_cpu_us_per_request'], '.1f'):>10} {fmt(d['proxy_cpu_sys_pct'], '.0f'):>5} "
                f"{fmt(d['proxy_cpu_cores'], '.2f'):>9} {fmt(d['proxy_peak_rss_mb'], '.1f'):>11} "
                f"{fmt(d['mock_cpu_us_per_request'], '.1f'):>11} {fmt(d['host_cpu_busy_pct'], '.0f'):>8}% "
                f"{d['error_count']:>6}\n"
            )
        added = []
        if "nginx_added_p50_ms" in row:
            added.append(f"nginx +{row['nginx_added_p50_ms'] * 1000:.0f} µs")
        if "floor_added_p50_ms" in row:
            added.append(f"floor +{row['floor_added_p50_ms'] * 1000:.0f} µs")
        if "gateway_added_p50_ms" in row:
            added.append(f"gateway +{row['gateway_added_p50_ms'] * 1000:.0f} µs")
        if added:
            w(f"     added p50 vs direct: {', '.join(added)}")
            if "added_p50_ok" in row:
                ratio = row["added_p50_ratio"]
                w(
                    f"  -> gateway/nginx {fmt(ratio, '.2f', 'n/a')}x "
                    f"(target <= {MAX_ADDED_P50_RATIO}x) {mark(row['added_p50_ok'])}"
                )
            w("\n")
        if "floor_added_p50_ms" in row:
            w(
                f"     the floor (a bare hyper proxy, none of the gateway's work): added p50 "
                f"{fmt(row.get('floor_added_p50_ratio'), '.2f', 'n/a')}x nginx's, RPS "
                f"{fmt(row.get('floor_rps_ratio'), '.2f', 'n/a')}x nginx's (a figure, not a target)\n"
            )
        gateway = runs.get(("gateway", c))
        if gateway and gateway["own_overhead_ms"] is not None:
            own = gateway["own_overhead_ms"]
            w(
                f"     the gateway's own count (gatehouse_overhead_seconds): p50 {own['p50'] * 1000:.0f} µs, "
                f"p99 {own['p99'] * 1000:.0f} µs; the rest of its added latency is the wait for CPU, "
                f"hyper and the kernel\n"
            )
        if "rps_ratio" in row:
            target = f" (target >= {MIN_RPS_RATIO}x)" if c == max(concurrency) else ""
            ok = f" {mark(row['rps_ratio'] >= MIN_RPS_RATIO)}" if target else ""
            w(f"     RPS gateway/nginx: {row['rps_ratio']:.2f}x{target}{ok}\n")
        for variant in VARIANTS:
            if f"{variant}_ratio" in row:
                ratio = row[f"{variant}_ratio"]
                limit = variant_limit(variant)
                verdict = (
                    f"(target <= {limit}x) {mark(None if ratio is None else ratio <= limit)}"
                    if variant_held(variant, c) else "(a figure, not a target)"
                )
                w(
                    f"     {variant}: added p50 +{row[f'{variant}_added_p50_ms'] * 1000:.0f} µs = "
                    f"{fmt(ratio, '.2f', 'n/a')}x key-only {verdict}\n"
                )

    for check in meta.get("capture_checks", []):
        answered, records = check.get("answered"), check.get("records")
        if check.get("room_waits") is not None:
            w(f"  {check['target']}: {check['room_waits']} calls waited for room in the audit queue\n")
        targets.append({
            "name": f"{check['target']}: records in the store >= calls answered ({answered})",
            "value": records,
            "ok": None if records is None or answered is None else records >= answered,
        })

    w("\ntargets\n")
    for t in targets:
        value = t["value"]
        w(f"  {mark(t['ok']):<4}  {t['name']}: {fmt(value, '.2f', 'not measured')}\n")
    bad = [d for d in runs.values() if d["error_count"] > 0]
    for d in bad:
        w(f"  WARNING: {d['target']} at c={d['concurrency']} had errors {d['errors']}: its figures are invalid\n")

    document = {
        "benchmark": "gateway_load",
        "meta": meta,
        "runs": [runs[k] for k in sorted(runs, key=lambda k: (ALL_TARGETS.index(k[0]), k[1]))],
        "comparisons": comparisons,
        "targets": targets,
        "all_targets_met": all(t["ok"] is True for t in targets),
    }
    out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 3 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ports")
    p.add_argument("count", type=int)
    p = sub.add_parser("entra-fixtures")
    for name in ("key", "public", "out"):
        p.add_argument(f"--{name}", type=Path, required=True)
    for name in ("authority", "tenant", "audience"):
        p.add_argument(f"--{name}", required=True)
    p = sub.add_parser("line")
    p.add_argument("result", type=Path)
    p = sub.add_parser("post")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--header", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p = sub.add_parser("summarize")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--meta", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.command == "ports":
        print(" ".join(str(p) for p in free_ports(args.count)))
    elif args.command == "entra-fixtures":
        entra_fixtures(args.key, args.public, args.authority, args.tenant, args.audience, args.out)
    elif args.command == "post":
        answered = post(args.port, args.path, args.body, args.header, args.count, args.connections)
        print(answered)
        return 0 if answered == args.count else 1
    elif args.command == "line":
        print(line(args.result))
    else:
        return summarize(args.results, args.meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
