"""Effects: what a protocol machine asks the node to do.  Plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the peer node listening at ``address``."""

    address: str
    message: Any


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call the machine's ``tick`` again at time ``at`` (same clock as ``now``)."""

    at: float


@dataclass(frozen=True, slots=True)
class MembersChanged:
    """The member set changed; ``members`` maps node id -> Member."""

    members: dict


@dataclass(frozen=True, slots=True)
class Refuted:
    """Someone claimed our node id (at ``claimed_address`` with ``claimed_generation``);
    we took ``generation`` and told every member.  The node logs it loudly."""

    claimed_address: str
    claimed_generation: int
    generation: int
