"""The command line as users and scripts call it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import count_frames, read_frames, storyreel, write_config


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
    assert out.stdout == out.stderr  # captured apart, the report goes to both; on a terminal, once
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
    out = storyreel("run", "--once", "--config", str(cfg), env={"HF_HOME": str(tmp_path / "hf")})
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
