#!/usr/bin/env python3
"""Load benchmark: wasmgate beside nginx and nginx+Lua/njs, in one run.

Run through `bench/run`, which installs what is missing and builds in release. Every target proxies
to the same upstream (nginx returning a short body), with keep-alive on both sides. The upstream and
the proxy under test share CPU 0; wrk runs on CPU 1 (taskset). Targets are interleaved, each run
repeated, and the median taken. Proxy CPU per request is read from /proc (utime + stime of the
proxy's processes) around each run.

Writes the table to stdout and, unless --smoke, into docs/performance.md between the bench markers.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "target" / "wasm" / "wasm32-wasip2" / "release"
GATEWAY = ROOT / "target" / "release" / "wasmgate"
FLOOR = ROOT / "target" / "release" / "hyper-floor"
API_KEY = "bench-key-0123456789"
JWT_SECRET = "bench-secret-that-is-at-least-32-bytes-long"
CLK_TCK = os.sysconf("SC_CLK_TCK")


_GIVEN_PORTS = set()


def free_port():
    """A port free now and not given out before in this run. Every target's port is picked
    before any target starts, and the kernel may hand a released port out again: the second
    target on it then fails to bind, while the first answers on its port as if it were the
    second (a session-17 run measured one target twice that way)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(port, proc, what, limit=60.0, log=None):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            shown = Path(log).read_text()[-3000:] if log else ""
            sys.exit(f"{what} exited during start-up (status {proc.returncode})\n{shown}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {limit} s")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token():
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": "bench", "iss": "bench", "exp": int(time.time()) + 86400}).encode())
    signature = hmac.new(JWT_SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


# ---------------------------------------------------------------------------------------------
# nginx configurations

NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
{modules}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/{name}.body;
    proxy_temp_path {dir}/{name}.proxy;
    {http}
}}
"""

UPSTREAM_HTTP = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello from the upstream\\n"; }}
    }}
"""

PROXY_HTTP = """
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}
    {extra_http}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

LUA_MODULES = """
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
"""

# The OpenResty architecture under Kong and APISIX: api-key check (SHA-256 of the key, compared
# with the configured hash, as the api-key plugin does), header rewrite both ways, a JSON access
# log line per request written unbuffered to a file.
LUA_HTTP = """
    lua_package_path "/usr/share/lua/5.1/?.lua;;";
    init_by_lua_block {{
        local ffi = require "ffi"
        ffi.cdef[[unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);]]
        crypto = ffi.load("crypto")
        digest_buf = ffi.new("unsigned char[32]")
        cjson = require "cjson.safe"
        local hex = "{key_hash}"
        expected = hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
    }}
    init_worker_by_lua_block {{
        log_file = io.open("{dir}/lua-access.log", "a")
        log_file:setvbuf("line")
    }}
