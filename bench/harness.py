"""What the HTTPS benchmarks share: servers started on their own core, `wrk` on another, and
the figures read back from both.

The load generator is `wrk` (Debian's), one thread, keep-alive, in its own process; a Lua script
posts a fixed body and prints its summary as one JSON line, so nothing is scraped from wrk's
human-readable output. On a machine with two cores or more the server gets the last core and
wrk the first (`taskset`); on one core they share it and the ratios still hold, the absolute
numbers do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CONCURRENCY = (1, 16, 64)

CPUS = sorted(os.sched_getaffinity(0))
PINNED = len(CPUS) >= 2 and shutil.which("taskset") is not None
SERVER_CPU = CPUS[-1]
CLIENT_CPU = CPUS[0]


def _pinned(cpu: int, command: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if PINNED else list(command)


@contextlib.contextmanager
def on_server_cpu() -> Iterator[None]:
    """Run in-process loops on the core the servers get, for like-for-like ratios."""
    before = os.sched_getaffinity(0)
    if PINNED:
        os.sched_setaffinity(0, {SERVER_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def on_client_cpu() -> Iterator[None]:
    """Run a Python client (and the threads it starts) on the core the servers do not have, as
    wrk is."""
    before = os.sched_getaffinity(0)
    if PINNED:
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def rss_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in KiB."""
        figures: dict[str, int] = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
        return figures

    def cpu_seconds(self) -> float:
        """User and system CPU time used so far by the server and every process under it (the
        workers of `--workers N`), from /proc."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.process.pid))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a process that exits meanwhile is left out)."""
    tree: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return tree


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (fields 14 and 15 of /proc/PID/stat, after the name)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def certs_dir(workdir: Path) -> Path:
    """A certificates directory made by `injector certs init`, as a user would."""
    path = workdir / "certs"
    subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir",
                    str(path)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def start(name: str, args: Sequence[str], workdir: Path, certs: Path,
          env: Mapping[str, str] | None = None, pin: bool = True) -> Server:
    """Start a server (`python <args>` with `--port`) on the server core (on any with
    `pin=False`); wait for /healthz."""
    return start_command(name, [sys.executable, *args], workdir, certs, env, pin)


def start_command(name: str, command: Sequence[str], workdir: Path, certs: Path,
                  env: Mapping[str, str] | None = None, pin: bool = True) -> Server:
    """Start any server program (`command` with `--port`; a Go peer, say) as `start` does: on
    the server core unless `pin=False`, answering /healthz over TLS with the dev root. Tried
    three times: on a busy machine another process may take the free port first."""
    for attempt in range(3):
        try:
            return _start(name, command, workdir, certs, env, pin)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start(name: str, program: Sequence[str], workdir: Path, certs: Path,
           env: Mapping[str, str] | None, pin: bool) -> Server:
    port = free_port()
    log_path = workdir / f"{name}.log"
    command = [*program, "--port", str(port)]
    command = _pinned(SERVER_CPU, command) if pin else command
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   # No gRPC CA unless a benchmark asks: its port
                                   # (15012) is one for the machine, servers are several.
                                   env={"INJECTOR_GRPC_PORT": "0", **os.environ,
                                        **(env or {})})
    server = Server(name, f"https://127.0.0.1:{port}", process, log_path)
    trust = ssl.create_default_context(cafile=str(certs / "root-cert.pem"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                               f"{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/healthz", verify=trust, timeout=5).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not answer in 60 s:\n{log_path.read_text()}")


@dataclass
class Load:
    """One wrk run's summary."""

    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"status":%%d,"socket":%%d,' ..
    '"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


_ROTATE = """
tokens = {%s}
counter = 0
request = function()
  counter = counter + 1
  wrk.headers["Authorization"] = "Bearer " .. tokens[(counter %% #tokens) + 1]
  return wrk.format()
end
"""


_VARY = """
body_head, body_tail = [==[%s]==], [==[%s]==]
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, body_head .. counter .. body_tail)
end
"""


def wrk_script(body: bytes, headers: Mapping[str, str], directory: Path,
               bearer_tokens: Sequence[str] = (), vary: str | None = None) -> Path:
    """A wrk script posting `body` with `headers`; with `bearer_tokens`, each request carries
    the next one in turn (many callers, as a cluster's sidecars are); with `vary`, a string
    found once in `body`, each request has the next number in its place (no two bodies
    alike, so no server can answer one from a cache)."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be a Lua long string")
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                      for k, v in headers.items())
    if bearer_tokens and vary is not None:
        raise ValueError("a script either rotates tokens or varies the body, not both")
    if bearer_tokens:
        lines += _ROTATE % ", ".join(json.dumps(token) for token in bearer_tokens)
    if vary is not None:
        head, found, tail = text.partition(vary)
        if not found or vary in tail:
            raise ValueError(f"{vary!r} must be in the body exactly once")
        lines += _VARY % (head, tail)
    path = Path(tempfile.mkstemp(suffix=".lua", dir=directory)[1])
    path.write_text(_LUA % {"body": text, "headers": lines})
    return path


def wrk(url: str, script: Path, connections: int, seconds: int = SECONDS,
        pin: bool = True) -> Load:
    """wrk, one thread, `connections` keep-alive connections, pinned to the client core
    (unless `pin=False`)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(script), url]
    command = _pinned(CLIENT_CPU, command) if pin else command
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout} {done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("WRKJSON "))
    data = json.loads(line.removeprefix("WRKJSON "))
    return Load(
        requests=data["requests"], seconds=data["duration_us"] / 1e6, non_2xx=data["status"],
        socket_errors=data["socket"], p50_ms=data["p50"] / 1e3, p90_ms=data["p90"] / 1e3,
        p99_ms=data["p99"] / 1e3, max_ms=data["max"] / 1e3,
    )


