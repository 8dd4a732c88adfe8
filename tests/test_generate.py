"""The image seam on CPU with the tiny model; GPU-only behaviour through a fake DeviceOps and injected faults.

None of this runs CUDA: OOM, sticky errors, VRAM-based choices and offload are simulated at
the seams a real GPU failure would come through (the pipeline call, DeviceOps). The fake GPU
computes in a GPU's default precision, fp16, on the CPU, so everything it runs (the OOM ladder,
the auto choices) runs the fp16 path; the plain tests run on both, the CPU's fp32 and the fake
GPU's fp16 (tests/test_half_precision.py has the fp16-only cases).
"""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from pipeline.errors import GpuFatalError, ModelNotFound, SceneOutOfMemory
from pipeline.images.device import GIB, DeviceOps
from pipeline.images.memory import is_sticky_cuda_error
from pipeline.images.model import pick_variant
from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.sdxl_load import configure_allocator, vae_upcast_decision
from pipeline.images.seam import SceneRequest
from pipeline.settings import Settings, settings_from_dict

W, H, STEPS = 64, 48, 2  # small: no test here is about the size itself
LONG = " ".join(f"word{i % 10}" for i in range(150))  # ~900 byte-level tokens: far past 77


def make_settings(tiny: Path, **image: Any) -> Settings:
    return settings_from_dict(
        {
            "model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny), "warmup": False},
            "image": {"width": W, "height": H, "steps": STEPS, **image},
        },
        tiny.parent,
    )


@pytest.fixture(scope="session", params=["cpu", "fake-gpu"])
def generator(request: pytest.FixtureRequest, tiny_dir: Path) -> Iterator[SdxlGenerator]:
    """The CPU as it is (fp32), and the fake GPU (fp16 on the CPU, as a GPU runs by default)."""
    device = DeviceOps("cpu") if request.param == "cpu" else FakeGpu()
    gen = SdxlGenerator(make_settings(tiny_dir), device=device)
    yield gen
    gen.close()


def dtype_name(gen: SdxlGenerator) -> str:
    return str(gen.device.dtype).removeprefix("torch.")


def req(
    prompt: str = "a lighthouse at dusk", seed: int = 7, negative: str = "blurry", **kw: Any
) -> SceneRequest:
    return SceneRequest(
        prompt=prompt,
        negative=negative,
        seed=seed,
        width=kw.get("width", W),
        height=kw.get("height", H),
        steps=kw.get("steps", STEPS),
        guidance=kw.get("guidance", 6.0),
    )


def png(gen: SdxlGenerator, r: SceneRequest) -> bytes:
    buf = io.BytesIO()
    gen.generate(r).image.save(buf, format="PNG")
    return buf.getvalue()


class FakeGpu(DeviceOps):
    """A "GPU" that computes on the CPU in a GPU's precision: reports VRAM, counts cache flushes,
    records offload."""

    def __init__(self, total: int = 80 * GIB, dtype: torch.dtype = torch.float16) -> None:
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.total = total
        self.calls: list[str] = []

    @property
    def name(self) -> str:
        return "fake-gpu"

    @property
    def has_own_memory(self) -> bool:
        return True

    def total_memory_bytes(self) -> int | None:
        return self.total

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")

    def peak_memory_bytes(self) -> int | None:
        return 123

    def supports_offload(self) -> bool:
        return True

    def enable_offload(self, pipe: Any) -> None:
        self.calls.append("offload_on")

    def disable_offload(self, pipe: Any) -> None:
        self.calls.append("offload_off")


def pipe_state(pipe: Any) -> dict[str, Any]:
    return {
        "attention": type(next(iter(pipe.unet.attn_processors.values()))).__name__,
        "vae_slicing": pipe.vae.use_slicing,
        "vae_tiling": pipe.vae.use_tiling,
    }


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[int], BaseException | None]], list[dict]]:
    """Make the pipeline call fail as `fault(n)` says on its n-th call; returns the state seen per call."""

    def arm(fault: Callable[[int], BaseException | None]) -> list[dict]:
        seen: list[dict] = []
        calls = iter(range(1, 1 << 30))
        real = StableDiffusionXLPipeline.__call__

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(pipe_state(self))
            err = fault(next(calls))
            if err is not None:
                raise err
            return real(self, *args, **kwargs)

        monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
        return seen

    return arm


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


