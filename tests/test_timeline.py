"""Timelines for editing software, read back with OpenTimelineIO and its FCP7 and CMX 3600 adapters.

Each test builds a real story folder (master clips encoded, a real film of the same scenes, WAV
stems) and checks what an editor's import would see: the scenes in order, as long as the film
frame for frame, each dissolve where the film's crossfade is, media inside the folder, handles.
"""

from __future__ import annotations

import shutil
import wave
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import opentimelineio as otio
import pytest
from delivered import dissolves
from delivered import whole_frames as frames
from streams import probe

from pipeline.video.encode import VideoEncoding
from pipeline.video.film import FilmInfo, FilmScene, make_film
from pipeline.video.master import handle_frames, master_name, write_master_clip
from pipeline.video.timeline import Stems, TimelineFiles, TimelineScene, build_timeline, write_timelines

W, H = 64, 48
SECONDS = [1.0, 0.75, 1.25]
DESCRIPTIONS = [
    "Mara climbs the lighthouse stairs",
    "a harbour at dawn,\n gulls",
    "Ωμέγα: the lamp goes dark 灯",
]
RATES = [Fraction(24), Fraction(25), Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001)]


@dataclass
class Story:
    folder: Path
    fps: Fraction
    film: FilmInfo
    scenes: list[TimelineScene]
    files: TimelineFiles


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(30, 220, (H, W, 3), dtype=np.uint8)


def silent_wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(b"\0\0\0\0" * round(seconds * 48000))
    return path


def make_story(root: Path, fps: Fraction, stems: bool = True, codec: str = "h264") -> Story:
    folder = root / "lighthouse"
    (folder / "master").mkdir(parents=True)
    enc = VideoEncoding(width=W, height=H, fps=fps, crf=23, preset="ultrafast")
    images = [picture(k) for k in range(len(SECONDS))]
    film = make_film(
        [FilmScene(img, s) for img, s in zip(images, SECONDS, strict=True)],
        folder / "film.mp4",
        enc,
        fade_seconds=0.25,
        crossfade_seconds=0.5,
    )
    master_enc = enc.for_master(codec)  # type: ignore[arg-type]
    h = handle_frames(fps, film.crossfade_frames)
    scenes = []
    for k, (img, s) in enumerate(zip(images, SECONDS, strict=True)):
        path = folder / "master" / master_name(f"scene_{k + 1:03d}", master_enc)
        m = write_master_clip(
            img, path, master_enc, seconds=s, motion="zoom_in", zoom=0.12, pan=0.1, handles=h
        )
        scenes.append(TimelineScene(m, DESCRIPTIONS[k]))
    sound = Stems()
    if stems:
        length = film.seconds
        sound = Stems(
            silent_wav(folder / "audio/narration.wav", length), silent_wav(folder / "audio/music.wav", length)
        )
    files = write_timelines(
        folder, "The Last Keeper", scenes, fps=fps, crossfade_frames=film.crossfade_frames, stems=sound
    )
    return Story(folder, fps, film, scenes, files)


def read_back(story: Story) -> dict[str, otio.schema.Timeline]:
    return {
        "otio": otio.adapters.read_from_file(str(story.files.otio)),
        "fcp7": otio.adapters.read_from_file(str(story.files.xml), adapter_name="fcp_xml"),
        "edl": otio.adapters.read_from_file(
            str(story.files.edl), adapter_name="cmx_3600", rate=float(story.fps)
        ),
    }


def film_crossfades(story: Story) -> list[tuple[int, int]]:
    x = story.film.crossfade_frames
    counts = [s.master.scene_frames for s in story.scenes]
    starts = [sum(counts[:k]) - k * x for k in range(len(counts))]
    return [(start, start + x) for start in starts[1:]]


