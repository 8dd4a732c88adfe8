"""One story, top to bottom: plan -> image -> finish -> clip per scene; then film, contact sheet,
manifest and ZIP, in a work folder laid out as the outbox will be.

    runner.py    `render_story`: the steps, numbered, each safe to repeat
    job.py       `StoryJob` and `WorkFolder`: the story and its work folder's layout
    scenes.py    the scene loop: the GPU on scene N+1 while the CPU pool finishes N
    records.py   the CPU half of a scene, and the record that says a scene is finished
    media.py     a scene's narration, clip and master clip, at the length its narration needs
    sound.py     the voice opened once; after the last scene the timing, captions and mix
    extras.py    film and its sound, timelines, contact sheet, from the finished scenes
    editing.py   the timelines for editing software, over the master clips
    manifest.py  what was made, and how
    events.py    what the caller hears (scene started/finished, steps) and how it stops a story

The names below are the API the daemon, the benchmarks and library users call.
"""

from pipeline.render.events import QuietEvents, RenderEvents, Stopped
from pipeline.render.job import StoryJob, WorkFolder
from pipeline.render.runner import render_story
from pipeline.render.scenes import CpuPool
from pipeline.render.sound import SoundSetup

__all__ = [
    "CpuPool",
    "QuietEvents",
    "RenderEvents",
    "SoundSetup",
    "Stopped",
    "StoryJob",
    "WorkFolder",
    "render_story",
]
