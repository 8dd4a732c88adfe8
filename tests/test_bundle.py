"""Good bundles: what is extracted, checked, reported and kept for the outbox."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
from PIL import Image

from pipeline.bundle import (
    BundleError,
    check_bundle,
    copy_assets,
    extract_bundle,
    inspect_bundle,
    validate_bundle,
)
from pipeline.settings import LimitsSettings
from pipeline.story import StoryError, load_story

from bundles import (
    STORY,
    bundle_files,
    entry,
    good_bundle,
    mp3_claiming,
    picture_bytes,
    sound_bytes,
    story_with_files,
    wav_bytes,
    write_bundle,
    write_raw_zip,
)

LIMITS = LimitsSettings()


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_extract_writes_story_and_named_files_only(tmp_path: Path) -> None:
    files = {**bundle_files(2), "extra/unused.txt": b"not named"}
    raw = json.dumps(story_with_files(2), indent=1).encode()
    bundle = extract_bundle(write_bundle(tmp_path / "b.zip", raw, files), tmp_path / "x", LIMITS)
    assert tree(tmp_path / "x") == {"story.json", "images/scene0.png", "images/scene1.png", "people/mara.jpg"}
    assert bundle.story_bytes == raw == (tmp_path / "x" / "story.json").read_bytes()
    assert bundle.story == load_story(raw, LIMITS, bundle=True)
    for path, f in bundle.files.items():
        data = (tmp_path / "x" / path).read_bytes()
        assert data == files[path] and f.bytes == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
    assert bundle.files["images/scene0.png"].fields == ("scenes.0.image (scene 1)",)
    assert bundle.files["people/mara.jpg"].picture is not None
    assert bundle.files["people/mara.jpg"].picture.format == "JPEG"
    assert (
        bundle.files["people/mara.jpg"].picture.width,
        bundle.files["people/mara.jpg"].picture.height,
    ) == (48, 64)
    assert bundle.entries == 5 and bundle.unpacked_bytes == len(raw) + sum(map(len, files.values()))


def test_one_picture_named_twice_is_extracted_once(tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "image": "a.png"}, {"description": "b", "image": "a.png"}]}
    bundle = extract_bundle(
        write_bundle(tmp_path / "b.zip", story, {"a.png": picture_bytes()}), tmp_path / "x", LIMITS
    )
    assert list(bundle.files) == ["a.png"]
    assert bundle.files["a.png"].fields == ("scenes.0.image (scene 1)", "scenes.1.image (scene 2)")


def test_inspect_reads_only_the_listing_and_story(tmp_path: Path) -> None:
    """The claim's look: a picture that would not decode is not its business, and it writes nothing."""
    zip_path = write_raw_zip(
        tmp_path / "b.zip", [entry("story.json", STORY), entry("a.png", b"not a picture")]
    )
    before = set(tmp_path.rglob("*"))
    assert len(inspect_bundle(zip_path, LIMITS).scenes) == 1
    assert set(tmp_path.rglob("*")) == before
    with pytest.raises(BundleError, match="is not a picture"):
        check_bundle(zip_path, LIMITS)


def test_check_bundle_leaves_no_temporary_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    zip_path = good_bundle(tmp_path / "b.zip")
    assert len(check_bundle(zip_path, LIMITS, tmp_dir=scratch).scenes) == 2
    assert list(scratch.iterdir()) == []
    bad = write_raw_zip(tmp_path / "bad.zip", [entry("story.json", STORY), entry("a.png", b"x")])
    with pytest.raises(BundleError):
        check_bundle(bad, LIMITS, tmp_dir=scratch)
    assert list(scratch.iterdir()) == []


def test_validate_gives_file_field_message_lines(tmp_path: Path) -> None:
    """Every named-file problem is reported, one line each, like a story's field problems."""
    story = {
        "music": "music.mp3",
        "characters": {"Mara": {"image": "Mara.JPG"}},
        "scenes": [
            {"description": "a", "image": "images/a.png"},
            {"description": "b", "image": "b.png", "audio": "b.wav"},
            {"description": "c", "image": "folder"},
        ],
    }
    files = {"mara.jpg": picture_bytes(fmt="JPEG"), "b.png": b"<svg/>", "folder/x.png": picture_bytes()}
    files |= {"images-a.png": picture_bytes(), "b.wav": b"RIFF....WAVE", "music.mp3": sound_bytes("mp3", 0.5)}
    lines = validate_bundle(write_bundle(tmp_path / "b.zip", story, files, top="s"), LIMITS, "b.zip")
    assert lines == [
        "b.zip: characters.Mara.image: 'Mara.JPG' is not in the bundle "
        "(it holds 'mara.jpg': names must match exactly, case included)",
        "b.zip: scenes.0.image (scene 1): 'images/a.png' is not in the bundle",
        "b.zip: scenes.2.image (scene 3): 'folder' is a folder, not a file",
    ]


