"""The test harness: how the tests run storyreel and check what it made (tests/conftest.py
re-exports every name here, so tests import them `from conftest import ...`).

    world.py    the constants of a test run (REPO, SMALL settings, HANG_SECONDS), `story`,
                `write_config`, `storyreel` (one command to its end) and `wait_for`
    daemons.py  `Setup` (one daemon's world over temp folders) and `Daemon` (`storyreel run` as
                a real process, its JSON log parsed by `events()`)
    checks.py   what the contract promises of a published story, decoded and checked
    order.py    `make test`'s order: longest first, by the last run's durations
"""
