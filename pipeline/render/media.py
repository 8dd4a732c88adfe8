"""A scene's sound and moving pictures, made in its CPU half once its picture is ready.

In order: its narration spoken (or its recording converted), so that its length is known; its
clip at exactly that many frames; its master clip with handles for the timelines (when
`[outputs] timeline`). Whatever made the picture (the model, or a bundle's own) calls
`scene_media` the same way and puts what it returns into the scene's record.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.fsutil import file_sha256
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob
from pipeline.render.sound import SoundSetup, scene_length, speak
from pipeline.settings import Settings
from pipeline.sound.timing import requested_crossfade
from pipeline.video.encode import video_encoding
from pipeline.video.framerate import frame_rate_json
from pipeline.video.kenburns import Box, render_clip
from pipeline.video.master import MasterInfo, handle_frames, master_name, write_master_clip

Picture = Image.Image | np.ndarray


def scene_media(
    job: StoryJob,
    plan: ScenePlan,
    picture: Picture,
    settings: Settings,
    sound: SoundSetup,
    *,
    source_box: Box | None = None,
) -> dict[str, Any]:
    """Speak the scene, then render its clip (and master) at the length its narration needs.

    Returns the record's fields for all of it: length and what set it, narration, clip, master,
    and their timings. `source_box` is the part of `picture` the scene shows (a provided one).
    """
    t0 = time.perf_counter()
    speech = speak(job, plan, sound)
    frames, how = scene_length(plan, speech, settings, len(job.story.scenes))
    t1 = time.perf_counter()
    v = settings.video
    encoding = video_encoding(v, (settings.image.width, settings.image.height))
    seconds = float(frames / v.fps)  # encoding.frames(seconds) == frames: round() of a whole number
    mp4 = job.folder.clip(plan.stem)
    render_clip(
        picture, mp4, encoding, seconds=seconds, motion=plan.motion, zoom=v.zoom, pan=v.pan,
        fade_seconds=v.fade_seconds, source_box=source_box,
    )  # fmt: skip
    t2 = time.perf_counter()
    record: dict[str, Any] = {
        "seconds": seconds,  # as made: frames / fps
        "seconds_asked": plan.seconds,  # the story's (or the default): a minimum
        "frames": frames,
        "length_from": how,  # "seconds" or "narration"
        "narration": speech.record() if speech is not None else None,
        "clip": mp4.relative_to(job.out).as_posix(),
        **file_facts("clip", mp4),
    }
    if speech is not None and speech.wav is not None:
        wav = speech.wav
        record |= {"narration_wav": wav.relative_to(job.work).as_posix(), **file_facts("narration_wav", wav)}
    if settings.outputs.timeline:
        master = write_master(job, plan, picture, settings, seconds, source_box)
        record |= {"master": master.path.relative_to(job.out).as_posix(), **file_facts("master", master.path)}
        record["master_info"] = master_record(master)
    t3 = time.perf_counter()
    record["timings"] = {"speech": t1 - t0, "clip": t2 - t1, "master": t3 - t2}
    return record


def file_facts(key: str, path: Path) -> dict[str, Any]:
    """`KEY_bytes` and `KEY_sha256`: what a resumed story checks before it trusts the file."""
    return {f"{key}_bytes": path.stat().st_size, f"{key}_sha256": file_sha256(path)}


def write_master(
    job: StoryJob,
    plan: ScenePlan,
    picture: Picture,
    settings: Settings,
    seconds: float,
    source_box: Box | None,
) -> MasterInfo:
    """The scene's clean clip with handles (NAME/master/), in `[outputs] master_codec`. Handles
    cover half the requested crossfade, so they cover the film's (clamped, never longer)."""
    v = settings.video
    encoding = video_encoding(v, (settings.image.width, settings.image.height)).for_master(
        settings.outputs.master_codec
    )
    job.folder.masters.mkdir(parents=True, exist_ok=True)
    return write_master_clip(
        picture, job.folder.masters / master_name(plan.stem, encoding), encoding, seconds=seconds,
        motion=plan.motion, zoom=v.zoom, pan=v.pan, source_box=source_box,
        handles=handle_frames(v.fps, requested_crossfade(v.crossfade_seconds, v.fps)),
    )  # fmt: skip


def master_record(m: MasterInfo) -> dict[str, Any]:
    return {
        "codec": m.codec, "width": m.width, "height": m.height, "fps": frame_rate_json(m.fps),
        "frames": m.frames, "scene_frames": m.scene_frames, "handles": m.handles,
    }  # fmt: skip
