"""The one settings object, read from config.toml and passed down explicitly.

Nothing below the command line reads environment variables or files of its own:
`load_settings` is the single place a configuration enters the program, and an
unknown key or a wrong type stops start-up with the key's dotted path.
"""

from __future__ import annotations

import os
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.video.framerate import FrameRate

Motion = Literal["zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down"]
MOTIONS: tuple[str, ...] = get_args(Motion)  # the same list, for argparse choices and messages
AutoOnOff = Literal["auto", "on", "off"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsSettings(_Section):
    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    state: Path = Path("state")
    # False: inbox and outbox must exist at start. On a share that is not mounted they do not,
    # and folders created under the bare mount point would be served to nobody.
    create: bool = False


class ModelSettings(_Section):
    # hub id (resolved in the local HF cache, offline), a local folder, or "tiny"
    source: str = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: str | None = None
    device: Literal["auto", "cuda", "cpu", "mps"] = "auto"
    # "auto": fp16 on CUDA, fp32 elsewhere. "float32" on a card whose fp16 gives black or NaN
    # frames; "float16" on the CPU runs a GPU's precision there (slowly: the tests rehearse it so).
    dtype: Literal["auto", "float16", "float32"] = "auto"
    # One throw-away generation before READY=1, so the first story pays no warm-up.
    warmup: bool = True
    # Where model.source = "tiny" is built once and loaded from (default: <state>/models/tiny).
    tiny_dir: Path | None = None


class ImageSettings(_Section):
    width: int = Field(1024, ge=16, le=4096, multiple_of=8)
    height: int = Field(768, ge=16, le=4096, multiple_of=8)
    steps: int = Field(30, ge=1, le=200)
    guidance: float = Field(6.0, ge=0.0, le=30.0)
    # "auto": only where VRAM is short (decided by the generator at load time).
    attention_slicing: AutoOnOff = "auto"
    vae_slicing: AutoOnOff = "auto"
    # "auto": torch.compile the UNet during warm-up on CUDA only.
    compile: AutoOnOff = "auto"
    channels_last: AutoOnOff = "auto"
    fuse_qkv: AutoOnOff = "off"
    # "auto": fp16 VAE where it is fp16-safe, else decode in fp32 (never NaN/black frames).
    vae_upcast: AutoOnOff = "auto"
    # Long-prompt encoding (compel) so nothing of a description is dropped at 77 tokens.
    long_prompts: bool = True


class FinishSettings(_Section):
    sharpen: float = Field(0.6, ge=0.0, le=3.0)  # unsharp-mask amount
    sharpen_radius: float = Field(1.2, ge=0.1, le=10.0)
    contrast: float = Field(1.05, ge=0.5, le=2.0)
    brightness: float = Field(1.0, ge=0.5, le=2.0)
    grain: float = Field(3.0, ge=0.0, le=50.0)  # std-dev of luminance noise, in 8-bit levels


class VideoSettings(_Section):
    # an integer 1-120 or an NTSC rate (24000/1001, ...), held exactly: pipeline/video/framerate.py
    fps: FrameRate = Fraction(24)
    seconds_per_scene: float = Field(5.0, gt=0.0, le=600.0)
    motion: Motion = "zoom_in"
    zoom: float = Field(0.12, ge=0.0, le=1.0)  # total zoom over a clip: 1.0 -> 1.12
    pan: float = Field(0.10, ge=0.0, le=0.5)  # fraction of the frame a pan travels
    fade_seconds: float = Field(0.5, ge=0.0, le=10.0)
    crossfade_seconds: float = Field(0.5, ge=0.0, le=10.0)
    crf: int = Field(18, ge=0, le=51)
    preset: str = "veryfast"  # crf 18 veryfast: better than MoviePy's crf 23 medium, ~3x less CPU
    # The size of clips and film; both 0: the image's own size ([image] width x height).
    width: int = Field(0, ge=0, le=8192)
    height: int = Field(0, ge=0, le=8192)
    # Captions drawn into the film's pictures too (film.srt/film.vtt are written either way).
    burn_captions: bool = False

    @model_validator(mode="after")
    def _size_pair(self) -> VideoSettings:
        if (self.width == 0) != (self.height == 0):
            raise ValueError("video.width and video.height are set together (both 0: the image's size)")
        if self.width and (self.width % 2 or self.height % 2 or self.width < 2 or self.height < 2):
            raise ValueError(
                "video.width and video.height must be even and >= 2 for H.264 "
                f"(got {self.width}x{self.height})"
            )
        return self


class OutputsSettings(_Section):
    film: bool = True
    contact_sheet: bool = True
    folder: bool = True  # outbox/NAME/
    zip: bool = True  # outbox/NAME.zip: the same content again, in one file
    subtitles: bool = True  # NAME/film.srt and NAME/film.vtt when any scene has narration
    timeline: bool = True  # NAME/timeline.otio, timeline.xml (FCP7 XML), timeline.edl
    # The clean scene clips with handles that the timelines point at (NAME/master/): "h264" (.mp4,
    # small), or an editing codec in .mov: "prores" (ProRes 422 HQ), "dnxhr" (DNxHR HQ).
    master_codec: Literal["h264", "prores", "dnxhr"] = "h264"

    @model_validator(mode="after")
    def _something_published(self) -> OutputsSettings:
        if not (self.folder or self.zip):
            raise ValueError("outputs.folder and outputs.zip are both false; at least one must be true")
        return self


class MetricsSettings(_Section):
    # Prometheus text format for node_exporter's textfile collector; "" = off.
    textfile: str = ""

    @field_validator("textfile")
    @classmethod
    def _prom_suffix(cls, value: str) -> str:
        if value and not value.endswith(".prom"):
            raise ValueError("must end in .prom (node_exporter's textfile collector reads only those)")
        return value


class RetentionSettings(_Section):
    """What may be removed, and when; 0 turns each limit off (the default: nothing is removed)."""

    keep_days: float = Field(0, ge=0)  # published stories (outbox/NAME/, NAME.zip) older than this go
    failed_days: float = Field(0, ge=0)  # kept inputs of failed stories (state/failed/) older than this go
    max_outbox_gb: float = Field(0, ge=0)  # above this, the oldest published stories go first


class WatchSettings(_Section):
    mode: Literal["auto", "inotify", "polling"] = "auto"
    poll_seconds: float = Field(2.0, gt=0.0, le=3600.0)
    settle_seconds: float = Field(1.0, ge=0.0, le=3600.0)
    # Full directory rescans are the truth; watch events only make us look sooner.
    rescan_seconds: float = Field(10.0, gt=0.0, le=3600.0)


class LimitsSettings(_Section):
    max_file_bytes: int = Field(1_000_000, ge=1)
    max_scenes: int = Field(200, ge=1)
    max_description_chars: int = Field(4000, ge=1)
    max_title_chars: int = Field(300, ge=1)
    max_style_chars: int = Field(1000, ge=1)
    max_characters: int = Field(50, ge=0)
    max_json_depth: int = Field(32, ge=2)
    max_name_chars: int = Field(80, ge=8)
    min_scene_seconds: float = Field(0.5, gt=0.0)
    max_scene_seconds: float = Field(120.0, gt=0.0)
    # A story bundle (inbox/NAME.zip) as a whole: every entry counts, named or not.
    max_bundle_bytes: int = Field(2_000_000_000, ge=1)  # uncompressed, counted while extracting
    max_bundle_files: int = Field(1000, ge=1)


class DaemonSettings(_Section):
    # Attempts of one story that ended with the process dying (segfault, CUDA fatal).
    max_attempts: int = Field(3, ge=1)
    # CPU workers for finishing/clips while the GPU denoises the next scene ("0" = auto).
    cpu_workers: int = Field(0, ge=0, le=64)
    # Back-off while the outbox/inbox is unavailable (disk full, share gone).
    retry_min_seconds: float = Field(1.0, gt=0.0)
    retry_max_seconds: float = Field(60.0, gt=0.0)
    history: int = Field(20, ge=1)
    # A call on the inbox or outbox with no progress for this long: the share is not answering.
    share_timeout_seconds: float = Field(2.0, gt=0.0, le=600.0)


class WorkersSettings(_Section):
    """Who makes the images: one generator in the daemon's own process, or a pool of Ray actors.

    The checks that span keys live here (not in the engine), so a config that cannot work
    stops start-up with the key named, before anything is loaded.
    """

    engine: Literal["local", "ray"] = "local"
    # "" = a private Ray instance on this box (loopback only, no dashboard); "auto", "HOST:PORT"
    # or "ray://HOST:10001" joins an existing cluster.
    address: str = ""
    gpus_per_worker: float = Field(1, ge=0)  # 0 = CPU workers (the tests, the benchmark)
    count: int = Field(0, ge=0, validate_default=True)  # 0 = one per GPU that Ray reports
    # 0 = derived: steps x the observed seconds per step x a margin, never under a floor
    scene_timeout_seconds: float = Field(0, ge=0)

    @field_validator("count")
    @classmethod
    def _count_fits_engine(cls, count: int, info: ValidationInfo) -> int:
        engine, gpus = info.data.get("engine"), info.data.get("gpus_per_worker")
        if engine == "local" and count > 1:
            raise ValueError(f'engine = "local" runs one worker; count = {count} needs engine = "ray"')
        if engine == "ray" and count == 0 and gpus == 0:
            raise ValueError(
                "must be set for CPU workers (gpus_per_worker = 0): there are no GPUs to count workers by"
            )
        return count


class CharactersSettings(_Section):
    """How each named character is kept the same person from scene to scene."""

    consistency: Literal["on", "off"] = "on"
    # A local folder of IP-Adapter weights in h94/IP-Adapter's layout; "" = not used.
    ip_adapter: str = ""
    # Inside that folder: the adapter file, and the CLIP image encoder it was trained with.
    ip_adapter_file: str = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    ip_adapter_encoder: str = "models/image_encoder"
    # How strongly the reference picture steers a scene naming the character (0 = not at all).
    ip_adapter_scale: float = Field(0.6, ge=0.0, le=2.0)


class VoiceSettings(_Section):
    """What speaks `scenes[i].narration`: piper (with a voice file), espeak-ng, or nothing."""

    # auto: piper when piper_voice is set, else espeak-ng when installed, else off (captions only)
    engine: Literal["auto", "piper", "espeak", "off"] = "auto"
    piper_voice: str = ""  # a piper voice (.onnx, with its .onnx.json beside it)
    # The language espeak-ng speaks (one of `espeak-ng --voices`); piper's is its voice file's.
    espeak_voice: str = Field("en-us", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_+\-]*$")


class AudioSettings(_Section):
    """The film's sound: the mix is loudness-normalised to this (EBU R128 integrated)."""

    loudness_lufs: float = Field(-16.0, ge=-40.0, le=-5.0)
    # The box's music under every story that brings none of its own (a bundle's `music` wins);
    # "" = none. Looped or trimmed to the film and ducked under the narration, as a bundle's is.
    music: str = ""


class HooksSettings(_Section):
    """Commands run when a story ends (the daemon runs them; see daemon/hooks.py).

    An argv list, run without a shell: ["/usr/bin/curl", "-fsS", "https://..."].
    """

    on_done: list[str] = []
    on_failed: list[str] = []
    timeout_seconds: float = Field(60.0, gt=0.0, le=86400.0)  # a hook still running then is killed

    @field_validator("on_done", "on_failed")
    @classmethod
    def _program_first(cls, argv: list[str]) -> list[str]:
        if argv and not argv[0].strip():
            raise ValueError("the first item is the program to run; it cannot be empty")
        return argv


class Settings(_Section):
    paths: PathsSettings = PathsSettings()
    model: ModelSettings = ModelSettings()
    image: ImageSettings = ImageSettings()
    finish: FinishSettings = FinishSettings()
    video: VideoSettings = VideoSettings()
    outputs: OutputsSettings = OutputsSettings()
    watch: WatchSettings = WatchSettings()
    limits: LimitsSettings = LimitsSettings()
    daemon: DaemonSettings = DaemonSettings()
    hooks: HooksSettings = HooksSettings()
    metrics: MetricsSettings = MetricsSettings()
    retention: RetentionSettings = RetentionSettings()
    workers: WorkersSettings = WorkersSettings()
    characters: CharactersSettings = CharactersSettings()
    voice: VoiceSettings = VoiceSettings()
    audio: AudioSettings = AudioSettings()

    @property
    def tiny_dir(self) -> Path:
        return self.model.tiny_dir or self.paths.state / "models" / "tiny"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def settings_from_dict(data: dict[str, Any], base_dir: Path, origin: str = "config") -> Settings:
    """Validate a parsed config; relative paths are taken from the config file's folder."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    for name in ("inbox", "outbox", "state"):
        p = getattr(settings.paths, name)
        setattr(settings.paths, name, _absolute(base_dir, p))
    if settings.metrics.textfile:
        settings.metrics.textfile = str(_absolute(base_dir, Path(settings.metrics.textfile)))
    if settings.model.tiny_dir is not None:
        settings.model.tiny_dir = _absolute(base_dir, settings.model.tiny_dir)
    if settings.characters.ip_adapter:
        settings.characters.ip_adapter = str(_absolute(base_dir, Path(settings.characters.ip_adapter)))
    if settings.voice.piper_voice:
        settings.voice.piper_voice = str(_absolute(base_dir, Path(settings.voice.piper_voice)))
    if settings.audio.music:
        settings.audio.music = str(_absolute(base_dir, Path(settings.audio.music)))
    settings.model.source = _model_source(settings.model.source, base_dir)
    if problem := _master_size_problem(settings):
        raise ConfigError(f"{origin}: invalid configuration\n  outputs.master_codec: {problem}")
    return settings


DNXHR_SMALLEST = (256, 120)  # ffmpeg's dnxhd encoder: "input must be at least 256x120"


def _master_size_problem(settings: Settings) -> str | None:
    """DNxHR has a smallest picture: said at start, rather than by every story's first scene."""
    if not settings.outputs.timeline or settings.outputs.master_codec != "dnxhr":
        return None
    v, i = settings.video, settings.image
    w, h = (v.width, v.height) if v.width else (i.width, i.height)
    if w >= DNXHR_SMALLEST[0] and h >= DNXHR_SMALLEST[1]:
        return None
    return f'"dnxhr" needs clips of at least 256x120 (these are {w}x{h}); use "prores" or "h264"'


def require_named_files(settings: Settings) -> None:
    """The files and folders config keys name must be there: a start-up error (exit 2) naming the
    key, never a story failing hours later. What is *inside* them is checked by their loaders."""
    voice = settings.voice
    if voice.engine == "piper" and not voice.piper_voice:
        raise ConfigError('voice.piper_voice: engine = "piper" needs a voice file (.onnx)')
    if voice.piper_voice:
        onnx = Path(voice.piper_voice)
        if not onnx.is_file():
            raise ConfigError(f"voice.piper_voice: {onnx} does not exist or is not a file")
        if not Path(f"{onnx}.json").is_file():
            raise ConfigError(f"voice.piper_voice: {onnx}.json (the voice's config) is missing beside it")
    if settings.audio.music and not Path(settings.audio.music).is_file():
        raise ConfigError(f"audio.music: {settings.audio.music} does not exist or is not a file")
    chars = settings.characters
    if chars.ip_adapter and not Path(chars.ip_adapter).is_dir():
        raise ConfigError(f"characters.ip_adapter: {chars.ip_adapter} is not a folder")
    if chars.ip_adapter:
        from pipeline.images.consistency.adapter_files import IpAdapterError, check_files

        try:
            check_files(Path(chars.ip_adapter), chars.ip_adapter_file, chars.ip_adapter_encoder)
        except IpAdapterError as err:
            raise ConfigError(str(err)) from None


def _model_source(source: str, base_dir: Path) -> str:
    """A folder named relative to the config file resolves there; a hub id stays as it is."""
    if source == "tiny":
        return source
    path = Path(source).expanduser()
    explicit = source.startswith(("/", "./", "../", "~"))
    if explicit or (base_dir / path).is_dir():
        return str(_absolute(base_dir, path))
    return source


def _absolute(base_dir: Path, path: Path) -> Path:
    """Relative to the config's folder, `~` expanded, `..` folded (no symlinks resolved)."""
    return Path(os.path.normpath((base_dir / path.expanduser()).absolute()))


def load_settings(path: Path | None) -> Settings:
    """Read a TOML file; `None` gives the documented defaults relative to the cwd."""
    if path is None:
        return settings_from_dict({}, Path.cwd(), "defaults")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror or err}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return settings_from_dict(data, path.resolve().parent, str(path))