# -- plain generation ------------------------------------------------------------------------------------
def test_image_has_the_requested_size_and_a_full_record(generator: SdxlGenerator) -> None:
    out = generator.generate(req())
    assert out.image.size == (W, H) and out.image.mode == "RGB"
    assert set(out.timings) == {"encode", "denoise", "decode", "total"}
    assert all(v >= 0 for v in out.timings.values())
    info = out.info
    assert (
        info["dtype"] == dtype_name(generator)
        and info["device"] == generator.device.name
        and info["scheduler"] == "EulerDiscreteScheduler"
    )
    assert info["memory_savers"] == [] and info["oom_retries"] == 0
    assert info["long_prompt_encoding"] is True and info["prompt_tokens"] > 0
    import json

    json.dumps(info)  # goes into the manifest as is


def test_same_request_gives_byte_identical_png_and_seeds_differ(generator: SdxlGenerator) -> None:
    a, b = png(generator, req(seed=11)), png(generator, req(seed=11))
    assert a == b
    assert png(generator, req(seed=12)) != a


def test_seed_fixes_the_starting_noise_on_the_cpu(generator: SdxlGenerator) -> None:
    x = generator.initial_latents(req(seed=3))
    g = torch.Generator().manual_seed(3)
    expected = torch.randn((1, 4, H // 8, W // 8), generator=g, dtype=torch.float32)
    assert x.dtype == generator.device.dtype  # drawn in fp32, then cast: the same noise in either precision
    assert torch.equal(x.cpu(), expected.to(x.dtype))


def test_on_step_is_called_every_step_from_the_calling_thread(generator: SdxlGenerator) -> None:
    calls: list[tuple[int, int, int]] = []
    generator.generate(req(steps=3), on_step=lambda i, n: calls.append((i, n, threading.get_ident())))
    assert [(i, n) for i, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert {t for *_, t in calls} == {threading.get_ident()}


def test_requests_and_results_cross_a_process_boundary(generator: SdxlGenerator) -> None:
    r = req()
    assert pickle.loads(pickle.dumps(r)) == r
    out = pickle.loads(pickle.dumps(generator.generate(r)))
    assert out.image.size == (W, H)


def test_describe_names_model_device_and_choices(generator: SdxlGenerator) -> None:
    d = generator.describe()
    assert d["model"] == "tiny" and d["device"] == generator.device.name
    assert d["dtype"] == dtype_name(generator)
    assert d["scheduler"] == "EulerDiscreteScheduler" and d["attention"] == "AttnProcessor2_0"
    assert d["compile"] is False and d["channels_last"] is False and d["fuse_qkv"] is False


# -- prompts ---------------------------------------------------------------------------------------------
def test_long_prompt_is_encoded_whole(generator: SdxlGenerator) -> None:
    out = generator.generate(req(LONG + " red"))
    info = out.info
    assert info["prompt_tokens"] > 3 * info["token_limit"]
    assert info["prompt_tokens_dropped"] == 0
    assert info["conditioning_tokens"] > 77 and info["conditioning_tokens"] % 77 == 0
    # The words past the 77-token window still change the picture.
    assert png(generator, req(LONG + " red")) != png(generator, req(LONG + " blue"))


def test_without_long_prompts_the_cut_is_reported(tiny_dir: Path) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir, long_prompts=False))
    out = gen.generate(req(LONG + " red"))
    assert out.info["long_prompt_encoding"] is False
    assert out.info["prompt_tokens_dropped"] == out.info["prompt_tokens"] - 75 > 0
    assert out.info["conditioning_tokens"] == 77
    assert png(gen, req(LONG + " red")) == png(gen, req(LONG + " blue"))  # truncated: the tail is lost


def test_prompt_syntax_characters_are_taken_literally(generator: SdxlGenerator) -> None:
    """compel would read "(cat)1.5" as a weight; the text must reach the encoder exactly as written."""
    assert generator.pipe is not None and generator.prompts.long is not None
    text = 'a (cat)1.5 with [dog]++ and "quotes" \\(escaped\\) .and() - end'
    cpu = torch.device("cpu")
    with torch.no_grad():
        literal, _, pooled, _ = generator.pipe.encode_prompt(prompt=text, device=cpu, negative_prompt=None)
        ours, our_pooled = generator.prompts.long.encode(text, cpu)
    assert torch.equal(ours, literal) and torch.equal(our_pooled, pooled)


def test_prompt_and_negative_of_different_lengths_are_padded_to_match(generator: SdxlGenerator) -> None:
    cond = generator.prompts.encode(req(prompt="short", negative=LONG))
    assert cond.prompt_embeds.shape == cond.negative_embeds.shape
    assert cond.prompt_embeds.shape[1] > 77
    empty = generator.prompts.long.empty_chunk(torch.device("cpu"))  # type: ignore[union-attr]
    assert torch.equal(cond.prompt_embeds[:, 77:154], empty)


def test_empty_negative_is_zeros_in_both_encodings(tiny_dir: Path, generator: SdxlGenerator) -> None:
    plain = SdxlGenerator(make_settings(tiny_dir, long_prompts=False))
    for gen in (generator, plain):
        cond = gen.prompts.encode(req(negative=""))
        assert not cond.negative_embeds.any() and not cond.negative_pooled.any()


# -- memory: auto choices, OOM ladder, sticky errors -------------------------------------------------------
@pytest.mark.parametrize(("total", "expected"), [(8 * GIB, True), (80 * GIB, False)])
def test_auto_memory_savers_follow_vram(tiny_dir: Path, total: int, expected: bool) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir), device=FakeGpu(total))
    assert gen.describe()["memory_savers"] == (["attention_slicing", "vae_slicing"] if expected else [])
    assert gen.generate(req()).image.size == (W, H)


