#!/usr/bin/env python3
"""Profiles one wasmgate target under the load benchmark's conditions, with `perf`.

Starts the benchmark's nginx upstream and one wasmgate (both pinned to CPU 0, WASMGATE_WORKERS=1,
plugin code named through WASMGATE_PERF_MAP), drives it with wrk on CPU 1, records the gateway with
`perf record -g` for the run, and prints the hottest symbols (self time) and the share of samples
in the kernel, in plugin code and in the gateway binary. Needs what `bench/run` installs, a release
build, the plugins built, and `perf`. For finding where time goes; the numbers to compare come from
`bench/run`.

    python3 bench/profile.py --chain policies --isolation pooled --seconds 10
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CHAINS = {
    "none": ([], ()),
    "policies": (["api-key", "header-rewrite", "access-log"], (f"x-api-key: {bench.API_KEY}",)),
    "jwt": (["jwt-auth", "header-rewrite", "access-log"], None),
    # One plugin at a time, to split a chain's cost.
    "api-key": (["api-key"], (f"x-api-key: {bench.API_KEY}",)),
    "header-rewrite": (["header-rewrite"], ()),
    "access-log": (["access-log"], ()),
}


def context_switches(pid):
    """(voluntary, involuntary) context switches of `pid` so far."""
    fields = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])


def minor_faults(pid):
    """Minor page faults of `pid` so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may hold spaces): minflt is the 10th field overall.
    return int(stat.rsplit(")", 1)[1].split()[7])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", choices=CHAINS, default="none")
    parser.add_argument("--isolation", default="pooled")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--gateway", default=str(bench.GATEWAY))
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--syscalls", action="store_true",
                        help="count the target's system calls per request (perf trace) instead of sampling")
    parser.add_argument("--nginx", action="store_true", help="profile nginx as a plain proxy instead")
    parser.add_argument("--floor", nargs="?", const="hyper", choices=["hyper", "native-client", "raw"],
                        help="profile a floor (bench/hyper-floor; default its hyper mode) instead")
    args = parser.parse_args()

    dir = tempfile.mkdtemp(prefix="wasmgate-profile-")
    chain, headers = CHAINS[args.chain]
    if headers is None:
        headers = (f"Authorization: Bearer {bench.hs256_token()}",)
    up_port = bench.free_port()
    upstream = bench.Target("upstream", ["nginx", "-c", str(bench.nginx_conf(
        dir, "upstream", "", bench.UPSTREAM_HTTP.format(port=up_port)))], up_port)
    port = bench.free_port()
    manifest = bench.wasmgate_manifest(dir, "profiled", port, up_port, chain, args.isolation)
    gateway = bench.Target("wasmgate", [args.gateway, "run", "-c", str(manifest)], port, headers,
                           env={"WASMGATE_WORKERS": "1", "RUST_LOG": "info", "WASMGATE_PERF_MAP": "1"},
                           log=f"{dir}/gateway.log")
    if args.nginx:
        http = bench.PROXY_HTTP.format(upstream=up_port, port=port, extra_http="", location="")
        gateway = bench.Target("nginx", ["nginx", "-c", str(bench.nginx_conf(dir, "proxy", "", http))], port)
    if args.floor:
        mode = [] if args.floor == "hyper" else [args.floor]
        gateway = bench.Target(f"{args.floor} floor",
                               [str(bench.FLOOR), f"127.0.0.1:{port}", f"127.0.0.1:{up_port}", *mode], port)
    data = f"{dir}/perf.data"
    try:
        upstream.start(dir)
        gateway.start(dir)
        bench.check_answers(gateway)
        bench.wrk(gateway, args.connections, 2)  # warm-up
        pid = gateway.pids()[-1]  # nginx: its worker
        switches = context_switches(pid)
        faults = minor_faults(pid)
        record = ["perf", "trace", "-s", "-o", data] if args.syscalls else ["perf", "record", "-g", "-o", data]
        perf = subprocess.Popen([*record, "-p", str(pid), "--", "sleep", str(args.seconds)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = bench.wrk(gateway, args.connections, args.seconds)
        perf.wait()
        voluntary, involuntary = (after - before for after, before in zip(context_switches(pid), switches))
        faulted = minor_faults(pid) - faults
        rss = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))) / 1024
        print(f"{result['rps']:.0f} req/s, {result['cpu_us']:.1f} us of CPU per request, per request "
              f"{voluntary / result['requests']:.2f} voluntary and {involuntary / result['requests']:.2f} "
              f"involuntary context switches and {faulted / result['requests']:.2f} minor page faults; "
              f"RSS after the run {rss:.1f} MiB")
    finally:
        gateway.stop()
        upstream.stop()
    if args.syscalls:
        print_syscalls(data, result["requests"])
        return
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym",
                             "--stdio", "-g", "none", "--percent-limit", "0.3"],
                            capture_output=True, text=True).stdout
    rows = [line for line in report.splitlines() if line.strip() and not line.startswith("#")]
    shares = {"kernel": 0.0, "plugin code": 0.0, "wasmgate": 0.0, "libc": 0.0}
    everything = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso",
                                 "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    for line in everything.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith("%"):
            continue
        share, dso = float(parts[0].rstrip("%")), parts[1]
        if dso.startswith("[kernel"):
            shares["kernel"] += share
        elif dso.startswith("perf-") or dso.startswith("[JIT") or dso.endswith(".map"):
            shares["plugin code"] += share
        elif dso in ("wasmgate", "nginx", "hyper-floor"):
            shares["wasmgate"] += share
        elif dso.startswith("libc"):
            shares["libc"] += share
    print(", ".join(f"{name} {share:.1f} %" for name, share in shares.items()))
    print("self time of the gateway binary's code by crate: " + ", ".join(
        f"{crate} {share:.1f} %" for crate, share in by_crate(data)[:14]))
    print("\n".join(rows[: args.top]))


def print_syscalls(data, requests):
    """Prints each system call's count per request from a `perf trace -s` summary. The trace
    covers the same seconds as the load run, give or take the tools' start-up."""
    counts = {}
    for line in Path(data).read_text().splitlines():
        parts = line.split()
        # Summary rows: syscall, calls, errors, total, min, avg, max, stddev.
        if len(parts) >= 4 and parts[1].isdigit() and parts[2].isdigit():
            counts[parts[0]] = counts.get(parts[0], 0) + int(parts[1])
    total = sum(counts.values())
    print(f"system calls per request: {total / requests:.2f}")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"    {name:<20} {count / requests:.3f}")


def by_crate(data):
    """The binary's self time summed by the crate its symbols come from, largest first. Generic
    code is counted where it was instantiated's first path segment (e.g. hyper for hyper's)."""
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio",
                             "-g", "none"], capture_output=True, text=True).stdout
    crates = {}
    for line in report.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4 or not parts[0].endswith("%") or parts[1] not in ("wasmgate", "nginx", "hyper-floor"):
            continue
        symbol = parts[3].lstrip("<").replace("_<", "")
        crate = symbol.split("::", 1)[0] if "::" in symbol else "(other)"
        crates[crate] = crates.get(crate, 0.0) + float(parts[0].rstrip("%"))
    return sorted(crates.items(), key=lambda item: -item[1])


if __name__ == "__main__":
    main()
