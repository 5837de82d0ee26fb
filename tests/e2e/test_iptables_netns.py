"""`injector iptables` on a real netfilter stack, in throwaway network namespaces.

A dual-stack "pod" namespace and a "peer" namespace joined by a veth pair:

    pod  10.200.0.2/24  ---- veth ----  10.200.0.1/24  peer (also 10.200.1.1 on its lo)
         fd00:200::2/64                 fd00:200::1/64      (also fd00:201::1 on its lo)

`injector iptables` runs inside the pod namespace. Small listeners stand in for the proxy's
outbound (15001) and inbound (15006) capture ports, for the app and for the peer's services; each
answers a connection with its own name and the connection's original destination
(SO_ORIGINAL_DST), and a client run inside a namespace, as root or as the proxy's uid 1337,
prints that answer. So every test reads where a real TCP connection landed.

The host's own network namespace is never touched: links are created directly inside the test
namespaces, every command runs under `ip netns exec`, and the namespaces are deleted in teardown.
Needs root, `ip` (iproute2), `iptables` and `setpriv` (util-linux); skipped with the reason
otherwise. CI runs as root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from injector.mesh.network import parse_written_cidrs
from injector.traffic.iptables import TrafficOptions, build_rules

POD_IP = "10.200.0.2"
PEER_IP = "10.200.0.1"
EXCLUDED_PEER_IP = "10.200.1.1"  # on the peer, inside the excluded range
EXCLUDED_RANGE = "10.200.1.0/24"
POD_IP6 = "fd00:200::2"
PEER_IP6 = "fd00:200::1"
EXCLUDED_PEER_IP6 = "fd00:201::1"
EXCLUDED_RANGE6 = "fd00:201::/64"
EXCLUDED_OUTBOUND_PORT = 5432
APP_PORT = 9080
PROXY_UID = 1337

# What the webhook puts on the init container's command line for such a pod.
OPTIONS = TrafficOptions(exclude_outbound_cidrs=parse_written_cidrs(
                             f"{EXCLUDED_RANGE},{EXCLUDED_RANGE6}"),
                         exclude_outbound_ports=(EXCLUDED_OUTBOUND_PORT,))

TIMEOUT = 10  # seconds, for any one command; every step here takes milliseconds
SOL_IP = 0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SOL_IPV6 = 41
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
CLONE_NEWNET = 0x40000000
# Where the tools live on Debian; pytest's PATH may lack the sbin directories.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The client: connect (optionally from a chosen source address), print the listener's answer.
# Run by an interpreter that uid 1337 can execute, so standard library only.
CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
with socket.create_connection((host, port), timeout=5, source_address=source) as sock:
    answer = b""
    while not answer.endswith(b"\\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        answer += chunk
print(answer.decode().strip())
"""


def _missing_prerequisite() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and program iptables (CI runs as root)"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables"),
                          ("iptables-save", "iptables"), ("setpriv", "util-linux")):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"needs {tool} (Debian package {package}; `make system-deps` installs it)"
    return None


