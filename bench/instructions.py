#!/usr/bin/env python3
"""Counts the instructions wasmgate executes per request, with valgrind's callgrind.

Wall-clock and CPU-time figures on this kind of machine move by 5-10 % from run to run (a
virtual machine without hardware counters), which hides a change worth half a microsecond. The
user-space instructions a request costs are nearly deterministic: this script runs the gateway
under callgrind beside the benchmark's nginx upstream, sends a warm-up, zeroes the counters, sends
load for a fixed time, and prints instructions per request answered -- for one or several binaries,
so that an A/B reads in one run. Kernel time is not counted: a change that moves work between the
two needs `bench.py` as well. Slow (valgrind runs the gateway ~50x slower); for comparisons, not
for the figures in docs/performance.md.

Needs valgrind (`apt-get install valgrind`) besides what `bench/run` installs, a release build and
the plugins built.

    python3 bench/instructions.py --chain policies --seconds 10 [--baseline OTHER_BINARY]
    python3 bench/instructions.py --seconds 6 --floor native-client   # bare path beside a floor
    python3 bench/instructions.py --chain jwt --connections 1 --plugin-functions 20
    python3 bench/instructions.py --chain policies --nginx   # beside nginx with the Lua policies
"""

import argparse
import bisect
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import profile as chains  # noqa: E402  (the chains profile.py knows)


def nginx_peer(dir, label, chain, port, up_port):
    """The nginx of `bench/run` doing what `chain` does (`none`: a plain proxy; `policies`: the
    Lua policies; `jwt`: njs), in one process (no master), so that callgrind follows it."""
    work = {"none": "proxy", "policies": "lua", "jwt": "njs"}.get(chain)
    if work is None:
        sys.exit(f"--nginx has no peer for the chain {chain}")
    modules, extra_http, location = bench.nginx_peer(dir, work)
    http = bench.PROXY_HTTP.format(upstream=up_port, port=port, extra_http=extra_http,
                                   location=location)
    conf = bench.nginx_conf(dir, label, "master_process off;\n" + modules, http)
    return ["nginx", "-c", str(conf)]


def measure(binary, plugin_dir, chain, headers, isolation, seconds, connections, dir, label,
            floor=None, plugin_functions=0, nginx=None):
    """Counts `binary` (a wasmgate, or with `floor` the hyper-floor binary in that mode, or with
    `nginx` (a chain's name) nginx doing that chain's work); with `plugin_functions`, also prints
    that many of the plugins' own functions, most costly first."""
    up_port = bench.free_port()
    upstream = bench.Target("upstream", ["nginx", "-c", str(bench.nginx_conf(
        dir, f"upstream-{label}", "", bench.UPSTREAM_HTTP.format(port=up_port)))], up_port)
    port = bench.free_port()
    if nginx:
        command = nginx_peer(dir, label, nginx, port, up_port)
    elif floor:
        mode = [] if floor == "hyper" else [floor]
        command = [binary, f"127.0.0.1:{port}", f"127.0.0.1:{up_port}", *mode]
    else:
        manifest = bench.wasmgate_manifest(dir, f"counted-{label}", port, up_port, chain,
                                           isolation, plugin_dir=plugin_dir)
        # Valgrind runs plugin code ~50x slower than it runs: the default deadlines would end it.
        manifest.write_text(manifest.read_text().replace(
            f"isolation: {isolation} }}", f"isolation: {isolation}, deadline: 10s }}"))
        command = [binary, "run", "-c", str(manifest)]
    out = f"{dir}/callgrind-{label}.out"
    gateway = bench.Target(label, [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--smc-check=all",
        *command], port, headers,
        # Valgrind cannot reserve the address space of the default instance slots (4 GiB and more
        # each); with 4, a chain of three plugins runs at one or two connections.
        env={"WASMGATE_WORKERS": "1", "RUST_LOG": "info", "WASMGATE_INSTANCE_SLOTS": "4",
             # wasmtime writes /tmp/perf-PID.map, which names the compiled plugins' functions.
             **({"WASMGATE_PERF_MAP": "1"} if plugin_functions else {})},
        log=f"{dir}/gateway-{label}.log",
        images=not floor and not nginx and bool(chain) and isolation == "per-request")
    try:
        upstream.start(dir)
        # Under valgrind the CPU has other features, so the plugin cache holds code compiled
        # for it apart: the first run after a plugin changed compiles it, ~50x slower than
        # natively (a minute and a half for jwt-auth).
        gateway.start(dir, limit=600.0)
        bench.check_answers(gateway)
        send(gateway, 2, connections)  # warm-up: pools filled, code compiled and paged in
        pid = gateway.proc.pid
        subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
        requests = send(gateway, seconds, connections)
        subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
        time.sleep(0.5)
    finally:
        gateway.stop()
        upstream.stop()
    # The dump after zeroing is the file with the highest part number.
    dumps = sorted(Path(dir).glob(f"callgrind-{label}.out*"), key=lambda p: p.stat().st_mtime)
    totals = [total(p) for p in dumps]
    counted = [t for t in totals if t is not None]
    # The explicit dump holds the counted requests; the final one (at exit) holds the shutdown.
    index = -2 if len(counted) >= 2 else -1
    dump = [p for p, t in zip(dumps, totals) if t is not None][index]
    if plugin_functions:
        print_plugin_functions(dump, Path(f"/tmp/perf-{pid}.map"), requests, plugin_functions)
    return counted[index], block_copies(dump), requests


