"""What the consistency tests share: the tiny pipeline loaded as the daemon loads it, and scenes.

A scene here is the generator's denoising call (`pipe(...)` with prompt embeddings and the
seed's CPU-drawn noise, latents out), with or without references in view; tests compare the
latents, which decode to the PNG bit for bit or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler

from pipeline.images.consistency.attention import SharedAttention
from pipeline.images.consistency.record import TextConditioning, initial_noise, latent_shape, record_portrait
from pipeline.images.consistency.reference import Reference
from pipeline.images.consistency.replay import references_in_view
from pipeline.images.consistency.tiny_adapter import ENCODER, WEIGHTS
from pipeline.images.model import ModelLocation, from_folder, quiet_libraries

W, H, STEPS, GUIDANCE = 64, 48, 4, 6.0
CPU = torch.device("cpu")


def load_tiny(tiny_dir: Path) -> Any:
    """Through `from_pretrained`, as pipeline/images/model.py loads it; Euler, as the generator sets."""
    quiet_libraries()
    pipe = from_folder(ModelLocation("tiny", tiny_dir, None, None), torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def text(pipe: Any, prompt: str, negative: str = "blurry") -> TextConditioning:
    with torch.no_grad():
        pe, npe, po, npo = pipe.encode_prompt(
            prompt=prompt,
            device=CPU,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    return TextConditioning(pe, npe, po, npo)


def portrait(pipe: Any, who: str, prompt: str, seed: int, **kw: Any) -> tuple[torch.Tensor, Reference]:
    with torch.no_grad():
        return record_portrait(
            pipe,
            who,
            text(pipe, prompt),
            seed=seed,
            width=W,
            height=H,
            steps=kw.pop("steps", STEPS),
            guidance=kw.pop("guidance", GUIDANCE),
            **kw,
        )


def scene(
    pipe: Any,
    shared: SharedAttention | None,
    cond: TextConditioning,
    seed: int,
    refs: list[Reference] | None = None,
    guidance: float = GUIDANCE,
    extra: dict[str, Any] | None = None,
    **view: Any,
) -> torch.Tensor:
    """One scene's latents; `refs` in view when given (through `references_in_view`)."""
    noise = initial_noise(seed, latent_shape(pipe, W, H), torch.float32, CPU)
    call = {
        **cond.pipe_kwargs(),
        "latents": noise,
        "width": W,
        "height": H,
        "num_inference_steps": STEPS,
        "guidance_scale": guidance,
        "output_type": "latent",
        "return_dict": False,
        **(extra or {}),
    }
    with torch.no_grad():
        if not refs:
            return pipe(**call)[0]
        assert shared is not None
        with references_in_view(
            pipe, shared, refs, width=W, height=H, steps=STEPS, guidance=guidance, **view
        ) as more:
            return pipe(**call, **more)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def broken_adapter(adapter_dir: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the tiny adapter folder, broken as `how` says (test_consistency_ip.ERRORS)."""
    folder = tmp_path / "broken"
    shutil.copytree(adapter_dir, folder)
    if how == "no folder":
        shutil.rmtree(folder)
    elif how == "no adapter file":
        (folder / WEIGHTS).unlink()
    elif how == "no encoder config":
        (folder / ENCODER / "config.json").unlink()
    elif how == "no encoder weights":
        for f in (folder / ENCODER).glob("*.safetensors"):
            f.unlink()
    elif how == "not an adapter":
        (folder / WEIGHTS).write_bytes(b"not a safetensors file")
    elif how == "encoder does not fit":  # a wider vision model than the adapter was made for
        config = json.loads((folder / ENCODER / "config.json").read_text())
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        config.update(hidden_size=48, projection_dim=48)
        shutil.rmtree(folder / ENCODER)
        wide = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**{k: v for k, v in config.items() if k != "architectures"})
        )
        wide.save_pretrained(folder / ENCODER)
    return folder


# -- stories for the daemon tests (tests/test_characters_daemon.py, tests/test_ray.py) ----------------
# Every scene has its own seed, so the same scene in another story (another order, other company)
# is the same request: its PNG must come out byte-identical.
MARA_LOOKS = "a woman in her sixties, silver braid, yellow raincoat"
TOM_LOOKS = "a tall fisherman, red beard, navy sweater"
STYLE = "overcast Atlantic light"
KEEPER: dict[str, Any] = {
    "title": "The keeper",
    "seed": 7,
    "style": STYLE,
    "characters": {"Mara": MARA_LOOKS, "Tom": {"description": TOM_LOOKS}, "Nobody": "named by no scene"},
    "scenes": [
        {"description": "Mara climbs the lighthouse stairs", "seed": 11},
        {"description": "Tom and Mara mend nets on the quay", "seed": 12},
        {"description": "the empty sea at dawn", "seed": 13},
        {"description": "Tom rows out alone", "seed": 14},
    ],
}
# Scenes 4 and 3 of KEEPER, in that order, in other company (Ann instead of Mara, a scene of hers first).
OTHERS: dict[str, Any] = {
    "title": "Others",
    "seed": 7,
    "style": STYLE,
    "characters": {"Ann": "a girl of ten, red wellingtons", "Tom": {"description": TOM_LOOKS}},
    "scenes": [
        {"description": "Ann waves from the harbour wall", "seed": 20},
        {"description": "Tom rows out alone", "seed": 14},
        {"description": "the empty sea at dawn", "seed": 13},
    ],
}
SAME_IN_OTHERS = {2: 4, 3: 3}  # OTHERS' scene -> KEEPER's scene
NO_CHARACTER = 3  # KEEPER's scene naming no character
KEEPER_REFERENCED = [["Mara"], ["Mara", "Tom"], [], ["Tom"]]  # each scene's characters_referenced
