"""Leases: which client owns which interactive session, and for how long.

A lease is claimed (``/claim``), used with its token in ``X-Lease-Token``, and ends on
``/release``, on its idle timeout (no real action: image, prompt, undo, reset, predict) or on its
liveness timeout (no request at all, heartbeats included: a crashed client). Sessions never share
state: each lease has its own :class:`~nnunet_guide.inference.session.GuidedSession`.

The table enforces the maximum lease count and the memory budget (bytes held by all sessions);
both refusals are :class:`AtCapacity` (HTTP 503 with ``Retry-After``).
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional


class LeaseGone(LookupError):
    """Unknown, released or expired lease (HTTP 410)."""


class AtCapacity(RuntimeError):
    """No room for another lease or session (HTTP 503); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = int(max(1, retry_after))


@dataclass
class Lease:
    token: str
    created: float
    last_action: float
    last_seen: float
    session: Any = None               # GuidedSession once an image is set
    memory: int = 0                   # bytes held by the session (measured after set_image)
    state: Dict[str, Any] = field(default_factory=dict)  # per-client protocol state (buffer, flags)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LeaseTable:
    """Thread-safe table of leases.

    Args:
        max_sessions: most leases at a time.
        idle_timeout: seconds without a real action before a lease is reaped.
        liveness_timeout: seconds without any request (heartbeats count) before it is reaped.
        memory_budget: most bytes all sessions may hold (None: no limit).
        clock: time source (seconds), for tests.
    """

    def __init__(self, max_sessions: int = 4, idle_timeout: float = 600.0, liveness_timeout: float = 60.0,
                 memory_budget: Optional[int] = None, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.max_sessions = int(max_sessions)
        self.idle_timeout = float(idle_timeout)
        self.liveness_timeout = float(liveness_timeout)
        self.memory_budget = memory_budget
        self.clock = clock
        self._leases: Dict[str, Lease] = {}
        self._lock = threading.Lock()

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _remaining(self, lease: Lease, now: float) -> float:
        r = self.idle_timeout - (now - lease.last_action)
        if self.liveness_timeout > 0:
            r = min(r, self.liveness_timeout - (now - lease.last_seen))
        return r

    def reap(self) -> List[Lease]:
        """Drop expired leases; returns them."""
        now = self.clock()
        with self._lock:
            gone = [l for l in self._leases.values() if self._remaining(l, now) <= 0]
            for l in gone:
                del self._leases[l.token]
        for l in gone:
            l.session = None
        return gone

    def _retry_after(self) -> int:
        now = self.clock()
        if not self._leases:
            return 5
        return int(min(max(self._remaining(l, now), 1.0) for l in self._leases.values())) + 1

    def memory_in_use(self, exclude: Optional[str] = None) -> int:
        with self._lock:
            return sum(l.memory for t, l in self._leases.items() if t != exclude)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    # ---- lease life ---------------------------------------------------------------------------
    def claim(self) -> Lease:
        self.reap()
        now = self.clock()
        with self._lock:
            if len(self._leases) >= self.max_sessions:
                raise AtCapacity(f"server is at capacity: {len(self._leases)} of {self.max_sessions} sessions "
                                 f"in use; retry later", self._retry_after())
            used = sum(l.memory for l in self._leases.values())
            if self.memory_budget is not None and used >= self.memory_budget:
                raise AtCapacity(f"server is at capacity: sessions hold {used / 2**20:.0f} MiB of the "
                                 f"{self.memory_budget / 2**20:.0f} MiB memory budget; retry later",
                                 self._retry_after())
            token = secrets.token_urlsafe(32)
            lease = Lease(token, now, now, now)
            self._leases[token] = lease
            return lease

    def get(self, token: Optional[str], action: bool = True, seen: bool = True) -> Lease:
        """The live lease of ``token``; refreshes its idle clock if ``action``, its liveness clock
        if ``seen``. LeaseGone if unknown or expired."""
        if not token:
            raise LeaseGone("no X-Lease-Token header: claim a session first (POST /claim)")
        self.reap()
        now = self.clock()
        with self._lock:
            lease = self._leases.get(token)
            if lease is None:
                raise LeaseGone("lease expired or unknown: claim a new session (POST /claim)")
            if seen:
                lease.last_seen = now
            if action:
                lease.last_action = now
            return lease

    def remaining(self, lease: Lease) -> float:
        return max(0.0, self._remaining(lease, self.clock()))

    def release(self, token: Optional[str]) -> bool:
        with self._lock:
            lease = self._leases.pop(token, None) if token else None
        if lease is not None:
            lease.session = None
        return lease is not None

    def reserve_memory(self, lease: Lease, estimate: int) -> None:
        """AtCapacity if ``estimate`` more bytes for ``lease`` (replacing what it holds) would
        exceed the budget."""
        if self.memory_budget is None:
            return
        others = self.memory_in_use(exclude=lease.token)
        if others + estimate > self.memory_budget:
            raise AtCapacity(f"server is at capacity: this image needs about {estimate / 2**20:.0f} MiB, other "
                             f"sessions hold {others / 2**20:.0f} MiB of the {self.memory_budget / 2**20:.0f} MiB "
                             f"memory budget; retry later", self._retry_after())
