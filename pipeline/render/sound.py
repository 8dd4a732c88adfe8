"""The story's sound, as the runner makes it: the voice opened once, each scene spoken while it is
made, and after the last scene the timing, captions and mix.

    SoundSetup.open(settings)  at start: the voice (one that cannot work is a config error naming
                               its key, exit 2) and the box's default music, checked to decode
    speak(job, plan, setup)    a scene's narration, in its CPU half, before its clip: its length
                               follows the narration (`scene_length`)
    plan_sound(...)            after the last scene: where every scene and narration falls on
                               the film, the captions (film.srt/.vtt, the ASS file to burn in),
                               the music converted
    StorySound.mix(...)        the mix, its stems and AAC tracks, muxed into the film and clips

A resumed story does not speak again: a finished scene's record holds its Speech, read back
with its WAV from the work folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pipeline.bundle.sounds import SoundError, decode_sound
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob
from pipeline.settings import ConfigError, Settings
from pipeline.sound.burn import caption_filter, write_ass
from pipeline.sound.captions import Cue, story_cues, write_captions
from pipeline.sound.mix import SoundTracks, has_sound, mix_story
from pipeline.sound.mux import mux_audio
from pipeline.sound.recorded import Music, prepare_music
from pipeline.sound.speech import Speech
from pipeline.sound.timing import SceneSound, Timing, plan_timing, requested_crossfade, scene_frames, too_long
from pipeline.sound.voices import Voice, open_voice, speak_scene
from pipeline.story import StoryError
from pipeline.video.encode import video_encoding

log = structlog.get_logger("storyreel")

_CHECK_MUSIC_SECONDS = 5.0  # the default music is decoded this far at start: it decodes, and holds sound


@dataclass
class SoundSetup:
    """What the box brings to every story's sound: the voice, loaded once, and the default music.

    Scenes are spoken on the CPU pool's threads; piper's phonemizer is not known to be thread-safe,
    so one scene speaks at a time (speaking costs a small part of a scene's CPU half).
    """

    voice: Voice | None  # None: narration is captions only
    music: Path | None = None  # [audio] music: under every story that brings none of its own
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, settings: Settings) -> SoundSetup:
        """At start-up: a voice or music that cannot work raises ConfigError naming the key."""
        music = Path(settings.audio.music) if settings.audio.music else None
        if music is not None:
            try:
                decode_sound(music, _CHECK_MUSIC_SECONDS)
            except (SoundError, OSError) as err:
                raise ConfigError(f"audio.music: {music} {err}") from None
        return cls(open_voice(settings.voice), music)

    def describe(self) -> dict[str, Any]:
        return self.voice.describe() if self.voice is not None else {"engine": "none"}


def speak(job: StoryJob, plan: ScenePlan, setup: SoundSetup) -> Speech | None:
    """Scene `plan`'s narration as sound (a bundle's recording wins over the voice); None when
    it has neither. What the voice could not say is logged, naming the scene."""
    scene = job.story.scenes[plan.index]
    wav = job.folder.narration(plan.stem)
    if scene.audio:
        speech = speak_scene(
            None, scene=plan.number, narration=scene.narration, wav=wav,
            audio=job.file(scene.audio), audio_name=scene.audio,
        )  # fmt: skip
    else:
        with setup.lock:
            speech = speak_scene(setup.voice, scene=plan.number, narration=scene.narration, wav=wav)
    for warning in speech.warnings if speech else ():
        log.warning("narration not fully spoken", story=job.name, scene=plan.number, warning=warning)
    return speech


def _field(speech: Speech | None) -> str:
    return "audio" if speech is not None and speech.source.get("engine") == "file" else "narration"


def _spoken(speech: Speech | None) -> float | None:
    return speech.seconds if speech is not None and speech.samples else None


def scene_length(plan: ScenePlan, speech: Speech | None, settings: Settings, scenes: int) -> tuple[int, str]:
    """The scene's frames and what set them ("seconds" or "narration"): its seconds are a minimum,
    never cut short. A narration that would make it longer than `[limits] max_scene_seconds`
    fails the story, naming the scene, as soon as it is spoken."""
    v = settings.video
    crossfade = requested_crossfade(v.crossfade_seconds, v.fps)
    frames, how = scene_frames(
        plan.seconds, _spoken(speech), fps=v.fps, crossfade_frames=crossfade,
        first=plan.index == 0, last=plan.index == scenes - 1,
    )  # fmt: skip
    sound = SceneSound(plan.seconds, _spoken(speech), _field(speech))
    problem = too_long(plan.index, sound, frames, how, v.fps, settings.limits.max_scene_seconds)
    if problem is not None:
        raise StoryError([problem])
    return frames, how


@dataclass
class StorySound:
    """The story's sound once every scene is made: the film's layout, captions and music."""

    timing: Timing
    speeches: list[Speech | None]
    cues: list[Cue]
    music: Music | None
    captions: list[str]  # film.srt, film.vtt when written
    burn: Path | None  # the ASS file the film's encoder draws, when [video] burn_captions

    def caption_filter(self) -> str:
        return caption_filter(self.burn) if self.burn is not None else ""

    def mix(
        self, job: StoryJob, settings: Settings, clips: list[Path], on_clip: Callable[[int], None]
    ) -> SoundTracks | None:
        """Mix, then mux: the film's AAC track into film.mp4 (if made), each clip's into its clip
        (`on_clip(k)` after clip k changed, so its record follows). None: a silent story, no track."""
        if not has_sound(self.speeches, self.music):
            return None
        job.folder.audio.mkdir(parents=True, exist_ok=True)
        tracks = mix_story(
            self.timing, self.speeches, self.music, loudness_lufs=settings.audio.loudness_lufs,
            stems_dir=job.folder.audio, tracks_dir=job.folder.sound,
            clip_fade_seconds=settings.video.fade_seconds,
        )  # fmt: skip
        if tracks is None:
            return None
        film = job.out / "film.mp4"
        if film.is_file():
            mux_audio(film, tracks.film)
        for k, (clip, track) in enumerate(zip(clips, tracks.clips, strict=True)):
            mux_audio(clip, track)
            on_clip(k)
        return tracks


def _music(job: StoryJob, setup: SoundSetup) -> Music | None:
    """The bundle's music, else the box's default, converted to 48 kHz stereo in the work folder."""
    wav = job.folder.sound / "music.wav"
    if job.story.music:
        return prepare_music(job.file(job.story.music), wav, name=job.story.music)
    if setup.music is not None:
        return prepare_music(setup.music, wav, name=setup.music.name, field="audio.music")
    return None


def plan_sound(
    job: StoryJob, plans: list[ScenePlan], records: dict[int, dict[str, Any]], settings: Settings,
    setup: SoundSetup,
) -> StorySound:  # fmt: skip
    """Every scene's place on the film (the frames its record has), the captions, the music."""
    said = [records[p.number].get("narration") for p in plans]
    speeches = [Speech.from_record(r, job.folder.sound) if r else None for r in said]
    v, out = settings.video, settings.outputs
    timing = plan_timing(
        [SceneSound(p.seconds, _spoken(sp), _field(sp)) for p, sp in zip(plans, speeches, strict=True)],
        fps=v.fps, crossfade_seconds=v.crossfade_seconds, max_scene_seconds=settings.limits.max_scene_seconds,
    )  # fmt: skip
    made = [records[p.number]["frames"] for p in plans]
    if [sc.frames for sc in timing.scenes] != made:  # both come from scene_frames: a bug if not
        raise RuntimeError(f"scene frames {made} differ from the film's timing {timing}")
    cues = story_cues(timing, speeches)
    captions: list[str] = []
    if out.subtitles and any(sp is not None and sp.caption for sp in speeches):
        write_captions(cues, job.out / "film.srt", job.out / "film.vtt")
        captions = ["film.srt", "film.vtt"]
    burn = None
    if v.burn_captions and cues:
        burn = job.folder.sound / "captions.ass"
        size = video_encoding(v, (settings.image.width, settings.image.height)).size
        write_ass(cues, burn, width=size[0], height=size[1])
    return StorySound(timing, speeches, cues, _music(job, setup), captions, burn)
