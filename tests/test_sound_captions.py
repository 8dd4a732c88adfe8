"""Captions: film.srt and film.vtt parse with the libraries, one cue per spoken sentence (else one
per scene), each inside its scene, text as written; burned in, they are drawn while they last."""

from __future__ import annotations

import html
import subprocess
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pysubs2
import pytest
import srt
import webvtt

from pipeline.sound.burn import caption_filter, write_ass
from pipeline.sound.captions import Cue, story_cues, write_captions
from pipeline.sound.speech import Sentence, Speech
from pipeline.sound.timing import SceneSound, Timing, plan_timing
from pipeline.video.encode import VideoEncoding, open_video


def spoken(caption: str, sentences: list[tuple[float, float, str]]) -> Speech:
    end = sentences[-1][1]
    return Speech(
        Path("n.wav"), round(end * 48_000), caption, tuple(Sentence(*s) for s in sentences), {}, -20.0
    )


def captions_only(text: str) -> Speech:
    return Speech(None, 0, text, (), {"engine": "none"}, None)


@pytest.fixture
def story() -> tuple[Timing, list[Speech | None]]:
    speeches: list[Speech | None] = [
        spoken("One. Two & <three> --> four?", [(0.0, 0.8, "One."), (1.1, 2.5, "Two & <three> --> four?")]),
        None,
        captions_only("Nobody speaks here, but it is captioned."),
        spoken("Recorded, one span.", [(0.0, 3.0, "Recorded, one span.")]),
        captions_only("Short scene caption."),
    ]
    seconds = [1.0, 2.0, 3.0, 1.0, 0.5]
    sounds = [
        SceneSound(s, sp.seconds if sp and sp.samples else None)
        for s, sp in zip(seconds, speeches, strict=True)
    ]
    return plan_timing(sounds, fps=24, crossfade_seconds=0.5, max_scene_seconds=60), speeches


def test_cues_per_sentence_else_per_scene_inside_their_scenes(
    story: tuple[Timing, list[Speech | None]],
) -> None:
    timing, speeches = story
    cues = story_cues(timing, speeches)
    assert [(c.scene, c.text) for c in cues] == [
        (0, "One."),
        (0, "Two & <three> --> four?"),
        (2, "Nobody speaks here, but it is captioned."),
        (3, "Recorded, one span."),
        (4, "Short scene caption."),
    ]
    for c in cues:
        scene = timing.scenes[c.scene]
        assert scene.start * 1000 <= c.start_ms < c.end_ms <= scene.end * 1000
    first = timing.scenes[0]
    assert cues[0].start_ms == round((first.narration_start or 0) * 1000)  # where its sound starts
    assert cues[0].end_ms == cues[1].start_ms  # shown until the next sentence starts
    assert all(a.end_ms <= b.start_ms for a, b in pairwise(cues))


def test_srt_and_vtt_parse_back_to_the_cues(
    tmp_path: Path, story: tuple[Timing, list[Speech | None]]
) -> None:
    cues = story_cues(*story)
    srt_path, vtt_path = tmp_path / "film.srt", tmp_path / "film.vtt"
    write_captions(cues, srt_path, vtt_path)
    want = [(c.start_ms, c.end_ms, c.text) for c in cues]
    parsed = list(srt.parse(srt_path.read_text("utf-8")))
    assert [
        (round(s.start.total_seconds() * 1000), round(s.end.total_seconds() * 1000), s.content)
        for s in parsed
    ] == want
    vtt = webvtt.read(str(vtt_path))
    assert [
        (c.start_time.in_milliseconds(), c.end_time.in_milliseconds(), html.unescape(c.text)) for c in vtt
    ] == want
    assert "&lt;three&gt; --&gt; four" in vtt_path.read_text("utf-8")  # "-->" never appears in a cue
    for path in (srt_path, vtt_path):  # and a third reader, as an editor's tool would
        subs = pysubs2.load(str(path))
        assert [(e.start, e.end) for e in subs] == [(a, b) for a, b, _ in want]
        texts = [t for _, _, t in want]
        if path == srt_path:  # SRT has no escapes: readers take <three> for a tag, as players do
            texts = [t.replace("<three>", "") for t in texts]
        assert [html.unescape(e.plaintext) for e in subs] == texts
    assert not srt_path.read_bytes().startswith(b"\xef\xbb\xbf")


def test_no_cues_write_empty_but_valid_files(tmp_path: Path) -> None:
    write_captions([], tmp_path / "f.srt", tmp_path / "f.vtt")
    assert list(srt.parse((tmp_path / "f.srt").read_text())) == []
    assert (tmp_path / "f.vtt").read_text().startswith("WEBVTT")


def _bottom_brightness(video: Path, w: int, h: int) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(video))
    next(reader)
    return np.array([np.frombuffer(f, np.uint8).reshape(h, w, 3)[int(h * 0.7) :].max() for f in reader])


def test_burned_captions_are_drawn_only_while_their_cue_lasts(tmp_path: Path) -> None:
    w, h, fps = 320, 180, 10
    odd = tmp_path / "it's a [strange], folder; name: here"  # the filter's escaping, both levels
    odd.mkdir()
    black = odd / "black.mp4"
    with open_video(
        black, VideoEncoding(width=w, height=h, fps=Fraction(fps), crf=30, preset="ultrafast")
    ) as enc:
        for _ in range(30):  # 3 s of black
            enc.write(np.concatenate([np.full((h, w), 16, np.uint8), np.full((h // 2, w), 128, np.uint8)]))
    ass = odd / "captions.ass"
    write_ass([Cue(1000, 2000, "Hello {there} 日本", 0)], ass, width=w, height=h)
    assert pysubs2.load(str(ass)).info["PlayResY"] == str(h)
    out = tmp_path / "burned.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(black), "-vf", caption_filter(ass),
           "-c:v", "libx264", "-preset", "ultrafast", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    bright = _bottom_brightness(out, w, h)
    assert bright.size == 30
    assert (bright[11:19] > 200).all()  # white text, 1.0-2.0 s (frames 10-19; edges left out)
    assert (bright[:9] < 40).all() and (bright[21:] < 40).all()  # nothing drawn outside the cue
