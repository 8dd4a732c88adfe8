"""SDXL behind the seam: `SdxlGenerator.generate(SceneRequest) -> GeneratedImage`.

The daemon only ever calls `generate` with plain data and gets back an RGB image with timings
and a record of what was used. Nothing else about SDXL leaks out, so scenes can be spread over
several warm GPUs (one generator per process or Ray actor) without touching the daemon.

Around the diffusers pipeline: the choices made at load (sdxl_load.py), the OOM ladder and
sticky CUDA errors (memory.py), long prompts (conditioning.py), the VAE decode (decode.py) and
characters who stay themselves (characters.py: reference portraits, scenes with references).

What has and has not been exercised here: everything runs in the tests on CPU with the tiny
model, and the CUDA-only behaviour (fp16, VRAM-based "auto" choices, OOM recovery, CPU offload,
sticky-error detection, cache flushing) is driven through a fake `DeviceOps` with injected faults.
None of the CUDA paths has been run on a real GPU in this repository's test suite.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from pipeline.errors import GpuFatalError, SceneOutOfMemory, first_line
from pipeline.images.characters import Characters, made_with
from pipeline.images.conditioning import Conditioning, PromptEncoder
from pipeline.images.decode import decode
from pipeline.images.device import DeviceOps
from pipeline.images.memory import MemorySaver, OutOfMemory, is_out_of_memory, is_sticky_cuda_error
from pipeline.images.model import ModelLocation, SdxlPipeline, load_located
from pipeline.images.sdxl_load import prepare
from pipeline.images.seam import (
    GeneratedImage,
    ImageGenerator,
    ImageRequest,
    Phase,
    PortraitRequest,
    SceneRequest,
    StepCallback,
)
from pipeline.settings import Settings

WARMUP_STEPS = 2
# The prompt lengths, in 77-token chunks, a compiled UNet is warmed up at: two, so that
# torch.compile makes the sequence dimension dynamic (see `SdxlGenerator.warm_up`).
WARMUP_CHUNKS = (1, 2)


class SdxlGenerator:
    """SDXL on one device. Not thread-safe: one generator, one caller (the daemon's loop, or a Ray actor)."""

    def __init__(
        self,
        settings: Settings,
        device: DeviceOps | None = None,
        pipe: SdxlPipeline | None = None,
        location: ModelLocation | None = None,
    ) -> None:
        """`pipe` lets a caller (the benchmark, a test) bring a pipeline built in memory."""
        self.settings = settings
        self.device = device or DeviceOps(settings.model.device, settings.model.dtype)
        if pipe is None:
            pipe, location = load_located(settings, self.device)
        self.location = location or ModelLocation("in-memory", None, None, None)
        self.pipe: SdxlPipeline | None = pipe
        self._poisoned: str | None = None
        self.features, baseline = prepare(pipe, settings.image, self.device)
        self.cast = Characters(pipe, settings, self.device)  # after prepare, before the savers
        self.savers = MemorySaver(pipe, self.device, baseline, fixed_processors=self.cast.fixed_processors)
        self.prompts = PromptEncoder(pipe, self.device.device, settings.image.long_prompts)

    def _pipe(self) -> SdxlPipeline:
        if self.pipe is None:
            raise RuntimeError("generator is closed")
        return self.pipe

    # -- the seam ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        pipe = self._pipe()
        processor = next(iter(self.savers.unet_processors.values()), None)
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
            "memory_savers": self.savers.baseline.names(),
            "long_prompts": self.prompts.long is not None,
            **self.features.describe(),
            "characters": self.cast.describe(),
        }

    def warm_up(self, phase: Phase | None = None) -> None:
        """Throw-away 2-step images at the configured size, before READY.

        This is where the UNet is compiled (when enabled): compilation takes minutes with no
        denoising step to report progress from, so it must happen under the start-up allowance,
        never inside a real scene, whose first watchdog ping comes only after its first step.
        torch.compile specialises on the first prompt length it sees; long prompts are 77 tokens
        a chunk, so a warm-up of 77 only left the first longer scene to recompile (and systemd
        to kill it past WatchdogSec, then the same scene to recompile after the restart). A
        second length (154) makes dynamo's automatic dynamic shapes mark that dimension dynamic:
        no later length recompiles. Each compile is its own start-up phase, told to `phase`.
        """
        img = self.settings.image
        t0 = time.perf_counter()
        mode = self.features.compile_mode
        compiling = mode is not None and not self.features.compiled
        if compiling:
            self._pipe().unet.compile(mode=mode, fullgraph=False)
            self.features = replace(self.features, compiled=True)
        chunks = WARMUP_CHUNKS if compiling and self.prompts.long is not None else WARMUP_CHUNKS[:1]
        for n in chunks:
            prompt = self._warm_up_prompt(n)
            if compiling and phase is not None:
                tokens = int(self._pipe().tokenizer.model_max_length) * n
                phase(f"warming up: compiling the UNet ({mode}) for {tokens}-token prompts")
            self.generate(SceneRequest(prompt, "", 0, img.width, img.height, WARMUP_STEPS, img.guidance))
        self.features = replace(self.features, warmup_seconds=round(time.perf_counter() - t0, 3))

    def _warm_up_prompt(self, chunks: int) -> str:
        """A prompt that fills `chunks` 77-token windows: "a" is one token to CLIP's tokenizer and
        to the tiny model's; half a window past the last full one."""
        limit = int(self._pipe().tokenizer.model_max_length) - 2  # start and end markers
        return " ".join(["a"] * (limit * (chunks - 1) + limit // 2))

    def generate(self, req: ImageRequest, on_step: StepCallback | None = None) -> GeneratedImage:
        """One image (a scene, or a character's portrait); retries an OOM with more memory savers,
        then restores the normal settings.

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
                    self.savers.apply(self.savers.baseline)
                    self._release()

    def close(self) -> None:
        self.prompts.long = None
        self.pipe = None
        self.savers.unet_processors = {}
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
                self._poisoned = first_line(err)
                raise GpuFatalError(f"sticky CUDA error, the process must restart: {self._poisoned}") from err
            raise

    def _climb_ladder(self, req: ImageRequest, on_step: StepCallback | None) -> GeneratedImage:
        """Try each rung of memory savers until an attempt fits; SceneOutOfMemory after the last.

        A scene with references never climbs onto a rung that would replace its processors."""
        t0 = time.perf_counter()
        failures: list[str] = []
        keep = isinstance(req, SceneRequest) and bool(req.references)
        for savers in self.savers.ladder(keep_processors=keep):
            self.savers.apply(savers)
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
            f"memory saver on ({', '.join(self.savers.active.names()) or 'none'}): {failures[-1]}"
        )

    # -- one attempt ---------------------------------------------------------------------------------
    def _attempt(self, req: ImageRequest, on_step: StepCallback | None) -> GeneratedImage | OutOfMemory:
        """Run once; an OOM comes back as a value, so the caller cleans up outside this except block."""
        message = ""
        try:
            with torch.no_grad():
                return self._make(req, on_step)
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            message = first_line(err)
        return OutOfMemory(message)

    def _make(self, req: ImageRequest, on_step: StepCallback | None) -> GeneratedImage:
        """One image, in the steps of diffusers' SDXL `__call__`, each timed on a synchronised device."""
        pipe, dev = self._pipe(), self.device
        dev.reset_peak()
        t0 = time.perf_counter()

        # 1. Encode the prompts (long prompts in 77-token chunks when enabled)
        cond = self.prompts.encode(req)
        dev.synchronize()
        t1 = time.perf_counter()

        # 2. Denoise from the seed's CPU-drawn noise; diffusers runs its own steps 4-8 in here.
        #    A portrait records its trajectory as it goes; a bundle's picture is noised instead.
        picture, ref = None, None
        if isinstance(req, PortraitRequest):
            latents, picture, ref = self.cast.portrait(pipe, req, cond, self._step_end(req, on_step))
        else:
            latents = self._denoise(pipe, req, cond, on_step)
        dev.synchronize()
        t2 = time.perf_counter()
        info = {**self._record(), **cond.info}
        del cond  # the embeddings are not needed for decoding: free them first

        # 3. Decode the latents with the VAE (fp16 NaN -> one retry in fp32); a picture is itself
        image, decode_info = (picture, {}) if latents is None else decode(pipe, latents)
        assert image is not None
        if ref is not None:
            ref = self.cast.with_picture(ref, image)
        dev.synchronize()
        t3 = time.perf_counter()

        # 4. Record what was used and how long each step took
        info.update(decode_info, **made_with(req, ref), peak_memory_bytes=dev.peak_memory_bytes())
        timings = {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2}
        return GeneratedImage(image=image, timings=timings, info=info, reference=ref)

    def _record(self) -> dict[str, Any]:
        d = self.describe()
        keep = ("model", "revision", "variant", "device", "dtype", "vae_dtype", "vae_upcast", "scheduler")
        return {
            **{k: d[k] for k in keep},
            "attention": type(next(iter(self._pipe().unet.attn_processors.values()))).__name__,
            "memory_savers": self.savers.active.names(),
            "channels_last": self.features.channels_last,
            "fuse_qkv": self.features.fuse_qkv,
            "compiled": self.features.compiled_mode(),
        }

    def initial_latents(self, req: SceneRequest) -> torch.Tensor:
        """The seed's noise, drawn on the CPU in fp32: the same starting point on every machine."""
        pipe = self._pipe()
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, req.height // scale, req.width // scale)
        g = torch.Generator(device="cpu").manual_seed(req.seed)
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        return noise.to(device=self.device.device, dtype=self.device.dtype)

    @staticmethod
    def _step_end(req: ImageRequest, on_step: StepCallback | None) -> Any:
        def step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, req.steps)  # on the denoising thread: the watchdog ping proves progress
            return kwargs

        return step_end

    def _denoise(
        self, pipe: SdxlPipeline, req: SceneRequest, cond: Conditioning, on_step: StepCallback | None
    ) -> torch.Tensor:
        """The scene's pipeline call; with references, inside their view (characters.py)."""
        with self.cast.scene(pipe, req, self._step_end(req, on_step)) as extra:
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
                **extra,
            )
        latents: torch.Tensor = out[0]
        return latents

    def _release(self) -> None:
        """Return freed memory to the device after each image and each failed attempt."""
        self.device.release()


def open_generator(settings: Settings) -> ImageGenerator:
    """What the daemon calls at start-up: load the configured model on the configured device."""
    return SdxlGenerator(settings)
