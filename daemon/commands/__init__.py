"""The box's commands besides `run` (daemon/cli.py reads argv and the environment, then calls them).

box.py      status, pause, resume, cancel, retry: read the daemon's state, leave requests
animate.py  one Ken Burns clip, every input checked before a frame is made
usage.py    the mistakes a user can fix: one line, exit 2
"""
