"""Making one scene with its characters' references in view.

The scene is an ordinary `pipe(...)` call. Before each of its denoising steps, every reference
is run through the UNet once at that step (a reference pass: its recorded latents for the step,
its own conditioning, the same timestep), capturing the keys and values of the shared layers;
the scene's step then attends to them. Step 0's pass runs before the pipeline call; step i+1's
runs in the pipeline's step-end callback, after the scheduler has moved to that step. The step
is always the pipeline scheduler's own `step_index` (cross-checked against the callback's step),
never a counter of ours.

A reference pass is the same computation, on the same inputs, as the portrait's own render at
that step, so the reference rows follow the recorded trajectory exactly; and it does not
depend on the scene, so a scene comes out the same whatever other scenes are made, in any order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.images.consistency.attention import CaptureComplete, KeysValues, SharedAttention
from pipeline.images.consistency.reference import Reference, ReferenceTensors

StepEnd = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
Captured = dict[str, KeysValues]


class KVCache:
    """Reference keys/values kept across scenes (the cached mode): one reference pass per step, ever.

    Entries are exactly what a pass would compute again, so a scene is bitwise the same with or
    without the cache. `host=True` keeps them in host memory (pinned on CUDA) and copies each
    step's back as it is needed: at 1024×768 one reference is ~330 MB per step in fp16, ~10 GB
    for 30 steps, more than a 24 GB card can spare. Bounded: the least recently used entries go
    once `max_bytes` is passed.
    """

    def __init__(self, max_bytes: int, host: bool = False) -> None:
        self.max_bytes = max_bytes
        self.host = host
        self._entries: OrderedDict[tuple[str, int, int], Captured] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def size(entry: Captured) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in entry.values())

    def get(self, key: tuple[str, int, int], device: torch.device) -> Captured | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        if not self.host:
            return entry
        return {
            n: (k.to(device, non_blocking=True), v.to(device, non_blocking=True))
            for n, (k, v) in entry.items()
        }

    def put(self, key: tuple[str, int, int], entry: Captured) -> None:
        if self.host:
            entry = {n: (_to_host(k), _to_host(v)) for n, (k, v) in entry.items()}
        self._entries[key] = entry
        self.bytes += self.size(entry)
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.bytes -= self.size(old)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        return t.to("cpu").pin_memory()
    return t.clone()  # a CPU tensor: a copy of its own, as a host copy of a GPU tensor would be


def time_ids(height: int, width: int, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for a full, uncropped frame, one row per batch row.

    As diffusers 0.42 `StableDiffusionXLPipeline._get_add_time_ids` builds it with the defaults
    the generator uses (original size = target size = the frame, crop at (0, 0)).
    """
    return torch.tensor([[height, width, 0, 0, height, width]] * rows, dtype=dtype, device=device)


