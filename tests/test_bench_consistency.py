"""bench/consistency.py runs (reduced, on CPU), and its FLOP count of SDXL says what the mechanism costs.

Timings are the benchmark's business, never asserted here; the FLOP count is arithmetic on
shapes (SDXL's UNet on the meta device), the same on every machine.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import consistency as bench


@pytest.mark.slow
def test_every_row_runs_reduced_on_the_tiny_model() -> None:
    result = bench.run(model="tiny", size=(64, 48), steps=2, repeats=1, device="cpu")
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == [label for label, *_ in bench.ROWS]
    assert rows["plain scene (0 references)"]["ratio"] == 1.0
    assert all(r["s/scene"] > 0 for r in rows.values())
    assert rows["1 reference, cached on the device"]["cache GiB"] > 0  # it did keep the passes
    assert result["meta"]["shared_layers"] == 2 and not result["meta"]["representative"]
    bench.print_table(result)


@pytest.mark.slow  # ~10 s of Python building and walking SDXL's UNet, no weights
def test_sdxl_flops_at_1024x768() -> None:
    """One reference costs a reference pass that stops after the up blocks' last attention,
    plus the scene's longer self-attention; cached, only the latter."""
    r = bench.flop_ratios("sdxl", (1024, 768))
    assert 9.0 < r["plain TFLOP/step"] < 11.0  # SDXL's UNet at batch 2 (guidance), 128×96 latents
    assert 1.8 < r["1 reference"] < r["1 reference, whole reference pass"] <= 2.1
    assert 2.7 < r["2 references"] < 3.1
    assert 1.0 < r["1 reference, cached"] < r["2 references, cached"] < 1.3
    assert 300 < r["reference keys/values per step, fp16 MB"] < 360  # what one cached step holds