"""

LUA_LOCATION = """
            access_by_lua_block {
                local key = ngx.var.http_x_api_key
                if not key then return ngx.exit(401) end
                crypto.SHA256(key, #key, digest_buf)
                if ffi_string == nil then ffi_string = require("ffi").string end
                if ffi_string(digest_buf, 32) ~= expected then return ngx.exit(401) end
                ngx.req.clear_header("x-api-key")
                ngx.req.set_header("x-consumer", "bench")
                ngx.req.set_header("x-gateway", "wasmgate-bench")
            }
            header_filter_by_lua_block {
                ngx.header["x-served-by"] = "bench"
            }
            log_by_lua_block {
                log_file:write(cjson.encode({
                    method = ngx.req.get_method(),
                    path = ngx.var.uri,
                    status = ngx.status,
                    bytes_out = tonumber(ngx.var.bytes_sent),
                    duration_ms = (ngx.now() - ngx.req.start_time()) * 1000,
                    client = ngx.var.remote_addr,
                    user_agent = ngx.var.http_user_agent,
                }), "\\n")
            }
"""

NJS_MODULES = "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;"

NJS_HTTP = """
    js_import jwt from {dir}/jwt.js;
    js_set $jwt_ok jwt.verify;
    log_format bench_json escape=json '{{"method":"$request_method","path":"$uri","status":$status,'
        '"bytes_out":$bytes_sent,"duration_ms":$request_time,"client":"$remote_addr"}}';
"""

NJS_LOCATION = """
            if ($jwt_ok != "1") { return 401; }
            access_log {dir}/njs-access.log bench_json;
            proxy_set_header x-gateway wasmgate-bench;
            add_header x-served-by bench;
"""

NJS_SCRIPT = """
const crypto = require('crypto');
const SECRET = '%s';
function verify(r) {
    const auth = r.headersIn['Authorization'] || '';
    if (!auth.startsWith('Bearer ')) { return '0'; }
    const parts = auth.slice(7).split('.');
    if (parts.length !== 3) { return '0'; }
    let header, claims;
    try {
        header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
        claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
    } catch (e) { return '0'; }
    if (header.alg !== 'HS256') { return '0'; }
    const signature = crypto.createHmac('sha256', SECRET).update(parts[0] + '.' + parts[1]).digest('base64url');
    if (signature !== parts[2]) { return '0'; }
    if (typeof claims.exp !== 'number' || claims.exp < Date.now() / 1000) { return '0'; }
    if (claims.iss !== 'bench') { return '0'; }
    return '1';
}
export default { verify };
"""


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nginx_peer(dir, work):
    """What nginx loads and runs to do `work` (`proxy`, `lua` policies or `njs` jwt) in `dir`:
    (modules, http-level directives, location directives). Writes the njs script it needs."""
    if work == "proxy":
        return "", "", ""
    if work == "lua":
        key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
        return LUA_MODULES, LUA_HTTP.format(dir=dir, key_hash=key_hash), LUA_LOCATION
    if work == "njs":
        (Path(dir) / "jwt.js").write_text(NJS_SCRIPT % JWT_SECRET)
        return NJS_MODULES, NJS_HTTP.format(dir=dir), NJS_LOCATION.replace("{dir}", dir)
    raise ValueError(f"no nginx peer does {work}")


def nginx_conf(dir, name, modules, http):
    name = slug(name)
    path = Path(dir) / f"{name}.conf"
    path.write_text(NGINX_COMMON.format(dir=dir, name=name, modules=modules, http=http))
    return path


# ---------------------------------------------------------------------------------------------
# wasmgate manifests

def wasmgate_manifest(dir, name, port, upstream, chain, isolation, routes=1, plugin_dir=None):
    plugin_dir = plugin_dir or PLUGINS
    plugins = {
        "api-key": f"{plugin_dir}/api_key.wasm",
        "header-rewrite": f"{plugin_dir}/header_rewrite.wasm",
        "access-log": f"{plugin_dir}/access_log.wasm",
        "jwt-auth": f"{plugin_dir}/jwt_auth.wasm",
    }
    configs = {
        "api-key": {"keys": [{"consumer": "bench", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}],
                    "forward_consumer": "x-consumer"},
        "header-rewrite": {"request": {"set": {"x-gateway": "wasmgate-bench"}},
                           "response": {"set": {"x-served-by": "bench"}}},
        "access-log": None,
        "jwt-auth": {"keys": [{"secret": JWT_SECRET}], "algorithms": ["HS256"], "issuers": ["bench"]},
    }
    lines = [
        "version: 1",
        f'listeners: [{{ name: public, bind: "127.0.0.1:{port}" }}]',
        "reload: { watch: false }",
        f"plugin_cache: {ROOT}/target/wasmgate-cache",
        "plugins:" if chain else "plugins: {}",
    ]
    for plugin in chain:
        lines.append(f'  {plugin}: {{ source: "{plugins[plugin]}", isolation: {isolation} }}')
    lines += ["upstreams:", f'  up: {{ targets: [{{ url: "http://127.0.0.1:{upstream}" }}] }}', "routes:"]
    for i in range(routes):
        uses = ", ".join(
            f"{{ name: {p}, config: {json.dumps(configs[p])} }}" if configs[p] is not None else f"{{ name: {p} }}"
            for p in chain
        )
        matcher = "{ prefix: / }" if i == 0 else f"{{ prefix: /r{i} }}"
        lines.append(f"  - {{ name: r{i}, match: {matcher}, upstream: up, plugins: [{uses}] }}")
    path = Path(dir) / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# processes and measurements

class Target:
    def __init__(self, name, argv, port, headers=(), env=None, log=None, images=False):
        self.name, self.argv, self.port, self.headers = name, argv, port, list(headers)
        self.env, self.log = env, log
        # Whether it is a wasmgate that makes pre-initialised images (plugins used per request):
        # then it is waited for even before its log says so (under valgrind the line can come
        # well after the port opens).
        self.images = images
        self.proc = None

    def start(self, dir, limit=60.0):
        log = open(self.log or os.devnull, "ab")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(["taskset", "-c", "0", *self.argv], stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        wait_port(self.port, self.proc, self.name, limit=limit, log=self.log)
        self.wait_images(limit)

    def wait_images(self, limit):
        """A wasmgate with per-request plugins makes their pre-initialised images in the
        background after it starts listening; measuring before they are made would count the
        slower path and the making itself. Waits for them, when the log says they are coming."""
        if not self.log:
            return
        deadline = time.time() + limit
        while self.images or "plugin images: making" in Path(self.log).read_text(errors="replace"):
            if "plugin images settled" in Path(self.log).read_text(errors="replace"):
                return
            if time.time() > deadline:
                sys.exit(f"{self.name}: plugin images not made within {limit} s")
            time.sleep(0.1)

    def pids(self):
        pids = [self.proc.pid]
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
            pids += [int(p) for p in out.split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError):
                pass
        return total / CLK_TCK

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def parse_duration(text):
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(target, connections, seconds):
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in target.headers:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{target.port}/bench")
    before = target.cpu_seconds()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cpu = target.cpu_seconds() - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non_2xx or errors:
        sys.exit(f"{target.name}: failed requests in the run:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": parse_duration(latency["50"]),
        "p99": parse_duration(latency["99"]),
        "cpu_us": cpu / max(requests, 1) * 1e6,
        "requests": requests,
    }


def paced(target, rate, seconds, connections, paced_load):
    """An open-loop run at a fixed rate (bench/hyper-floor/src/bin/paced-load.rs), for the
    latency at a given load: wrk only measures at saturation. Returns its JSON line."""
    argv = ["taskset", "-c", "1", str(paced_load), f"127.0.0.1:{target.port}", "/bench", f"{rate:.0f}",
            str(seconds), str(connections), *target.headers]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    if result["failed"]:
        sys.exit(f"{target.name}: {result['failed']} failed requests in the paced run: {out}")
    return result


def check_answers(target):
    """One request with curl-like checks, so that a misconfigured target fails loudly."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    headers = dict(h.split(": ", 1) for h in target.headers)
    conn.request("GET", "/bench", headers=headers)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200 or b"hello from the upstream" not in body:
        sys.exit(f"{target.name}: expected 200 from the upstream, got {response.status} {body[:200]!r}")
    if target.headers:
        # The policy chain must refuse a request without credentials.
        conn.request("GET", "/bench")
        refused = conn.getresponse()
        refused.read()
        if refused.status != 401:
            sys.exit(f"{target.name}: a request without credentials got {refused.status}, not 401")


def main():
    global GATEWAY
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="1 s runs, one round, no docs update")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-requests", type=int, default=1_000_000)
    parser.add_argument("--gateway", default=str(GATEWAY), help="the wasmgate binary to measure")
    parser.add_argument("--baseline", help="another wasmgate binary, measured as the target `wasmgate baseline` beside the bare one")
    parser.add_argument("--floor", default=str(FLOOR), help="the hyper-floor binary (bench/hyper-floor)")
    parser.add_argument("--baseline-plugins", help="the folder of .wasm plugins the baseline binary loads "
                        "(default: the same as the measured one), for A/B runs across plugin changes")
    parser.add_argument("--only", help="comma-separated target names to run (no docs update), for A/B checks while tuning")
    args = parser.parse_args()
    GATEWAY = Path(args.gateway)
    if args.smoke:
        args.seconds, args.rounds, args.memory_requests = 1, 1, 20_000

    dir = tempfile.mkdtemp(prefix="wasmgate-bench-")
    key_header = [f"x-api-key: {API_KEY}"]
    jwt_header = [f"Authorization: Bearer {hs256_token()}"]
    up_port = free_port()
    upstream = Target("upstream", ["nginx", "-c", str(nginx_conf(dir, "upstream", "", UPSTREAM_HTTP.format(port=up_port)))],
                      up_port, log=f"{dir}/upstream.stderr.log")

    def nginx_target(name, work, headers=()):
        modules, extra_http, location = nginx_peer(dir, work)
        port = free_port()
        http = PROXY_HTTP.format(upstream=up_port, port=port, extra_http=extra_http, location=location)
        return Target(name, ["nginx", "-c", str(nginx_conf(dir, name, modules, http))], port, headers,
                      log=f"{dir}/{slug(name)}.stderr.log")

    def wasmgate_target(name, chain, isolation="per-request", headers=(), binary=None, plugin_dir=None):
        port = free_port()
        manifest = wasmgate_manifest(dir, slug(name), port, up_port, chain, isolation, plugin_dir=plugin_dir)
        return Target(name, [str(binary or GATEWAY), "run", "-c", str(manifest)], port, headers,
                      env={"WASMGATE_WORKERS": "1", "RUST_LOG": "info"}, log=f"{dir}/{slug(name)}.log",
                      images=bool(chain) and isolation == "per-request")

    policies = ["api-key", "header-rewrite", "access-log"]
    jwt_chain = ["jwt-auth", "header-rewrite", "access-log"]
    direct = Target("direct (upstream)", [], up_port)
    floor_port = free_port()
    floor = Target("hyper floor", [args.floor, f"127.0.0.1:{floor_port}", f"127.0.0.1:{up_port}"], floor_port,
                   log=f"{dir}/hyper-floor.log")
    targets = [
        direct,
        nginx_target("nginx", "proxy"),
        floor,
        wasmgate_target("wasmgate", []),
        nginx_target("nginx+lua policies", "lua", key_header),
        wasmgate_target("wasmgate policies", policies, headers=key_header),
        wasmgate_target("wasmgate policies pooled", policies, "pooled", key_header),
        nginx_target("nginx+njs jwt", "njs", jwt_header),
        wasmgate_target("wasmgate jwt", jwt_chain, headers=jwt_header),
        wasmgate_target("wasmgate jwt pooled", jwt_chain, "pooled", jwt_header),
    ]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")} | {"direct (upstream)", "nginx", "nginx+lua policies", "wasmgate"}
        # Two more floors, on request only: hyper's server with a hand-written HTTP/1 client, and
        # no hyper at all (bench/hyper-floor/src/native.rs), to size what a proxy core of
        # wasmgate's own could save.
        for mode in ("native-client", "raw"):
            if f"{mode} floor" in wanted:
                port = free_port()
                targets.insert(3, Target(f"{mode} floor", [args.floor, f"127.0.0.1:{port}", f"127.0.0.1:{up_port}", mode],
                                         port, log=f"{dir}/{mode}-floor.log"))
        targets = [t for t in targets if t.name in wanted]
        args.memory_requests = 0
    if args.baseline:
        # The same wasmgate targets again, run by the other binary, each right after its own.
        chains = {"wasmgate": ([], "per-request", ()), "wasmgate policies": (policies, "per-request", key_header),
                  "wasmgate policies pooled": (policies, "pooled", key_header),
                  "wasmgate jwt": (jwt_chain, "per-request", jwt_header),
                  "wasmgate jwt pooled": (jwt_chain, "pooled", jwt_header)}
        with_baselines = []
        for target in targets:
            with_baselines.append(target)
            if target.name in chains:
                chain, isolation, headers = chains[target.name]
                with_baselines.append(wasmgate_target(f"{target.name} baseline", chain, isolation, headers,
                                                      args.baseline, args.baseline_plugins))
        targets = with_baselines
    started = [upstream]
    try:
        upstream.start(dir)
        direct.proc = upstream.proc
        for target in targets[1:]:
            target.start(dir)
            started.append(target)
        for target in targets:
            check_answers(target)
        for target in targets[1:]:
            # Another process answering on a target's port would hide its exit (see free_port).
            if target.proc.poll() is not None:
                sys.exit(f"{target.name} exited during start-up (status {target.proc.returncode})")

        connection_counts = [1, 32]
        results = {(t.name, c): [] for t in targets for c in connection_counts}
        cpu_before = cpu_times()
        for round in range(args.rounds):
            for connections in connection_counts:
                for target in targets:
                    wrk(target, connections, 1)  # warm-up: connections, pools, caches
                    results[(target.name, connections)].append(wrk(target, connections, args.seconds))
                    print(f"round {round + 1} c={connections} {target.name}: "
                          f"{results[(target.name, connections)][-1]['rps']:.0f} req/s", file=sys.stderr)

        # The p99 target is "at half of the maximum load": the same offered rate for
        # every target, half of what the slower of nginx and bare wasmgate served at 32
        # connections, open loop.
        half = None
        present = {t.name: t for t in targets}
        if {"nginx", "wasmgate"} <= present.keys():
            most = min(statistics.median(r["rps"] for r in results[(name, 32)]) for name in ("nginx", "wasmgate"))
            rate = most / 2
            paced_load = Path(args.floor).with_name("paced-load")
            runs = {name: [] for name in ("direct (upstream)", "nginx", "wasmgate")}
            for round in range(args.rounds):
                for name, results_of in runs.items():
                    result = paced(present[name], rate, args.seconds, 32, paced_load)
                    results_of.append(result)
                    print(f"round {round + 1} half load ({rate:.0f} req/s) {name}: p99 {result['p99_ms']:.3f} ms",
                          file=sys.stderr)
            half = {"rate": rate, "p99": {n: statistics.median(r["p99_ms"] for r in rs) for n, rs in runs.items()},
                    "p50": {n: statistics.median(r["p50_ms"] for r in rs) for n, rs in runs.items()}}

        steal = steal_share(cpu_before, cpu_times())
        memory = measure_memory(dir, up_port, args.memory_requests, key_header)
        table = render(targets, connection_counts, results, args, memory, half, steal)
        print(table)
        if not args.smoke and not args.only and not args.baseline:
            write_docs(table)
    finally:
        for target in reversed(started):
            target.stop()
        report_fiber_switches(dir)
        shutil.rmtree(dir, ignore_errors=True)