def test_explicit_memory_settings_win(tiny_dir: Path) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir, attention_slicing="on", vae_slicing="off"))
    assert gen.describe()["memory_savers"] == ["attention_slicing"]
    assert gen.generate(req()).info["attention"] == "SlicedAttnProcessor"


def test_oom_is_retried_with_slicing_then_settings_return_to_normal(tiny_dir: Path, inject: Any) -> None:
    fake = FakeGpu()
    gen = SdxlGenerator(make_settings(tiny_dir), device=fake)
    expected = png(gen, req())
    seen = inject(lambda n: oom() if n == 1 else None)
    fake.calls.clear()
    out = gen.generate(req())
    assert [s["attention"] for s in seen] == ["AttnProcessor2_0", "SlicedAttnProcessor"]
    assert [s["vae_slicing"] for s in seen] == [False, True]
    assert out.info["oom_retries"] == 1 and "out of memory" in out.info["oom_errors"][0]
    assert out.info["memory_savers"] == ["attention_slicing", "vae_slicing"]
    assert fake.calls.count("empty_cache") >= 2  # after the failure and after the image
    seen.clear()
    after = gen.generate(req())
    assert seen == [{"attention": "AttnProcessor2_0", "vae_slicing": False, "vae_tiling": False}]
    assert after.info["memory_savers"] == [] and after.info["oom_retries"] == 0
    buf = io.BytesIO()
    after.image.save(buf, format="PNG")
    assert buf.getvalue() == expected  # back to exactly the normal settings


def test_every_rung_failing_is_scene_out_of_memory_and_next_scene_is_normal(
    tiny_dir: Path, inject: Any
) -> None:
    fake = FakeGpu()
    gen = SdxlGenerator(make_settings(tiny_dir), device=fake)
    seen = inject(lambda n: oom() if n <= 4 else None)
    with pytest.raises(SceneOutOfMemory, match="every memory saver"):
        gen.generate(req())
    assert len(seen) == 4
    assert seen[2]["vae_tiling"] and not seen[1]["vae_tiling"]
    assert "offload_on" in fake.calls and fake.calls.index("offload_off") > fake.calls.index("offload_on")
    out = gen.generate(req())
    assert seen[4] == {"attention": "AttnProcessor2_0", "vae_slicing": False, "vae_tiling": False}
    assert out.info["memory_savers"] == [] and out.image.size == (W, H)
    vae = gen.pipe.vae  # type: ignore[union-attr]
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == gen.savers.vae_tiles


def test_oom_ladder_keeps_a_configured_baseline(tiny_dir: Path, inject: Any) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir, attention_slicing="on"), device=FakeGpu())
    seen = inject(lambda n: oom() if n == 1 else None)
    gen.generate(req())
    gen.generate(req())
    assert [s["attention"] for s in seen] == ["SlicedAttnProcessor"] * 3
    assert [s["vae_slicing"] for s in seen] == [False, True, False]