_MISSING = _missing_prerequisite()
_OWN_NAMESPACE = os.readlink("/proc/self/ns/net")
pytestmark = [pytest.mark.root, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{SYSTEM_PATH}:{os.environ.get('PATH', '')}"}


def _run(*argv: str, check: bool = True, stdin: str | None = None, tools: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    """Run a command; `tools` is a directory put first on PATH (the legacy iptables shims)."""
    env = _env()
    if tools is not None:
        env["PATH"] = f"{tools}:{env['PATH']}"
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _unique(prefix: str) -> str:
    # Unique per test and per xdist worker; short, since interface names stop at 15 characters.
    return f"{prefix}{secrets.token_hex(4)}"


@contextlib.contextmanager
def _namespaces(*prefixes: str) -> Iterator[list[str]]:
    """Fresh network namespaces, deleted afterwards whatever happened in between."""
    names: list[str] = []
    try:
        for prefix in prefixes:
            name = _unique(f"inj-{prefix}-")
            _run("ip", "netns", "add", name)
            names.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            # Deleting the namespace deletes its end of the veth, and with it the other end.
            with contextlib.suppress(subprocess.TimeoutExpired):  # still try the next one
                subprocess.run(["ip", "netns", "del", name], capture_output=True,
                               timeout=TIMEOUT, env=_env(), check=False)


def _socket_in(namespace: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in `namespace`.

    setns(2) moves only the calling thread, so a short-lived thread moves, makes the socket and
    ends; the socket stays in that namespace, and the test process never leaves its own.
    """
    made: dict[str, object] = {}

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{namespace}", "rb") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
            made["socket"] = socket.socket(family, socket.SOCK_STREAM)
        except BaseException as error:  # handed to the caller's thread
            made["error"] = error

    thread = threading.Thread(target=make, name=f"setns-{namespace}")
    thread.start()
    thread.join(TIMEOUT)
    if "error" in made:
        raise made["error"]  # type: ignore[misc]
    return made["socket"]  # type: ignore[return-value]


def _original_destination(connection: socket.socket) -> str:
    """Where the client meant to go, before any REDIRECT (SO_ORIGINAL_DST)."""
    try:
        if connection.family == socket.AF_INET6:
            raw = connection.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # sockaddr_in6
            port, address6 = struct.unpack("!2xH4x16s4x", raw)
            return f"[{ipaddress.IPv6Address(address6)}]:{port}"
        raw = connection.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
    except OSError:
        return "-"  # no conntrack entry for it
    port, address = struct.unpack("!2xH4s8x", raw)
    return f"{ipaddress.IPv4Address(address)}:{port}"


@dataclass
class Listener:
    """Accepts connections in a namespace and answers `<name> <original destination>`."""

    name: str
    server: socket.socket
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        self.server.settimeout(0.1)
        while not self.stop.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with connection:
                connection.settimeout(TIMEOUT)
                answer = f"{self.name} {_original_destination(connection)}\n"
                with contextlib.suppress(OSError):
                    connection.sendall(answer.encode())


@contextlib.contextmanager
def _listeners(specs: list[tuple[str, str, str, int]]) -> Iterator[None]:
    """(name, namespace, address, port) listeners, serving until the block ends."""
    running: list[tuple[Listener, threading.Thread]] = []
    try:
        for name, namespace, address, port in specs:
            ipv6 = ":" in address
            server = _socket_in(namespace, socket.AF_INET6 if ipv6 else socket.AF_INET)
            if ipv6:  # the IPv4 listener on the same port is a separate socket
                server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((address, port))
            server.listen(16)
            listener = Listener(name, server)
            thread = threading.Thread(target=listener.serve, name=f"listener-{name}", daemon=True)
            thread.start()
            running.append((listener, thread))
        yield
    finally:
        for listener, _ in running:
            listener.stop.set()
        for listener, thread in running:
            thread.join(TIMEOUT)
            listener.server.close()


def _injector(namespace: str, *args: str, tools: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    """`injector iptables ARGS` inside the namespace, as the init container runs it."""
    return _run("ip", "netns", "exec", namespace, sys.executable, "-m", "injector", "iptables",
                *args, check=False, tools=tools)


def _saved_nat_table(namespace: str, ipv6: bool = False, tools: Path | None = None) -> str:
    save = "ip6tables-save" if ipv6 else "iptables-save"
    saved = _run("ip", "netns", "exec", namespace, save, "-t", "nat", tools=tools).stdout
    # Drop the "# Generated by ... on <time>" lines: only the rules are compared.
    return "\n".join(line for line in saved.splitlines() if not line.startswith("#"))


def _python_for_uid(uid: int) -> str | None:
    """An interpreter that a process running as `uid` can execute (the venv's may sit under a
    0700 home directory)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3",
                  shutil.which("python3") or ""]
    for candidate in dict.fromkeys(candidates):
        if not candidate or not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c",
             "pass"], capture_output=True, timeout=TIMEOUT, env=_env(), check=False)
        if probe.returncode == 0:
            return candidate
    return None


