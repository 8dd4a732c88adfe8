"""The command line as users and scripts call it."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, count_frames, read_frames, storyreel, write_config


def test_validate_good_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"scenes": ["a", {"description": "b", "motion": "pan_left"}]}))
    ok = storyreel("validate", str(good))
    assert ok.returncode == 0 and "valid, 2 scenes" in ok.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scenes": [{"description": "x", "seed": -1, "motoin": "zoom_in"}]}))
    out = storyreel("validate", str(bad))
    assert out.returncode == 1
    assert "scenes.0.seed" in out.stderr and "scenes.0.motoin" in out.stderr
    assert out.stdout == ""  # the result on stdout, the problems on stderr: each said once
    missing = storyreel("validate", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_schema_is_json_schema() -> None:
    out = storyreel("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/") and "scenes" in schema["required"]


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", {"image": {"widht": 5}})
    out = storyreel("run", "--once", "--config", str(cfg))
    assert out.returncode == 2 and "image.widht: unknown key" in out.stderr


def test_config_from_environment_then_cwd(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "elsewhere.toml", {"limits": {"max_scenes": 1}})
    story = tmp_path / "two.json"
    story.write_text(json.dumps({"scenes": ["a", "b"]}))
    assert storyreel("validate", str(story), cwd=tmp_path).returncode == 0
    via_env = storyreel("validate", str(story), cwd=tmp_path, env={"STORYREEL_CONFIG": str(cfg)})
    assert via_env.returncode == 1 and "limit of 1" in via_env.stderr
    write_config(tmp_path / "config.toml", {"limits": {"max_scenes": 1}})
    assert storyreel("validate", str(story), cwd=tmp_path).returncode == 1


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "paths": {"inbox": "in", "outbox": "out", "state": "state", "create": True},
            "model": {"source": "nobody/no-such-model", "device": "cpu"},
        },
    )
    out = storyreel("run", "--once", "--config", str(cfg), env={"HF_HOME": str(tmp_path / "hf")}, cold=True)
    assert out.returncode == 2
    assert "nobody/no-such-model" in out.stderr and str(tmp_path / "hf") in out.stderr
    assert "Traceback" not in out.stderr


def test_animate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out.mp4"
    res = storyreel("animate", str(img), str(out), "--seconds", "1.5", "--fps", "12", "--motion", "zoom_out")
    assert res.returncode == 0, res.stderr
    assert count_frames(out) == 18
    size, frames = read_frames(out)
    assert size == (128, 96)
    assert frames[0].mean() < frames[9].mean()  # fades in from black
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nope.png", "out.mp4"], "nope.png: no such file"),
        (["not-an-image.png", "out.mp4"], "not-an-image.png: not an image"),
        (["in.png", "no-such-folder/out.mp4"], "no-such-folder: no such folder"),
        (["in.png", "out.mp4", "--seconds", "0"], "--seconds 0"),
        (["in.png", "out.mp4", "--fps", "0"], "--fps 0"),
        (["in.png", "out.mp4", "--width", "101"], "--width 101: must be even"),
        (["in.png", "out.mp4", "--height", "0"], "--height 0"),
        (["odd.png", "out.mp4"], "odd.png: 1x1"),
        (["in.png", "out.gif"], "out.gif: animate writes an MP4"),
    ],
)
def test_animate_everyday_mistakes_get_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp_path / "in.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "odd.png")
    (tmp_path / "not-an-image.png").write_text("hello\n")
    before = set(tmp_path.iterdir())
    res = storyreel("animate", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == "" and set(tmp_path.iterdir()) == before  # nothing written, not even a temp file


def test_validate_reports_each_file_once(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"scenes": ["one"]}))
    (tmp_path / "b.json").write_text(json.dumps({"scenes": [{"description": "x", "seconds": "5"}]}))
    (tmp_path / "c.json").write_text(json.dumps({"scenes": ["one", "two"]}))
    out = storyreel("validate", "a.json", "b.json", "missing.json", "c.json", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["a.json: valid, 1 scene", "c.json: valid, 2 scenes"]
    problems = out.stderr.splitlines()
    assert problems[0].startswith("b.json: scenes.0.seconds (scene 1): ") and '"5"' in problems[0]
    assert problems[1].startswith("missing.json: cannot read") and len(problems) == 2, out.stderr
    ok = storyreel("validate", "a.json", "c.json", cwd=tmp_path)
    assert (ok.returncode, ok.stderr) == (0, "")
    usage = storyreel("validate", cwd=tmp_path)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1, usage.stderr


def _as_someone_else() -> list[str] | None:
    """A command prefix that runs this Python as an unprivileged user (root reads everything)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # It must also read this checkout: a clone in a 0700 folder (as `mktemp -d` makes) is root's alone.
    works = subprocess.run(
        [*prefix, sys.executable, "-c", "import daemon.cli"], cwd=REPO, capture_output=True, timeout=60
    )
    return prefix if works.returncode == 0 else None