def test_validate_reports_every_file_that_will_not_decode(tmp_path: Path) -> None:
    story = {
        "scenes": [
            {"description": "a", "image": "a.png", "audio": "a.wav"},
            {"description": "b", "image": "b.png"},
        ]
    }
    files = {"a.png": b"GIF89a junk", "a.wav": b"RIFF junk", "b.png": picture_bytes()}
    lines = validate_bundle(write_bundle(tmp_path / "b.zip", story, files), LIMITS, "b.zip")
    assert len(lines) == 2
    assert lines[0] == (
        "b.zip: scenes.0.image (scene 1): 'a.png' is not a picture storyreel reads "
        "(PNG, JPEG, WebP, GIF, BMP or TIFF)"
    )
    assert lines[1].startswith(
        "b.zip: scenes.0.audio (scene 1): 'a.wav' is not a sound ffmpeg can decode (WAV"
    )


def test_paths_are_relative_to_the_folder_holding_story_json(tmp_path: Path) -> None:
    """story.json in top/ naming a.png means top/a.png; a.png at the root is not it (and the hint says so)."""
    zip_path = write_raw_zip(
        tmp_path / "b.zip", [entry("top/story.json", STORY), entry("a.png", picture_bytes())]
    )
    with pytest.raises(BundleError) as err:
        inspect_bundle(zip_path, LIMITS)
    assert err.value.problems == [
        "scenes.0.image (scene 1): 'a.png' is not in the bundle (paths are relative to the folder holding "
        "story.json, 'top/')"
    ]


def test_invalid_story_json_gives_its_usual_lines(tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "seconds": "5", "image": "a.png"}], "musik": "x"}
    with pytest.raises(BundleError) as err:
        inspect_bundle(write_bundle(tmp_path / "b.zip", story, {"a.png": picture_bytes()}), LIMITS)
    assert err.value.problems == [
        'scenes.0.seconds (scene 1): Input should be a valid number, got "5" (a string)',
        "musik: unknown field (check the spelling)",
    ]


def test_story_json_limit_names_the_entry(tmp_path: Path) -> None:
    zip_path = write_bundle(tmp_path / "b.zip", STORY, {"a.png": picture_bytes()}, top="t")
    with pytest.raises(BundleError) as err:
        inspect_bundle(zip_path, LimitsSettings(max_file_bytes=20))
    assert err.value.problems == ["t/story.json: over the limit of 20 bytes (limits.max_file_bytes)"]


def test_hidden_names_are_refused_naming_the_field(tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "image": ".secret/a.png"}]}
    with pytest.raises(BundleError) as err:
        inspect_bundle(write_bundle(tmp_path / "b.zip", story, {".secret/a.png": picture_bytes()}), LIMITS)
    assert err.value.problems == [
        "scenes.0.image (scene 1): '.secret/a.png' is a hidden name (starting with '.'), "
        "which is not published"
    ]


def test_story_json_cannot_name_itself(tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "image": "story.json"}]}
    with pytest.raises(BundleError) as err:
        extract_bundle(write_bundle(tmp_path / "b.zip", story, {}, top="t"), tmp_path / "x", LIMITS)
    assert err.value.problems == [
        "scenes.0.image (scene 1): 'story.json' is the story itself, not a picture or a sound"
    ]


def test_plain_story_file_fields_are_still_refused() -> None:
    with pytest.raises(StoryError) as err:
        load_story(STORY, LIMITS)
    assert err.value.problems == [
        "scenes.0.image (scene 1): names a file ('a.png'), which only a story bundle (NAME.zip) can bring"
    ]


# ----------------------------------------------------------------------------------------------
# Sounds


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "m4a", "aac", "ogg", "opus"])
def test_sounds_in_every_common_format_decode_and_are_measured(fmt: str, tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "audio": f"voice.{fmt}"}], "music": f"music.{fmt}"}
    files = {f"voice.{fmt}": sound_bytes(fmt, 1.5), f"music.{fmt}": sound_bytes(fmt, 3.0, 220)}
    limits = LimitsSettings(max_scene_seconds=2.0)
    bundle = extract_bundle(write_bundle(tmp_path / "b.zip", story, files), tmp_path / "x", limits)
    voice, music = bundle.files[f"voice.{fmt}"].sound, bundle.files[f"music.{fmt}"].sound
    assert voice is not None and music is not None
    assert voice.seconds == pytest.approx(1.5, abs=0.05)
    assert music.seconds == pytest.approx(3.0, abs=0.05)  # music has no limit of its own


