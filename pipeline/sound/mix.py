"""The story's sound in two ffmpeg runs (three or four for a peaky mix): measure, then write.

1. Plan: each narration's first sample and length, each clip's span, the film's length, all in
   48 kHz samples from the timing; the gains that bring each narration and the music to their
   levels (pipeline.sound.mixgraph).
2. Pass 1: the mix measured (EBU R128 integrated, true peak, LRA: ffmpeg's ebur128 meter);
   measured again with its peaks limited lower while one gain would lift them past -1.5 dBTP.
3. Pass 2: the same mix through loudnorm given those measurements (linear: one gain), and from
   the same graph, at that same gain: the film's AAC track, every clip's AAC track (its own
   narration and its part of the music), and the 48 kHz WAV stems, each the film's length:
   narration.wav, music.wav and scene_NNN.wav (a narrated scene's voice alone, at its place).

A mix that measures as silence is written as it is, never raised to the target. A story with
no sound at all (no narration spoken or recorded, no music) has no tracks: `mix_story` gives None.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_path
from pipeline.sound.ffmpeg import EBUR128, RATE, Loudness, read_ebur128, read_loudnorm, run_ffmpeg
from pipeline.sound.mixgraph import Duck, Levels, MixPlan, Voice, build_graph
from pipeline.sound.recorded import Music
from pipeline.sound.speech import Speech
from pipeline.sound.timing import Timing, to_samples

__all__ = ["TRUE_PEAK_DBTP", "SoundTracks", "has_sound", "mix_story", "plan_mix"]

TRUE_PEAK_DBTP = -1.0
_TRUE_PEAK_AIM = TRUE_PEAK_DBTP - 0.5  # AAC's coding may raise a peak a little
_INTERSAMPLE_DB = 1.0  # a sample-peak limiter's output peaks up to this much higher between samples
_MEASURES = 4
_MAX_BOOST_DB = 30.0  # a near-silent recording is raised at most this much to the narration level


@dataclass(frozen=True)
class SoundTracks:
    """What pass 2 wrote, and what the mix measured."""

    film: Path  # AAC in MP4 (.m4a), exactly the film's length: mux it into film.mp4
    clips: tuple[Path, ...]  # one AAC track per scene clip, each exactly its clip's length
    narration_stem: Path | None
    music_stem: Path | None
    scene_stems: tuple[Path | None, ...]  # per scene; None where a scene has no narration sound
    measured: Loudness  # pass 1, before normalising
    loudness_lufs: float | None  # the film's track as written (ebur128), None: silent
    true_peak_dbtp: float | None
    target_lufs: float
    gain_db: float  # what the stems were given (the mix's linear gain)
    ceiling_db: float | None  # the lower peak ceiling the mix needed, if any (before the gain)
    normalization: str  # "linear", "dynamic" (loudnorm could not stay linear) or "silent"
    seconds: float  # wall time of both passes

    def record(self) -> dict[str, Any]:
        """The manifest's entry for the mix."""
        return {
            "target_lufs": self.target_lufs,
            "integrated_lufs": self.loudness_lufs,
            "true_peak_dbtp": self.true_peak_dbtp,
            "normalization": self.normalization,
            "measured_before_lufs": None if self.measured.silent else self.measured.integrated,
            "gain_db": round(self.gain_db, 2),
            "peak_ceiling_db": self.ceiling_db,
        }


def has_sound(speeches: Sequence[Speech | None], music: Music | None) -> bool:
    """Anything to hear: a narration spoken or recorded (a recorded silence counts), or music."""
    return any(s is not None and s.wav is not None for s in speeches) or (
        music is not None and music.samples > 0
    )


def _gain(target: float, measured: float | None) -> float:
    return 0.0 if measured is None else min(_MAX_BOOST_DB, target - measured)


def plan_mix(
    timing: Timing,
    speeches: Sequence[Speech | None],
    music: Music | None,
    *,
    levels: Levels,
    clip_fade_seconds: float,
) -> MixPlan:
    """Every placement in samples; narrations that do not fit their clip are a bug, said so."""
    if len(speeches) != len(timing.scenes):
        raise ValueError(f"{len(speeches)} speeches for {len(timing.scenes)} scenes")
    clips = tuple((to_samples(sc.start), to_samples(sc.seconds)) for sc in timing.scenes)
    voices = []
    for sc, sp in zip(timing.scenes, speeches, strict=True):
        if sp is None or sp.wav is None or sc.narration_start is None:
            continue
        v = Voice(sc.index, sp.wav, to_samples(sc.narration_start, up=True), sp.samples,
                  _gain(levels.narration_lufs, sp.loudness_lufs))  # fmt: skip
        first, n = clips[sc.index]
        if v.start + v.samples > first + n:
            raise ValueError(f"scene {sc.index + 1}: its narration does not fit its clip")
        voices.append(v)
    tune = music if music is not None and music.samples > 0 else None
    return MixPlan(
        film=timing.samples,
        voices=tuple(voices),
        clips=clips,
        music=tune.wav if tune else None,
        music_gain_db=_gain(levels.music_lufs, tune.loudness_lufs) if tune else 0.0,
        clip_fade=round(clip_fade_seconds * RATE),
    )


