"""The tiny SDXL-architecture model: built deterministically, saved atomically, loaded like real weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.images.device import DeviceOps
from pipeline.images.model import load_pipeline
from pipeline.images.tiny import build_tiny_pipeline, byte_level_tokenizer
from pipeline.settings import settings_from_dict


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> Any:
    return StableDiffusionXLPipeline.from_pretrained(
        tiny_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_it_is_small_and_nothing_is_left_beside_it(tiny_dir: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size < 10 << 20
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny"]
    assert sorted(p.name for p in tiny_dir.rglob("*.safetensors")) == [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "model.safetensors",
    ]


def test_loads_as_a_real_sdxl_pipeline(loaded: Any) -> None:
    p = loaded
    kinds = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": EulerDiscreteScheduler,
    }
    assert {name: type(getattr(p, name)) for name in kinds} == kinds
    assert p.vae_scale_factor == 8 and p.vae.config.scaling_factor == 0.13025
    hidden = p.text_encoder.config.hidden_size + p.text_encoder_2.config.hidden_size
    assert p.unet.config.cross_attention_dim == hidden
    assert p.unet.config.addition_embed_type == "text_time"
    expected = p.text_encoder_2.config.projection_dim + 6 * p.unet.config.addition_time_embed_dim
    assert p.unet.config.projection_class_embeddings_input_dim == expected
    sched = p.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.steps_offset, sched.timestep_spacing) == (1, "leading")


def test_tokenizer_round_trips_through_disk(loaded: Any) -> None:
    text = 'A café (at night), 3 ships + "quotes" — naïve!'
    fresh = byte_level_tokenizer()
    for tok in (loaded.tokenizer, loaded.tokenizer_2):
        ids = tok(text)["input_ids"]
        assert ids == fresh(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1]  # every byte has a token
        assert tok.model_max_length == 77
        decoded = tok.decode(ids, skip_special_tokens=True)  # CLIP lowercases and spaces out punctuation
        assert decoded.split() and "".join(decoded.split()) == "".join(text.lower().split())
        assert len(tok) <= loaded.text_encoder.config.vocab_size


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    state = torch.random.get_rng_state()
    build_tiny_pipeline(again)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert digests(again) == digests(tiny_dir)


@pytest.mark.slow  # builds a tiny model of its own
def test_a_crash_mid_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Any, path: Path, **kwargs: object) -> None:
        (Path(path) / "unet").mkdir(parents=True)
        (Path(path) / "unet" / "half.safetensors").write_bytes(b"x")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(StableDiffusionXLPipeline, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_pipeline(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_a_dead_builders_leftovers_are_swept(tiny_dir: Path, tmp_path: Path) -> None:
    dead = tmp_path / ".tiny.999999999.abcd1234.building"  # no such pid
    live = tmp_path / f".tiny.{os.getpid()}.abcd1234.building"
    for d in (dead, live):
        (d / "unet").mkdir(parents=True)
    build_tiny_pipeline(tmp_path / "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "tiny"])


def test_losing_the_race_keeps_the_winner(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    target = tmp_path / "tiny"
    shutil.copytree(tiny_dir, target)
    build_tiny_pipeline(target)  # another process finished first: no error, no leftovers
    assert digests(target) == digests(tiny_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


@pytest.mark.slow  # builds a tiny model of its own
def test_source_tiny_is_built_on_first_load(tmp_path: Path) -> None:
    settings = settings_from_dict({"model": {"source": "tiny", "device": "cpu"}}, tmp_path)
    assert not settings.tiny_dir.exists()
    pipe = load_pipeline(settings, DeviceOps("cpu"))
    assert (settings.tiny_dir / "model_index.json").is_file()
    assert isinstance(pipe, StableDiffusionXLPipeline)


def test_small_image_comes_out_at_the_right_size(loaded: Any) -> None:
    """Speed is kept by size (~0.1 s for 256×192×2 steps on 2 idle cores), not asserted: timings flake."""
    parts = (loaded.unet, loaded.vae, loaded.text_encoder, loaded.text_encoder_2)
    assert sum(p.numel() for m in parts for p in m.parameters()) < 2_000_000
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a cat", width=256, height=192, num_inference_steps=2).images[0]
    assert image.size == (256, 192)
