"""docs/configuration.md's table of mesh config keys against MeshConfig itself: every key, no
other, each with its real default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from injector.mesh.config import MeshConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def shown(value: Any) -> str:
    """A default as the page writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def model_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if isinstance(field.default, BaseModel):
            found.update(model_defaults(type(field.default), f"{key}."))
        else:
            found[key] = shown(field.default)
    return found


def documented() -> dict[str, str]:
    table = DOC.read_text().split("## Mesh config keys\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"^\| `([\w.]+)` \|\s*`?([^|`]*?)`?\s*\|", line)
        if match:
            rows[match[1]] = match[2].strip()
    return rows


def test_every_mesh_config_key_is_documented_with_its_default() -> None:
    assert documented() == model_defaults(MeshConfig)
