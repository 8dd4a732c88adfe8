"""A published story folder checked as a viewer and an editor receive it: pictures (size, exact
rate, BT.709, frames), its sound (decoded and measured), its captions and timelines (read back
with the libraries an importer would use). Shared by the runner's and the daemon's tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import wave
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg
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


def dissolves(track: otio.schema.Track, fps: Fraction) -> list[tuple[int, int]]:
    """Each transition's span on the timeline, [start, end) in frames."""
    spans = []
    for i, item in enumerate(track):
        if isinstance(item, otio.schema.Transition):
            cut = whole_frames(track.range_of_child_at_index(i - 1).end_time_exclusive(), fps)
            spans.append((cut - whole_frames(item.in_offset, fps), cut + whole_frames(item.out_offset, fps)))
    return spans


def film_crossfades(manifest: dict[str, Any]) -> list[tuple[int, int]]:
    """Where the film crossfades, [start, end) in frames, from the scenes' frame counts."""
    x = manifest["film_info"]["crossfade_frames"]
    counts = [sc["frames"] for sc in manifest["scenes"]]
    return [(sum(counts[:k]) - k * x, sum(counts[:k]) - k * x + x) for k in range(1, len(counts))]


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
    frame, each clip within its master's handles, each dissolve where the film crossfades with
    the cut in its middle, a marker per scene carrying its description; every media path relative
    and resolving inside the story folder, also once the folder is moved (and the ZIP unzipped)
    somewhere else."""
    masters = [sc["master"] for sc in manifest["scenes"]]
    film_frames, crossfade = manifest["film_info"]["frames"], manifest["film_info"]["crossfade_frames"]
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
            assert handles >= -(-crossfade // 2), (
                f"{kind}: {handles} handles for a {crossfade}-frame dissolve"
            )
            start = whole_frames(clip.source_range.start_time, fps)
            end = whole_frames(clip.source_range.end_time_exclusive(), fps)
            assert handles <= start and end <= handles + sc["frames"], f"{kind}: {clip.name} {start}-{end}"
        assert dissolves(video[0], fps) == film_crossfades(manifest), (
            f"{kind}: dissolves are not the crossfades"
        )
        _resolves_inside(folder, timeline, kind)
    for kind in (
        "otio",
        "fcp7",
    ):  # the cut in the middle of its crossfade (an EDL's dissolve follows its cut)
        offsets = [
            (whole_frames(t.in_offset, fps), whole_frames(t.out_offset, fps))
            for t in timelines[kind].video_tracks()[0]
            if isinstance(t, otio.schema.Transition)
        ]
        assert offsets == [(crossfade // 2, crossfade - crossfade // 2)] * (len(masters) - 1), kind
    markers = [m for c in timelines["otio"].video_tracks()[0].find_clips() for m in c.markers]
    assert [m.comment for m in markers] == [" ".join(sc["description"].split()) for sc in manifest["scenes"]]
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


def audio_streams(path: Path) -> list[tuple[str, int]]:
    """Each audio stream's codec and sample rate, as ffmpeg lists them."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    listing = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False).stderr
    return [(m[1], int(m[2])) for m in re.finditer(r"Stream #\S+: Audio: (\w+)[^\n]*?, (\d+) Hz", listing)]


def check_stem(path: Path, samples: int) -> None:
    """A stem for editors: a 48 kHz PCM WAV of exactly `samples` frames."""
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnframes()) == (RATE, samples), path


def check_in_sync(video: Path, frames: int, fps: Fraction) -> None:
    """One AAC track at 48 kHz, lasting as long as the file's pictures within one frame."""
    assert audio_streams(video) == [("aac", RATE)], video
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
