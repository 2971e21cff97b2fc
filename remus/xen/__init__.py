"""Real Xen domains (placeholder until the Xen binding lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from remus.errors import XenUnavailable

if TYPE_CHECKING:
    from remus.domain import Domain


def open_xen_domain(spec: str) -> "Domain":
    raise XenUnavailable(f"cannot open Xen domain {spec!r}: Xen support is not built yet")
