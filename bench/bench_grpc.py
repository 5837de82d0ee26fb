"""CSRs per second over Istio's gRPC protocol against the same over HTTPS JSON, in the same run,
from the same `injector serve` (one worker, on the server core) and the same client.

The client is Python on the other core, the same for both protocols so that the ratio compares
the server's transports: N threads, each signing-request loop sending one P-256 CSR (the CA signs
each anew) with the token of one of IDENTITIES service accounts in turn (a static token file,
each identity well under its rate). HTTPS: one keep-alive httpx connection per thread (HTTP/1.1).
gRPC: one channel for all threads (HTTP/2 streams), as a sidecar's CA client has. Rounds
interleave the two protocols; the best of each is kept. Every answer is checked: a refusal stops
the benchmark. Run alone with `python -m bench.bench_grpc`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import harness
from injector.server import grpc_ca
from injector.server.proto.istio_ca_pb2 import IstioCertificateRequest, IstioCertificateResponse
from tests.support.servers import free_port

IDENTITIES = 2000
CONCURRENCY = (1, 8)
ROUNDS = 3
SECONDS = 2.0


def _measure(worker: Callable[[int, threading.Event], int], threads: int) -> float:
    """Requests per second of `threads` threads running `worker(index, stop)` (each returns how
    many requests it completed) for SECONDS."""
    stop = threading.Event()
    counts = [0] * threads

    def run(index: int) -> None:
        counts[index] = worker(index, stop)

    pool = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> dict[str, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)).decode()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        workdir = Path(tmp)
        certs = harness.certs_dir(workdir)
        token_file, tokens = harness.write_static_tokens(workdir, IDENTITIES)
        grpc_port = free_port()
        server = harness.start("grpc-ca", [
            "-m", "injector", "serve", "--certs-dir", str(certs), "--token-file",
            str(token_file), "--grpc-port", str(grpc_port)], workdir, certs)
        root = certs / "root-cert.pem"
        body = orjson.dumps({"csr": csr_pem})
        request = IstioCertificateRequest(csr=csr_pem)
        channel = grpc.secure_channel(f"127.0.0.1:{grpc_port}",
                                      grpc.ssl_channel_credentials(root.read_bytes()))
        call = channel.unary_unary(
            grpc_ca.METHOD_PATH, request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString)

        def https_worker(index: int, stop: threading.Event) -> int:
            done = 0
            with httpx.Client(base_url=server.url, verify=str(root), timeout=10) as client:
                while not stop.is_set():
                    token = tokens[(index * 7919 + done) % IDENTITIES]
                    answer = client.post("/v1/certificates", content=body, headers={
                        "authorization": f"Bearer {token}",
                        "content-type": "application/json"})
                    if answer.status_code != 200:
                        raise RuntimeError(f"HTTPS refused: {answer.status_code} "
                                           f"{answer.text[:200]}")
                    done += 1
            return done

        def grpc_worker(index: int, stop: threading.Event) -> int:
            done = 0
            while not stop.is_set():
                token = tokens[(index * 7919 + done) % IDENTITIES]
                answer = call(request, metadata=(("authorization", f"Bearer {token}"),),
                              timeout=10)
                if len(answer.cert_chain) < 2:
                    raise RuntimeError("gRPC answered an empty chain")
                done += 1
            return done

        results: dict[str, object] = {}
        try:
            with harness.on_client_cpu():
                for threads in CONCURRENCY:
                    best = {"https": 0.0, "grpc": 0.0}
                    for _ in range(ROUNDS):
                        best["https"] = max(best["https"], _measure(https_worker, threads))
                        best["grpc"] = max(best["grpc"], _measure(grpc_worker, threads))
                    ratio = best["grpc"] / best["https"]
                    print(f"  {threads:>2} concurrent: HTTPS JSON {best['https']:7.0f} CSR/s, "
                          f"gRPC {best['grpc']:7.0f} CSR/s, gRPC/HTTPS {ratio:.2f}")
                    results[f"c{threads}"] = {"https_per_second": round(best["https"]),
                                              "grpc_per_second": round(best["grpc"]),
                                              "grpc_over_https": round(ratio, 2)}
        finally:
            channel.close()
            server.stop()
    return results


if __name__ == "__main__":
    main()
