"""Characters behind the image seam: the SDXL generator (tiny model, CPU) making portraits and
scenes with references, as a worker does from plain requests.

What is checked, each able to fail: the load order (adapter, then ours, then the saved
processors); a portrait's picture and recorded reference; a scene naming no one unchanged by
the machinery (or by consistency off, which installs nothing); a reference scene that keeps its
references on every rung of the OOM ladder (attention slicing would replace them); the
compiled UNet never used with references in view; warm-up with an adapter.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from pipeline.bundle.pictures import fit_picture
from pipeline.images.consistency.attention import SharedAttnProcessor
from pipeline.images.consistency.tiny_adapter import build_tiny_ip_adapter
from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.seam import GeneratedImage, PortraitRequest, SceneRequest
from pipeline.render import StoryJob, render_story
from pipeline.settings import Settings, settings_from_dict
from pipeline.story import load_story

from characters import load_tiny

pytestmark = pytest.mark.slow

W, H, STEPS, G = 64, 48, 2, 6.0
MARA = PortraitRequest("Mara", "Mara, a woman, silver braid, yellow raincoat", "blurry", 5, W, H, STEPS, G)
TOM = PortraitRequest("Tom", "Tom, a tall fisherman, red beard", "blurry", 6, W, H, STEPS, G)


def make_settings(tiny: Path, characters: dict[str, Any] | None = None, **image: Any) -> Settings:
    return settings_from_dict(
        {
            "model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny), "warmup": False},
            "image": {"width": W, "height": H, "steps": STEPS, **image},
            "video": {"fps": 8, "seconds_per_scene": 1.0, "preset": "ultrafast"},
            "characters": characters or {},
        },
        tiny.parent,
    )


def scene(prompt: str, seed: int, *refs: Any) -> SceneRequest:
    return SceneRequest(prompt, "blurry", seed, W, H, STEPS, G, tuple(refs))


def png(out: GeneratedImage) -> bytes:
    buf = io.BytesIO()
    out.image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gen(tiny_dir: Path) -> Iterator[SdxlGenerator]:
    g = SdxlGenerator(make_settings(tiny_dir))
    yield g
    g.close()


@pytest.fixture(scope="module")
def portraits(gen: SdxlGenerator) -> dict[str, GeneratedImage]:
    return {r.character: gen.generate(r) for r in (MARA, TOM)}


def test_a_portrait_comes_back_with_its_reference_as_plain_data(
    gen: SdxlGenerator, portraits: dict[str, GeneratedImage]
) -> None:
    mara = portraits["Mara"]
    ref = mara.reference
    assert ref is not None and (ref.character, ref.source, ref.width, ref.height) == (
        "Mara",
        "generated",
        W,
        H,
    )
    assert ref.latents.shape[0] == STEPS + 1 and ref.image_embeds is None
    assert mara.image.size == (W, H) and mara.info["portrait"]["reference_sha256"] == ref.digest
    again = pickle.loads(pickle.dumps(mara))  # what a Ray worker sends back
    assert again.reference is not None and again.reference.digest == ref.digest
    assert png(gen.generate(MARA)) == png(mara)  # the same portrait every time
    # The portrait is the plain render of its prompt and seed: its trajectory's end is that picture.
    plain = gen.generate(SceneRequest(MARA.prompt, MARA.negative, MARA.seed, W, H, STEPS, G))
    assert png(plain) == png(mara)


def test_references_change_the_scene_and_travel_in_the_request(
    gen: SdxlGenerator, portraits: dict[str, GeneratedImage]
) -> None:
    mara, tom = portraits["Mara"].reference, portraits["Tom"].reference
    plain = gen.generate(scene("Mara on the quay", 9))
    with_mara = gen.generate(scene("Mara on the quay", 9, mara))
    with_tom = gen.generate(scene("Mara on the quay", 9, tom))
    assert len({png(plain), png(with_mara), png(with_tom)}) == 3
    assert "references" not in plain.info
    assert with_mara.info["references"] == [
        {"character": "Mara", "source": "generated", "reference_sha256": mara.digest}  # type: ignore[union-attr]
    ]
    travelled = pickle.loads(pickle.dumps(scene("Mara on the quay", 9, mara)))
    assert png(gen.generate(travelled)) == png(with_mara)


def test_consistency_off_installs_nothing_and_a_plain_scene_is_the_same_either_way(
    gen: SdxlGenerator, tiny_dir: Path
) -> None:
    off = SdxlGenerator(make_settings(tiny_dir, {"consistency": "off"}))
    try:
        kinds = {type(p) for p in off.pipe.unet.attn_processors.values()}  # type: ignore[union-attr]
        assert kinds == {AttnProcessor2_0}
        assert off.describe()["characters"]["consistency"] == "off"
        ours = [p for p in gen.pipe.unet.attn_processors.values() if isinstance(p, SharedAttnProcessor)]  # type: ignore[union-attr]
        assert len(ours) == gen.describe()["characters"]["shared_layers"] == 2
        assert png(off.generate(scene("the empty sea", 4))) == png(gen.generate(scene("the empty sea", 4)))
        with pytest.raises(ValueError, match="consistency off"):
            off.generate(MARA)
    finally:
        off.close()


def oom_on_first_call(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first pipeline call runs out of memory; records the attention processor of each call."""
    seen: list[str] = []
    real = StableDiffusionXLPipeline.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(
            type(
                self.unet.attn_processors["up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
            ).__name__
        )
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    return seen


def test_a_reference_scene_never_loses_its_references_to_attention_slicing(
    gen: SdxlGenerator, portraits: dict[str, GeneratedImage], tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slicing replaces every processor: the baseline's and the OOM rungs' slicing is skipped for
    a scene with references, which comes out exactly as without any slicing."""
    mara = portraits["Mara"].reference
    want = png(gen.generate(scene("Mara on the quay", 9, mara)))
    sliced = SdxlGenerator(make_settings(tiny_dir, attention_slicing="on"))
    try:
        assert sliced.describe()["memory_savers"] == ["attention_slicing"]
        out = sliced.generate(scene("Mara on the quay", 9, mara))
        assert png(out) == want and out.info["memory_savers"] == []
        plain = sliced.generate(scene("the empty sea", 4))  # a plain scene still slices
        assert plain.info["memory_savers"] == ["attention_slicing"]
    finally:
        sliced.close()
    seen = oom_on_first_call(monkeypatch)
    out = gen.generate(scene("Mara on the quay", 9, mara))
    assert out.info["oom_retries"] == 1 and "attention_slicing" not in out.info["memory_savers"]
    assert out.info["memory_savers"] == ["vae_slicing"] and png(out) == want
    assert seen == ["SharedAttnProcessor", "SharedAttnProcessor"]


def test_the_compiled_unet_runs_plain_scenes_and_never_a_reference_scene(
    tiny_dir: Path, portraits: dict[str, GeneratedImage]
) -> None:
    """torch.compile with our processors installed (Dynamo, an eager backend: CPU has no inductor
    test here): plain scenes run the compiled graph, scenes with references the UNet itself."""
    g = SdxlGenerator(make_settings(tiny_dir))
    try:
        mara = portraits["Mara"].reference
        plain, ref_scene = scene("the empty sea", 4), scene("Mara on the quay", 9, mara)
        want = {"plain": png(g.generate(plain)), "ref": png(g.generate(ref_scene))}
        graphs: list[int] = []

        def backend(gm: Any, inputs: Any) -> Any:
            graphs.append(1)
            return gm.forward

        g.pipe.unet.compile(backend=backend, fullgraph=False)  # type: ignore[union-attr]
        calls: list[int] = []
        compiled = g.pipe.unet._compiled_call_impl  # type: ignore[union-attr]

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return compiled(*args, **kwargs)

        g.pipe.unet._compiled_call_impl = counting  # type: ignore[union-attr]
        assert png(g.generate(plain)) == want["plain"] and calls and graphs
        before = len(calls), len(graphs)
        assert png(g.generate(ref_scene)) == want["ref"]
        assert (len(calls), len(graphs)) == before  # not one compiled call, no graph traced
        assert g.pipe.unet._compiled_call_impl is counting  # type: ignore[union-attr]
    finally:
        g.close()


@pytest.fixture(scope="module")
def adapted(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdxlGenerator]:
    folder = build_tiny_ip_adapter(tmp_path_factory.mktemp("ipa") / "IP-Adapter", load_tiny(tiny_dir).unet)
    g = SdxlGenerator(make_settings(tiny_dir, {"ip_adapter": str(folder)}, attention_slicing="on"))
    yield g
    g.close()


def test_with_an_adapter_warm_up_runs_and_nothing_is_ever_sliced(adapted: SdxlGenerator) -> None:
    names = {n: type(p).__name__ for n, p in adapted.pipe.unet.attn_processors.items()}  # type: ignore[union-attr]
    assert {v for k, v in names.items() if k.endswith("attn2.processor")} == {"IPAdapterAttnProcessor2_0"}
    assert {v for k, v in names.items() if k.startswith("up_blocks") and "attn1" in k} == {
        "SharedAttnProcessor"
    }
    assert adapted.describe()["memory_savers"] == []  # attention_slicing = on, and not applied
    adapted.warm_up()  # a plain call on an adapted UNet needs the adapter's (neutral) embeddings
    for rung in adapted.savers.ladder():
        assert not rung.attention_slicing


def test_with_an_adapter_the_portrait_picture_is_encoded_into_its_reference(
    adapted: SdxlGenerator, gen: SdxlGenerator, portraits: dict[str, GeneratedImage]
) -> None:
    made = adapted.generate(MARA)
    ref = made.reference
    assert ref is not None and ref.image_embeds is not None and ref.image_embeds.shape[0] == 2
    assert png(made) == png(portraits["Mara"])  # the render itself: the adapter neutral, at scale 0
    assert np.array_equal(ref.latents, portraits["Mara"].reference.latents)  # type: ignore[union-attr]
    plain = scene("the empty sea", 4)
    assert png(adapted.generate(plain)) == png(gen.generate(plain))  # scale 0 == no adapter
    steered = adapted.generate(scene("Mara on the quay", 9, ref))
    assert png(steered) != png(gen.generate(scene("Mara on the quay", 9, ref)))


def test_a_bundle_picture_is_the_portrait(gen: SdxlGenerator, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    picture = Image.fromarray((rng.random((H, W, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    req = PortraitRequest("Ann", "Ann, a girl", "blurry", 8, W, H, STEPS, G, picture=buf.getvalue())
    made = gen.generate(req)
    assert np.array_equal(np.asarray(made.image), np.asarray(picture))  # published as it came
    ref = made.reference
    assert ref is not None and ref.source == "picture" and made.info["portrait"]["source"] == "picture"
    assert ref.latents.shape[0] == STEPS + 1
    ann_scene = gen.generate(scene("Ann waves", 2, ref))
    assert png(ann_scene) != png(gen.generate(scene("Ann waves", 2)))


def test_a_story_with_a_bundle_picture_publishes_it_fitted_as_the_portrait(
    gen: SdxlGenerator, tmp_path: Path
) -> None:
    """render_story's cast step, as the daemon runs it for a bundle (job.files: its extracted files)."""
    files = tmp_path / "bundle"
    files.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((50, 100, 3)) * 255).astype("uint8")).save(files / "ann.png")
    doc = {"seed": 2, "characters": {"Ann": {"image": "ann.png"}}, "scenes": ["Ann waves", "the sea"]}
    raw = json.dumps(doc).encode()
    story = load_story(raw, gen.settings.limits, bundle=True)
    job = StoryJob("ann", story, raw, tmp_path / "work", files=files)
    m = render_story(job, gen.settings, gen)
    portrait = job.out / "characters" / "Ann.png"
    with Image.open(portrait) as im:
        fitted = fit_picture(files / "ann.png", W, H).image()
        assert im.size == (W, H) and np.array_equal(np.asarray(im), np.asarray(fitted))
    ann = m["characters"]["Ann"]
    assert ann["source"] == "bundle picture" and ann["picture"] == "ann.png"
    refs = [(r["character"], r["source"], r["file"]) for r in m["scenes"][0]["consistency"]["references"]]
    assert refs == [("Ann", "picture", "characters/Ann.png")]
    assert m["scenes"][1]["consistency"] is None


def test_a_reference_that_does_not_fit_the_scene_is_refused(
    gen: SdxlGenerator, portraits: dict[str, GeneratedImage]
) -> None:
    mara = portraits["Mara"].reference
    with pytest.raises(ValueError, match="the scene is 64×48, 3 steps"):
        gen.generate(SceneRequest("Mara", "", 1, W, H, 3, G, (mara,)))  # type: ignore[arg-type]
