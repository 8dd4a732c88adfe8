"""espeak-ng, the voice that is always there (Debian's package `espeak-ng`): robotic, offline.

It is run as a program, once per sentence, text on stdin (so no text is ever read as an option)
and a WAV on stdout. espeak-ng is GPL-3.0; running the program keeps it a separate work.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import ConfigError
from pipeline.sound.speech import Speech, speak_sentences

__all__ = ["EspeakVoice", "espeak_installed"]

_VERSION = re.compile(r"text-to-speech:\s*([0-9][\w.\-]*)")


def espeak_installed() -> str | None:
    """The espeak-ng program's path, or None."""
    return shutil.which("espeak-ng")


class EspeakVoice:
    """espeak-ng speaking one language (`voice`, one of `espeak-ng --voices`)."""

    engine = "espeak"

    def __init__(self, voice: str = "en-us", program: str | None = None) -> None:
        found = program or espeak_installed()
        if found is None:
            raise ConfigError(
                'voice.engine: "espeak" needs the espeak-ng program (apt-get install espeak-ng)'
            )
        self.program = found
        self.voice = voice
        self.version = self._version()
        if voice.lower() not in self._voices():
            raise ConfigError(
                f"voice.espeak_voice: espeak-ng has no voice {voice!r} (see espeak-ng --voices)"
            )
        self.rate = self._wav("a")[1]  # espeak-ng's own output rate (22.05 kHz)

    def _run(self, args: list[str], text: str | None = None) -> bytes:
        proc = subprocess.run(
            [self.program, *args],
            input=(text or "").encode("utf-8"),
            capture_output=True,
            start_new_session=True,
            check=False,
            timeout=300,
        )
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise RuntimeError(f"espeak-ng {' '.join(args[:2])}: {msg}")
        return proc.stdout

    def _version(self) -> str:
        found = _VERSION.search(self._run(["--version"]).decode("utf-8", "replace"))
        return found.group(1) if found else "unknown"

    def _voices(self) -> set[str]:
        names = set()
        for line in self._run(["--voices"]).decode("utf-8", "replace").splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 4:
                names |= {cols[1].lower(), cols[3].lower()}  # the language, the voice's name
        return names

    def describe(self) -> dict[str, Any]:
        return {"engine": "espeak-ng", "version": self.version, "voice": self.voice}

    def synthesize(self, sentence: str) -> np.ndarray:
        """One sentence -> mono float32 at 22.05 kHz (-b 1: the text is UTF-8)."""
        return self._wav(sentence)[0]

    def _wav(self, sentence: str) -> tuple[np.ndarray, int]:
        # On a pipe espeak-ng cannot seek back to fill in the header's length: read what came.
        data = self._run(["-v", self.voice, "-b", "1", "--stdout"], sentence)
        with wave.open(io.BytesIO(data), "rb") as w:
            rate, width = w.getframerate(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
        if width != 2:
            raise RuntimeError(f"espeak-ng wrote {8 * width}-bit samples; 16-bit expected")
        return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate

    def speak(self, text: str, wav: Path, *, scene: int) -> Speech:
        return speak_sentences(
            self.synthesize,
            rate=self.rate,
            language=self.voice,
            text=text,
            wav=wav,
            scene=scene,
            source=self.describe(),
            voice_name=f"espeak-ng {self.voice}",
        )
