"""The film's sound: what speaking and mixing cost (pipeline/sound).

    .venv/bin/python bench/sound.py [--runs 3] [--minutes 1 5]

1. Text to speech: wall seconds of synthesis per second of speech (the real-time factor; under
   1 is faster than real time), espeak-ng and piper, each narration spoken sentence by sentence
   into its 48 kHz WAV exactly as a story's scene is (speak_scene), best of `--runs`.
   The piper row uses the random-weight test voice (tests/tiny_voice.py: one table lookup per
   phoneme), so it prices piper's own phonemizer and onnxruntime call plus our assembly, not a
   real VITS voice's inference, which costs more.
2. Mixing, per minute of film: mix_story on stories of `--minutes` of film (5 s scenes, every
   other one narrated by espeak-ng, music looped under all), the measuring passes (one, or more
   for a peaky mix) and pass 2 (write: the film's AAC, every clip's AAC, the stems) timed apart,
   beside the floor: one ffmpeg run that only encodes a film-length WAV to AAC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.settings import VoiceSettings
from pipeline.sound import mix as mix_module
from pipeline.sound.ffmpeg import run_ffmpeg
from pipeline.sound.recorded import prepare_music
from pipeline.sound.timing import SceneSound, plan_timing
from pipeline.sound.voices import Voice, open_voice, speak_scene

from sound_media import music
from tiny_voice import build_tiny_voice

PARAGRAPH = (
    "The lighthouse stood alone on the rock at the edge of the bay. Nobody had climbed its stairs "
    "for years, and the lamp had long gone dark. Then one grey morning Mara came back, a yellow "
    "raincoat over her shoulders and a key in her hand. She turned it, and the door opened. "
    "Inside, the air smelled of salt and old paper. Step by step she climbed towards the light."
)


def bench_tts(name: str, voice: Voice, folder: Path, runs: int) -> tuple[str, float, float, float]:
    best = float("inf")
    speech = None
    for k in range(runs):
        started = time.perf_counter()
        speech = speak_scene(voice, scene=1, narration=PARAGRAPH, wav=folder / f"{name}-{k}.wav")
        best = min(best, time.perf_counter() - started)
    assert speech is not None and speech.samples
    return name, speech.seconds, best, best / speech.seconds


def bench_mix(minutes: float, voice: Voice, folder: Path, runs: int) -> tuple[float, ...]:
    """(film minutes, measuring passes, their s, pass 2 s, total s, floor s), best of `runs`."""
    scenes = round(minutes * 60 / 4.5)  # 5 s scenes, 0.5 s crossfades
    line = "The tide came in over the rocks, and the gulls went quiet."
    texts = [line if k % 2 else None for k in range(scenes)]
    spoken = {}
    speeches = []
    for k, text in enumerate(texts):
        if text is not None and text not in spoken:
            spoken[text] = speak_scene(voice, scene=k + 1, narration=text, wav=folder / "line.wav")
        speeches.append(spoken[text] if text is not None else None)
    sounds = [SceneSound(5.0, s.seconds if s else None) for s in speeches]
    timing = plan_timing(sounds, fps=24, crossfade_seconds=0.5, max_scene_seconds=120)
    tune = prepare_music(music(folder / "song.wav", 40.0), folder / "song48.wav", name="song.wav")
    passes: list[float] = []
    original = mix_module.run_ffmpeg

    def timed(args: list[str], **kw: object) -> str:
        started = time.perf_counter()
        out = original(args, **kw)  # type: ignore[arg-type]
        passes.append(time.perf_counter() - started)
        return out

    mix_module.run_ffmpeg = timed  # type: ignore[assignment]
    best = (float("inf"), 0.0, 0.0, 0.0)
    try:
        for _ in range(runs):
            passes.clear()
            tracks = mix_module.mix_story(timing, speeches, tune, loudness_lufs=-16.0, stems_dir=folder,
                                          tracks_dir=folder)  # fmt: skip
            assert tracks is not None
            if sum(passes) < best[0]:  # the last run writes; those before it measure
                best = (sum(passes), len(passes) - 1, sum(passes[:-1]), passes[-1])
    finally:
        mix_module.run_ffmpeg = original
    started = time.perf_counter()
    floor_args = ["-i", str(folder / "music.wav"), "-c:a", "aac", "-b:a", "192k", "-f", "mp4"]
    run_ffmpeg([*floor_args, str(folder / "floor.m4a")], what="floor: the film's length to AAC, nothing else")
    floor = time.perf_counter() - started
    film_minutes = float(timing.seconds) / 60
    return film_minutes, best[1], best[2], best[3], best[0], floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        espeak = open_voice(VoiceSettings(engine="espeak"))
        piper = open_voice(VoiceSettings(engine="piper", piper_voice=str(build_tiny_voice(folder / "voice"))))
        assert espeak is not None and piper is not None
        print(f"Text to speech: one {len(PARAGRAPH.split('. '))}-sentence paragraph, best of {args.runs}\n")
        print("| voice | speech s | synthesis s | s per s of speech |")
        print("|---|---:|---:|---:|")
        for name, voice in (("espeak-ng en-us", espeak), ("piper (random-weight test voice)", piper)):
            _, speech, wall, rtf = bench_tts(name.split()[0], voice, folder, args.runs)
            print(f"| {name} | {speech:.2f} | {wall:.3f} | {rtf:.3f} |")
        print(f"\nMixing (5 s scenes, every other narrated, music under all), best of {args.runs}\n")
        head = ["film min", "measuring passes", "their s", "pass 2 s", "total s", "s per film min"]
        head += ["AAC alone s", "total / AAC alone"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---:|" * len(head))
        for minutes in args.minutes:
            film, n, p1, p2, total, floor = bench_mix(minutes, espeak, folder, args.runs)
            row = [f"{film:.2f}", f"{n:.0f}", f"{p1:.2f}", f"{p2:.2f}", f"{total:.2f}", f"{total / film:.2f}"]
            row += [f"{floor:.2f}", f"{total / floor:.1f}x"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