@dataclass(frozen=True)
class Pod:
    """The pod and peer namespaces with `injector iptables` applied in the pod."""

    pod: str
    peer: str
    python: str  # runnable by any uid

    def connect(self, host: str, port: int, *, namespace: str | None = None,
                uid: int | None = None, gid: int | None = None, source: str | None = None) -> str:
        """Connect from the pod (or `namespace`) and return the answer: who took the call."""
        command = ["ip", "netns", "exec", namespace or self.pod]
        if uid is not None or gid is not None:
            command += ["setpriv", f"--reuid={uid if uid is not None else 0}",
                        f"--regid={gid if gid is not None else 0}", "--clear-groups"]
        command += [self.python, "-c", CLIENT, host, str(port)]
        if source is not None:
            command.append(source)
        done = _run(*command, check=False)
        assert done.returncode == 0, f"connection to {host}:{port} failed: {done.stderr.strip()}"
        return done.stdout.strip()


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    python = _python_for_uid(PROXY_UID)
    if python is None:
        pytest.skip(f"no Python interpreter that uid {PROXY_UID} may execute")
    with _namespaces("pod", "peer") as (pod_ns, peer_ns):
        pod_link, peer_link = _unique("vp"), _unique("vq")
        # Both ends are created directly inside the test namespaces, never in the host's.
        _run("ip", "link", "add", pod_link, "netns", pod_ns, "type", "veth",
             "peer", "name", peer_link, "netns", peer_ns)
        _run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", pod_link)
        _run("ip", "-n", pod_ns, "link", "set", pod_link, "up")
        _run("ip", "-n", pod_ns, "route", "add", "default", "via", PEER_IP)
        _run("ip", "-n", peer_ns, "addr", "add", f"{PEER_IP}/24", "dev", peer_link)
        _run("ip", "-n", peer_ns, "addr", "add", f"{EXCLUDED_PEER_IP}/32", "dev", "lo")
        # nodad: the addresses are usable at once instead of after duplicate detection.
        _run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP6}/64", "dev", pod_link, "nodad")
        _run("ip", "-n", peer_ns, "addr", "add", f"{PEER_IP6}/64", "dev", peer_link, "nodad")
        _run("ip", "-n", peer_ns, "addr", "add", f"{EXCLUDED_PEER_IP6}/128", "dev", "lo")
        _run("ip", "-n", peer_ns, "link", "set", peer_link, "up")
        _run("ip", "-n", pod_ns, "-6", "route", "add", "default", "via", PEER_IP6)

        # No --ipv6: the pod's global IPv6 address must be enough to get IPv6 rules as well.
        applied = _injector(pod_ns, *OPTIONS.to_args())
        assert applied.returncode == 0, applied.stderr

        listeners = [
            ("outbound-capture", pod_ns, "0.0.0.0", OPTIONS.proxy_port),
            ("inbound-capture", pod_ns, "0.0.0.0", OPTIONS.inbound_capture_port),
            ("proxy-health", pod_ns, "0.0.0.0", 15021),
            ("app", pod_ns, "0.0.0.0", APP_PORT),
            ("app-localhost", pod_ns, "127.0.0.1", 8081),
            ("peer-service", peer_ns, PEER_IP, 8080),
            ("peer-database", peer_ns, PEER_IP, EXCLUDED_OUTBOUND_PORT),
            ("peer-excluded-range", peer_ns, EXCLUDED_PEER_IP, 8080),
            ("outbound-capture", pod_ns, "::", OPTIONS.proxy_port),
            ("inbound-capture", pod_ns, "::", OPTIONS.inbound_capture_port),
            ("app", pod_ns, "::", APP_PORT),
            ("app-localhost", pod_ns, "::1", 8081),
            ("peer-service", peer_ns, PEER_IP6, 8080),
            ("peer-excluded-range", peer_ns, EXCLUDED_PEER_IP6, 8080),
        ]
        with _listeners(listeners):
            yield Pod(pod_ns, peer_ns, python)


# --- outbound -----------------------------------------------------------------------------------

def test_the_apps_outbound_call_is_captured_with_its_original_destination(pod: Pod) -> None:
    assert pod.connect(PEER_IP, 8080) == f"outbound-capture {PEER_IP}:8080"


def test_an_unprivileged_apps_call_is_captured_too(pod: Pod) -> None:
    assert pod.connect(PEER_IP, 8080, uid=1000, gid=1000) == f"outbound-capture {PEER_IP}:8080"


def test_the_proxys_own_call_is_not_captured(pod: Pod) -> None:
    assert pod.connect(PEER_IP, 8080, uid=PROXY_UID, gid=PROXY_UID).startswith("peer-service ")


def test_the_proxys_group_alone_is_enough(pod: Pod) -> None:
    assert pod.connect(PEER_IP, 8080, uid=1000, gid=PROXY_UID).startswith("peer-service ")


