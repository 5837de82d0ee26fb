"""The test cluster itself (tests/support/cluster.py): it really is kube-apiserver with RBAC,
and it goes away completely when stopped."""

from __future__ import annotations

from pathlib import Path

from tests.support.cluster import Cluster, start_cluster


def listening(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:`port` (from /proc/net/tcp: state 0A)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return True
    return False


def test_a_stopped_cluster_leaves_nothing_running_or_listening(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path)
    try:
        processes = [(peer.process, peer.ports) for peer in cluster.processes]
        assert [peer.name for peer in cluster.processes] == ["etcd", "kube-apiserver"]
        assert all(listening(port) for _, ports in processes for port in ports)
    finally:
        cluster.stop()
    for process, ports in processes:
        assert process.poll() is not None
        assert not Path(f"/proc/{process.pid}").exists()
        assert not any(listening(port) for port in ports)


def test_the_session_cluster_authorizes_with_rbac(kube_cluster: Cluster) -> None:
    """A ServiceAccount with no role can do nothing: RBAC is on, not AlwaysAllow."""
    namespace = kube_cluster.namespace("rbac")
    token = kube_cluster.token(namespace, "default")
    kubeconfig = kube_cluster.token_kubeconfig(kube_cluster.workdir / f"{namespace}.kubeconfig",
                                               token)
    refused = kube_cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig,
                                   check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr
    whoami = kube_cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                                  kubeconfig=kubeconfig)
    assert whoami.stdout == f"system:serviceaccount:{namespace}:default"
