"""The film's sound: narration spoken or recorded, scene timing, captions, the mix and its stems.

Small modules, each for one step a story's runner calls:

- `voices`: `open_voice(settings.voice)` once (piper, espeak-ng or none), then per scene
  `speak_scene(...)` -> a `Speech` (48 kHz WAV, its length, sentence spans, source, warnings);
  `espeak` and `piper_voice` are the two engines, `recorded` a bundle's own sound file.
- `text`: sentences as written, and what a voice's language can speak.
- `timing`: pure arithmetic: scene frame counts from narration, where narration sits on the film.
- `captions`: `film.srt` and `film.vtt`, and the ASS file and filter that burn captions in.
- `mix`: the story's sound in two ffmpeg runs (measure, then apply): narration placed, music
  looped and ducked under it, loudness-normalised; the film's AAC track, each clip's, the stems.
- `mux`: an AAC track into an existing MP4 without touching its video.
- `ffmpeg`: running ffmpeg, decoding sound to numpy, reading loudnorm's measurements.
"""
