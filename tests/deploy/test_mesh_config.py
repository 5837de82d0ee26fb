"""The mesh config ConfigMap: it loads, and agrees with the manifests around it."""

from __future__ import annotations

from typing import Any

from injector.commands import serve
from injector.commands.cli import CommandParser, camel_case
from tests.support.deploy import SERVE_OPTION_KEYS, check_consistency, mesh_config_of


def test_mesh_config_loads_and_matches_the_manifests(objects: list[dict[str, Any]]) -> None:
    _, mesh = mesh_config_of(objects)
    assert mesh.proxy_image == "injector:0.1.0"
    assert mesh.trust_domain == "cluster.local"
    assert mesh.ca_address == "injector.mesh-system.svc:443"
    check_consistency(objects)


def test_config_key_collision_with_serve_options_is_real() -> None:
    """SERVE_OPTION_KEYS must follow serve's real options, or the check above is hollow."""
    parser = CommandParser(prog="serve")
    serve.add_arguments(parser)
    options = {camel_case(layer.dest) for layer in parser.layered}
    assert options <= SERVE_OPTION_KEYS, f"add {options - SERVE_OPTION_KEYS} to SERVE_OPTION_KEYS"
