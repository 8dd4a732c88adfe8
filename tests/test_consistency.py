"""Shared attention on replayed reference trajectories, driven on the tiny SDXL pipeline.

No test here can judge whether a face stays the same (random weights draw noise); each checks
an invariant that breaks when the mechanism is wired wrong: idle is stock, a portrait as its
own reference changes nothing (and any step, layer or guidance-half misalignment does), the
reference rows replay the portrait's render exactly, a scene depends on nothing but itself.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import pipeline.images.consistency.replay as replay
from pipeline.images.consistency.attention import SharedAttention, SharedAttnProcessor
from pipeline.images.consistency.record import TextConditioning
from pipeline.images.consistency.reference import Reference, load_reference, save_reference

from characters import GUIDANCE, STEPS, H, W, load_tiny, max_diff, portrait, scene, text

# The self-reference no-op is exact in arithmetic, not in floating point (softmax over duplicated
# keys sums in another order): measured 1.2e-5 on latents of magnitude ~12. Every misalignment
# tried moves them by 5e-3 or more, 50x this bound.
NOOP_ATOL = 1e-4
MARA = "Mara, a woman in her sixties, silver braid, yellow raincoat"
TOM = "Tom, a tall fisherman, red beard, navy sweater"
HARBOUR = "a harbour at dawn, fishing boats, gulls"


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> Any:
    return load_tiny(tiny_dir)


@pytest.fixture
def shared(pipe: Any) -> Iterator[SharedAttention]:
    sa = SharedAttention(pipe.unet)
    yield sa
    sa.uninstall()


@pytest.fixture(scope="module")
def refs(pipe: Any) -> dict[str, Any]:
    """Portraits recorded before any processor of ours is installed (as stock renders)."""
    mara_latents, mara = portrait(pipe, "Mara", MARA, seed=5)
    _, tom = portrait(pipe, "Tom", TOM, seed=9)
    return {"Mara": mara, "Tom": tom, "mara_latents": mara_latents}


def test_installed_but_idle_is_the_stock_pipeline(pipe: Any) -> None:
    cond = text(pipe, HARBOUR)
    stock = scene(pipe, None, cond, 11)
    before = dict(pipe.unet.attn_processors)
    sa = SharedAttention(pipe.unet)
    names = [
        n.removesuffix(".processor")
        for n, p in pipe.unet.attn_processors.items()
        if isinstance(p, SharedAttnProcessor)
    ]
    assert (
        names == list(sa.layers)
        and names
        and all(n.startswith("up_blocks.") and n.endswith("attn1") for n in names)
    )
    assert torch.equal(scene(pipe, sa, cond, 11), stock)  # installed, idle
    sa.uninstall()
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {
        k: type(v) for k, v in before.items()
    }
    assert torch.equal(scene(pipe, None, cond, 11), stock)


def test_self_reference_is_a_no_op(pipe: Any, shared: SharedAttention, refs: dict[str, Any]) -> None:
    """The portrait as its own reference: attention over every key twice is the same average."""
    own = scene(pipe, shared, text(pipe, MARA), 5, [refs["Mara"]])
    assert max_diff(own, refs["mara_latents"]) < NOOP_ATOL
    assert not torch.equal(own, refs["mara_latents"])  # it did run the shared path, just to no effect
    other = scene(pipe, shared, text(pipe, MARA), 5, [refs["Tom"]])
    assert max_diff(other, refs["mara_latents"]) > 100 * NOOP_ATOL  # the tolerance means something


def _offset(by: int) -> Any:
    run = replay.ReferencePasses.run

    def shifted(self: Any, ref: Any, step: int, t: Any) -> Any:
        return run(self, ref, min(max(step + by, 0), STEPS), t)

    return shifted


def _swap_halves(self: Any, ref: Any, step: int, t: Any) -> Any:
    got = ORIGINAL_RUN(self, ref, step, t)
    return {name: (k.flip(0), v.flip(0)) for name, (k, v) in got.items()}


def _swap_layers(self: Any, ref: Any, step: int, t: Any) -> Any:
    got = ORIGINAL_RUN(self, ref, step, t)
    names = list(got)
    return dict(zip(names, [got[n] for n in reversed(names)], strict=True))


ORIGINAL_RUN = replay.ReferencePasses.run
BREAKS = {
    "replay one step ahead": _offset(+1),
    "replay one step behind": _offset(-1),
    "guidance halves crossed": _swap_halves,
    "layers crossed": _swap_layers,
}


@pytest.mark.parametrize("broken", sorted(BREAKS))
def test_any_misalignment_breaks_the_no_op(
    pipe: Any, shared: SharedAttention, refs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A build with the reference out of step, half or layer is caught by the no-op test."""
    monkeypatch.setattr(replay.ReferencePasses, "run", BREAKS[broken])
    own = scene(pipe, shared, text(pipe, MARA), 5, [refs["Mara"]])
    assert max_diff(own, refs["mara_latents"]) > 10 * NOOP_ATOL