def test_an_excluded_outbound_port_is_not_captured(pod: Pod) -> None:
    answer = pod.connect(PEER_IP, EXCLUDED_OUTBOUND_PORT)
    assert answer.startswith("peer-database ")


def test_an_excluded_range_is_not_captured(pod: Pod) -> None:
    assert pod.connect(EXCLUDED_PEER_IP, 8080).startswith("peer-excluded-range ")


def test_loopback_to_127_0_0_1_is_not_captured(pod: Pod) -> None:
    assert pod.connect("127.0.0.1", 8081).startswith("app-localhost ")


def test_the_app_calling_its_own_pod_address_is_not_captured(pod: Pod) -> None:
    assert pod.connect(POD_IP, APP_PORT).startswith("app ")


# --- inbound ------------------------------------------------------------------------------------

def test_an_inbound_call_is_captured_with_its_original_destination(pod: Pod) -> None:
    answer = pod.connect(POD_IP, APP_PORT, namespace=pod.peer)
    assert answer == f"inbound-capture {POD_IP}:{APP_PORT}"


def test_an_excluded_inbound_port_is_not_captured(pod: Pod) -> None:
    # 15021 is one of the default exclusions: the kubelet's readiness probe reaches the proxy.
    assert pod.connect(POD_IP, 15021, namespace=pod.peer).startswith("proxy-health ")


def test_the_proxy_calling_the_pods_address_goes_to_inbound(pod: Pod) -> None:
    # e.g. the app calls its own service through the proxy: the proxy's outbound leg is
    # treated as inbound traffic of the pod.
    answer = pod.connect(POD_IP, APP_PORT, uid=PROXY_UID, gid=PROXY_UID)
    assert answer == f"inbound-capture {POD_IP}:{APP_PORT}"


def test_the_proxys_inbound_passthrough_from_127_0_0_6_reaches_the_app(pod: Pod) -> None:
    answer = pod.connect(POD_IP, APP_PORT, uid=PROXY_UID, gid=PROXY_UID, source="127.0.0.6")
    assert answer.startswith("app ")


# --- IPv6 --------------------------------------------------------------------------------------

def test_ipv6_outbound_call_is_captured_with_its_original_destination(pod: Pod) -> None:
    assert pod.connect(PEER_IP6, 8080) == f"outbound-capture [{PEER_IP6}]:8080"


def test_ipv6_proxys_own_call_is_not_captured(pod: Pod) -> None:
    assert pod.connect(PEER_IP6, 8080, uid=PROXY_UID, gid=PROXY_UID).startswith("peer-service ")


def test_ipv6_excluded_range_and_loopback_are_not_captured(pod: Pod) -> None:
    assert pod.connect(EXCLUDED_PEER_IP6, 8080).startswith("peer-excluded-range ")
    assert pod.connect("::1", 8081).startswith("app-localhost ")


def test_ipv6_inbound_call_is_captured_with_its_original_destination(pod: Pod) -> None:
    answer = pod.connect(POD_IP6, APP_PORT, namespace=pod.peer)
    assert answer == f"inbound-capture [{POD_IP6}]:{APP_PORT}"


def test_ipv6_proxys_inbound_passthrough_from_6_reaches_the_app(pod: Pod) -> None:
    # ::6 exists on lo only because the command added it; the proxy can bind it.
    answer = pod.connect(POD_IP6, APP_PORT, uid=PROXY_UID, gid=PROXY_UID, source="::6")
    assert answer.startswith("app ")


# --- the rules themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_the_kernel_holds_exactly_the_rules_we_built(pod: Pod, ipv6: bool) -> None:
    saved = _saved_nat_table(pod.pod, ipv6).splitlines()
    ours = [line for line in saved
            if line.startswith("-A") and ("ISTIO_" in line.split()[1] or "-j ISTIO_" in line)]
    # Same rules, same order within each chain (iptables-save groups them by chain).
    for chain in ("PREROUTING", "OUTPUT", "ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT",
                  "ISTIO_REDIRECT"):
        expected = [rule for rule in build_rules(OPTIONS, ipv6) if rule.split()[1] == chain]
        assert [rule for rule in ours if rule.split()[1] == chain] == expected, chain


