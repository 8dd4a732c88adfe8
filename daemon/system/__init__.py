"""The system room: what the daemon needs from the machine, known to no story.

    notify.py    the systemd notify protocol
    logs.py      structlog set-up (JSON lines, or readable lines on a terminal)
    hooks.py     `[hooks]`: a command run when a story ends, one thread per hook
    wake.py      the self-pipe the loop sleeps on, and the warm stop a signal asks for
    backoff.py   the one exponential back-off
    deadline.py  the one way to run a call that may hang (a share) on a thread, with a deadline
    jsonl.py     the one JSON-lines reader (sidecars, history, notices), and their time stamp
    errors.py    an OSError in words

Nothing here imports any other room of the daemon.
"""
