"""The image half of the pipeline, behind one narrow seam: `ImageGenerator.generate(SceneRequest)`.

The daemon's worker only ever calls `generate` with plain data and gets back an RGB image with
timings and a record of what was used. Nothing else about SDXL leaks out, so scenes can later
be spread over several warm GPUs (one generator per process or Ray actor) without touching the
worker.

What has and has not been exercised here: everything runs in the tests on CPU with the tiny
model, and the CUDA-only behaviour (fp16, VRAM-based "auto" choices, OOM recovery, CPU offload,
sticky-error detection, cache flushing) is driven through a fake `DeviceOps` with injected faults.
None of the CUDA paths has been run on a real GPU in this repository's test suite.
"""

from __future__ import annotations

import contextlib
import gc
import io
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import PIL.Image
import torch
from diffusers import EulerDiscreteScheduler

from pipeline.device import GIB, DeviceOps
from pipeline.errors import GpuFatalError, SceneOutOfMemory
from pipeline.model import ModelLocation, SdxlPipeline, load_located
from pipeline.settings import Settings

# Below this much VRAM the "auto" memory savers are switched on from the start.
LOW_VRAM_BYTES = 12 * GIB
# CUDA graphs ("reduce-overhead") are avoided: they pin a private memory pool, must be re-recorded
# whenever the OOM ladder changes attention processors or offloads, and buy little for a UNet whose
# kernels are large. Autotuned kernels without graphs keep the memory behaviour of eager mode.
COMPILE_MODE = "max-autotune-no-cudagraphs"
WARMUP_STEPS = 2
# diffusers tiles the VAE at its training size (1024 px for SDXL), which never tiles a 1024×768 frame;
# the tiling rung uses smaller tiles so that it actually lowers peak memory.
VAE_TILE_PIXELS = 512
# Messages of CUDA errors after which the context is unusable: only a new process can recover.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "CUDA error: device-side assert",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "misaligned address",
    "uncorrectable ECC",
)
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOCATOR_SETTING = "expandable_segments:True"


def configure_allocator(environ: MutableMapping[str, str]) -> None:
    """Ask for expandable segments unless the user chose an allocator config (either variable name).

    Must run before CUDA initialises: the allocator reads it once. Expandable segments stop the
    fragmentation that otherwise makes a long-running daemon OOM on a frame it rendered an hour ago.
    """
    if "PYTORCH_ALLOC_CONF" in environ:  # the newer name; setting the old one too would conflict
        return
    environ.setdefault(ALLOCATOR_ENV, ALLOCATOR_SETTING)


@dataclass(frozen=True)
class SceneRequest:
    """Everything needed for one image; plain data, so it pickles across a process or Ray boundary."""

    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float


@dataclass
class GeneratedImage:
    image: PIL.Image.Image  # raw RGB, before finishing
    timings: dict[str, float]  # "encode", "denoise", "decode", "total" seconds
    info: dict[str, Any]  # JSON-ready: goes into the story's manifest


class ImageGenerator(Protocol):
    def describe(self) -> dict[str, Any]: ...

    def warm_up(self) -> None: ...

    def generate(
        self, req: SceneRequest, on_step: Callable[[int, int], None] | None = None
    ) -> GeneratedImage: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class MemorySavers:
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False

    def union(self, other: MemorySavers) -> MemorySavers:
        return MemorySavers(*(a or b for a, b in zip(self.flags(), other.flags(), strict=True)))

    def flags(self) -> tuple[bool, bool, bool, bool]:
        return (self.attention_slicing, self.vae_slicing, self.vae_tiling, self.cpu_offload)

    def names(self) -> list[str]:
        labels = ("attention_slicing", "vae_slicing", "vae_tiling", "model_cpu_offload")
        return [name for name, on in zip(labels, self.flags(), strict=True) if on]


# Rungs tried, in order, after an out-of-memory error; each adds to the configured baseline.
OOM_LADDER = (
    MemorySavers(attention_slicing=True, vae_slicing=True),
    MemorySavers(attention_slicing=True, vae_slicing=True, vae_tiling=True),
    MemorySavers(attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True),
)


