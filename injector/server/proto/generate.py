"""Regenerate istio_ca_pb2.py and istio_ca_pb2.pyi from istio_ca.proto (grpcio-tools, a test
dependency): `python -m injector.server.proto.generate [OUT_DIR]`.

Only the message classes are generated: the one gRPC method is registered by hand in
injector.server.grpc_ca, typed, rather than through an untyped generated stub.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "istio_ca.proto"


def generate(out_dir: Path) -> None:
    """Write the generated modules into `out_dir`; SystemExit with protoc's status on failure."""
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/struct.proto
    status = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"-I{includes}",
                          f"--python_out={out_dir}", f"--pyi_out={out_dir}", str(HERE / PROTO)])
    if status != 0:
        raise SystemExit(status)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
