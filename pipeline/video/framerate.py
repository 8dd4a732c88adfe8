"""Frame rates as exact fractions: 24, 25, ... and the NTSC rates 24000/1001, 30000/1001, 60000/1001.

Editing software and broadcast deliver at 23.976 (24000/1001), 29.97 and 59.94. Those are not
the decimals they are written as: a float 23.976 drifts a frame from 24000/1001 every ~7 minutes,
and the encoded stream, the frame counts and the timelines must agree to the frame. So a rate is a
`fractions.Fraction` from the config to ffmpeg's `-r` and the timelines' rates; the decimals
people write are read as the rates they mean.

Imports nothing but the standard library and pydantic (the settings' own dependency).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

__all__ = ["NTSC_RATES", "FrameRate", "frame_rate_json", "parse_frame_rate"]

MAX_INTEGER_RATE = 120
NTSC_RATES: dict[str, Fraction] = {
    "23.976": Fraction(24000, 1001),
    "29.97": Fraction(30000, 1001),
    "59.94": Fraction(60000, 1001),
}
_EXPECTED = (
    f"an integer 1-{MAX_INTEGER_RATE}, or 24000/1001, 30000/1001, 60000/1001"
    " (also written 23.976, 29.97, 59.94)"
)


def _checked(rate: Fraction, given: object) -> Fraction:
    if rate.denominator == 1 and 1 <= rate <= MAX_INTEGER_RATE:
        return rate
    if rate in NTSC_RATES.values():
        return rate
    raise ValueError(f"must be {_EXPECTED}, got {given!r}")


def parse_frame_rate(value: Any) -> Fraction:
    """An accepted frame rate as a Fraction, or ValueError saying which forms are accepted.

    Integers (also as "24" or 24.0), the three NTSC fractions ("24000/1001") and their usual
    decimals (23.976, "29.97"); nothing else, so that every rate stored is exactly representable
    in the containers and timelines we write.
    """
    if isinstance(value, bool):  # a TOML `fps = true` is not a rate
        raise ValueError(f"must be {_EXPECTED}, got {value!r}")
    if isinstance(value, Fraction):
        return _checked(value, value)
    if isinstance(value, int):
        return _checked(Fraction(value), value)
    if isinstance(value, float):
        text = f"{value:g}"
        if text in NTSC_RATES:
            return NTSC_RATES[text]
        if value.is_integer():
            return _checked(Fraction(int(value)), value)
        raise ValueError(f"must be {_EXPECTED}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text in NTSC_RATES:
            return NTSC_RATES[text]
        try:
            rate = Fraction(text) if "/" in text or text.isdigit() else None
        except (ValueError, ZeroDivisionError):
            rate = None
        if rate is None:
            raise ValueError(f"must be {_EXPECTED}, got {value!r}")
        return _checked(rate, value)
    raise ValueError(f"must be {_EXPECTED}, got {value!r}")


def frame_rate_json(rate: Fraction) -> int | str:
    """24 for a whole rate (as configs and manifests always had it), else "24000/1001"."""
    return int(rate) if rate.denominator == 1 else f"{rate.numerator}/{rate.denominator}"


# A pydantic field type: accepts what parse_frame_rate accepts, holds a Fraction, dumps as
# frame_rate_json (in model_dump() too: the manifest is json.dumps of model_dump()).
FrameRate = Annotated[
    Fraction,
    PlainValidator(parse_frame_rate),
    PlainSerializer(frame_rate_json, return_type=int | str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER_RATE},
                {"enum": ["24000/1001", "30000/1001", "60000/1001", 23.976, 29.97, 59.94]},
            ]
        }
    ),
]
