"""Story bundles (inbox/NAME.zip): a stranger's ZIP read safely, and the pictures and sounds it brings.

read.py       story.json and the named files: the claim's look, the run's extraction, validate
archive.py    the ZIP itself: every entry's name and kind checked, inflated under a byte budget
pictures.py   a provided picture upright and in sRGB, and its cover fit to a size
sounds.py     a provided sound decoded by ffmpeg (audio demuxers only) and its length
"""

from pipeline.bundle.read import (
    Bundle,
    BundleError,
    BundleFile,
    check_bundle,
    copy_assets,
    extract_bundle,
    inspect_bundle,
    validate_bundle,
)

__all__ = [
    "Bundle",
    "BundleError",
    "BundleFile",
    "check_bundle",
    "copy_assets",
    "extract_bundle",
    "inspect_bundle",
    "validate_bundle",
]