@dataclass
class ReferencePasses:
    """Runs the reference passes of one scene and hands their keys/values to the shared layers."""

    pipe: Any
    shared: SharedAttention
    refs: list[ReferenceTensors]
    width: int
    height: int
    batch: int  # rows of the scene's UNet batch: 2 with guidance, 1 without
    ip: Any = None  # an IpAdapter when one is loaded: reference passes run with it at scale 0
    cache: KVCache | None = None
    stop_early: bool = True
    loaded_step: int | None = None
    steps_shared: list[int] = field(default_factory=list)

    def run(self, ref: ReferenceTensors, step: int, t: torch.Tensor) -> Captured:
        """One reference at one step: the UNet call the portrait's own render made at that step."""
        key = (ref.reference.digest, step, self.batch)
        hit = self.cache.get(key, ref.latents.device) if self.cache is not None else None
        if hit is not None:
            return hit
        pipe, unet = self.pipe, self.pipe.unet
        x = ref.latents[step : step + 1]
        # As the pipeline's loop: both guidance halves see the same latents, scaled by the scheduler.
        sample = pipe.scheduler.scale_model_input(torch.cat([x] * self.batch), t)
        added: dict[str, Any] = {
            "text_embeds": ref.rows(ref.text_embeds, self.batch),
            "time_ids": time_ids(self.height, self.width, self.batch, ref.prompt_embeds.dtype, x.device),
        }
        quiet = nullcontext() if self.ip is None else self.ip.scaled(0.0)
        if self.ip is not None:
            added["image_embeds"] = self.ip.neutral(self.batch)
        with self.shared.capturing(self.stop_early) as got, quiet:
            with suppress(CaptureComplete):
                unet(
                    sample,
                    t,
                    encoder_hidden_states=ref.rows(ref.prompt_embeds, self.batch),
                    timestep_cond=None,
                    cross_attention_kwargs=None,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
            captured = dict(got)
        if self.cache is not None:
            self.cache.put(key, captured)
        return captured

    def load(self, step: int, t: torch.Tensor) -> None:
        self.shared.load([self.run(ref, step, t) for ref in self.refs])
        self.loaded_step = step

    def prime(self, steps: int) -> None:
        """Step 0's passes, before the pipeline call, on the pipeline's own scheduler.

        `set_timesteps` here is the call the pipeline makes itself first thing (it resets the
        scheduler's step index), so the timesteps and scaling are the ones the scene will use.
        """
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device=self.refs[0].latents.device)
        self.load(0, scheduler.timesteps[0])

    def step_end(self, then: StepEnd | None) -> StepEnd:
        """The pipeline's step-end callback: check the step just made, load the next one's keys."""

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            scheduler = pipe.scheduler
            nxt = scheduler.step_index
            if self.loaded_step != i or nxt != i + 1:
                raise RuntimeError(
                    f"reference replay out of step: loaded {self.loaded_step}, pipeline made {i}, "
                    f"scheduler now at {nxt}"
                )
            self.steps_shared.append(i)
            if nxt < len(scheduler.timesteps):
                self.load(nxt, scheduler.timesteps[nxt])
            return then(pipe, i, t, kwargs) if then is not None else kwargs

        return callback


@contextmanager
def references_in_view(
    pipe: Any,
    shared: SharedAttention,
    references: Sequence[Reference],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    on_step_end: StepEnd | None = None,
    ip: Any = None,
    cache: KVCache | None = None,
    stop_early: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield the keyword arguments to add to the scene's `pipe(...)` call; make it inside.

    References are used in the order given (the caller sorts them, e.g. by name, so that the
    order of the keys the scene sees never depends on anything else). Raises ValueError when a
    reference does not fit the scene (size or step count).
    """
    if not references:
        raise ValueError("references_in_view needs at least one reference")
    if not shared.installed():
        raise RuntimeError("the shared-attention processors were replaced: install them again, last")
    for ref in references:
        ref.fits(width, height, steps)
        if ref.torch_dtype() != pipe.unet.dtype:  # made on another kind of worker: no exact replay
            raise ValueError(
                f"reference of {ref.character} was made in {ref.dtype}, this model runs {pipe.unet.dtype}"
            )
    device = pipe.unet.device
    passes = ReferencePasses(
        pipe=pipe,
        shared=shared,
        refs=[ReferenceTensors.on(r, device) for r in references],
        width=width,
        height=height,
        batch=2 if guidance > 1.0 else 1,  # the pipeline's do_classifier_free_guidance
        ip=ip,
        cache=cache,
        stop_early=stop_early,
    )
    kwargs: dict[str, Any] = {"callback_on_step_end": passes.step_end(on_step_end)}
    if ip is not None:
        kwargs["ip_adapter_image_embeds"] = ip.scene_embeds(
            [r.image_embeds for r in passes.refs], passes.batch
        )
    try:
        passes.prime(steps)
        steer = nullcontext() if ip is None else ip.scaled(ip.scale)
        with shared.sharing(), steer:
            yield kwargs
        if passes.steps_shared != list(range(steps)):
            raise RuntimeError(f"reference replay covered steps {passes.steps_shared}, not 0..{steps - 1}")
    finally:
        shared.clear()