def test_scene_sound_longer_than_max_scene_seconds_is_refused(tmp_path: Path) -> None:
    story = {"scenes": [{"description": "a", "audio": "voice.mp3"}]}
    zip_path = write_bundle(tmp_path / "b.zip", story, {"voice.mp3": sound_bytes("mp3", 3.0)})
    assert validate_bundle(zip_path, LimitsSettings(max_scene_seconds=2.0), "b.zip") == [
        "b.zip: scenes.0.audio (scene 1): 'voice.mp3' lasts longer than the limit of 2 s "
        "(limits.max_scene_seconds)"
    ]
    assert validate_bundle(zip_path, LimitsSettings(max_scene_seconds=3.0), "b.zip") == []


def test_sound_length_comes_from_decoding_not_the_header(tmp_path: Path) -> None:
    """An MP3 whose header says 1 s (ffmpeg's own header read agrees) but which holds 3 s of
    sound is measured at 3 s, and refused."""
    lying = tmp_path / "lie.mp3"
    lying.write_bytes(mp3_claiming(3.0, claimed_seconds=1.0))
    header = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(lying)], capture_output=True, text=True
    )
    assert "Duration: 00:00:01.0" in header.stderr or "Duration: 00:00:00.9" in header.stderr
    story = {"scenes": [{"description": "a", "audio": "v.mp3"}]}
    zip_path = write_bundle(tmp_path / "b.zip", story, {"v.mp3": lying.read_bytes()})
    lines = validate_bundle(zip_path, LimitsSettings(max_scene_seconds=2.0))
    assert len(lines) == 1 and "'v.mp3' lasts longer than the limit of 2 s" in lines[0], lines
    bundle = extract_bundle(zip_path, tmp_path / "x", LimitsSettings(max_scene_seconds=5.0))
    assert bundle.files["v.mp3"].sound is not None
    assert bundle.files["v.mp3"].sound.seconds == pytest.approx(3.0, abs=0.05)


def test_script_posing_as_sound_cannot_open_other_files(tmp_path: Path) -> None:
    """An ffconcat script named .mp3 that points at a sound beside it: plain ffmpeg follows it
    (the threat is real); through the demuxer whitelist it is not a sound."""
    (tmp_path / "real.wav").write_bytes(wav_bytes(1.0))
    script = b"ffconcat version 1.0\nfile real.wav\n"
    (tmp_path / "v.mp3").write_bytes(script)
    plain = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "v.mp3"), "-f", "null", "-"]
    assert subprocess.run(plain, capture_output=True, timeout=60, check=False).returncode == 0
    story = {"scenes": [{"description": "a", "audio": "v.mp3"}]}
    files = {"v.mp3": script, "real.wav": wav_bytes(1.0)}
    lines = validate_bundle(write_bundle(tmp_path / "b.zip", story, files), LIMITS, "b.zip")
    assert lines == [
        "b.zip: scenes.0.audio (scene 1): 'v.mp3' is not a sound ffmpeg can decode "
        "(WAV, FLAC, MP3, AAC/M4A, Ogg Vorbis/Opus, WebM, AIFF): not a format storyreel reads"
    ]


def test_video_without_sound_is_not_a_sound(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=d=1:s=64x48",
        str(video),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    story = {"scenes": [{"description": "a", "audio": "v.mp4"}]}
    lines = validate_bundle(
        write_bundle(tmp_path / "b.zip", story, {"v.mp4": video.read_bytes()}), LIMITS, "b.zip"
    )
    assert lines == ["b.zip: scenes.0.audio (scene 1): 'v.mp4' holds no sound (no audio stream)"]


# ----------------------------------------------------------------------------------------------
# What the outbox keeps


def test_copy_assets_keeps_named_files_under_assets(tmp_path: Path) -> None:
    files = {**bundle_files(2), "unused.png": picture_bytes()}
    story = story_with_files(2)
    story["scenes"].append({"description": "again", "image": "images/scene0.png"})
    bundle = extract_bundle(write_bundle(tmp_path / "b.zip", story, files), tmp_path / "x", LIMITS)
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_assets(bundle.root, bundle.story, out)
    assert copied == ["assets/people/mara.jpg", "assets/images/scene0.png", "assets/images/scene1.png"]
    assert tree(out) == set(copied)
    for rel in copied:
        assert (out / rel).read_bytes() == files[rel.removeprefix("assets/")]
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary names left


def test_extracted_files_are_plain_files_we_own(tmp_path: Path) -> None:
    bundle = extract_bundle(good_bundle(tmp_path / "b.zip"), tmp_path / "x", LIMITS)
    for f in bundle.files.values():
        st = os.lstat(bundle.path(f.path))
        assert not os.path.islink(bundle.path(f.path)) and st.st_nlink == 1
        assert Image.open(bundle.path(f.path)).size[0] > 0


def test_target_must_be_new(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        extract_bundle(good_bundle(tmp_path / "b.zip"), tmp_path / "x", LIMITS)
    assert (tmp_path / "x").is_dir()  # not ours: left alone
