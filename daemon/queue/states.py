"""The states a story can be in: the one list, used everywhere a state is named.

    queued ──▶ processing ──▶ done
      ▲  │         │  └─────▶ failed      (the story's fault; input kept; `retry` re-queues it)
      │  │         ├────────▶ cancelled   (asked for; input kept; `retry` re-queues it)
      │  ▼         ▼
      │ paused   waiting                  (not the story's fault: disk, share; resumes by itself)
      └──┴─────────┘
    done ──▶ expired                       (retention removed its outputs: the sidecar's last line)

A state changes in one place only, `daemon.queue.ledger.Ledger.move`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    WAITING = "waiting"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def ended(self) -> bool:
        """A final state: the claim is gone, the story is in history."""
        return self in ENDED


ENDED = frozenset({State.DONE, State.FAILED, State.CANCELLED, State.EXPIRED})