def report_fiber_switches(dir):
    """Prints the gateway log lines saying a plugin's calls moved to a fiber: a plugin is called
    without one until a call runs long, and a run where that happened measured the slower path."""
    for log in sorted(Path(dir).glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "its calls run on a fiber from now on" in line:
                print(f"note: {log.stem}: {line}")


def measure_memory(dir, up_port, total, headers):
    """RSS of a gateway with 20 routes x 3 plugins: idle, after 10k requests, after `total`."""
    port = free_port()
    manifest = wasmgate_manifest(dir, "memory", port, up_port, ["api-key", "header-rewrite", "access-log"],
                                 "pooled", routes=20)
    target = Target("memory", [str(GATEWAY), "run", "-c", str(manifest)], port, headers,
                    env={"WASMGATE_WORKERS": "1", "RUST_LOG": "warn"})
    target.start(dir)
    try:
        idle = target.rss_kib()
        done = 0
        while done < min(10_000, total):
            done += wrk(target, 32, 1)["requests"]
        after_10k = target.rss_kib()
        while done < total:
            done += wrk(target, 32, 5)["requests"]
        return {"idle": idle, "after_10k": after_10k, "after": target.rss_kib(), "requests": done}
    finally:
        target.stop()


def cpu_times():
    """The machine's CPU time counters (the `cpu` line of /proc/stat), in ticks."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


def steal_share(before, after):
    """The share of CPU time the hypervisor gave to others between two readings (steal is the
    8th field): on a shared virtual machine the main source of run-to-run differences."""
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / max(sum(delta), 1) if len(delta) > 7 else None


def render(targets, connection_counts, results, args, memory, half, steal=None):
    def median(name, c, key):
        return statistics.median(r[key] for r in results[(name, c)])

    def spread(name, c):
        """How far apart the rounds of one target were: highest req/s over lowest, as a percentage."""
        rps = [r["rps"] for r in results[(name, c)]]
        return (max(rps) / max(min(rps), 1) - 1) * 100

    rows = []
    header = ("| target | conns | req/s (median) | rounds spread | p50 ms | p99 ms | proxy CPU µs/req | vs nginx "
              "| vs nginx+Lua | vs bare wasmgate | vs direct |")
    rows.append(header)
    rows.append("|" + " --- |" * 11)
    for c in connection_counts:
        base = {n: median(n, c, "rps") for n in ("nginx", "nginx+lua policies", "wasmgate", "direct (upstream)")}
        for t in targets:
            rps = median(t.name, c, "rps")
            cpu = "" if t.name.startswith("direct") else f"{median(t.name, c, 'cpu_us'):.1f}"
            rows.append(
                f"| {t.name} | {c} | {rps:,.0f} | {spread(t.name, c):.0f} % | {median(t.name, c, 'p50'):.3f} "
                f"| {median(t.name, c, 'p99'):.3f} "
                f"| {cpu} | {rps / base['nginx']:.2f} | {rps / base['nginx+lua policies']:.2f} "
                f"| {rps / base['wasmgate']:.2f} | {rps / base['direct (upstream)']:.2f} |"
            )
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [
        f"Generated by `bench/run` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, {nginx_version}, "
        f"wrk 1 thread; {args.rounds} rounds of {args.seconds} s per target and connection count, interleaved, "
        "median shown. Upstream and proxy pinned to CPU 0, wrk to CPU 1; nginx with 1 worker, wasmgate with "
        "WASMGATE_WORKERS=1 (one thread, one event loop); keep-alive everywhere. Policies: api-key (SHA-256 of the key), header rewrite "
        "both ways, JSON access log line per request to a file. jwt: HS256 verify (+ iss, exp), same rewrite, "
        "JSON log (nginx+njs: njs verifies, native nginx rewrites and logs). hyper floor: bench/hyper-floor, "
        "wasmgate's HTTP stack alone (hyper-util auto server + legacy pooled client, one current-thread "
        "runtime, nothing else), to tell wasmgate's own cost from its stack's. Rounds spread: a target's "
        "highest req/s over its lowest across the rounds; where it is larger than a ratio's distance from "
        "1.0, that ratio is noise."
        + ("" if steal is None else
           f" CPU steal during the rounds (time the hypervisor gave to other guests, from /proc/stat): "
           f"{steal * 100:.1f} % of all CPU time."),
        "",
        *rows,
        "",
        *([] if not half else [
            f"At half of the maximum load ({half['rate']:,.0f} req/s, half of what the slower of nginx and bare "
            f"wasmgate served at 32 connections; 32 connections, open loop, `paced-load`; median of "
            f"{args.rounds} rounds of {args.seconds} s): p99 "
            + ", ".join(
                f"{name} {half['p99'][name]:.3f} ms"
                + ("" if name.startswith("direct") else
                   f" ({half['p99'][name] - half['p99']['direct (upstream)']:+.3f} over direct)")
                for name in ("direct (upstream)", "nginx", "wasmgate"))
            + "; p50 " + ", ".join(f"{name} {half['p50'][name]:.3f} ms"
                                   for name in ("direct (upstream)", "nginx", "wasmgate")) + ".",
            "",
        ]),
        f"Memory (20 routes x 3 plugins, api-key + header-rewrite + access-log, pooled): RSS idle "
        f"{memory['idle'] / 1024:.1f} MiB, after 10k requests {memory['after_10k'] / 1024:.1f} MiB, after "
        f"{memory['requests']:,} requests {memory['after'] / 1024:.1f} MiB "
        f"({(memory['after'] / max(memory['after_10k'], 1) - 1) * 100:+.1f} %).",
    ]
    return "\n".join(lines)


def write_docs(table):
    path = ROOT / "docs" / "performance.md"
    text = path.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Load: wasmgate beside nginx (bench/run)\n\n{block}\n"
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
