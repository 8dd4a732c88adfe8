"""IP-Adapter through diffusers' own loader, on a random-weight adapter in h94/IP-Adapter's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pipeline.images.consistency import tiny_adapter
from pipeline.images.consistency.attention import SharedAttention
from pipeline.images.consistency.ip_adapter import IpAdapter, IpAdapterError, load_ip_adapter
from pipeline.images.consistency.record import initial_noise, latent_shape
from pipeline.images.consistency.tiny_adapter import ENCODER, WEIGHTS, build_tiny_ip_adapter
from pipeline.settings import ConfigError, require_named_files, settings_from_dict

from characters import CPU, GUIDANCE, STEPS, H, W, broken_adapter, load_tiny, max_diff, portrait, scene, text

HARBOUR = "a harbour at dawn, fishing boats, gulls"


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((H, W, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("ipa") / "IP-Adapter", load_tiny(tiny_dir).unet)


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path, adapter_dir: Path) -> tuple[Any, IpAdapter]:
    pipe = load_tiny(tiny_dir)
    return pipe, load_ip_adapter(pipe, adapter_dir, WEIGHTS, ENCODER, scale=0.6)


def test_the_tiny_adapter_is_in_the_published_layout(adapter_dir: Path, tiny_dir: Path) -> None:
    assert (adapter_dir / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors").is_file()
    config = json.loads((adapter_dir / "models" / "image_encoder" / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModelWithProjection"]
    with safe_open(str(adapter_dir / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    # The original Resampler's names (diffusers renames them on load), one pair per cross-attention.
    assert {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.layers.0.0.to_kv.weight"} <= keys
    assert {
        "image_proj.layers.3.1.3.weight",
        "ip_adapter.1.to_k_ip.weight",
        "ip_adapter.1.to_v_ip.weight",
    } <= keys
    cross = [n for n in load_tiny(tiny_dir).unet.attn_processors if n.endswith("attn2.processor")]
    assert sum(k.startswith("ip_adapter.") for k in keys) == 2 * len(cross)
    with pytest.raises(KeyError):
        tiny_adapter.original_key("layers.0.something_new.weight")  # a renamed diffusers key is loud


def test_loaded_by_diffusers_and_our_processors_go_on_after(loaded: tuple[Any, IpAdapter]) -> None:
    pipe, ip = loaded
    kinds = {type(p).__name__ for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")}
    assert kinds == {"IPAdapterAttnProcessor2_0"}
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert all(p.scale == [0.0] for p in ip._processors())  # not steering until a scene asks
    sa = SharedAttention(pipe.unet)
    try:
        kinds = {
            type(p).__name__ for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")
        }
        assert kinds == {"IPAdapterAttnProcessor2_0"}  # ours take attn1 of the up blocks only
    finally:
        sa.uninstall()


def test_installing_ours_first_is_undone_by_the_loader(tiny_dir: Path, adapter_dir: Path) -> None:
    """Why the order matters: the loader rebuilds every attn1 processor, and ours with it."""
    pipe = load_tiny(tiny_dir)
    sa = SharedAttention(pipe.unet)
    with pytest.raises(TypeError):  # it calls our class with no arguments
        load_ip_adapter(pipe, adapter_dir, WEIGHTS, ENCODER, scale=0.6)
    assert sa.installed()


def test_scale_zero_is_no_adapter_and_scale_above_zero_differs(
    tiny_dir: Path, loaded: tuple[Any, IpAdapter]
) -> None:
    pipe, ip = loaded
    cond = text(pipe, HARBOUR)
    without = scene(load_tiny(tiny_dir), None, cond, 11)
    assert torch.equal(scene(pipe, None, cond, 11, extra=ip.plain_kwargs(GUIDANCE)), without)
    embeds = [torch.from_numpy(ip.encode(picture(1)))]
    with ip.scaled(0.0):
        assert torch.equal(scene(pipe, None, cond, 11, extra={"ip_adapter_image_embeds": embeds}), without)
    with ip.scaled(0.6):
        steered = scene(pipe, None, cond, 11, extra={"ip_adapter_image_embeds": embeds})
    assert max_diff(steered, without) > 1e-2
    assert all(p.scale == [0.0] for p in ip._processors())  # back to 0 after


def test_embeddings_travel_and_equal_the_image_path(loaded: tuple[Any, IpAdapter]) -> None:
    pipe, ip = loaded
    cond = text(pipe, HARBOUR)
    a, b = picture(1), picture(2)
    ea, eb = ip.encode(a), ip.encode(b)
    assert isinstance(ea, np.ndarray) and ea.shape[:2] == (2, 1)  # negative, positive; one picture
    with ip.scaled(0.6):
        by_image = scene(pipe, None, cond, 11, extra={"ip_adapter_image": a})
        by_embeds = scene(pipe, None, cond, 11, extra={"ip_adapter_image_embeds": [torch.from_numpy(ea)]})
        both_images = scene(pipe, None, cond, 11, extra={"ip_adapter_image": [[a, b]]})
        joined = ip.scene_embeds([torch.from_numpy(ea), torch.from_numpy(eb)], 2)
        both_embeds = scene(pipe, None, cond, 11, extra={"ip_adapter_image_embeds": joined})
    assert torch.equal(by_image, by_embeds)
    # Two pictures encoded together or one by one: the same up to the encoder's batch arithmetic.
    assert max_diff(both_images, both_embeds) < 1e-5 and max_diff(both_embeds, by_embeds) > 1e-3


def test_references_with_the_adapter(tiny_dir: Path, loaded: tuple[Any, IpAdapter]) -> None:
    """Reference passes run at scale 0 (they replay the portrait), the scene at the adapter's scale."""
    pipe, ip = loaded
    outputs: list[tuple[str, torch.Tensor]] = []
    sa: SharedAttention | None = None

    def probe(_m: Any, _args: Any, out: Any) -> None:
        outputs.append((sa.state.mode if sa is not None else "portrait", out[0].clone()))

    hook = pipe.unet.register_forward_hook(probe)
    try:
        latents, ref = portrait(pipe, "Mara", "Mara, silver braid", seed=5, extra=ip.plain_kwargs(GUIDANCE))
        assert torch.equal(latents, portrait(load_tiny(tiny_dir), "Mara", "Mara, silver braid", seed=5)[0])
        ref = _with_embeds(ref, ip.encode(picture(1)))
        sa = SharedAttention(pipe.unet)
        cond = text(pipe, HARBOUR)
        both = scene(pipe, sa, cond, 11, [ref], ip=ip, stop_early=False)
        recorded = [y for mode, y in outputs if mode == "portrait"]
        passes = [y for mode, y in outputs if mode == "capture"]
        assert len(passes) == STEPS and all(torch.equal(a, b) for a, b in zip(recorded, passes, strict=True))
        hook.remove()
        plain = scene(pipe, sa, cond, 11, extra=ip.plain_kwargs(GUIDANCE))
        shared_only = scene(pipe, sa, cond, 11, [ref], ip=_AtZero(ip))
        assert torch.equal(both, scene(pipe, sa, cond, 11, [ref], ip=ip))
        assert max_diff(shared_only, plain) > 1e-2 and max_diff(both, shared_only) > 1e-2
        noop = scene(pipe, sa, text(pipe, "Mara, silver braid"), 5, [ref], ip=_AtZero(ip))
        assert max_diff(noop, latents) < 1e-4  # with the adapter loaded, self-reference is still a no-op
    finally:
        hook.remove()
        if sa is not None:
            sa.uninstall()


