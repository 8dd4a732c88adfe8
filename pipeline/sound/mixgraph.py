"""The ffmpeg filter graph of a story's sound: built as text here, run by pipeline.sound.mix.

    narration k ─ level to -20 LUFS ─ peak limit ─┬─ pad to the next ─ concat ─ narration bus
                                                  ├─ scene k's stem (at its place on the film)
                                                  └─ scene k's clip track
    music ─ loop/trim to the film ─ level to -26 LUFS ─ peak limit ─ fades ─ duck (key: the
            narration bus, sidechaincompress) ─┬─ music stem ─ each clip's part of it
    narration bus + ducked music ─ loudnorm (pass 1: measure; pass 2: apply) ─ the film's track

Every placement is in 48 kHz samples, computed from pipeline.sound.timing, so a narration sits
exactly where its captions say and every track is exactly as long as its pictures. The levels
before the mix leave the voice's peaks at most 12 dB above its loudness, so that loudnorm can
bring the mix to the target with one gain (linear) and stay under -1 dBTP; where the mix as a
whole measures quieter (long music, short lines), `MixPlan.ceiling_db` limits them lower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sound.ffmpeg import EBUR128, RATE

__all__ = ["Built", "Duck", "Levels", "MixPlan", "Voice", "build_graph"]

MONO = f"aresample={RATE},aformat=sample_fmts=fltp:sample_rates={RATE}:channel_layouts=mono"
STEREO = f"aresample={RATE},aformat=sample_fmts=fltp:sample_rates={RATE}:channel_layouts=stereo"
TO_STEREO = "pan=stereo|c0=c0|c1=c0"  # a mono voice in the middle, at its own level in both ears
WAV = ["-c:a", "pcm_s16le", "-f", "wav"]
AAC = ["-c:a", "aac", "-b:a", "192k", "-ar", str(RATE), "-f", "mp4"]


@dataclass(frozen=True)
class Levels:
    """Where the parts sit before the mix is normalised (LUFS, and peak ceilings in dBFS)."""

    narration_lufs: float = -20.0
    narration_ceiling_db: float = -8.0
    music_lufs: float = -26.0  # between narrations: 6 LU under the voice
    music_ceiling_db: float = -14.0
    music_fade_in: float = 1.0  # seconds, at most a quarter of the film
    music_fade_out: float = 2.0
    lra: float = 20.0  # loudnorm's range target: wide, so that its gain is all it changes


@dataclass(frozen=True)
class Duck:
    """sidechaincompress settings: the narration (at -20 LUFS) pushes the music down by 10-20 dB
    while it sounds; a long release keeps it down across the gaps between words."""

    threshold: float = 0.015  # about -36 dBFS of the narration
    ratio: float = 20.0
    attack_ms: float = 10.0
    release_ms: float = 600.0
    knee: float = 2.0

    def filter(self) -> str:
        return (
            f"sidechaincompress=threshold={self.threshold}:ratio={self.ratio}:attack={self.attack_ms}:"
            f"release={self.release_ms}:knee={self.knee}:detection=rms:link=maximum"
        )


@dataclass(frozen=True)
class Voice:
    """One scene's narration on the film, in samples."""

    scene: int  # 0-based
    wav: Path
    start: int  # its first sample on the film
    samples: int
    gain_db: float  # to the narration level


@dataclass(frozen=True)
class MixPlan:
    film: int  # samples
    voices: tuple[Voice, ...]  # in film order, never overlapping
    clips: tuple[tuple[int, int], ...]  # per scene: (first sample on the film, samples)
    music: Path | None  # 48 kHz stereo WAV
    music_gain_db: float
    clip_fade: int  # samples of fade at each end of a clip's music
    # A lower peak ceiling for the voices and the ducked music, where the mix's peaks would
    # otherwise stand too far above its loudness for one gain to reach the target (mix.py).
    ceiling_db: float | None = None


