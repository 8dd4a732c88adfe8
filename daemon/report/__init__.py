"""The report room: what people see of the daemon. It only reads the queue's truth.

snapshot.py  one look at the daemon (current.json or the daemon's own view, the claims,
             history): every report below is rendered from one `Snapshot`
status.py    `storyreel status`, in words
overview.py  the page's view of a snapshot; page.py renders it as outbox/index.html
             (templates/), with thumbnails under outbox/.storyreel/
metrics.py   the Prometheus textfile
writer.py    `ReportWriter`: the ledger's listener, writing the page and metrics when
             something changed, at most every few seconds
"""