def print_plugin_functions(dump, perf_map, requests, top):
    """Callgrind sees compiled plugin code as unnamed addresses; wasmtime's perf map names them."""
    if not perf_map.exists():
        print(f"no {perf_map}: plugin functions not named")
        return
    symbols = []
    for line in perf_map.read_text(errors="replace").splitlines():
        start, size, name = line.split(" ", 2)
        symbols.append((int(start, 16), int(size, 16), name))
    symbols.sort()
    starts = [start for start, _, _ in symbols]
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)],
                         capture_output=True, text=True).stdout
    costs = {}
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\?\?\?:0x([0-9a-f]+) \[\?\?\?\]", line)
        if not match:
            continue
        address = int(match.group(2), 16)
        at = bisect.bisect_right(starts, address) - 1
        if at >= 0 and address < symbols[at][0] + symbols[at][1]:
            name = symbols[at][2]
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    print(f"plugin code: {sum(costs.values()) / requests:,.0f} instructions per request; the costliest:")
    for name, cost in sorted(costs.items(), key=lambda item: -item[1])[:top]:
        print(f"  {cost / requests:9,.0f}  {name[:150]}")


def block_copies(path):
    """Instructions spent in memcpy/memmove/memset. Callgrind counts each byte a `rep movsb`
    moves as one instruction, so large copies (futures moved whole) weigh far more here than
    they cost; they are reported apart."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(path)],
                         capture_output=True, text=True).stdout
    copies = 0
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\S*:(__)?mem(cpy|move|set)", line)
        if match:
            copies += int(match.group(1).replace(",", ""))
    return copies


def total(path):
    text = Path(path).read_text(errors="replace")
    match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    return int(match.group(1)) if match else None


def send(target, seconds, connections):
    """Keep-alive HTTP/1.1 load for `seconds` (wrk); returns how many requests were answered."""
    return bench.wrk(target, connections, seconds)["requests"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", choices=chains.CHAINS, default="none")
    parser.add_argument("--isolation", default="pooled")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--gateway", default=str(bench.GATEWAY))
    parser.add_argument("--plugins", default=None, help="the folder of .wasm plugins (default: the built ones)")
    parser.add_argument("--baseline", help="another wasmgate binary, counted the same way")
    parser.add_argument("--baseline-plugins", default=None)
    parser.add_argument("--floor", choices=["hyper", "native-client", "raw"],
                        help="also count bench/hyper-floor in this mode (the bare path's floors)")
    parser.add_argument("--plugin-functions", type=int, default=0, metavar="N",
                        help="print the N costliest functions of the plugins' compiled code")
    parser.add_argument("--nginx", action="store_true",
                        help="also count nginx doing the chain's work, as bench/run runs it (a plain "
                        "proxy for `none`, the Lua policies for `policies`, njs for `jwt`)")
    args = parser.parse_args()

    chain, headers = chains.CHAINS[args.chain]
    if headers is None:
        headers = (f"Authorization: Bearer {bench.hs256_token()}",)
    dir = tempfile.mkdtemp(prefix="wasmgate-instructions-")
    runs = [("wasmgate", args.gateway, args.plugins)]
    if args.baseline:
        runs.append(("baseline", args.baseline, args.baseline_plugins or args.plugins))
    results = {}
    if args.floor:
        runs.append((f"{args.floor} floor", str(bench.FLOOR), None))
    if args.nginx:
        runs.append(("nginx", "nginx", None))
    for label, binary, plugins in runs:
        floor = args.floor if label.endswith(" floor") else None
        nginx = args.chain if label == "nginx" else None
        instructions, copies, requests = measure(binary, plugins, chain, headers, args.isolation,
                                                 args.seconds, args.connections, dir,
                                                 label.replace(" ", "-"), floor,
                                                 0 if floor or nginx else args.plugin_functions,
                                                 nginx)
        results[label] = instructions / requests
        print(f"{label}: {results[label]:,.0f} instructions per request, of which "
              f"{copies / requests:,.0f} in memcpy/memset (chain {args.chain}, {requests} requests, "
              f"{args.connections} connections)")
    if "baseline" in results:
        change = results["wasmgate"] / results["baseline"] - 1
        print(f"wasmgate vs baseline: {change:+.1%}")


if __name__ == "__main__":
    main()
