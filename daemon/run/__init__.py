"""The run room: making one story, from its claim to an outcome, and recording that outcome.

runner.py    `StoryRunner.run(claim) -> Outcome`: load, the poison rule, render, publish
outcome.py   the outcomes (Done, Failed, Halted, Waiting, GpuFatal) and `classify`, the one
             rule that turns what a run raised into one
recorder.py  `Recorder.record(claim, outcome)`: the ledger moves each outcome makes
poison.py    the poison-story rule: a story that keeps killing the process is given up
events.py    `StatusEvents`: render events -> status lines, systemd pings, the loop's turn
"""