def test_a_replay_out_of_step_with_the_scheduler_stops_the_scene(
    pipe: Any, shared: SharedAttention, refs: dict[str, Any]
) -> None:
    def skip_a_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == 1:
            p.scheduler._step_index += 1  # the scheduler moves on without the replay
        return kwargs

    with pytest.raises(RuntimeError, match="out of step"):
        scene(pipe, shared, text(pipe, HARBOUR), 11, [refs["Mara"]], on_step_end=skip_a_step)
    assert shared.state.mode == "idle" and not shared.state.shared  # and leaves nothing behind


def test_reference_rows_follow_the_recorded_trajectory(pipe: Any, refs: dict[str, Any]) -> None:
    """Every reference pass is the portrait's own UNet call at that step: same input, same output."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    sa: SharedAttention | None = None

    def probe(_m: Any, args: tuple[Any, ...], _kw: dict[str, Any], out: Any) -> None:
        mode = sa.state.mode if sa is not None else "portrait"
        calls.append((mode, args[0].clone(), out[0].clone()))

    hook = pipe.unet.register_forward_hook(probe, with_kwargs=True)
    try:
        latents, ref = portrait(pipe, "Mara", MARA, seed=5)
        recorded = list(calls)
        calls.clear()
        sa = SharedAttention(pipe.unet)
        scene(pipe, sa, text(pipe, HARBOUR), 11, [ref], stop_early=False)
    finally:
        hook.remove()
        if sa is not None:
            sa.uninstall()
    passes = [(x, y) for mode, x, y in calls if mode == "capture"]
    assert len(recorded) == len(passes) == STEPS
    for step, ((x0, y0), (x1, y1)) in enumerate(zip([c[1:] for c in recorded], passes, strict=True)):
        assert torch.equal(x0, x1), f"step {step}: reference pass input differs from the portrait's"
        assert torch.equal(y0, y1), f"step {step}: reference pass output differs from the portrait's"
    assert torch.equal(torch.from_numpy(ref.latents[-1:]), latents)  # the trajectory ends at the portrait
    assert sum(mode == "share" for mode, _, _ in calls) == STEPS


def test_references_change_the_scene(pipe: Any, shared: SharedAttention, refs: dict[str, Any]) -> None:
    cond = text(pipe, HARBOUR)
    plain = scene(pipe, shared, cond, 11)
    mara = scene(pipe, shared, cond, 11, [refs["Mara"]])
    tom = scene(pipe, shared, cond, 11, [refs["Tom"]])
    both = scene(pipe, shared, cond, 11, [refs["Mara"], refs["Tom"]])
    pairs = {"with/without": (mara, plain), "A/B": (mara, tom), "AB/A": (both, mara), "AB/B": (both, tom)}
    for label, (a, b) in pairs.items():
        assert max_diff(a, b) > 100 * NOOP_ATOL, label


def test_a_scene_is_the_same_alone_in_any_order_and_company(
    pipe: Any, tiny_dir: Path, shared: SharedAttention, refs: dict[str, Any]
) -> None:
    jobs = [
        ("Mara on the quay", 21, ["Mara"]),
        ("Mara and Tom mend nets", 22, ["Mara", "Tom"]),
        (HARBOUR, 23, []),
    ]

    def make(p: Any, sa: SharedAttention, job: tuple[str, int, list[str]], cache: Any = None) -> torch.Tensor:
        prompt, seed, who = job
        return scene(p, sa, text(p, prompt), seed, [refs[w] for w in who], cache=cache)

    forward = [make(pipe, shared, j) for j in jobs]
    backward = [make(pipe, shared, j) for j in reversed(jobs)][::-1]
    cached = replay.KVCache(1 << 30)
    with_cache = [make(pipe, shared, j, cached) for j in (jobs[1], jobs[0], jobs[1])]
    assert cached.hits == 3 * STEPS  # Mara in the second scene, Mara and Tom in the third: reused
    alone_pipe = load_tiny(tiny_dir)  # another warm pipeline: another worker
    alone_sa = SharedAttention(alone_pipe.unet)
    alone = make(alone_pipe, alone_sa, jobs[1])
    stock = scene(load_tiny(tiny_dir), None, text(pipe, HARBOUR), 23)
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert torch.equal(forward[1], alone) and torch.equal(forward[1], with_cache[0])
    assert torch.equal(forward[1], with_cache[2]) and torch.equal(forward[0], with_cache[1])
    assert torch.equal(forward[2], stock)  # named no one: exactly as with consistency off


FRESH = """
import pickle, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from characters import load_tiny, scene, text
from pipeline.images.consistency.attention import SharedAttention
refs = pickle.loads(open({refs!r}, "rb").read())
pipe = load_tiny(__import__("pathlib").Path({tiny!r}))
out = scene(pipe, SharedAttention(pipe.unet), text(pipe, {prompt!r}), 22, refs)
np.save({out!r}, out.numpy())
"""


def test_references_are_plain_data_a_fresh_process_makes_the_same_scene(
    pipe: Any, tiny_dir: Path, shared: SharedAttention, refs: dict[str, Any], tmp_path: Path
) -> None:
    cast = [refs["Mara"], refs["Tom"]]
    for ref in cast:
        for name in ("latents", "prompt_embeds", "negative_embeds", "pooled", "negative_pooled"):
            assert isinstance(getattr(ref, name), np.ndarray)
    blob = pickle.dumps(cast)
    assert b"torch" not in blob  # nothing tied to a device or a torch version travels
    (tmp_path / "refs.pkl").write_bytes(blob)
    prompt = "Mara and Tom mend nets"
    here = scene(pipe, shared, text(pipe, prompt), 22, cast)
    code = FRESH.format(
        tests=str(Path(__file__).parent),
        refs=str(tmp_path / "refs.pkl"),
        tiny=str(tiny_dir),
        prompt=prompt,
        out=str(tmp_path / "out.npy"),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), here.numpy())


def test_a_reference_file_round_trips_to_the_bit(refs: dict[str, Any], tmp_path: Path) -> None:
    save_reference(tmp_path / "Mara.npz", refs["Mara"])
    back = load_reference(tmp_path / "Mara.npz")
    assert back.digest == refs["Mara"].digest and back.meta() == refs["Mara"].meta()
    assert [p.name for p in tmp_path.iterdir()] == ["Mara.npz"]  # no temporary left


def test_cached_and_early_stopped_passes_change_nothing(
    pipe: Any, shared: SharedAttention, refs: dict[str, Any]
) -> None:
    cond, cast = text(pipe, HARBOUR), [refs["Mara"], refs["Tom"]]
    base = scene(pipe, shared, cond, 11, cast)
    assert torch.equal(scene(pipe, shared, cond, 11, cast, stop_early=False), base)
    for host in (False, True):
        cache = replay.KVCache(1 << 30, host=host)
        first, again = (scene(pipe, shared, cond, 11, cast, cache=cache) for _ in range(2))
        assert torch.equal(first, base) and torch.equal(again, base) and cache.hits == 2 * STEPS
    small = replay.KVCache(max_bytes=1)  # keeps one entry only: every pass is made again
    assert torch.equal(scene(pipe, shared, cond, 11, cast, cache=small), base) and len(small._entries) == 1


def test_without_guidance_the_single_row_is_shared_too(pipe: Any, shared: SharedAttention) -> None:
    latents, ref = portrait(pipe, "Mara", MARA, seed=5, guidance=1.0)
    own = scene(pipe, shared, text(pipe, MARA), 5, [ref], guidance=1.0)
    assert max_diff(own, latents) < NOOP_ATOL


def _two_chunks(cond: TextConditioning) -> TextConditioning:
    """A 154-token conditioning, as compel makes of a long prompt (two 77-token chunks)."""
    return TextConditioning(
        torch.cat([cond.prompt_embeds] * 2, dim=1),
        torch.cat([cond.negative_embeds] * 2, dim=1),
        cond.pooled,
        cond.negative_pooled,
    )


def test_prompts_of_any_length(pipe: Any, shared: SharedAttention, refs: dict[str, Any]) -> None:
    """A reference and a scene need not share a token length: each pass has its own conditioning."""
    from pipeline.images.consistency.record import record_portrait

    long = _two_chunks(text(pipe, MARA))
    with torch.no_grad():
        latents, ref = record_portrait(
            pipe, "Mara", long, seed=5, width=W, height=H, steps=STEPS, guidance=GUIDANCE
        )
    assert ref.prompt_embeds.shape[1] == 154
    noop = scene(pipe, shared, long, 5, [ref])
    assert max_diff(noop, latents) < NOOP_ATOL
    short_scene = scene(pipe, shared, text(pipe, HARBOUR), 11, [ref])  # 77-token scene, 154-token reference
    long_scene = scene(pipe, shared, _two_chunks(text(pipe, HARBOUR)), 11, [refs["Mara"]])  # and the reverse
    assert torch.isfinite(short_scene).all() and torch.isfinite(long_scene).all()
    assert max_diff(short_scene, scene(pipe, shared, text(pipe, HARBOUR), 11)) > 100 * NOOP_ATOL


def test_a_reference_that_does_not_fit_is_refused(pipe: Any, shared: SharedAttention) -> None:
    from dataclasses import replace

    _, ref = portrait(pipe, "Mara", MARA, seed=5, steps=STEPS + 1)
    fits = f"Mara is {W}×{H}, {STEPS + 1} steps; the scene is {W}×{H}, {STEPS} steps"
    with pytest.raises(ValueError, match=fits):
        scene(pipe, shared, text(pipe, HARBOUR), 11, [ref])
    _, ref = portrait(pipe, "Mara", MARA, seed=5)
    half = replace(ref, dtype="float16", latents=ref.latents.astype(np.float16))  # from a GPU worker
    with pytest.raises(ValueError, match=r"made in float16, this model runs torch\.float32"):
        scene(pipe, shared, text(pipe, HARBOUR), 11, [half])


def test_replaced_processors_are_noticed(pipe: Any, refs: dict[str, Any]) -> None:
    sa = SharedAttention(pipe.unet)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # what attention slicing or a loader does
    assert not sa.installed()
    with pytest.raises(RuntimeError, match="install them again"):
        scene(pipe, sa, text(pipe, HARBOUR), 11, [refs["Mara"]])


def test_fused_projections(tiny_dir: Path) -> None:
    """With QKV fused (a generator option), idle is still stock and self-reference still a no-op."""
    fused = load_tiny(tiny_dir)
    fused.fuse_qkv_projections()
    cond = text(fused, MARA)
    latents, ref = portrait(fused, "Mara", MARA, seed=5)
    sa = SharedAttention(fused.unet)
    assert torch.equal(scene(fused, sa, cond, 5), latents)
    assert max_diff(scene(fused, sa, cond, 5, [ref]), latents) < NOOP_ATOL


def test_reference_from_a_picture(pipe: Any, shared: SharedAttention) -> None:
    """A bundle picture: its latent noised to every step's sigma; the scene sees it, repeatably."""
    from PIL import Image

    from pipeline.images.consistency.record import encode_picture, fit_picture, reference_from_picture

    rng = np.random.default_rng(0)
    taken = Image.fromarray((rng.random((300, 200, 3)) * 255).astype("uint8"))  # portrait-shaped
    picture = fit_picture(taken, W, H)
    assert picture.size == (W, H) and picture.mode == "RGB"
    with torch.no_grad():
        ref = reference_from_picture(
            pipe, "Mara", picture, text(pipe, MARA), seed=5, width=W, height=H, steps=STEPS
        )
        x0 = encode_picture(pipe, picture, W, H)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    lat = torch.from_numpy(ref.latents)
    assert ref.source == "picture" and torch.equal(lat[-1:], x0)
    noise = (lat[0] - lat[-1]) / sched.sigmas[0]
    for i in range(STEPS):
        assert torch.allclose(lat[i] - lat[-1], sched.sigmas[i] * noise, atol=1e-5)
    cond = text(pipe, HARBOUR)
    made = scene(pipe, shared, cond, 11, [ref])
    assert torch.equal(made, scene(pipe, shared, cond, 11, [ref]))
    assert max_diff(made, scene(pipe, shared, cond, 11)) > 100 * NOOP_ATOL
    with pytest.raises(ValueError, match="expected 64×48"):
        reference_from_picture(
            pipe, "Mara", picture.resize((32, 32)), text(pipe, MARA), seed=5, width=W, height=H, steps=STEPS
        )


def test_a_reference_keeps_its_dtype(refs: dict[str, Any]) -> None:
    ref: Reference = refs["Mara"]
    assert ref.dtype == "float32" and ref.latents.dtype == np.float32
    assert ref.latents.shape == (STEPS + 1, 4, H // 8, W // 8)