@pytest.fixture
def bare_pod() -> Iterator[str]:
    """A namespace with loopback only, for tests that only look at the rules."""
    with _namespaces("bare") as (name,):
        yield name


@pytest.fixture(params=["nft", "legacy"])
def iptables_backend(request: pytest.FixtureRequest, bare_pod: str, tmp_path: Path
                     ) -> Path | None:
    """None for the system's default iptables (nf_tables on Debian), or a directory of
    `iptables-*` shims for the legacy (x_tables) backend, that older nodes still use.

    The shims are only ever put on PATH for commands run inside a test namespace.
    """
    if request.param == "nft":
        return None
    legacy = shutil.which("xtables-legacy-multi", path=SYSTEM_PATH)
    if legacy is None:
        pytest.skip("no xtables-legacy-multi (Debian package iptables) for the legacy backend")
    tools = tmp_path / "legacy"
    tools.mkdir()
    for tool in ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"):
        (tools / tool).symlink_to(legacy)
    probe = _run("ip", "netns", "exec", bare_pod, "iptables-save", "-t", "nat", check=False,
                 tools=tools)
    if probe.returncode != 0:
        pytest.skip(f"this kernel has no legacy iptables: {probe.stderr.strip()}")
    return tools


def test_running_twice_leaves_identical_rules_and_keeps_others_rules(
    bare_pod: str, iptables_backend: Path | None
) -> None:
    tools = iptables_backend
    # Somebody else's rules, before and after where our hooks go: they must survive untouched.
    _run("ip", "netns", "exec", bare_pod, "iptables-restore", "--noflush", tools=tools, stdin=(
        "*nat\n:OTHER - [0:0]\n-A OTHER -j RETURN\n-A OUTPUT -d 192.0.2.1/32 -j OTHER\n"
        "-A PREROUTING -p udp -j RETURN\nCOMMIT\n"))
    args = OPTIONS.to_args()
    first_run = _injector(bare_pod, *args, tools=tools)
    assert first_run.returncode == 0, first_run.stderr
    first = _saved_nat_table(bare_pod, tools=tools)
    second_run = _injector(bare_pod, *args, tools=tools)
    assert second_run.returncode == 0, second_run.stderr
    assert _saved_nat_table(bare_pod, tools=tools) == first
    assert first.count("-j ISTIO_OUTPUT") == 1 and first.count("-j ISTIO_INBOUND") == 1
    for foreign in ("-A OTHER -j RETURN", "-A OUTPUT -d 192.0.2.1/32 -j OTHER",
                    "-A PREROUTING -p udp -j RETURN"):
        assert foreign in first.splitlines()


def test_a_new_run_replaces_the_previous_configuration(bare_pod: str) -> None:
    assert _injector(bare_pod).returncode == 0
    # Inbound capture switched off, outbound narrowed: no trace of the first run may remain.
    assert _injector(bare_pod, "-b", "", "-i", "10.0.0.0/8").returncode == 0
    saved = _saved_nat_table(bare_pod)
    assert "-j ISTIO_INBOUND" not in saved
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" not in saved
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in saved
    assert saved.count("-A OUTPUT -p tcp -j ISTIO_OUTPUT") == 1


def test_bad_input_applies_nothing(bare_pod: str) -> None:
    before = _saved_nat_table(bare_pod)
    failed = _injector(bare_pod, "-x", "10.0.0.0/8,10.300.0.0/16")
    assert failed.returncode == 2
    assert failed.stderr == "injector: -x/--exclude-outbound-cidrs: not a CIDR: '10.300.0.0/16'\n"
    assert _saved_nat_table(bare_pod) == before
    assert "ISTIO" not in before


def test_dry_run_changes_nothing(bare_pod: str) -> None:
    before = _saved_nat_table(bare_pod)
    dry = _injector(bare_pod, "--dry-run")
    assert dry.returncode == 0 and "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in dry.stdout
    assert _saved_nat_table(bare_pod) == before


def test_the_test_process_never_left_its_own_namespace(pod: Pod) -> None:
    # The setns threads end once their socket is made; no thread of ours may stay moved.
    assert os.readlink("/proc/thread-self/ns/net") == _OWN_NAMESPACE
    for thread in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            assert os.readlink(thread / "ns" / "net") == _OWN_NAMESPACE, thread.name
