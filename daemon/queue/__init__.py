"""The queue room: the truth about every story, and the rules that move it.

spool.py        the crash-safe queue on local disk (Maildir-style claims, history, endings)
claim.py        one claim and what its folder holds
states.py       the story states, one enum
ledger.py       the one transition function: status lines, history, endings, hooks
activity.py     what the daemon is doing: current.json and systemd's STATUS=
sidecar.py      outbox/NAME.status.jsonl    current.py  state/current.json
notices.py      controls that changed nothing, for `storyreel status`
history.py      state/history.jsonl: totals and compaction
stories.py      a claim's bytes back into a Story
claiming.py     settled drops into the spool, in arrival order, under a free name
controls.py     pause, cancel, retry: the files the commands and the share leave
steering.py     those controls applied, each turn
gate.py         what holds the queue: a share gone, back-off, an ending pending
maintenance.py  endings left pending, retention, compaction
retention.py    `[retention]`: what may go, and when
lookahead.py    the scenes of the stories queued behind, for idle image workers
"""
