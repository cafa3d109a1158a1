#!/usr/bin/env python3
"""Helpers for scripts/bench: parse client outputs, read process figures, hold many idle
flows, and turn the raw samples into the results table, CSV and JSON.

    bench_lib.py iperf FILE.json            -> "GBIT_PER_S BYTES_RECEIVED"
    bench_lib.py redis FILE.csv             -> "RPS P50_MS P99_MS"
    bench_lib.py wrk FILE                   -> "RPS ERRORS"
    bench_lib.py cpu PID                    -> utime+stime of the process, seconds
    bench_lib.py boxcpu                     -> busy CPU seconds of the whole machine (/proc/stat)
    bench_lib.py mem PID                    -> "VMHWM_KB VMRSS_KB"
    bench_lib.py hold-server --port P       (echo server that holds every connection)
    bench_lib.py hold-client --host H --port P --flows N [--probes K] [--rss-pid PID]
    bench_lib.py meta [--note TEXT]... KEY=VALUE...   -> a JSON object (values parsed as JSON
                                                       when they are JSON, else strings)
    bench_lib.py report --samples CSV --meta JSON --out DIR

Samples are CSV lines `round,workload,mode,metric,value` written by scripts/bench; a
`metric` of `error` carries a message instead of a number.
"""

import argparse
import asyncio
import csv
import json
import os
import resource
import statistics
import sys
import time

MODES = ["direct", "ssh", "mse"]
MODE_LABEL = {"direct": "direct", "ssh": "ssh -L", "mse": "mse-vpn"}

# What the table shows, in order: (workload, metric, label, unit, better, target).
# `target` is the goal: ("ratio", x) for mse-vpn / ssh -L, ("abs", x) for an
# absolute bound on mse-vpn's own figure, or None.
ROWS = [
    ("iperf_fwd", "gbps", "iperf3 1 stream, forward", "Gbit/s", "higher", ("ratio", 1.0)),
    ("iperf_rev", "gbps", "iperf3 1 stream, reverse (-R)", "Gbit/s", "higher", ("ratio", 1.0)),
    ("iperf_p8", "gbps", "iperf3 8 streams (-P 8)", "Gbit/s", "higher", ("ratio", 1.0)),
    ("redis_c1", "p50_ms", "redis PING -c 1, p50", "ms", "lower", ("ratio", 1.1)),
    ("redis_c1", "p99_ms", "redis PING -c 1, p99", "ms", "lower", None),
    ("run_iperf_fwd", "gbps", "  rootless run: 1 stream forward", "Gbit/s", "higher", None),
    ("run_redis_c1", "p50_ms", "  rootless run: redis -c 1, p50", "ms", "lower", None),
    ("redis_c50", "rps", "redis PING -c 50", "req/s", "higher", None),
    ("paused_1", "p50_ms", "redis -c 1 beside 1 paused dl, p50", "ms", "lower", None),
    ("paused_1", "p99_ms", "redis -c 1 beside 1 paused dl, p99", "ms", "lower", ("abs", 5.0)),
    ("paused_1", "rss_mb", "  RSS while 1 download is paused", "MB", "lower", None),
    ("paused_50", "p50_ms", "redis -c 1 beside 50 paused, p50", "ms", "lower", None),
    ("paused_50", "p99_ms", "redis -c 1 beside 50 paused, p99", "ms", "lower", ("abs", 5.0)),
    ("paused_50", "rss_mb", "  RSS while 50 downloads are paused", "MB", "lower", None),
    ("paused_200", "p50_ms", "redis -c 1 beside 200 paused, p50", "ms", "lower", None),
    ("paused_200", "p99_ms", "redis -c 1 beside 200 paused, p99", "ms", "lower", ("abs", 5.0)),
    ("paused_200", "peak_rss_mb", "  peak RSS, 200 paused for 30 s", "MB", "lower", ("abs", 400.0)),
    ("wrk_ka", "rps", "wrk keep-alive, 1 KiB, -c 10", "req/s", "higher", None),
    ("wrk_close", "rps", "wrk Connection: close, -c 10", "req/s", "higher", ("ratio", 1.0)),
    ("curl_10m", "seconds", "curl 10 MiB download", "s", "lower", None),
    ("iperf_rtt40", "gbps", "iperf3 1 stream, fwd, +40 ms RTT", "Gbit/s", "higher", ("ratio", 1.0)),
    ("iperf_rtt40_rev", "gbps", "iperf3 1 stream, rev, +40 ms RTT", "Gbit/s", "higher", ("ratio", 1.0)),
    ("http_rtt40", "ms", "new HTTP req. 1 KiB, +40 ms RTT", "ms", "lower", None),
    ("cpu", "s_per_gb", "CPU per GB, all iperf3 runs", "s/GB", "lower", ("ratio", 1.0)),
    ("cpu", "s_per_gb_iperf_fwd", "  CPU per GB, 1 stream fwd", "s/GB", "lower", None),
    ("cpu", "s_per_gb_iperf_rev", "  CPU per GB, 1 stream rev", "s/GB", "lower", None),
    ("cpu", "s_per_gb_iperf_p8", "  CPU per GB, 8 streams", "s/GB", "lower", None),
    ("cpu", "box_s_per_gb", "whole-box CPU per GB, all iperf3", "s/GB", "lower", ("ratio", 1.0)),
    ("cpu", "box_s_per_gb_iperf_fwd", "  whole-box CPU per GB, fwd", "s/GB", "lower", None),
    ("cpu", "box_s_per_gb_iperf_rev", "  whole-box CPU per GB, rev", "s/GB", "lower", None),
    ("cpu", "box_s_per_gb_iperf_p8", "  whole-box CPU per GB, 8 str.", "s/GB", "lower", None),
    ("mem", "peak_rss_mb", "peak RSS after the bulk runs", "MB", "lower", ("abs", 100.0)),
    ("idle_10k", "open_ms", "10k idle flows: new flow, p50", "ms", "lower", ("abs", 50.0)),
    ("idle_10k", "open_ms_max", "10k idle flows: new flow, max", "ms", "lower", None),
    ("idle_10k", "rss_mb", "10k idle flows: RSS held", "MB", "lower", None),
    ("idle_10k", "peak_rss_mb", "10k idle flows: peak RSS", "MB", "lower", ("abs", 200.0)),
    ("idle_10k", "open_all_s", "10k idle flows: time to open all", "s", "lower", None),
    ("idle_10k", "failed", "10k idle flows: failed/dead flows", "", "lower", None),
]