def _pass(plan: MixPlan, levels: Levels, duck: Duck, *, final: str, write: bool,
          gain_db: float, paths: dict[str, Path] | None = None) -> str:  # fmt: skip
    built = build_graph(plan, levels, duck, final=final, write=write, gain_db=gain_db)
    args = [*built.inputs, "-filter_complex", built.graph]
    with contextlib.ExitStack() as stack:
        for key, (label, codec) in built.outputs.items():
            if paths is None:
                args += ["-map", f"[{label}]", *codec, "-f", "null", "-"]
            else:
                tmp = stack.enter_context(atomic_path(paths[key]))
                args += ["-map", f"[{label}]", *codec, str(tmp)]
        return run_ffmpeg(args, what="mixing the story's sound" + (" (measuring)" if not write else ""))


def _measure(plan: MixPlan, levels: Levels, duck: Duck, target: float) -> tuple[MixPlan, Loudness]:
    """Pass 1, repeated (at most three times more) while the mix's true peak would end above the aim
    once raised to `target`: each time with the voices and music limited lower by the excess.

    A story whose music runs long between short narrations measures quieter than its voice's
    peaks: one gain would push them over -1 dBTP, and loudnorm would fall back to its dynamic
    mode (which missed the target, and clipped the stems raised by the same gain).
    """
    for attempt in range(_MEASURES):
        measured = read_ebur128(_pass(plan, levels, duck, final=EBUR128, write=False, gain_db=0.0))[0]
        if measured.silent:
            return plan, measured
        gain = target - measured.integrated
        excess = measured.true_peak + gain - _TRUE_PEAK_AIM
        if excess <= 0 or attempt == _MEASURES - 1:
            return plan, measured
        ceiling = _TRUE_PEAK_AIM - gain - _INTERSAMPLE_DB
        plan = replace(
            plan, ceiling_db=min(ceiling, plan.ceiling_db if plan.ceiling_db is not None else ceiling)
        )
    raise AssertionError("unreachable")


def mix_story(
    timing: Timing,
    speeches: Sequence[Speech | None],
    music: Music | None,
    *,
    loudness_lufs: float,
    stems_dir: Path,
    tracks_dir: Path,
    clip_fade_seconds: float = 0.5,
    levels: Levels | None = None,
    duck: Duck | None = None,
) -> SoundTracks | None:
    """Mix the story (speeches[k]: scene k's, None for none) and write its tracks and stems.

    `stems_dir` gets narration.wav, music.wav and scene_NNN.wav (the outbox's NAME/audio/);
    `tracks_dir` the AAC tracks to mux: film.m4a and clip_NNN.m4a. Every file appears whole.
    """
    if not has_sound(speeches, music):
        return None
    started = time.perf_counter()
    levels, duck = levels or Levels(), duck or Duck()
    plan = plan_mix(timing, speeches, music, levels=levels, clip_fade_seconds=clip_fade_seconds)
    plan, measured = _measure(plan, levels, duck, loudness_lufs)
    if measured.silent:
        final, gain = "anull", 0.0
    else:
        gain = loudness_lufs - measured.integrated  # loudnorm's own gain in linear mode
        final = (f"loudnorm=I={loudness_lufs}:TP={_TRUE_PEAK_AIM}:LRA={levels.lra}:{measured.filter_args()}:"
                 f"linear=true:print_format=json,aresample={RATE}:resampler=soxr")  # fmt: skip
    paths = _paths(plan, stems_dir, tracks_dir)
    err = _pass(plan, levels, duck, final=final, write=True, gain_db=gain, paths=paths)
    applied = read_loudnorm(err)
    written = read_ebur128(err)[-1]
    silent = measured.silent or written.silent
    return SoundTracks(
        film=paths["film"],
        clips=tuple(paths[f"clip{k}"] for k in range(len(timing.scenes))),
        narration_stem=paths.get("narration"),
        music_stem=paths.get("music"),
        scene_stems=tuple(paths.get(f"scene{k}") for k in range(len(timing.scenes))),
        measured=measured,
        loudness_lufs=None if silent else written.integrated,
        true_peak_dbtp=None if silent else written.true_peak,
        target_lufs=loudness_lufs,
        gain_db=gain,
        ceiling_db=None if plan.ceiling_db is None else round(plan.ceiling_db, 2),
        normalization="silent" if silent else (applied[0].normalization if applied else "linear"),
        seconds=time.perf_counter() - started,
    )


def _paths(plan: MixPlan, stems_dir: Path, tracks_dir: Path) -> dict[str, Path]:
    paths = {"film": tracks_dir / "film.m4a"}
    paths |= {f"clip{k}": tracks_dir / f"clip_{k + 1:03d}.m4a" for k in range(len(plan.clips))}
    if plan.voices:
        paths["narration"] = stems_dir / "narration.wav"
        paths |= {f"scene{v.scene}": stems_dir / f"scene_{v.scene + 1:03d}.wav" for v in plan.voices}
    if plan.music is not None:
        paths["music"] = stems_dir / "music.wav"
    return paths
