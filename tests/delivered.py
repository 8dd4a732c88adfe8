"""A published story folder checked as a viewer and an editor receive it: pictures (size, exact
rate, BT.709, frames), its sound (decoded and measured), its captions and timelines (read back
with the libraries an importer would use). Shared by the runner's and the daemon's tests.
"""

from __future__ import annotations

import shutil
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import opentimelineio as otio
import pytest
import srt
import webvtt
from streams import colour_tags, probe

from sound_media import RATE, decode

BT709 = {"range": "tv", "matrix": "bt709", "primaries": "bt709", "transfer": "bt709"}


def manifest_rate(value: int | str) -> Fraction:
    return Fraction(value)


def check_pictures(folder: Path, manifest: dict[str, Any], size: tuple[int, int], fps: Fraction) -> None:
    """Every clip, master and the film at `size` and exactly `fps`, tagged BT.709, each as many
    frames as the manifest says (a master: its scene's frames plus its handles at both ends)."""
    videos = [(folder / "film.mp4", manifest["film_info"]["frames"])]
    for sc in manifest["scenes"]:
        videos.append((folder / sc["clip"], sc["frames"]))
        if "master" in sc:
            info = sc["master_info"]
            assert info["scene_frames"] == sc["frames"] and info["handles"] >= 1
            videos.append((folder / sc["master"], sc["frames"] + 2 * info["handles"]))
    for path, frames in videos:
        stream = probe(path)
        assert (stream.width, stream.height) == size, path
        assert stream.rate == fps, f"{path}: {stream.rate} fps, not {fps}"
        assert stream.frames == frames, f"{path}: {stream.frames} frames, the manifest says {frames}"
        assert colour_tags(path) == BT709, path
    assert manifest_rate(manifest["settings"]["video"]["fps"]) == fps
    assert manifest["film_info"]["fps"] == (fps.numerator if fps.denominator == 1 else str(fps))


def read_timelines(folder: Path, fps: Fraction) -> dict[str, otio.schema.Timeline]:
    return {
        "otio": otio.adapters.read_from_file(str(folder / "timeline.otio")),
        "fcp7": otio.adapters.read_from_file(str(folder / "timeline.xml"), adapter_name="fcp_xml"),
        "edl": otio.adapters.read_from_file(
            str(folder / "timeline.edl"), adapter_name="cmx_3600", rate=float(fps)
        ),
    }


def whole_frames(t: otio.opentime.RationalTime, fps: Fraction) -> int:
    assert t.rate == pytest.approx(float(fps), rel=1e-12), f"rate {t.rate} is not {float(fps)}"
    value = t.value_rescaled_to(float(fps))
    assert value == pytest.approx(round(value), abs=1e-6), f"{t} is not a whole frame"
    return round(value)


def _resolves_inside(root: Path, timeline: otio.schema.Timeline, kind: str) -> None:
    for clip in timeline.find_clips():
        url = clip.media_reference.target_url
        assert not Path(url).is_absolute() and "\\" not in url, f"{kind}: {url}"
        target = (root / url).resolve()
        assert target.is_relative_to(root.resolve()) and target.is_file(), f"{kind}: {url} from {root}"


def check_timelines(
    folder: Path, manifest: dict[str, Any], fps: Fraction, elsewhere: Path, zip_path: Path | None = None
) -> dict[str, otio.schema.Timeline]:
    """The three timelines read back: the masters in scene order, as long as the film frame for
    frame, each clip within its master's handles; every media path relative and resolving inside
    the story folder, also once the folder is moved (and the ZIP unzipped) somewhere else."""
    masters = [sc["master"] for sc in manifest["scenes"]]
    film_frames = manifest["film_info"]["frames"]
    assert manifest["timeline"]["files"] == ["timeline.otio", "timeline.xml", "timeline.edl"]
    assert manifest["timeline"]["masters"] == masters and manifest["timeline"]["frames"] == film_frames
    timelines = read_timelines(folder, fps)
    for kind, timeline in timelines.items():
        video = timeline.video_tracks()
        assert len(video) == 1, kind
        clips = list(video[0].find_clips())
        assert [Path(c.media_reference.target_url).name for c in clips] == [Path(m).name for m in masters], (
            kind
        )
        assert whole_frames(timeline.duration(), fps) == film_frames, kind
        for clip, sc in zip(clips, manifest["scenes"], strict=True):
            handles = sc["master_info"]["handles"]
            start = whole_frames(clip.source_range.start_time, fps)
            end = whole_frames(clip.source_range.end_time_exclusive(), fps)
            assert handles <= start and end <= handles + sc["frames"], f"{kind}: {clip.name} {start}-{end}"
        _resolves_inside(folder, timeline, kind)
    moved = elsewhere / "moved" / folder.name
    shutil.copytree(folder, moved)
    places = [moved]
    if zip_path is not None:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(elsewhere / "unzipped")
        places.append(elsewhere / "unzipped" / manifest["story"])  # the ZIP holds NAME/
    for place in places:
        for kind, timeline in read_timelines(place, fps).items():
            _resolves_inside(place, timeline, kind)
    return timelines


def audio_samples(path: Path) -> int:
    """How many 48 kHz samples the file's first audio stream decodes to."""
    return int(decode(path).shape[0])


def check_in_sync(video: Path, frames: int, fps: Fraction) -> None:
    """The file's sound lasts as long as its pictures, within one frame."""
    assert probe(video).frames == frames
    assert abs(Fraction(audio_samples(video), RATE) - Fraction(frames) / fps) <= 1 / fps, video


def check_captions(folder: Path, manifest: dict[str, Any]) -> list[srt.Subtitle]:
    """film.srt and film.vtt parse (srt, webvtt-py) to the same cues, in order, each inside the
    scene whose narration it shows (from that scene's first frame to its last)."""
    cues = list(srt.parse((folder / "film.srt").read_text("utf-8")))
    vtt = webvtt.read(str(folder / "film.vtt"))
    assert len(cues) == len(vtt.captions) >= 1
    for cue, caption in zip(cues, vtt.captions, strict=True):
        ms = (round(cue.start.total_seconds() * 1000), round(cue.end.total_seconds() * 1000))
        assert (caption.start_time.in_milliseconds(), caption.end_time.in_milliseconds()) == ms
        assert caption.text == cue.content
        owner = [
            sc for sc in manifest["scenes"] if sc["narration"] and cue.content in sc["narration"]["text"]
        ]
        assert len(owner) == 1, cue.content
        start, end = owner[0]["start_seconds"], owner[0]["start_seconds"] + owner[0]["seconds"]
        assert start - 1e-3 <= ms[0] / 1000 < ms[1] / 1000 <= end + 1e-3, (
            f"{cue.content!r} {ms} not in {start}-{end}"
        )
    assert [c.start for c in cues] == sorted(c.start for c in cues)
    return cues