class _AtZero(IpAdapter):
    """The loaded adapter with its scale at 0: shared attention alone."""

    def __init__(self, ip: IpAdapter) -> None:
        super().__init__(ip.pipe, ip.files, 0.0)
        self._neutral = ip._neutral


def _with_embeds(ref: Any, embeds: np.ndarray) -> Any:
    from dataclasses import replace

    return replace(ref, image_embeds=embeds)


ERRORS = {
    "no folder": "no such folder",
    "no adapter file": f"no adapter file {WEIGHTS} (characters.ip_adapter_file)",
    "no encoder config": f"no image encoder at {ENCODER}",
    "no encoder weights": "has no .safetensors weights",
    "not an adapter": "could not be loaded into this model",
    "encoder does not fit": f"the image encoder {ENCODER} does not fit the adapter {WEIGHTS}",
}


@pytest.mark.parametrize("how", sorted(ERRORS))
def test_a_missing_or_mismatched_folder_is_named(
    tiny_dir: Path, adapter_dir: Path, tmp_path: Path, how: str
) -> None:
    folder = broken_adapter(adapter_dir, tmp_path, how)
    with pytest.raises(IpAdapterError) as err:
        load_ip_adapter(load_tiny(tiny_dir), folder, WEIGHTS, ENCODER, scale=0.6)
    message = str(err.value)
    assert message.startswith(f"characters.ip_adapter: {folder}: ") and ERRORS[how] in message, message
    assert "\n" not in message


def test_the_config_check_names_the_key(adapter_dir: Path, tmp_path: Path) -> None:
    good = settings_from_dict({"characters": {"ip_adapter": str(adapter_dir)}}, tmp_path)
    require_named_files(good)  # the tiny adapter passes
    assert good.characters.ip_adapter_scale == 0.6 and good.characters.ip_adapter_file == WEIGHTS
    for chars, needle in (
        ({"ip_adapter_file": "sdxl_models/ip-adapter_sdxl.safetensors"}, "no adapter file"),
        (
            {"ip_adapter_encoder": "sdxl_models/image_encoder"},
            "no image encoder at sdxl_models/image_encoder",
        ),
        ({"ip_adapter_file": "../elsewhere.safetensors"}, "characters.ip_adapter_file: '../elsewhere"),
    ):
        s = settings_from_dict({"characters": {"ip_adapter": str(adapter_dir), **chars}}, tmp_path)
        with pytest.raises(ConfigError) as err:
            require_named_files(s)
        assert str(err.value).startswith("characters.ip_adapter") and needle in str(err.value), err.value
    with pytest.raises(ConfigError, match="ip_adapter_scale"):
        settings_from_dict({"characters": {"ip_adapter_scale": -1}}, tmp_path)


def test_guidance_off_takes_the_positive_half(loaded: tuple[Any, IpAdapter]) -> None:
    pipe, ip = loaded
    e = torch.from_numpy(ip.encode(picture(1)))
    assert ip.scene_embeds([e], 1)[0].shape[0] == 1 and ip.neutral(1)[0].shape[0] == 1
    noise = initial_noise(3, latent_shape(pipe, W, H), torch.float32, CPU)
    with torch.no_grad(), ip.scaled(0.6):
        out = pipe(
            **text(pipe, HARBOUR).pipe_kwargs(),
            latents=noise,
            width=W,
            height=H,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            ip_adapter_image_embeds=ip.scene_embeds([e], 1),
            output_type="latent",
        ).images
    assert torch.isfinite(out).all()