def test_sticky_cuda_error_is_fatal_for_good(tiny_dir: Path, inject: Any) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir), device=FakeGpu())
    inject(lambda n: RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(GpuFatalError, match="illegal memory access"):
        gen.generate(req())
    with pytest.raises(GpuFatalError):
        gen.generate(req())


def test_a_sticky_error_surfacing_after_the_step_is_fatal_too(tiny_dir: Path) -> None:
    class LateFailure(FakeGpu):
        def empty_cache(self) -> None:  # CUDA errors are asynchronous: they show up at the next call
            raise RuntimeError("CUDA error: unspecified launch failure")

    gen = SdxlGenerator(make_settings(tiny_dir), device=LateFailure())
    with pytest.raises(GpuFatalError, match="unspecified launch failure"):
        gen.generate(req())


def test_on_the_cpu_the_ladder_skips_offload(tiny_dir: Path, inject: Any) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir), device=DeviceOps("cpu"))
    seen = inject(lambda n: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried..."))
    with pytest.raises(SceneOutOfMemory, match="attention_slicing, vae_slicing, vae_tiling\\)"):
        gen.generate(req())
    assert len(seen) == 3  # baseline, slicing, tiling: offload would change nothing on a CPU


def test_other_errors_pass_through_untouched(tiny_dir: Path, inject: Any) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir), device=FakeGpu())
    seen = inject(lambda n: ValueError("bad input") if n == 1 else None)
    with pytest.raises(ValueError, match="bad input"):
        gen.generate(req())
    assert gen.generate(req()).info["oom_retries"] == 0 and len(seen) == 2


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx",
        "CUDA error: misaligned address",
        "CUDA error: uncorrectable ECC error encountered",
    ],
)
def test_sticky_messages_are_recognised(message: str) -> None:
    assert is_sticky_cuda_error(RuntimeError(message))
    assert not is_sticky_cuda_error(RuntimeError("shape mismatch"))


# -- VAE precision, warm-up, allocator, missing weights ----------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "dtype", "force_upcast", "upcast"),
    [
        ("auto", torch.float16, True, True),
        ("auto", torch.float16, False, False),
        ("on", torch.float16, False, True),
        ("off", torch.float16, True, False),
        ("auto", torch.float32, True, False),
        ("on", torch.float32, True, False),
    ],
)
def test_vae_upcast_decision(setting: str, dtype: torch.dtype, force_upcast: bool, upcast: bool) -> None:
    decided, why = vae_upcast_decision(setting, dtype, force_upcast)
    assert decided is upcast and why


def test_warm_up_runs_once_at_the_configured_size(tiny_dir: Path) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir))
    gen.warm_up()
    assert gen.describe()["warmup_seconds"] > 0
    gen.close()
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate(req())


def test_configure_allocator_respects_the_user() -> None:
    env: dict[str, str] = {}
    configure_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    configure_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    env = {"PYTORCH_ALLOC_CONF": "backend:native"}
    configure_allocator(env)
    assert env == {"PYTORCH_ALLOC_CONF": "backend:native"}


def test_missing_hub_weights_say_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    settings = settings_from_dict({"model": {"source": "stabilityai/stable-diffusion-xl-base-1.0"}}, tmp_path)
    with pytest.raises(ModelNotFound) as info:
        SdxlGenerator(settings, device=FakeGpu())
    msg = str(info.value)
    assert str(cache) in msg and "hf download stabilityai/stable-diffusion-xl-base-1.0" in msg
    assert "HF_HOME" in msg and "Traceback" not in msg


def test_a_hub_id_loads_from_the_local_cache_and_pins_the_commit(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = settings_from_dict({"model": {"source": "someone/tiny-sdxl"}}, tmp_path)
    gen = SdxlGenerator(settings, device=DeviceOps("cpu"))
    assert gen.describe()["revision"] == commit and gen.describe()["variant"] is None
    assert gen.generate(req()).info["revision"] == commit


def test_variant_choice_follows_the_dtype_and_what_exists(tmp_path: Path) -> None:
    def fake(files: list[str]) -> Path:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            (root / part).mkdir(parents=True)
            for name in files:
                (root / part / name).write_bytes(b"")
        return root

    both = fake(["model.safetensors", "model.fp16.safetensors"])
    assert pick_variant(both, torch.float16) == "fp16" and pick_variant(both, torch.float32) is None
    only_fp16 = fake(["diffusion_pytorch_model.fp16.safetensors"])
    assert pick_variant(only_fp16, torch.float32) == "fp16"
    only_full = fake(["model-00001-of-00002.safetensors"])
    assert pick_variant(only_full, torch.float16) is None


def test_missing_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "sdxl"
    settings = settings_from_dict({"model": {"source": str(folder)}}, tmp_path)
    with pytest.raises(ModelNotFound, match=str(folder)):
        SdxlGenerator(settings, device=FakeGpu())


def test_folder_without_weights_is_model_not_found(tmp_path: Path) -> None:
    folder = tmp_path / "half"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    settings = settings_from_dict({"model": {"source": str(folder)}}, tmp_path)
    with pytest.raises(ModelNotFound, match="no safetensors weights for unet"):
        SdxlGenerator(settings, device=FakeGpu())