def interleaved(servers: Mapping[str, Server], path: str, script: Path,
                concurrencies: Sequence[int], pin: bool | Mapping[str, bool] = True,
                measure_cpu: bool = False) -> dict[tuple[str, int], list[Load]]:
    """wrk against each server at each concurrency, ROUNDS times: the servers of one
    comparison run one after the other, in reverse order every other round, so that a drift
    in the machine's load favours none. Runs by (server name, concurrency). `pin` says whether
    wrk is pinned to the client core, for all servers or by server name.

    With `measure_cpu`, each run's `extra` has the CPU seconds the server (all its processes)
    and wrk used during it: `server_cpu_s`, `client_cpu_s`."""
    runs: dict[tuple[str, int], list[Load]] = {}
    order = list(servers)
    for round_number in range(ROUNDS):
        for connections in concurrencies:
            for name in order if round_number % 2 == 0 else order[::-1]:
                pinned = pin if isinstance(pin, bool) else pin[name]
                server_before = servers[name].cpu_seconds() if measure_cpu else 0.0
                client_before = _children_cpu_seconds()
                load = wrk(f"{servers[name].url}{path}", script, connections, pin=pinned)
                if measure_cpu:
                    load.extra["server_cpu_s"] = servers[name].cpu_seconds() - server_before
                    load.extra["client_cpu_s"] = _children_cpu_seconds() - client_before
                runs.setdefault((name, connections), []).append(load)
    return runs


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children: around one wrk run, wrk's own (the
    servers are children too, but are not waited for until they stop)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def best(loads: Sequence[Load]) -> Load:
    """The run with the highest throughput: on a shared machine, the least disturbed one."""
    return max(loads, key=lambda load: load.per_second)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def median(loads: Sequence[Load]) -> Load:
    """The run of median throughput (the upper one of an even count): a typical run."""
    ordered = sorted(loads, key=lambda load: load.per_second)
    return ordered[len(ordered) // 2]


def report_targets(verdicts: Mapping[str, bool]) -> None:
    """One line per target, as every benchmark prints them."""
    for target, met in verdicts.items():
        print(f"target {target}: {'met' if met else 'NOT met'}")


def write_static_tokens(workdir: Path, count: int) -> tuple[Path, list[str]]:
    """A `--token-file` of `count` service accounts (bench/sa-<i>), so that requests spread
    over identities as a mesh's do, and their tokens in that order."""
    tokens = [secrets.token_urlsafe(24) for _ in range(count)]
    token_file = workdir / "tokens.yaml"
    token_file.write_text(yaml.safe_dump(
        [{"token": token, "namespace": "bench", "serviceAccount": f"sa-{index}"}
         for index, token in enumerate(tokens)]))
    return token_file, tokens
