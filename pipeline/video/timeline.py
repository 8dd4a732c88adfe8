"""The story as an editable timeline: timeline.otio, timeline.xml (FCP7 XML), timeline.edl (CMX 3600).

One video track of the master clips (pipeline/video/master.py) in scene order, with the film's
crossfades as dissolves; an audio track for each sound stem given (narration, music: each the
film's length); a marker per scene carrying its description. Written with OpenTimelineIO and its
adapters, not by hand.

The timeline is the film, frame for frame. Scene k occupies film frames [start_k, start_k + n_k),
where start_k = sum of the scenes before it, less a crossfade X per cut. Each cut sits in the
middle of its crossfade: the outgoing clip runs to X//2 frames into it, the incoming one starts
there, and the dissolve (in_offset X//2 before the cut, out_offset X - X//2 after) spans exactly
the film's crossfade, drawing on frames past each edit point. So the clips' lengths add up to
the film's frame count. Each master also has `handles` frames beyond the scene at both ends, room
for an editor to lengthen a dissolve or trim.

Media paths are relative to the story folder (where the timelines lie), so the folder or its
unzipped ZIP can be moved anywhere. Rates are exact: OpenTimelineIO's rate is a float, and
float(24000/1001) is what its FCP7 reader computes from <timebase>24</timebase><ntsc>TRUE</ntsc>
(the FCPXML adapter would truncate 23.976 to 23, which is why FCP7 XML is the one written); an
EDL carries no rate and is read back with the story's.

What the formats cannot carry: an EDL holds one video track (no audio, which its writer drops),
its markers are single upper-cased lines (the description is cut to fit), and its writer style
is Premiere's (reel "AX", media named by file in comments): with the Avid style, the adapter's
reader gives each dissolve's incoming clip the outgoing clip's file. The film's fade in and out are not in the
timelines (the masters are clean; editors add their own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import opentimelineio as otio

from pipeline.fsutil import atomic_write_bytes
from pipeline.video.master import MasterInfo

__all__ = ["Stems", "TimelineFiles", "TimelineScene", "build_timeline", "has_timecode", "write_timelines"]

_EDL_MARKER_CHARS = 60
_DISSOLVE = otio.schema.TransitionTypes.SMPTE_Dissolve


@dataclass(frozen=True)
class TimelineScene:
    """A scene as the timeline places it: its master clip and what the scene shows."""

    master: MasterInfo
    description: str


@dataclass(frozen=True)
class Stems:
    """Sound stems for editors (48 kHz WAV, the film's length), each its own audio track."""

    narration: Path | None = None  # NAME/audio/narration.wav
    music: Path | None = None  # NAME/audio/music.wav


@dataclass(frozen=True)
class TimelineFiles:
    otio: Path
    xml: Path
    edl: Path
    frames: int  # the timeline's length: the film's frame count
    skipped: tuple[str, ...] = ()  # why a file was not written (a rate SMPTE timecode lacks)

    @property
    def written(self) -> tuple[Path, ...]:
        return (self.otio,) if self.skipped else (self.otio, self.xml, self.edl)


def has_timecode(fps: Fraction) -> bool:
    """Whether SMPTE timecode counts at this rate: FCP7 XML and CMX 3600 write every time as
    timecode, and OpenTimelineIO (like the editors) knows it only at 24, 25, 30, 48, 50, 60 fps
    and the NTSC rates 23.976, 29.97, 59.94."""
    return bool(otio.opentime.RationalTime.is_valid_timecode_rate(float(fps)))


def _time(frames: int, rate: float) -> otio.opentime.RationalTime:
    return otio.opentime.RationalTime(frames, rate)


def _range(start: int, frames: int, rate: float) -> otio.opentime.TimeRange:
    return otio.opentime.TimeRange(_time(start, rate), _time(frames, rate))


def _relative(folder: Path, path: Path) -> str:
    """`path` as a /-separated path relative to the story folder; it must lie inside it."""
    try:
        rel = Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        raise ValueError(f"{path}: not inside the story folder {folder}") from None
    if not (folder / rel).is_file():
        raise ValueError(f"{path}: no such file for the timeline to point at")
    return rel.as_posix()


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _marker(number: int, description: str, at: int, rate: float) -> otio.schema.Marker:
    """The scene's marker: its description whole as the comment (and FCP7's <comment>); the name
    short enough for an EDL's single locator line."""
    text = _one_line(description)
    name = f"Scene {number}: {text}"
    if len(name) > _EDL_MARKER_CHARS:
        name = name[: _EDL_MARKER_CHARS - 1].rstrip() + "…"
    return otio.schema.Marker(
        name=name,
        marked_range=_range(at, 0, rate),
        color=otio.schema.MarkerColor.RED,
        comment=text,
        metadata={"fcp_xml": {"comment": text}, "storyreel": {"scene": number, "description": description}},
    )


def _check(scenes: list[TimelineScene], fps: Fraction, crossfade: int) -> None:
    if not scenes:
        raise ValueError("a timeline needs at least one scene")
    if crossfade < 0 or (len(scenes) > 1 and crossfade > min(s.master.scene_frames for s in scenes) // 2):
        raise ValueError(f"a crossfade of {crossfade} frames does not fit these scenes (the film clamps it)")
    for s in scenes:
        if s.master.fps != fps:
            raise ValueError(
                f"{s.master.path.name} is at {s.master.fps} fps, the timeline at {fps}: one rate"
            )
        if 2 * s.master.handles < crossfade:
            raise ValueError(f"{s.master.path.name}: handles must be at least half the crossfade")


def _video_track(folder: Path, scenes: list[TimelineScene], rate: float, crossfade: int) -> otio.schema.Track:
    track = otio.schema.Track(name="Pictures", kind=otio.schema.TrackKind.Video)
    before, after = crossfade // 2, crossfade - crossfade // 2  # of each crossfade, either side of its cut
    last = len(scenes) - 1
    for k, scene in enumerate(scenes):
        m = scene.master
        lead, trail = (before if k > 0 else 0), (after if k < last else 0)
        if k > 0 and crossfade > 0:
            track.append(
                otio.schema.Transition(
                    name="Cross Dissolve",
                    transition_type=_DISSOLVE,
                    in_offset=_time(before, rate),
                    out_offset=_time(after, rate),
                )
            )
        media = otio.schema.ExternalReference(
            target_url=_relative(folder, m.path), available_range=_range(0, m.frames, rate)
        )
        media.name = m.path.name
        clip = otio.schema.Clip(
            name=m.path.stem,
            media_reference=media,
            source_range=_range(m.handles + lead, m.scene_frames - lead - trail, rate),
        )
        clip.markers.append(_marker(k + 1, scene.description, m.handles + lead, rate))
        track.append(clip)
    return track


def _audio_track(folder: Path, name: str, path: Path, frames: int, rate: float) -> otio.schema.Track:
    track = otio.schema.Track(name=name, kind=otio.schema.TrackKind.Audio)
    media = otio.schema.ExternalReference(
        target_url=_relative(folder, path), available_range=_range(0, frames, rate)
    )
    media.name = Path(path).name
    track.append(
        otio.schema.Clip(name=Path(path).stem, media_reference=media, source_range=_range(0, frames, rate))
    )
    return track


def build_timeline(
    folder: Path,
    title: str,
    scenes: list[TimelineScene],
    *,
    fps: Fraction,
    crossfade_frames: int,
    stems: Stems | None = None,
) -> otio.schema.Timeline:
    """The story's timeline in memory (write_timelines writes it three ways).

    `crossfade_frames` is the film's crossfade as made (FilmInfo.crossfade_frames, after its
    clamp), so that the timeline is as long as the film.
    """
    _check(scenes, fps, crossfade_frames)
    rate = float(fps)
    timeline = otio.schema.Timeline(name=title, global_start_time=_time(0, rate))
    video = _video_track(folder, scenes, rate, crossfade_frames)
    timeline.tracks.append(video)
    frames = round(video.duration().to_frames())
    stems = stems or Stems()
    for name, path in (("Narration", stems.narration), ("Music", stems.music)):
        if path is not None:
            timeline.tracks.append(_audio_track(folder, name, path, frames, rate))
    return timeline


def write_timelines(
    folder: Path,
    title: str,
    scenes: list[TimelineScene],
    *,
    fps: Fraction,
    crossfade_frames: int,
    stems: Stems | None = None,
) -> TimelineFiles:
    """Write folder/timeline.otio, folder/timeline.xml (FCP7 XML) and folder/timeline.edl
    (CMX 3600), each appearing complete or not at all; returns their paths and length.

    At a rate without SMPTE timecode (see `has_timecode`: 8 or 12 fps, say) only the .otio is
    written, exact at any rate; `skipped` says why the other two are not.
    """
    timeline = build_timeline(folder, title, scenes, fps=fps, crossfade_frames=crossfade_frames, stems=stems)
    label = fps.numerator if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator}"
    files = TimelineFiles(
        otio=folder / "timeline.otio",
        xml=folder / "timeline.xml",
        edl=folder / "timeline.edl",
        frames=round(timeline.duration().to_frames()),
        skipped=()
        if has_timecode(fps)
        else (
            f"timeline.xml and timeline.edl: FCP7 XML and CMX 3600 count in SMPTE timecode, which has no "
            f"{label} fps (24, 25, 30, 48, 50, 60 and 24000/1001, 30000/1001, 60000/1001 have it)",
        ),
    )
    atomic_write_bytes(files.otio, otio.adapters.write_to_string(timeline, "otio_json").encode("utf-8"))
    if files.skipped:
        return files
    atomic_write_bytes(files.xml, otio.adapters.write_to_string(timeline, "fcp_xml").encode("utf-8"))
    # The EDL writer edits the timeline it is given (it moves cut points): give it a copy of the
    # picture alone (it writes one video track and would refuse more than two audio ones).
    pictures = otio.schema.Timeline(name=title, global_start_time=_time(0, float(fps)))
    pictures.tracks.append(timeline.video_tracks()[0].deepcopy())
    for clip in pictures.find_clips():  # Premiere's reel for file-based media, on every event line
        clip.metadata["cmx_3600"] = {"reel": "AX"}
    edl = otio.adapters.write_to_string(pictures, "cmx_3600", rate=float(fps), style="premiere")
    atomic_write_bytes(files.edl, edl.encode("utf-8"))
    return files
