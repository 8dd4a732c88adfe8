"""The story for editing software: timeline.otio, timeline.xml (FCP7 XML), timeline.edl (CMX 3600).

The master clips (NAME/master/, clean, with handles) were made with each scene
(pipeline/render/media.py); the timelines place them as the film does, frame for frame, with
the mix's narration and music stems as audio tracks when the story has sound. Every media
path is relative to the story folder, so the folder (or its unzipped ZIP) can be moved.
"""

from __future__ import annotations

from typing import Any

import structlog
from PIL import Image

from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob
from pipeline.render.media import write_master
from pipeline.settings import Settings
from pipeline.sound.mix import SoundTracks
from pipeline.sound.timing import Timing
from pipeline.video.master import MasterInfo
from pipeline.video.timeline import Stems, TimelineScene, write_timelines

log = structlog.get_logger("storyreel")


def _master(job: StoryJob, plan: ScenePlan, record: dict[str, Any], settings: Settings) -> MasterInfo:
    """The scene's master clip as its record describes it; made now from its PNG if the scene was
    made before a timeline was asked for (the config changed while the story was stopped)."""
    info = record.get("master_info")
    if "master" not in record or not isinstance(info, dict):
        with Image.open(job.folder.image(plan.stem)) as img:
            return write_master(job, plan, img.convert("RGB"), settings, record["seconds"], None)
    return MasterInfo(
        path=job.out / record["master"], codec=info["codec"], width=info["width"], height=info["height"],
        fps=settings.video.fps, frames=info["frames"], scene_frames=info["scene_frames"],
        handles=info["handles"], render_seconds=record.get("timings", {}).get("master", 0.0),
    )  # fmt: skip


def write_story_timeline(
    job: StoryJob,
    plans: list[ScenePlan],
    records: dict[int, dict[str, Any]],
    settings: Settings,
    timing: Timing,
    tracks: SoundTracks | None,
) -> dict[str, Any]:
    """Write the three timelines into the story folder; returns the manifest's account of them."""
    scenes = [TimelineScene(_master(job, p, records[p.number], settings), p.description) for p in plans]
    stems = None if tracks is None else Stems(narration=tracks.narration_stem, music=tracks.music_stem)
    files = write_timelines(
        job.out, job.story.title or job.name, scenes, fps=settings.video.fps,
        crossfade_frames=timing.crossfade_frames, stems=stems,
    )  # fmt: skip
    if files.frames != timing.frames:
        raise RuntimeError(f"the timeline has {files.frames} frames, the film {timing.frames}")
    for why in files.skipped:
        log.info("timeline not written", story=job.name, why=why)
    return {
        "files": [p.relative_to(job.out).as_posix() for p in files.written],
        "not_written": list(files.skipped),
        "frames": files.frames,
        "masters": [s.master.path.relative_to(job.out).as_posix() for s in scenes],
        "master_codec": settings.outputs.master_codec,
        "handles": scenes[0].master.handles,
        "audio_tracks": [] if stems is None else [
            p.relative_to(job.out).as_posix() for p in (stems.narration, stems.music) if p is not None
        ],
    }  # fmt: skip
