"""A bounded load against a running `injector serve`: admissions and CSRs at a given
concurrency, counting errors, and the server's memory and open files before and after.

Used reduced by tests/test_load.py (part of `make test`) and at full size by `make bench`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from tests.support.certs import make_csr, p256
from tests.support.pods import replicaset_pod, review
from tests.support.servers import Server


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: list[str]
    seconds: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115 - short read
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _drive(server: Server, path: str, bodies: list[bytes], concurrency: int,
                 headers: dict[str, str], accept: Any) -> LoadResult:
    errors: list[str] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, verify=server.ssl_context(),
                                 limits=limits, timeout=30) as client:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                try:
                    reply = await client.post(path, content=body, headers=headers)
                    problem = accept(reply)
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                if problem:
                    errors.append(problem)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return LoadResult(len(bodies), errors, time.perf_counter() - started)


def _admitted(reply: httpx.Response) -> str | None:
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}: {reply.text[:100]}"
    if "patch" not in reply.json()["response"]:
        return "no patch"
    return None


def _issued(reply: httpx.Response) -> str | None:
    return None if reply.status_code == 200 else f"HTTP {reply.status_code}: {reply.text[:100]}"


def admissions(server: Server, count: int, concurrency: int) -> LoadResult:
    bodies = [orjson.dumps(review(replicaset_pod())) for _ in range(count)]
    return asyncio.run(_drive(server, "/inject", bodies, concurrency,
                              {"content-type": "application/json"}, _admitted))


def certificate_requests(server: Server, token: str, count: int,
                         concurrency: int) -> LoadResult:
    # One CSR reused: the CA checks and signs each request anew all the same.
    body = orjson.dumps({"csr": make_csr(p256()).decode()})
    return asyncio.run(_drive(server, "/v1/certificates", [body] * count, concurrency,
                              {"content-type": "application/json",
                               "authorization": f"Bearer {token}"}, _issued))