# ---------------------------------------------------------------- parsers


def parse_iperf(path):
    with open(path) as f:
        doc = json.load(f)
    if doc.get("error"):
        raise SystemExit(f"iperf3: {doc['error']}")
    end = doc["end"]
    rx = end["sum_received"]
    return rx["bits_per_second"] / 1e9, int(rx["bytes"])


def parse_redis(path):
    with open(path) as f:
        rows = [r for r in csv.DictReader(f)]
    if not rows:
        raise SystemExit("redis-benchmark: no CSV rows")
    r = rows[-1]
    return float(r["rps"]), float(r["p50_latency_ms"]), float(r["p99_latency_ms"])


def parse_wrk(path):
    rps = None
    errors = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Requests/sec:"):
                rps = float(line.split()[1])
            elif line.startswith("Socket errors:"):
                # Socket errors: connect 0, read 0, write 0, timeout 0
                parts = line.split(":", 1)[1].split(",")
                errors += sum(int(p.split()[1]) for p in parts)
            elif line.startswith("Non-2xx or 3xx responses:"):
                errors += int(line.split(":")[1])
    if rps is None:
        raise SystemExit("wrk: no Requests/sec line")
    return rps, errors


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def box_cpu():
    """Busy CPU seconds of every core since boot: user, nice, system, irq, softirq, steal."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid):
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


def peak_rss(args):
    """Samples the VmRSS of `pid` every 100 ms for `secs` seconds (or until it exits);
    prints the largest, in KiB."""
    peak = 0
    end = time.monotonic() + args.secs
    while time.monotonic() < end:
        try:
            peak = max(peak, proc_mem(args.pid)[1])
        except OSError:
            break
        time.sleep(0.1)
    print(peak, flush=True)


# ---------------------------------------------------------------- paused downloads


def pause_client(args):
    """Starts `flows` HTTP downloads of `path`, reads `first` bytes of each, prints "paused"
    once all are paused, then holds them without reading for `pause` seconds."""
    import socket
    import threading
    paused = threading.Barrier(args.flows + 1)
    held = []

    def one():
        s = socket.create_connection((args.host, args.port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        s.sendall(f"GET {args.path} HTTP/1.0\r\nHost: vpc\r\n\r\n".encode())
        got = 0
        while got < args.first:
            b = s.recv(min(65536, args.first - got))
            if not b:
                break
            got += len(b)
        held.append(s)
        paused.wait()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args.flows)]
    for t in threads:
        t.start()
    paused.wait(timeout=60)
    print("paused", flush=True)
    time.sleep(args.pause)


# ---------------------------------------------------------------- idle flows


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def hold_server(port):
    raise_nofile()

    async def handle(reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=4096, reuse_address=True)
    print(f"hold-server: listening on 0.0.0.0:{port}", flush=True)
    async with server:
        await server.serve_forever()


async def one_request(host, port, timeout):
    """Connect, send a line, read it back. Returns (reader, writer, seconds)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    writer.write(b"x\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), timeout)
    if line != b"x\n":
        writer.close()
        raise ConnectionError(f"bad echo {line!r}")
    return reader, writer, time.perf_counter() - t0


async def hold_client(args):
    raise_nofile()
    sem = asyncio.Semaphore(args.concurrency)
    held = []
    errors = {}

    async def open_one():
        async with sem:
            try:
                r, w, _ = await one_request(args.host, args.port, args.timeout)
                held.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted and reported
                key = f"{type(e).__name__}: {e}"
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(args.flows)))
    open_all = time.perf_counter() - t0
    await asyncio.sleep(args.settle)

    probes = []
    probe_errors = 0
    for _ in range(args.probes):
        try:
            _, w, dt = await one_request(args.host, args.port, args.timeout)
            probes.append(dt * 1000.0)
            w.close()
        except Exception as e:  # noqa: BLE001
            probe_errors += 1
            key = f"probe {type(e).__name__}: {e}"
            errors[key] = errors.get(key, 0) + 1
        await asyncio.sleep(0.05)

    # Are the held flows still alive? One more echo on each.
    async def ping(rw):
        r, w = rw
        async with sem:
            try:
                w.write(b"x\n")
                await w.drain()
                return await asyncio.wait_for(r.readline(), args.timeout) == b"x\n"
            except Exception:  # noqa: BLE001
                return False

    alive = sum(await asyncio.gather(*(ping(rw) for rw in held)))
    hwm = rss = None
    if args.rss_pid:
        hwm, rss = proc_mem(args.rss_pid)
    out = {
        "flows": args.flows,
        "opened": len(held),
        "alive": alive,
        "failed": args.flows - alive,
        "open_all_s": round(open_all, 3),
        "probes_ms": [round(p, 3) for p in probes],
        "probe_errors": probe_errors,
        "open_ms": round(statistics.median(probes), 3) if probes else None,
        "open_ms_max": round(max(probes), 3) if probes else None,
        "rss_mb": round(rss / 1024, 1) if rss is not None else None,
        "peak_rss_mb": round(hwm / 1024, 1) if hwm is not None else None,
        "errors": errors,
    }
    print(json.dumps(out), flush=True)
    for _, w in held:
        w.close()