@pytest.fixture(scope="module", params=RATES, ids=lambda r: str(r).replace("/", "_"))
def story(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Story:
    return make_story(tmp_path_factory.mktemp("timeline"), request.param)


def test_every_timeline_holds_the_scenes_in_order_as_long_as_the_film(story: Story) -> None:
    assert story.film.frames == probe(story.folder / "film.mp4").frames == story.files.frames
    for kind, timeline in read_back(story).items():
        video = timeline.video_tracks()
        assert len(video) == 1, kind
        clips = list(video[0].find_clips())
        assert [Path(c.media_reference.target_url).name for c in clips] == [
            s.master.path.name for s in story.scenes
        ], kind
        assert frames(timeline.duration(), story.fps) == story.film.frames, kind
        assert dissolves(video[0], story.fps) == film_crossfades(story), (
            f"{kind}: dissolves are not the crossfades"
        )


def test_each_cut_is_in_the_middle_of_its_crossfade(story: Story) -> None:
    x = story.film.crossfade_frames
    for kind in ("otio", "fcp7"):  # an EDL puts a dissolve after its cut, by the format's convention
        track = read_back(story)[kind].video_tracks()[0]
        transitions = [t for t in track if isinstance(t, otio.schema.Transition)]
        assert len(transitions) == len(story.scenes) - 1
        for t in transitions:
            assert (frames(t.in_offset, story.fps), frames(t.out_offset, story.fps)) == (
                x // 2,
                x - x // 2,
            ), kind


def test_every_media_path_resolves_inside_the_story_folder(story: Story, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "lighthouse"
    shutil.copytree(story.folder, moved)  # the folder, moved anywhere (as an unzipped ZIP is)
    for name, timeline in read_back(story).items():
        for clip in timeline.find_clips():
            url = clip.media_reference.target_url
            assert not Path(url).is_absolute() and "\\" not in url, f"{name}: {url}"
            target = (moved / url).resolve()
            assert target.is_relative_to(moved.resolve()) and target.is_file(), f"{name}: {url}"


def test_master_clips_have_handles_past_every_dissolve(story: Story) -> None:
    """Past the media each clip uses, transitions included, at least `handles` frames remain at
    both ends: the dissolves draw on frames beyond the edit points, never on missing ones."""
    for scene in story.scenes:
        assert scene.master.handles >= -(-story.film.crossfade_frames // 2)
        assert (
            probe(scene.master.path).frames
            == scene.master.frames
            == scene.master.scene_frames + 2 * scene.master.handles
        )
    for kind in ("otio", "fcp7", "edl"):
        track = read_back(story)[kind].video_tracks()[0]
        items = list(track)
        for i, item in enumerate(items):
            if not isinstance(item, otio.schema.Clip):
                continue
            master = next(
                s.master
                for s in story.scenes
                if s.master.path.name == Path(item.media_reference.target_url).name
            )
            before = items[i - 1] if i > 0 and isinstance(items[i - 1], otio.schema.Transition) else None
            after = (
                items[i + 1]
                if i + 1 < len(items) and isinstance(items[i + 1], otio.schema.Transition)
                else None
            )
            used_from = frames(item.source_range.start_time, story.fps) - (
                frames(before.in_offset, story.fps) if before else 0
            )
            used_to = frames(item.source_range.end_time_exclusive(), story.fps) + (
                frames(after.out_offset, story.fps) if after else 0
            )
            assert used_from >= master.handles, f"{kind} {item.name}: {used_from} frames before"
            assert master.frames - used_to >= master.handles, (
                f"{kind} {item.name}: {master.frames - used_to} after"
            )
            if kind != "edl":  # an EDL carries no media lengths
                available = item.media_reference.available_range
                assert frames(available.duration, story.fps) == master.frames, kind


def test_sound_stems_are_audio_tracks_the_film_s_length(story: Story) -> None:
    for kind in ("otio", "fcp7"):
        audio = read_back(story)[kind].audio_tracks()
        urls = [[c.media_reference.target_url for c in t.find_clips()] for t in audio]
        assert urls == [["audio/narration.wav"], ["audio/music.wav"]], kind
        for t in audio:
            assert frames(t.duration(), story.fps) == story.film.frames, kind
    edl = story.files.edl.read_text()
    assert "audio/" not in edl, "an EDL holds the picture track only"


def test_a_marker_per_scene_carries_its_description(story: Story) -> None:
    timelines = read_back(story)
    for kind in ("otio", "fcp7"):
        markers = [m for c in timelines[kind].video_tracks()[0].find_clips() for m in c.markers]
        assert [m.name.split(":")[0] for m in markers] == ["Scene 1", "Scene 2", "Scene 3"], kind
        comments = [m.comment if kind == "otio" else m.metadata["fcp_xml"]["comment"] for m in markers]
        assert comments == [" ".join(d.split()) for d in DESCRIPTIONS], kind
    locators = [line for line in story.files.edl.read_text().splitlines() if line.startswith("* LOC:")]
    for n in (1, 2, 3):
        assert any(f"SCENE {n}:" in line for line in locators), locators


def test_ntsc_rates_are_exact_in_every_writer(story: Story) -> None:
    xml = story.files.xml.read_text()
    ntsc = story.fps.denominator == 1001
    assert f"<timebase>{-(-story.fps.numerator // story.fps.denominator)}</timebase>" in xml
    assert ("<ntsc>TRUE</ntsc>" in xml) == ntsc and ("<ntsc>FALSE</ntsc>" in xml) != ntsc
    for kind, timeline in read_back(story).items():
        for clip in timeline.find_clips():
            assert clip.source_range.duration.rate == pytest.approx(float(story.fps), rel=1e-12), kind


def test_no_stems_no_audio_tracks(tmp_path: Path) -> None:
    story = make_story(tmp_path, Fraction(24), stems=False)
    for kind, timeline in read_back(story).items():
        assert timeline.audio_tracks() == [], kind


def test_prores_masters_are_what_the_timelines_point_at(tmp_path: Path) -> None:
    story = make_story(tmp_path, Fraction(24000, 1001), stems=False, codec="prores")
    for kind, timeline in read_back(story).items():
        urls = [c.media_reference.target_url for c in timeline.find_clips()]
        assert urls == [f"master/scene_00{k}.mov" for k in (1, 2, 3)], kind
    assert probe(story.folder / "master/scene_001.mov").codec == "prores"


def test_timelines_that_cannot_be_right_are_refused(tmp_path: Path) -> None:
    story = make_story(tmp_path, Fraction(24), stems=False)
    scenes, x = story.scenes, story.film.crossfade_frames
    outside = tmp_path / "stray.wav"
    silent_wav(outside, 1.0)
    other = VideoEncoding(width=W, height=H, fps=Fraction(25), crf=23, preset="ultrafast")
    stray_rate = write_master_clip(
        picture(9),
        story.folder / "master/odd.mp4",
        other,
        seconds=1.0,
        motion="zoom_in",
        zoom=0.1,
        pan=0.1,
        handles=12,
    )
    cases = [
        ([*scenes, TimelineScene(stray_rate, "x")], {}, "one rate"),
        ([TimelineScene(replace(scenes[0].master, handles=1), "x"), *scenes[1:]], {}, "half the crossfade"),
        (scenes, {"stems": Stems(narration=outside)}, "not inside the story folder"),
        (scenes, {"stems": Stems(music=story.folder / "audio/none.wav")}, "no such file"),
        ([], {}, "at least one scene"),
    ]
    for bad_scenes, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            build_timeline(story.folder, "x", bad_scenes, fps=Fraction(24), crossfade_frames=x, **kw)
    with pytest.raises(ValueError, match="does not fit"):
        build_timeline(story.folder, "x", scenes, fps=Fraction(24), crossfade_frames=100)
