"""Finishing is deterministic and does what it says; config errors name the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.finishing import finish
from pipeline.settings import ConfigError, FinishSettings, Settings, load_settings, settings_from_dict


def gradient() -> Image.Image:
    x = np.linspace(0, 255, 96, dtype=np.float32)
    arr = np.dstack([np.tile(x, (64, 1))] * 3).astype(np.uint8)
    return Image.fromarray(arr)


def test_grain_is_seeded() -> None:
    s = FinishSettings()
    a, b, c = finish(gradient(), 1, s), finish(gradient(), 1, s), finish(gradient(), 2, s)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_each_step_can_be_switched_off() -> None:
    off = FinishSettings(sharpen=0, contrast=1, brightness=1, grain=0)
    assert finish(gradient(), 1, off).tobytes() == gradient().tobytes()


def test_brightness_and_grain_change_the_image_as_configured() -> None:
    base = np.asarray(gradient(), dtype=np.float32)
    bright = np.asarray(finish(gradient(), 1, FinishSettings(sharpen=0, contrast=1, brightness=1.2, grain=0)))
    assert bright.mean() > base.mean() * 1.1
    grainy = np.asarray(finish(gradient(), 1, FinishSettings(sharpen=0, contrast=1, brightness=1, grain=8)))
    noise = grainy.astype(np.float32) - base
    assert 5 < noise[:, 10:-10].std() < 11
    assert np.allclose(noise[:, :, 0], noise[:, :, 1], atol=1)  # luminance grain, not colour noise


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[image]\nwidth = "wide"\nheigth = 3\n[video]\nfps = 24\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "image.width" in str(info.value) and "image.heigth: unknown key" in str(info.value)
    cfg.write_text('[paths]\ninbox = "in"\n')
    s = load_settings(cfg)
    assert s.paths.inbox == tmp_path / "in" and s.image.width == 1024
    cfg.write_text("[paths\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)


def test_shipped_config_is_the_defaults() -> None:
    shipped = load_settings(Path(__file__).resolve().parents[1] / "config.toml")
    defaults = Settings()
    for section in sorted(Settings.model_fields.keys() - {"paths"}):  # paths: made absolute
        assert getattr(shipped, section) == getattr(defaults, section), section
    assert shipped.paths.create is defaults.paths.create is False  # folders must exist unless asked


def test_folder_and_zip_cannot_both_be_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"outputs": {"folder": False, "zip": False}}, tmp_path)
    assert str(err.value).splitlines()[1] == (
        "  outputs: outputs.folder and outputs.zip are both false; at least one must be true"
    )
    config = {"outputs": {"folder": False}, "metrics": {"textfile": "m/s.prom"}}
    only_zip = settings_from_dict(config, tmp_path)
    assert only_zip.outputs.zip and only_zip.metrics.textfile == str(tmp_path / "m" / "s.prom")
    assert settings_from_dict({}, tmp_path).metrics.textfile == ""  # off by default