def test_status_names_the_group_to_join_when_the_state_is_closed() -> None:
    prefix = _as_someone_else()
    if prefix is None:
        pytest.skip("running as root, and nobody cannot run this Python or read this checkout (setpriv)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        lib = root / "lib"  # like /var/lib/storyreel: StateDirectoryMode=0750, the service's group
        (lib / "state" / "spool" / "queue").mkdir(parents=True)
        cfg = write_config(root / "c.toml", {"paths": {"inbox": "in", "outbox": "out", "state": "lib/state"}})
        cfg.chmod(0o644)
        if prefix:  # like Group=storyreel: a group that is neither root's nor the user's
            os.chown(lib, 0, next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, 65534)))
        lib.chmod(0o750 if prefix else 0o000)
        try:
            res = subprocess.run(
                [*prefix, sys.executable, "-m", "daemon.cli", "status", "--config", str(cfg)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            lib.chmod(0o750)
        group = grp.getgrgid(lib.stat().st_gid).gr_name
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"cannot read {lib}: permission denied" in res.stderr
    assert f"usermod -aG {group} " in res.stderr and res.stdout == ""


def test_report_commands_are_quiet_when_the_reader_goes_away(tmp_path: Path) -> None:
    """`storyreel status | head`: the Python docs' rule for SIGPIPE, no traceback."""
    cfg = write_config(tmp_path / "c.toml", {"paths": {"state": "state"}})
    (tmp_path / "state" / "spool" / "queue").mkdir(parents=True)
    for args in (["status", "--config", str(cfg)], ["schema"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write: deterministic EPIPE
        try:
            res = subprocess.run(
                [sys.executable, "-m", "daemon.cli", *args],
                cwd=REPO,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(write_end)
        assert (res.returncode, res.stderr) == (1, ""), (args, res.stderr)


def test_version_and_help_say_what_they_should(tmp_path: Path) -> None:
    version = storyreel("--version")
    assert (version.returncode, version.stdout) == (0, f"storyreel {metadata.version('storyreel')}\n")
    run_help = storyreel("run", "--help").stdout
    verbose = " ".join(run_help[run_help.index("-v, --verbose") :].split()[:4])
    assert verbose.startswith("-v, --verbose log ")  # the option has words of its own
    builtin = storyreel("animate", "--help", cwd=tmp_path).stdout
    assert "(default: 5.0, video.seconds_per_scene" in " ".join(builtin.split())
    assert "(default: 24, video.fps" in " ".join(builtin.split())
    cfg = write_config(tmp_path / "c.toml", {"video": {"seconds_per_scene": 3.5, "fps": 12}})
    configured = " ".join(storyreel("animate", "--config", str(cfg), "--help").stdout.split())
    assert (
        "(default: 3.5, video.seconds_per_scene in" in configured
        and "(default: 12, video.fps in" in configured
    )


def _readme_download_command() -> str:
    text = (REPO / "README.md").read_text("utf-8")
    start = text.index("HF_HOME=", text.index("hf download") - 200)
    end = text.index("```", start)
    return " ".join(text[start:end].replace("\\\n", " ").split())


def test_missing_model_message_is_said_once_with_the_readmes_command(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "paths": {"inbox": "in", "outbox": "out", "state": "state", "create": True},
            "model": {"device": "cpu"},
        },
    )
    hf = tmp_path / "hf"
    out = storyreel("run", "--once", "--config", str(cfg), env={"HF_HOME": str(hf)}, cold=True)
    assert out.returncode == 2 and out.stderr.count("hf download") == 1, out.stderr
    readme = _readme_download_command().replace("/var/lib/storyreel/hf", str(hf))
    # Off a terminal (journald, a file): one JSON log line, like every other line the daemon writes.
    [event] = [json.loads(line) for line in out.stderr.splitlines() if "hf download" in line]
    assert event["event"] == "cannot start" and event["level"] == "error"
    [command] = [line for line in event["error"].splitlines() if "hf download" in line]
    assert " ".join(command.split()) == readme
    # On a terminal (even one started by a systemd user session, which sets JOURNAL_STREAM): once, as text.
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--once", "--config", str(cfg)],
        cwd=REPO,
        env={**os.environ, "HF_HOME": str(hf), "JOURNAL_STREAM": "8:12345"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    assert proc.wait(120) == 2
    text = shown.decode("utf-8", "replace")
    assert text.count("hf download") == 1, text
    [command] = [line for line in text.splitlines() if "hf download" in line]
    assert " ".join(command.split()) == readme  # plain text, not a log record


def test_readme_examples_are_what_the_commands_print(tmp_path: Path) -> None:
    """Every `$ command` in the README's console blocks, run in a folder like the repository's."""
    text = (REPO / "README.md").read_text("utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```console\n")[1:]]
    assert blocks, "the README has no console examples"
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    Image.new("RGB", (640, 480), (120, 90, 60)).save(tmp_path / "photo.png")
    bin_dir = Path(sys.executable).parent  # where `storyreel` is installed
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("STORYREEL_CONFIG", None)
    for block in blocks:
        for step in block.split("$ ")[1:]:
            command, *expected = step.rstrip("\n").split("\n")
            res = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert (res.stdout + res.stderr).splitlines() == expected, command


def test_a_dnxhr_master_smaller_than_its_encoder_allows_is_a_config_error(tmp_path: Path) -> None:
    """Said at start with the key and the way out, not by the first scene of every story."""
    small = {"image": {"width": 128, "height": 128}, "outputs": {"timeline": True, "master_codec": "dnxhr"}}
    out = storyreel("run", "--once", "--config", str(write_config(tmp_path / "c.toml", small)))
    assert out.returncode == 2 and "outputs.master_codec" in out.stderr and "256x120" in out.stderr, (
        out.stderr
    )
    assert "Traceback" not in out.stderr
    big = {**small, "video": {"width": 256, "height": 144}}  # the clips' size is what counts
    (tmp_path / "x.json").write_text(json.dumps({"scenes": ["a"]}))
    fine = storyreel(
        "validate", str(tmp_path / "x.json"), "--config", str(write_config(tmp_path / "d.toml", big))
    )
    assert fine.returncode == 0, fine.stderr
