"""The IP-Adapter folder's expected files, checked without loading anything (no torch here).

Run at start-up from the config check, so a missing or misnamed file stops the daemon with a
line naming the key and the path, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StoryreelError


class IpAdapterError(StoryreelError):
    """The configured IP-Adapter folder cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class IpAdapterFiles:
    folder: Path
    weights: str  # relative to folder, '/'-separated
    encoder: str  # relative to folder

    def describe(self) -> dict[str, str]:
        return {"folder": str(self.folder), "file": self.weights, "encoder": self.encoder}


def check_files(folder: Path, weights: str, encoder: str) -> IpAdapterFiles:
    """What must be on disk before diffusers is asked, each missing piece named with its path."""
    where = f"characters.ip_adapter: {folder}"
    if not folder.is_dir():
        raise IpAdapterError(f"{where}: no such folder")
    for key, rel in (("ip_adapter_file", weights), ("ip_adapter_encoder", encoder)):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IpAdapterError(f"characters.{key}: {rel!r} must be a path inside {folder}")
    if not (folder / weights).is_file():
        raise IpAdapterError(f"{where}: no adapter file {weights} (characters.ip_adapter_file)")
    if not weights.endswith(".safetensors"):
        raise IpAdapterError(
            f"{where}: {weights} is not a .safetensors file (pickled .bin files are not loaded)"
        )
    enc = folder / encoder
    if not (enc / "config.json").is_file():
        raise IpAdapterError(
            f"{where}: no image encoder at {encoder} (config.json missing; characters.ip_adapter_encoder)"
        )
    if not any(enc.glob("*.safetensors")):
        raise IpAdapterError(f"{where}: the image encoder at {encoder} has no .safetensors weights")
    return IpAdapterFiles(folder, weights, encoder)
