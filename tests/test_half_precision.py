"""A GPU's default precision (fp16) run on the CPU: the path every GPU takes and no GPU has run here.

fp16 UNet and text encoders, compel's embeddings, the VAE upcast decision and its casts, the
NaN-to-fp32 decode retry, the OOM ladder, a daemon story end to end: all in fp16 on the CPU
(`model.dtype = "float16"`, or the fake GPU of tests/test_generate.py, whose other tests run in
fp16 too). The tiny VAE is made to overflow in fp16 on purpose (`tiny.overflow_in_fp16`), as
SDXL's trained VAE does, so the retry is seen saving a picture. What only a GPU can show is in
bench/README.md ("fp16 on the CPU").
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import LONG, FakeGpu, make_settings, req

from pipeline.images.device import DeviceOps
from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.tiny import build_tiny_pipeline

from conftest import Setup, check_published, read_frames, story

pytestmark = pytest.mark.slow  # the tiny model, built here with an overflowing VAE


@pytest.fixture(scope="session")
def overflowing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a VAE that overflows in fp16 and says it does not (force_upcast = false)."""
    path = tmp_path_factory.mktemp("models") / "tiny-overflowing"
    build_tiny_pipeline(path, vae_overflows_in_fp16=True)
    return path


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def watch_decodes(gen: SdxlGenerator) -> list[tuple[torch.dtype, bool]]:
    """Record each VAE decode's dtype and whether its output was finite."""
    vae = gen.pipe.vae  # type: ignore[union-attr]
    real = vae.decode
    seen: list[tuple[torch.dtype, bool]] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = real(latents, *args, **kwargs)
        seen.append((latents.dtype, bool(torch.isfinite(out[0]).all())))
        return out

    vae.decode = decode
    return seen


def test_the_setting_picks_the_precision() -> None:
    assert DeviceOps("cpu").dtype == torch.float32  # auto: fp16 is for CUDA
    assert DeviceOps("cpu", "float16").dtype == torch.float16
    assert DeviceOps("cpu", "float32").dtype == torch.float32


def test_an_fp16_overflow_is_decoded_again_in_fp32(overflowing_dir: Path) -> None:
    gen = SdxlGenerator(make_settings(overflowing_dir), device=FakeGpu())
    assert gen.describe()["vae_dtype"] == "float16"  # auto trusts the config's force_upcast = false
    seen = watch_decodes(gen)
    out = gen.generate(req())
    assert seen == [(torch.float16, False), (torch.float32, True)]  # NaN in fp16, a picture in fp32
    assert out.info["vae_nan_fp32_retry"] is True and out.info["vae_dtype"] == "float16"
    pixels = np.asarray(out.image, dtype=np.float64)
    assert pixels.std() > 10  # a NaN decode is a black (uniform) frame
    # The retry is an fp32 decode like any other: the picture vae_upcast = "on" makes, to the byte.
    upcast = SdxlGenerator(make_settings(overflowing_dir, vae_upcast="on"), device=FakeGpu())
    assert upcast.describe()["vae_dtype"] == "float32"
    fp32 = upcast.generate(req())
    assert fp32.info["vae_nan_fp32_retry"] is False and png(fp32.image) == png(out.image)
    # Per image: the next one is tried in fp16 again (its picture must not depend on the last).
    seen.clear()
    gen.generate(req(seed=8))
    assert [dtype for dtype, _ in seen] == [torch.float16, torch.float32]
    assert gen.pipe.vae.dtype == torch.float16  # type: ignore[union-attr]


def test_an_fp16_safe_vae_is_not_retried(tiny_dir: Path) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir, vae_upcast="off"), device=FakeGpu())
    seen = watch_decodes(gen)
    out = gen.generate(req(LONG))
    assert seen == [(torch.float16, True)] and out.info["vae_nan_fp32_retry"] is False
    assert out.info["dtype"] == "float16" and out.info["conditioning_tokens"] > 77


# -- a daemon story, end to end, in fp16 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory, overflowing_dir: Path) -> Iterator[tuple[Setup, Any]]:
    """One `storyreel run --once` in fp16 on the CPU over the overflowing VAE, the first two
    denoising attempts failing out of memory (tests/faulty.py): the ladder climbs in fp16."""
    s = Setup(
        tmp_path_factory.mktemp("fp16-daemon"),
        overflowing_dir,
        model={"dtype": "float16"},
        finish={"grain": 0.0},  # so that a black (NaN) frame stays black
    )
    doc = story(2, "fp16")
    doc["scenes"] = [LONG + " a quiet harbour", "a lighthouse at dusk"]  # two 77-token chunks and more
    s.drop("fp16.json", doc)
    result = s.run_once(faults={"oom": 2})
    yield s, result


def test_an_fp16_story_is_made_end_to_end(fp16_run: tuple[Setup, Any]) -> None:
    s, result = fp16_run
    assert result.returncode == 0, result.stderr
    manifest = check_published(s, "fp16", 2)
    first, second = (scene["generation"] for scene in manifest["scenes"])
    for gen in (first, second):
        assert gen["dtype"] == "float16" and gen["vae_dtype"] == "float16"
        assert gen["vae_nan_fp32_retry"] is True  # the overflowing VAE, saved by the retry
    assert first["conditioning_tokens"] > 2 * 77 and first["prompt_tokens_dropped"] == 0
    assert first["oom_retries"] == 2
    assert first["memory_savers"] == ["attention_slicing", "vae_slicing", "vae_tiling"]
    assert second["oom_retries"] == 0 and second["memory_savers"] == []
    for i in (1, 2):  # a NaN decode is a black frame, in the picture and in every frame of its clip
        with Image.open(s.outbox / "fp16" / "images" / f"scene_{i:03d}.png") as img:
            picture = np.asarray(img.convert("RGB"), dtype=np.float64)
        assert picture.std() > 10
        _, frames = read_frames(s.outbox / "fp16" / "clips" / f"scene_{i:03d}.mp4")
        middle = frames[len(frames) // 2]  # past any fade from black at a clip's ends
        assert middle.std() > 10 and abs(middle.mean() - picture.mean()) < 16  # it moves over this picture


def test_an_fp16_daemon_logs_only_json_lines(fp16_run: tuple[Setup, Any]) -> None:
    """journalctl shows the daemon's JSON events; a library's warnings must not come out raw."""
    _, result = fp16_run
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    raw = [line for line in lines if not line.startswith("{")]
    assert lines and not raw, raw[:5]
    assert all(isinstance(json.loads(line), dict) for line in lines)
