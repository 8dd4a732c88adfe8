"""The warm-up compiles the UNet for every prompt length a scene can bring, under the start-up allowance.

torch.compile specialises on the first shape it sees. Long prompts reach the UNet as 77 tokens a
chunk, so a warm-up at 77 tokens alone left the first scene with a longer prompt to recompile
inside its first denoising step, where no watchdog ping is sent (minutes on a GPU, against the
unit's WatchdogSec=120s). Compile is forced on through the settings, as on CUDA; Inductor on the
CPU takes over a minute for the tiny UNet, so the compile's backend is dynamo's "eager" one here:
the tracing, the guards and the automatic dynamic shapes that decide whether a call recompiles
are dynamo's and the same, only the kernels are not generated (bench/device_sdxl.py's recompile
row measures that part, with Inductor, on the device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_generate import FakeGpu, make_settings, req

from pipeline.images.factory import open_workers
from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.sdxl_load import COMPILE_MODE
from pipeline.settings import settings_from_dict


class Compiles:
    """The UNet's `compile`, with dynamo's eager backend counting each graph it is handed."""

    def __init__(self, gen: SdxlGenerator) -> None:
        self.graphs = 0
        self.modes: list[str | None] = []
        unet = gen.pipe.unet  # type: ignore[union-attr]

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            self.graphs += 1
            return gm.forward

        def compile_unet(mode: str | None = None, **_: Any) -> None:
            self.modes.append(mode)
            torch.nn.Module.compile(unet, backend=backend)

        unet.compile = compile_unet


@pytest.fixture
def compiled(tiny_dir: Path) -> Any:
    gen = SdxlGenerator(make_settings(tiny_dir, compile="on"), device=FakeGpu())
    compiles = Compiles(gen)
    yield gen, compiles
    gen.close()
    torch._dynamo.reset()  # this test's guards and graphs go with it


def test_after_warm_up_no_prompt_length_recompiles(compiled: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gen, compiles = compiled
    phases: list[tuple[str, int]] = []
    warm: list[int] = []
    real = gen.generate

    def generate(r: Any, on_step: Any = None) -> Any:
        out = real(r, on_step)
        warm.append(out.info["conditioning_tokens"])
        return out

    monkeypatch.setattr(gen, "generate", generate)
    gen.warm_up(lambda what: phases.append((what, compiles.graphs)))
    monkeypatch.undo()
    assert warm == [77, 154]  # one chunk, then two
    assert compiles.modes == [COMPILE_MODE] and gen.describe()["compiled"] is True
    after_warm_up = compiles.graphs
    tokens, graphs = [], []
    for words in (10, 18, 25):  # "lighthouse" is 10 tokens to the tiny model's byte-level tokenizer
        out = gen.generate(req(" ".join(["lighthouse"] * words)))
        tokens.append(out.info["conditioning_tokens"])
        graphs.append(compiles.graphs - after_warm_up)
        assert out.info["compiled"] == COMPILE_MODE
    assert tokens == [154, 231, 308] and graphs == [0, 0, 0]  # no scene compiles anything
    assert after_warm_up >= 2  # the 77-token graph, then the one with a dynamic sequence length
    # Each compile is a start-up phase of its own, told before it starts (a fresh allowance).
    assert [graphs for _, graphs in phases] == [0, 1]
    assert "77-token" in phases[0][0] and "154-token" in phases[1][0]


def test_without_compile_the_warm_up_is_one_image(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = SdxlGenerator(make_settings(tiny_dir), device=FakeGpu())
    calls: list[str] = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda r, on_step=None: calls.append(r.prompt) or real(r, on_step))
    phases: list[str] = []
    gen.warm_up(phases.append)
    assert len(calls) == 1 and phases == []  # nothing to compile: no phase, no second image
    assert gen.describe()["compiled"] is False and gen.describe()["warmup_seconds"] > 0


def test_the_daemon_tells_the_warm_up_its_phases() -> None:
    """open_workers hands the daemon's phase (STATUS= and EXTEND_TIMEOUT_USEC) to the warm-up."""
    told: list[str] = []

    class Stub:
        def describe(self) -> dict[str, Any]:
            return {"device": "cpu"}

        def warm_up(self, phase: Any = None) -> None:
            phase("compiling")

        def generate(self, r: Any, on_step: Any = None) -> Any:
            raise AssertionError("not called")

        def close(self) -> None:
            pass

    open_workers(settings_from_dict({}, Path(".")), lambda s: Stub(), told.append)
    assert told == ["loading model", "warming up", "compiling"]