@dataclass(frozen=True)
class Features:
    """The speed choices made at load (from the settings and the device), and whether the UNet
    has been compiled yet; reported by `describe()` and in every image's record."""

    vae_upcast: str  # why the VAE decodes in the dtype it does
    channels_last: bool
    fuse_qkv: bool
    compile_mode: str | None  # torch.compile mode for the UNet; None: it stays eager
    compiled: bool = False  # compilation happens at warm-up, not at load
    warmup_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        warm = {} if self.warmup_seconds is None else {"warmup_seconds": self.warmup_seconds}
        return {
            "vae_upcast": self.vae_upcast,
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "compile": self.compile_mode or False,
            "compiled": self.compiled,
            **warm,
        }

    def compiled_mode(self) -> str | bool:
        """The compile mode in effect for an image: False until warm-up compiled the UNet."""
        return (self.compiled and self.compile_mode) or False


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_pooled: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def is_sticky_cuda_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(s in str(err) for s in STICKY_CUDA_ERRORS)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OOM type, plus the allocators that still raise a plain RuntimeError (MPS, cuBLAS, CPU).

    A sticky CUDA error is never an OOM, whatever its text: retrying on a dead context is pointless.
    """
    if is_sticky_cuda_error(err):
        return False
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    markers = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")
    return isinstance(err, RuntimeError) and any(m in text for m in markers)


def _decide(setting: str, auto: bool) -> bool:
    return setting == "on" or (setting == "auto" and auto)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def vae_upcast_decision(setting: str, model_dtype: torch.dtype, force_upcast: bool) -> tuple[bool, str]:
    """Whether to keep the VAE in fp32, and why (recorded in every image's info).

    SDXL's own VAE overflows in fp16 (NaN, black frames). "auto" trusts the VAE config's
    `force_upcast`, which is False only on VAEs fixed for fp16; "off" is the user vouching
    for an fp16-safe VAE.
    """
    if model_dtype == torch.float32:
        return False, "not needed: model runs in fp32"
    if setting == "off":
        return False, "fp16 decode (vae_upcast = off)"
    if setting == "auto" and not force_upcast:
        return False, "fp16 decode (auto: VAE config says fp16-safe, force_upcast = false)"
    why = "vae_upcast = on" if setting == "on" else "auto: VAE config force_upcast = true"
    return True, f"fp32 decode ({why})"


class _OutOfMemory:
    """An attempt's OOM, reduced to its message so no frame or tensor of the attempt survives it."""

    def __init__(self, message: str) -> None:
        self.message = message


class LongPromptEncoder:
    """SDXL conditioning for prompts of any length, via compel, with user text taken literally.

    Compel's prompt syntax ("(word)1.2", "word+", "[neg]", ".and()", quotes, escapes) would
    re-weight or swallow parts of ordinary prose, so the parser is bypassed: each text becomes
    one unweighted fragment handed straight to compel's chunking encoder. Both encoders see the
    whole text in 77-token chunks; the pooled embedding (encoder 2) comes from the first chunk,
    as in SDXL training.
    """

    def __init__(self, pipe: SdxlPipeline) -> None:
        from compel import Compel, ReturnedEmbeddingsType

        # compel 2.5 print()s a deprecation notice for the two-encoder form; keep stdout clean
        # (this runs once, at load, before the daemon's other threads do anything).
        with contextlib.redirect_stdout(io.StringIO()):
            self.compel = Compel(
                tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                requires_pooled=[False, True],
                truncate_long_prompts=False,
            )
        self._empty: torch.Tensor | None = None

    def encode(self, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

        fragment = Fragment(text)
        fragment.text = text  # Fragment() un-escapes "\(" etc.; keep the user's characters as they are
        conditioning, _ = self.compel.build_conditioning_tensor_for_conjunction(
            Conjunction([FlattenedPrompt([fragment])])
        )
        provider = self.compel.conditioning_provider
        pooled = provider.get_pooled_embeddings([text], device=self.compel.device)
        return conditioning.to(device), pooled.to(device)

    def empty_chunk(self, device: torch.device) -> torch.Tensor:
        """The empty prompt's 77-token embedding: the padding compel itself would use, encoded once."""
        if self._empty is None:
            self._empty = self.encode("", device)[0]
        return self._empty.to(device)

    def pad_to(self, embeds: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
        """Lengthen to `length` tokens with empty-prompt chunks (compel's padder fails with two encoders)."""
        chunk = self.empty_chunk(device).to(embeds.dtype)
        parts = [embeds]
        size = embeds.shape[1]
        while size < length:
            parts.append(chunk)
            size += chunk.shape[1]
        return torch.cat(parts, dim=1)


class SdxlGenerator:
    """SDXL on one device. Not thread-safe: one generator, one caller (the worker's loop)."""

    def __init__(
        self,
        settings: Settings,
        device: DeviceOps | None = None,
        pipe: SdxlPipeline | None = None,
        location: ModelLocation | None = None,
    ) -> None:
        """`pipe` lets a caller (the benchmark, a test) bring a pipeline built in memory."""
        self.settings = settings
        self.device = device or DeviceOps(settings.model.device)
        if pipe is None:
            pipe, location = load_located(settings, self.device)
        self.location = location or ModelLocation("in-memory", None, None, None)
        self.pipe: SdxlPipeline | None = pipe
        self._poisoned: str | None = None
        self.features = self._prepare(pipe)
        self._long: LongPromptEncoder | None = (
            LongPromptEncoder(pipe) if settings.image.long_prompts else None
        )

    # -- load-time decisions -------------------------------------------------------------------------
    def _prepare(self, pipe: SdxlPipeline) -> Features:
        img, on_cuda = self.settings.image, self.device.device.type == "cuda"
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        features = Features(
            vae_upcast=self._place_vae(pipe),
            channels_last=_decide(img.channels_last, on_cuda),
            fuse_qkv=_decide(img.fuse_qkv, on_cuda),
            compile_mode=COMPILE_MODE if _decide(img.compile, on_cuda) else None,
        )
        pipe.to(self.device.device)
        if features.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if features.fuse_qkv:
            pipe.fuse_qkv_projections()
        # Saved after fusing, so that undoing attention slicing restores exactly this.
        self._unet_processors = dict(pipe.unet.attn_processors)
        self._vae_tiles = (pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size)
        total = self.device.total_memory_bytes()
        low_vram = total is not None and total < LOW_VRAM_BYTES
        self.baseline = MemorySavers(
            attention_slicing=_decide(img.attention_slicing, low_vram),
            vae_slicing=_decide(img.vae_slicing, low_vram),
        )
        self._active = MemorySavers()
        self._apply(self.baseline)
        return features

    def _place_vae(self, pipe: SdxlPipeline) -> str:
        force = bool(getattr(pipe.vae.config, "force_upcast", True))
        upcast, why = vae_upcast_decision(self.settings.image.vae_upcast, self.device.dtype, force)
        if upcast:
            pipe.vae.to(dtype=torch.float32)  # stays fp32; latents are cast to it before decoding
        return why

    # -- memory savers -------------------------------------------------------------------------------
    def _apply(self, want: MemorySavers) -> None:
        """Move from the active savers to `want`, touching only what differs."""
        pipe, have = self._pipe(), self._active
        if want.cpu_offload != have.cpu_offload and self.device.supports_offload():
            if want.cpu_offload:
                self.device.enable_offload(pipe)
            else:
                self.device.disable_offload(pipe)
        if want.attention_slicing != have.attention_slicing:
            if want.attention_slicing:
                pipe.enable_attention_slicing()
            else:
                pipe.unet.set_attn_processor(dict(self._unet_processors))
        if want.vae_slicing != have.vae_slicing:
            if want.vae_slicing:
                pipe.vae.enable_slicing()
            else:
                pipe.vae.disable_slicing()
        if want.vae_tiling != have.vae_tiling:
            self._set_vae_tiling(pipe, want.vae_tiling)
        self._active = replace(want, cpu_offload=want.cpu_offload and self.device.supports_offload())

    def _set_vae_tiling(self, pipe: SdxlPipeline, on: bool) -> None:
        vae = pipe.vae
        if on:
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            sample = min(VAE_TILE_PIXELS, self._vae_tiles[0])
            vae.tile_sample_min_size, vae.tile_latent_min_size = sample, sample // scale
            vae.enable_tiling()
        else:
            vae.tile_sample_min_size, vae.tile_latent_min_size = self._vae_tiles
            vae.disable_tiling()

    def _pipe(self) -> SdxlPipeline:
        if self.pipe is None:
            raise RuntimeError("generator is closed")
        return self.pipe

    # -- the seam ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        pipe = self._pipe()
        processor = next(iter(self._unet_processors.values()), None)
        return {
            "model": self.location.source,
            "folder": str(self.location.folder) if self.location.folder else None,
            "revision": self.location.revision,
            "variant": self.location.variant,
            "device": self.device.name,
            "dtype": str(self.device.dtype).removeprefix("torch."),
            "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."),
            "scheduler": type(pipe.scheduler).__name__,
            "attention": type(processor).__name__ if processor is not None else None,
            "total_memory_bytes": self.device.total_memory_bytes(),
            "memory_savers": self.baseline.names(),
            "long_prompts": self._long is not None,
            **self.features.describe(),
        }

    def warm_up(self) -> None:
        """One throw-away 2-step image at the configured size, before READY.

        This is where the UNet is compiled (when enabled): compilation takes minutes with no
        denoising step to report progress from, so it must happen under the start-up timeout,
        never inside the first real scene where the watchdog expects step pings.
        """
        img = self.settings.image
        t0 = time.perf_counter()
        mode = self.features.compile_mode
        if mode is not None and not self.features.compiled:
            self._pipe().unet.compile(mode=mode, fullgraph=False)
            self.features = replace(self.features, compiled=True)
        req = SceneRequest("warm-up", "", 0, img.width, img.height, WARMUP_STEPS, img.guidance)
        self.generate(req)
        self.features = replace(self.features, warmup_seconds=round(time.perf_counter() - t0, 3))

    def generate(
        self, req: SceneRequest, on_step: Callable[[int, int], None] | None = None
    ) -> GeneratedImage:
        """One image; retries an OOM with more memory savers, then restores the normal settings.

        Raises SceneOutOfMemory when even the last rung fails, GpuFatalError on a sticky CUDA
        error (and for every later call: the context is gone).
        """
        if self._poisoned:
            raise GpuFatalError(f"GPU unusable after an earlier error: {self._poisoned}")
        try:
            with self._sticky_errors_are_fatal():  # poisons first: the cleanup below must not touch the GPU
                return self._climb_ladder(req, on_step)
        finally:
            if not self._poisoned:
                with self._sticky_errors_are_fatal():
                    self._apply(self.baseline)
                    self._release()

    @contextlib.contextmanager
    def _sticky_errors_are_fatal(self) -> Iterator[None]:
        """Turn a sticky CUDA error into GpuFatalError and poison the generator for good.

        CUDA reports errors asynchronously, so a sticky one can surface in any call that touches
        the device, the cleanup after an image included: every such call runs under this.
        """
        try:
            yield
        except RuntimeError as err:
            if is_sticky_cuda_error(err):
                self._poisoned = _first_line(err)
                raise GpuFatalError(f"sticky CUDA error, the process must restart: {self._poisoned}") from err
            raise

    def _climb_ladder(self, req: SceneRequest, on_step: Callable[[int, int], None] | None) -> GeneratedImage:
        """Try each rung of memory savers until an attempt fits; SceneOutOfMemory after the last."""
        t0 = time.perf_counter()
        failures: list[str] = []
        for savers in self._ladder():
            self._apply(savers)
            outcome = self._attempt(req, on_step)
            if isinstance(outcome, GeneratedImage):
                outcome.timings["total"] = time.perf_counter() - t0
                outcome.info["oom_retries"] = len(failures)
                outcome.info["oom_errors"] = failures
                return outcome
            failures.append(outcome.message)
            del outcome
            self._release()  # outside the except block: the failed attempt's frames are gone now
        raise SceneOutOfMemory(
            f"out of memory on {self.device.name} at {req.width}×{req.height} even with every "
            f"memory saver on ({', '.join(self._active.names()) or 'none'}): {failures[-1]}"
        )

    def _ladder(self) -> list[MemorySavers]:
        """The baseline, then each OOM rung on top of it, minus rungs that change nothing here."""
        rungs: list[MemorySavers] = []
        for extra in (MemorySavers(), *OOM_LADDER):
            savers = self.baseline.union(extra)
            if not self.device.supports_offload():
                savers = replace(savers, cpu_offload=False)
            if savers not in rungs:
                rungs.append(savers)
        return rungs

    def close(self) -> None:
        self._long = None
        self.pipe = None
        self._unet_processors = {}
        self._release()

    # -- one attempt ---------------------------------------------------------------------------------
    def _attempt(
        self, req: SceneRequest, on_step: Callable[[int, int], None] | None
    ) -> GeneratedImage | _OutOfMemory:
        """Run once; an OOM comes back as a value, so the caller cleans up outside this except block."""
        message = ""
        try:
            with torch.no_grad():
                return self._make(req, on_step)
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            message = _first_line(err)
        return _OutOfMemory(message)

    def _make(self, req: SceneRequest, on_step: Callable[[int, int], None] | None) -> GeneratedImage:
        """One image, in the steps of diffusers' SDXL `__call__`, each timed on a synchronised device."""
        pipe, dev = self._pipe(), self.device
        dev.reset_peak()
        t0 = time.perf_counter()

        # 1. Encode the prompts (long prompts in 77-token chunks when enabled)
        cond = self._encode(req)
        dev.synchronize()
        t1 = time.perf_counter()

        # 2. Denoise from the seed's CPU-drawn noise; diffusers runs its own steps 4-8 in here
        latents = self._denoise(pipe, req, cond, on_step)
        dev.synchronize()
        t2 = time.perf_counter()
        info = {**self._record(), **cond.info}
        del cond  # the embeddings are not needed for decoding: free them first

        # 3. Decode the latents with the VAE (fp16 NaN -> one retry in fp32)
        image, decode_info = self._decode(pipe, latents)
        dev.synchronize()
        t3 = time.perf_counter()

        # 4. Record what was used and how long each step took
        info.update(decode_info, peak_memory_bytes=dev.peak_memory_bytes())
        timings = {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2}
        return GeneratedImage(image=image, timings=timings, info=info)

    def _record(self) -> dict[str, Any]:
        d = self.describe()
        keep = ("model", "revision", "variant", "device", "dtype", "vae_dtype", "vae_upcast", "scheduler")
        return {
            **{k: d[k] for k in keep},
            "attention": type(next(iter(self._pipe().unet.attn_processors.values()))).__name__,
            "memory_savers": self._active.names(),
            "channels_last": self.features.channels_last,
            "fuse_qkv": self.features.fuse_qkv,
            "compiled": self.features.compiled_mode(),
        }

    # -- encode / denoise / decode -------------------------------------------------------------------
    def _encode(self, req: SceneRequest) -> Conditioning:
        pipe = self._pipe()
        counts = self._token_counts(req)
        if self._long is not None:
            cond = self._encode_long(req)
        else:
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=req.prompt,
                device=self._exec_device(),
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=req.negative or None,  # empty -> zeros (SDXL's force_zeros_for_empty_prompt)
            )
            assert npe is not None and pooled is not None and npooled is not None
            cond = Conditioning(pe, npe, pooled, npooled)
        cond.info.update(counts, conditioning_tokens=int(cond.prompt_embeds.shape[1]))
        return cond

    def _encode_long(self, req: SceneRequest) -> Conditioning:
        assert self._long is not None
        pipe, device = self._pipe(), self._exec_device()
        pe, pooled = self._long.encode(req.prompt, device)
        if not req.negative and pipe.config.force_zeros_for_empty_prompt:
            # As diffusers does for an empty negative: SDXL was trained with zeros as "unconditional".
            npe, npooled = torch.zeros_like(pe), torch.zeros_like(pooled)
        else:
            npe, npooled = self._long.encode(req.negative, device)
        length = max(pe.shape[1], npe.shape[1])
        pe, npe = self._long.pad_to(pe, length, device), self._long.pad_to(npe, length, device)
        return Conditioning(pe, npe, pooled, npooled)

    def _token_counts(self, req: SceneRequest) -> dict[str, Any]:
        """How many tokens each text is, and how many the 77-token window would drop: never silent."""
        tok = self._pipe().tokenizer
        limit = int(tok.model_max_length) - 2  # the window holds start and end markers too
        long = self._long is not None

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

        n_prompt, n_negative = count(req.prompt), count(req.negative)
        return {
            "long_prompt_encoding": long,
            "token_limit": limit,
            "prompt_tokens": n_prompt,
            "negative_tokens": n_negative,
            "prompt_tokens_dropped": 0 if long else max(0, n_prompt - limit),
            "negative_tokens_dropped": 0 if long else max(0, n_negative - limit),
        }

    def _exec_device(self) -> torch.device:
        """Where inputs go: the device, even while offload hooks keep the weights in host RAM."""
        return self.device.device

    def initial_latents(self, req: SceneRequest) -> torch.Tensor:
        """The seed's noise, drawn on the CPU in fp32: the same starting point on every machine."""
        pipe = self._pipe()
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, req.height // scale, req.width // scale)
        g = torch.Generator(device="cpu").manual_seed(req.seed)
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        return noise.to(device=self._exec_device(), dtype=self.device.dtype)

    def _denoise(
        self,
        pipe: SdxlPipeline,
        req: SceneRequest,
        cond: Conditioning,
        on_step: Callable[[int, int], None] | None,
    ) -> torch.Tensor:
        def step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, req.steps)  # on the denoising thread: the watchdog ping proves progress
            return kwargs

        out = pipe(
            prompt_embeds=cond.prompt_embeds,
            negative_prompt_embeds=cond.negative_embeds,
            pooled_prompt_embeds=cond.pooled,
            negative_pooled_prompt_embeds=cond.negative_pooled,
            latents=self.initial_latents(req),
            width=req.width,
            height=req.height,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=step_end,
        )
        latents: torch.Tensor = out[0]
        return latents

    def _decode(self, pipe: SdxlPipeline, latents: torch.Tensor) -> tuple[PIL.Image.Image, dict[str, Any]]:
        """Decode in the VAE's own dtype; an fp16 VAE that still overflows is retried once in fp32.

        The upcast is decided once at load (`vae_upcast_decision`), not per call as diffusers does,
        and the NaN check and retry are ours; the denormalising is diffusers' own.
        """
        vae = pipe.vae
        cfg = vae.config
        # Adapted from diffusers 0.42 pipeline_stable_diffusion_xl.py, StableDiffusionXLPipeline.__call__,
        # the decode after "# 8. Denoising loop": cast to the VAE's dtype (upcast if needed), then
        # "unscale/denormalize the latents" with latents_mean/latents_std when the config has them.
        latents = latents.to(vae.dtype)  # scale in the decode dtype: an upcast VAE never sees fp16 values
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            s = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * s / cfg.scaling_factor + m
        else:
            latents = latents / cfg.scaling_factor
        decoded = self._vae_decode(vae, latents, vae.dtype)
        retried = False
        if vae.dtype == torch.float16 and not bool(torch.isfinite(decoded).all()):
            del decoded
            with self._vae_in_fp32(vae):
                decoded = self._vae_decode(vae, latents, torch.float32)
            retried = True
        image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
        return image.convert("RGB"), {"vae_nan_fp32_retry": retried}

    @staticmethod
    def _vae_decode(vae: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        decoded: torch.Tensor = vae.decode(latents.to(dtype), return_dict=False)[0]
        return decoded

    @staticmethod
    @contextlib.contextmanager
    def _vae_in_fp32(vae: Any) -> Iterator[None]:
        """Upcast for one decode, then back, as diffusers 0.42's SDXL `__call__` does when
        `needs_upcasting` (there for every decode; here only to retry one that overflowed)."""
        vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            vae.to(dtype=torch.float16)

    def _release(self) -> None:
        """Return freed memory to the device after each image and each failed attempt."""
        gc.collect()
        self.device.empty_cache()


def open_generator(settings: Settings) -> ImageGenerator:
    """What the daemon calls at start-up: load the configured model on the configured device."""
    return SdxlGenerator(settings)
