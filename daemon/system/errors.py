"""An OSError in words, the one way: what went wrong and where ("No space left on device (outbox/x)")."""

from __future__ import annotations

import os


def os_error_text(err: OSError) -> str:
    what = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    return f"{what} ({err.filename or 'I/O'})"