# ---------------------------------------------------------------- report


def fmt(v):
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def report(args):
    samples = {}  # (workload, mode, metric) -> [values]
    errors = []
    with open(args.samples) as f:
        for row in csv.reader(f):
            if len(row) < 5:
                continue
            rnd, wl, mode, metric, value = row[0], row[1], row[2], row[3], ",".join(row[4:])
            if metric == "error":
                errors.append({"round": rnd, "workload": wl, "mode": mode, "message": value})
                continue
            try:
                samples.setdefault((wl, mode, metric), []).append(float(value))
            except ValueError:
                errors.append({"round": rnd, "workload": wl, "mode": mode,
                               "message": f"unparsable {metric}={value!r}"})
    with open(args.meta) as f:
        meta = json.load(f)
    selected = set(meta.get("workloads", []))

    # CPU seconds per GB: sum of CPU over sum of bytes, per iperf3 workload and overall; for
    # the client-side process (cpu_s) and for the whole machine (box_s: every process,
    # iperf3 and sshd included, and the kernel).
    for key, prefix, modes in (("cpu_s", "s_per_gb", ("ssh", "mse")),
                               ("box_s", "box_s_per_gb", ("direct", "ssh", "mse"))):
        for mode in modes:
            tot_cpu = tot_bytes = 0.0
            for wl in ("iperf_fwd", "iperf_rev", "iperf_p8"):
                cpu = samples.get((wl, mode, key), [])
                nbytes = samples.get((wl, mode, "bytes"), [])
                if cpu and nbytes and len(cpu) == len(nbytes) and sum(nbytes) > 0:
                    samples[("cpu", mode, f"{prefix}_{wl}")] = [sum(cpu) / (sum(nbytes) / 1e9)]
                    tot_cpu += sum(cpu)
                    tot_bytes += sum(nbytes)
            if tot_bytes > 0:
                samples[("cpu", mode, prefix)] = [tot_cpu / (tot_bytes / 1e9)]

    # The rootless rows (run_W) have only mse-vpn's figure: the other paths' are W's.
    for (wl, mode, metric), vals in list(samples.items()):
        if wl.startswith("run_") or mode == "mse" or f"run_{wl}" not in selected:
            continue
        samples.setdefault((f"run_{wl}", mode, metric), vals)

    results = []
    for wl, metric, label, unit, better, target in ROWS:
        if not any((wl, m, metric) in samples for m in MODES):
            if wl in selected:
                results.append({"workload": wl, "metric": metric, "label": label, "unit": unit,
                                "better": better, "missing": True})
            continue
        r = {"workload": wl, "metric": metric, "label": label, "unit": unit, "better": better}
        for m in MODES:
            vals = samples.get((wl, m, metric))
            r[m] = statistics.median(vals) if vals else None
            r[f"{m}_samples"] = vals or []
        r["ratio"] = (r["mse"] / r["ssh"]) if r["mse"] is not None and r["ssh"] else None
        if metric == "failed":
            r["ratio"] = None  # a count, not a rate
        n_idle = meta.get("idle_flows", 10000)
        if wl == "idle_10k" and n_idle != 10000:
            r["label"] = label.replace("10k", f"{n_idle}")
        if target:
            kind, x = target
            r["target"] = f"{'>=' if better == 'higher' else '<='}{x:g}" + ("x" if kind == "ratio" else f" {unit}")
            v = r["ratio"] if kind == "ratio" else r["mse"]
            if v is None:
                r["met"] = None
            else:
                r["met"] = v >= x if better == "higher" else v <= x
        results.append(r)

    # The table.
    head = f"{'workload':<34} {'unit':<7} {'direct':>9} {'ssh -L':>9} {'mse-vpn':>9} {'mse/ssh':>8}  target"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.get("missing"):
            lines.append(f"{r['label']:<34} {r['unit']:<7} {'FAILED: no figure':>38}")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        tgt = ""
        if "target" in r:
            tgt = r["target"] + (" ok" if r["met"] else " MISS" if r["met"] is False else " ?")
        lines.append(
            f"{r['label']:<34} {r['unit']:<7} {fmt(r['direct']):>9} {fmt(r['ssh']):>9} "
            f"{fmt(r['mse']):>9} {ratio:>8}  {tgt}"
        )
    notes = [
        "medians over rounds; ratios = mse-vpn / ssh -L (higher is better for rates, lower for times)",
        "CPU = utime+stime of the client-side process (OpenSSH ssh / mse-vpn) per GB received by iperf3",
    ]
    for n in meta.get("notes", []):
        notes.append(n)
    for (wl, mode, metric), vals in sorted(samples.items()):
        if wl == "idle_10k" and metric == "failed" and sum(vals) > 0:
            notes.append(f"idle flows {MODE_LABEL.get(mode, mode)}: {sum(vals):.0f} of "
                         f"{meta.get('idle_flows')} flows failed to open or died "
                         f"(details in idle-{mode}.json)")
        if metric == "errors" and sum(vals) > 0:
            notes.append(f"{wl} {MODE_LABEL.get(mode, mode)}: the client reported "
                         f"{sum(vals):.0f} errors (socket errors / non-2xx) over {len(vals)} runs")
    text = "\n".join(lines) + "\n\n" + "\n".join(f"  * {n}" for n in notes) + "\n"
    if errors:
        text += f"\n{len(errors)} failed measurement(s):\n"
        for e in errors:
            text += f"  round {e['round']} {e['workload']} {MODE_LABEL.get(e['mode'], e['mode'])}: {e['message']}\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "metric", "label", "unit", "better", "direct", "ssh", "mse",
                    "ratio_mse_ssh", "target", "met", "n_direct", "n_ssh", "n_mse"])
        for r in results:
            if r.get("missing"):
                w.writerow([r["workload"], r["metric"], r["label"], r["unit"], r["better"],
                            "", "", "", "", "", "missing", 0, 0, 0])
                continue
            w.writerow([r["workload"], r["metric"], r["label"], r["unit"], r["better"],
                        r["direct"], r["ssh"], r["mse"], r["ratio"], r.get("target", ""),
                        r.get("met", ""), len(r["direct_samples"]), len(r["ssh_samples"]),
                        len(r["mse_samples"])])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "errors": errors}, f, indent=2)
    sys.stdout.write(text)
    # A workload that was asked for must have produced a figure for every mode it runs in.
    missing = []
    def expected_modes(wl, metric):
        if wl in ("iperf_rtt40", "iperf_rtt40_rev", "http_rtt40", "cpu", "mem"):
            return ("ssh", "mse")  # no direct path through the delaying relay; no process
        if wl in ("idle_10k", "paused_1", "paused_50", "paused_200") and "rss" in metric:
            return ("ssh", "mse")
        if wl.startswith("run_"):
            return ("mse",)
        return MODES

    for r in results:
        if r.get("missing"):
            missing.append(r["label"])
            continue
        for m in expected_modes(r["workload"], r["metric"]):
            if r[m] is None:
                missing.append(f"{r['label']} ({MODE_LABEL[m]})")
    if missing or errors:
        if missing:
            print("\nno figure for: " + "; ".join(missing))
        return 1
    return 0


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("iperf", "redis", "wrk"):
        sub.add_parser(name).add_argument("file")
    for name in ("cpu", "mem"):
        sub.add_parser(name).add_argument("pid", type=int)
    sub.add_parser("boxcpu")
    p = sub.add_parser("peak-rss")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--secs", type=float, required=True)
    p = sub.add_parser("pause-client")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--flows", type=int, default=1)
    p.add_argument("--pause", type=float, default=60)
    p = sub.add_parser("hold-server")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("hold-client")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--rss-pid", type=int)
    p.add_argument("--settle", type=float, default=1.0, help="seconds between opening and probing")
    p = sub.add_parser("meta")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("pairs", nargs="*")
    p = sub.add_parser("report")
    p.add_argument("--samples", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args()

    if args.cmd == "iperf":
        gbps, nbytes = parse_iperf(args.file)
        print(f"{gbps:.4f} {nbytes}")
    elif args.cmd == "redis":
        rps, p50, p99 = parse_redis(args.file)
        print(f"{rps} {p50} {p99}")
    elif args.cmd == "wrk":
        rps, errs = parse_wrk(args.file)
        print(f"{rps} {errs}")
    elif args.cmd == "cpu":
        print(f"{proc_cpu(args.pid):.2f}")
    elif args.cmd == "boxcpu":
        print(f"{box_cpu():.2f}")
    elif args.cmd == "peak-rss":
        peak_rss(args)
    elif args.cmd == "mem":
        print("%d %d" % proc_mem(args.pid))
    elif args.cmd == "pause-client":
        pause_client(args)
    elif args.cmd == "hold-server":
        asyncio.run(hold_server(args.port))
    elif args.cmd == "hold-client":
        asyncio.run(hold_client(args))
    elif args.cmd == "meta":
        doc = {}
        for pair in args.pairs:
            key, _, value = pair.partition("=")
            try:
                doc[key] = json.loads(value)
            except ValueError:
                doc[key] = value
        doc["notes"] = args.note
        print(json.dumps(doc, indent=2))
    elif args.cmd == "report":
        sys.exit(report(args))


if __name__ == "__main__":
    main()