@dataclass(frozen=True)
class Built:
    inputs: list[str]  # ffmpeg input arguments
    graph: str  # for -filter_complex
    outputs: dict[str, tuple[str, list[str]]]  # key -> (graph label, codec arguments)


def db(x: float) -> str:
    return f"volume={x:.3f}dB"


def limiter(ceiling_db: float) -> str:
    """A lookahead peak limiter, its delay compensated (latency) so nothing moves in time;
    alimiter goes no lower than -24 dBFS."""
    limit = max(0.0625, 10 ** (ceiling_db / 20))
    return f"alimiter=limit={limit:.5f}:attack=5:release=50:level=false:latency=true"


@dataclass
class _Graph:
    """Filter chains and fresh labels for -filter_complex."""

    chains: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    n: int = 0

    def take(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def add(self, ins: list[str], chain: str, outs: list[str]) -> None:
        self.chains.append("".join(f"[{x}]" for x in ins) + chain + "".join(f"[{x}]" for x in outs))

    def chain(self, ins: list[str], chain: str, stem: str) -> str:
        out = self.take(stem)
        self.add(ins, chain, [out])
        return out

    def split(self, label: str, n: int) -> list[str]:
        if n == 1:
            return [label]
        outs = [self.take(label + "_") for _ in range(n)]
        self.add([label], f"asplit={n}", outs)
        return outs

    def source(self, path: Path, *, loop: bool = False) -> str:
        index = self.inputs.count("-i")
        self.inputs += [*(["-stream_loop", "-1"] if loop else []), "-i", str(path)]
        return f"{index}:a"


def _voices(g: _Graph, plan: MixPlan, levels: Levels, uses: int) -> tuple[str | None, dict[int, list[str]]]:
    """The narration bus (every voice at its place, silence between, the film's length) and, per
    scene, `uses - 1` more copies of its levelled voice."""
    if not plan.voices:
        return None, {}
    segments, extra = [], {}
    for k, v in enumerate(plan.voices):
        ceiling = min(levels.narration_ceiling_db, plan.ceiling_db or 0.0)
        level = f"{MONO},{db(v.gain_db)},{limiter(ceiling)}"
        copies = g.split(g.chain([g.source(v.wav)], level, "v"), uses)
        extra[v.scene] = copies[1:]
        end = plan.voices[k + 1].start if k + 1 < len(plan.voices) else plan.film
        gap = end - v.start - v.samples
        steps = [f"adelay=delays={v.start}S:all=1"] if k == 0 and v.start else []
        steps += [f"apad=pad_len={gap}"] if gap > 0 else []
        segments.append(g.chain([copies[0]], ",".join(steps) or "anull", "seg"))
    tail = f"apad=whole_len={plan.film},atrim=end_sample={plan.film}"
    return g.chain(segments, f"concat=n={len(segments)}:v=0:a=1,{tail}", "nbus"), extra


def _music(g: _Graph, plan: MixPlan, levels: Levels, duck: Duck, key: str | None) -> str | None:
    """The music looped or trimmed to the film, levelled, faded in and out, ducked under `key`."""
    if plan.music is None:
        return None
    fin = max(1, min(round(levels.music_fade_in * RATE), plan.film // 4))
    fout = max(1, min(round(levels.music_fade_out * RATE), plan.film // 4))
    steps = [
        STEREO,
        f"atrim=end_sample={plan.film}",
        db(plan.music_gain_db),
        limiter(levels.music_ceiling_db),
        f"afade=t=in:ss=0:ns={fin}",
        f"afade=t=out:ss={plan.film - fout}:ns={fout}",
        f"apad=whole_len={plan.film}",
    ]
    bus = g.chain([g.source(plan.music, loop=True)], ",".join(steps), "m")
    if key is not None:
        bus = g.chain([bus, g.chain([key], TO_STEREO, "key")], duck.filter(), "duck")
    if plan.ceiling_db is not None:
        bus = g.chain([bus], limiter(plan.ceiling_db), "mlim")
    return bus


def build_graph(
    plan: MixPlan, levels: Levels, duck: Duck, *, final: str, write: bool, gain_db: float
) -> Built:
    """One pass: the mix ending in `final` (loudnorm measuring or applying); with `write`, also
    the stems and clip tracks, each at `gain_db` (the mix's gain)."""
    g = _Graph()
    outputs: dict[str, tuple[str, list[str]]] = {}
    voice, voice_copies = _voices(g, plan, levels, 3 if write else 1)
    key = None
    if voice is not None:
        uses = g.split(voice, (2 if write else 1) + (plan.music is not None))
        voice, key = uses[0], (uses[-1] if plan.music is not None else None)
        if write:
            outputs["narration"] = (g.chain([uses[1]], db(gain_db), "nst"), WAV)
    music = _music(g, plan, levels, duck, key)
    music_parts: list[str] = []
    if music is not None and write:
        framed = g.chain([music], "asetnsamples=n=9600:p=0", "mf")  # clip trims skip the film faster
        music, stem, *music_parts = g.split(framed, 2 + len(plan.clips))
        outputs["music"] = (g.chain([stem], db(gain_db), "mst"), WAV)
    parts = [g.chain([voice], TO_STEREO, "n2")] if voice is not None else []
    parts += [music] if music is not None else []
    mix = g.chain(parts, "amix=inputs=2:normalize=0:duration=longest" if len(parts) == 2 else "anull", "mix")
    tail = f"apad=whole_len={plan.film},atrim=end_sample={plan.film}"
    film = g.chain([mix], f"{final},{tail},{EBUR128}" if write else final, "film")
    outputs["film"] = (film, AAC if write else [])
    if write:
        for k, (first, n) in enumerate(plan.clips):
            outputs[f"clip{k}"] = (_clip(g, plan, k, first, n, voice_copies, music_parts, gain_db), AAC)
        for v in plan.voices:  # the film's length, like every stem: they line up at zero in an editor
            placed = _place(g, voice_copies[v.scene][1], v.start, plan.film)
            outputs[f"scene{v.scene}"] = (g.chain([placed], db(gain_db), "sst"), WAV)
    return Built(g.inputs, ";".join(g.chains), outputs)


def _place(g: _Graph, label: str, offset: int, length: int) -> str:
    """`label` starting `offset` samples into a track of exactly `length` samples."""
    delay = f"adelay=delays={offset}S:all=1," if offset > 0 else ""
    return g.chain([label], f"{delay}apad=whole_len={length},atrim=end_sample={length}", "pl")


def _clip(g: _Graph, plan: MixPlan, k: int, first: int, n: int, voices: dict[int, list[str]],
          music: list[str], gain_db: float) -> str:  # fmt: skip
    """Scene k's clip track: its own narration at its place, over its part of the music."""
    parts = []
    if music:
        fade = max(1, min(plan.clip_fade, n // 2))
        cut = (f"atrim=start_sample={first}:end_sample={first + n},asetpts=PTS-STARTPTS,"
               f"afade=t=in:ss=0:ns={fade},afade=t=out:ss={n - fade}:ns={fade}")  # fmt: skip
        parts.append(g.chain([music[k]], cut, "mc"))
    if k in voices:
        v = next(v for v in plan.voices if v.scene == k)
        parts.append(g.chain([_place(g, voices[k][0], v.start - first, n)], TO_STEREO, "nc"))
    if not parts:
        return g.chain([], f"anullsrc=r={RATE}:cl=stereo,atrim=end_sample={n}", "silent")
    mixed = "amix=inputs=2:normalize=0:duration=longest," if len(parts) == 2 else ""
    return g.chain(parts, f"{mixed}{db(gain_db)},apad=whole_len={n},atrim=end_sample={n}", "clip")
