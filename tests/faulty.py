"""`storyreel` with faults injected, for fault-injection tests. Test code only.

    python tests/faulty.py FAULTS_JSON run --config FILE [--once]

FAULTS_JSON is an object; each key arms one fault (counts are per process):
    {"oom": N}            the first N denoising calls raise torch.OutOfMemoryError
    {"gpu_fatal": true}   every denoising call raises a sticky CUDA error
    {"crash_on": TEXT}    the process dies of SIGSEGV while making a scene whose prompt contains TEXT
    {"enospc_clip": N}    the first N clip renders fail with ENOSPC (disk full)
    {"eio_publish": N}    the first N publishes fail with EIO (share gone)
    {"slow_step": S}      every denoising step takes S seconds longer, and says on stderr when
                          it has ended ("FAULT step <time.time()>"): the pace, measured
    {"hold_scene": TEXT}  the denoising of a scene whose prompt contains TEXT stops after its
                          first step ("FAULT holding TEXT" on stderr) and stays there, still
                          calling the step callback as a slow but live GPU would, until the
                          file named by "release" exists; never, when there is none
    {"hold_clip": NAME}   the clip render of NAME (e.g. "scene_002.mp4") says "FAULT rendering
                          NAME" on stderr and does not finish until "release" exists
    {"release": PATH}     the file that ends a hold
    {"hold_encode": PATH} the first video encode stops after its first frame, with ffmpeg running,
                          until PATH exists (and says so on stderr)
    {"gate_publish": DIR} the first publish creates DIR/publishing, then waits until DIR/open exists
Holds turn "while scene 3 is in progress" into a state the test waits for and ends itself,
so no test depends on how fast the machine is. The production code has no hooks for any of
this: the faults are patched in here, at the same seams a real failure would come through.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELD_POLL_SECONDS = 0.05


def _countdown(n: int) -> Any:
    left = {"n": n}

    def fire() -> bool:
        if left["n"] > 0:
            left["n"] -= 1
            return True
        return False

    return fire


def _say(text: str) -> None:
    print(f"FAULT {text}", file=sys.stderr, flush=True)


def _held(faults: dict[str, Any]) -> Callable[[], bool]:
    """True while a hold lasts: until the release file exists (forever without one)."""
    release = faults.get("release")
    return lambda: release is None or not Path(release).exists()


def arm(faults: dict[str, Any]) -> None:
    import diffusers
    import torch

    import daemon.run.runner
    import pipeline.images.sdxl
    import pipeline.render.media

    pipe_cls = diffusers.StableDiffusionXLPipeline
    real_call = pipe_cls.__call__
    oom = _countdown(int(faults.get("oom", 0)))
    current: dict[str, Any] = {"prompt": "", "on_step": None, "steps": 0}
    held = _held(faults)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if oom():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        if faults.get("gpu_fatal"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if faults.get("crash_on") and faults["crash_on"] in current["prompt"]:
            inner_cb = kwargs.get("callback_on_step_end")

            def crash_cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                os.kill(os.getpid(), signal.SIGSEGV)  # dies in the middle of denoising
                return inner_cb(p, i, t, kw) if inner_cb else kw

            kwargs["callback_on_step_end"] = crash_cb
        slow = float(faults.get("slow_step", 0))
        if slow:
            inner = kwargs.get("callback_on_step_end")

            def slow_cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                time.sleep(slow)  # the deliberately slow GPU
                out = inner(p, i, t, kw) if inner else kw
                _say(f"step {time.time():.6f}")  # after the step's own callback: its chance to ping
                return out

            kwargs["callback_on_step_end"] = slow_cb
        if faults.get("hold_scene") and faults["hold_scene"] in current["prompt"]:
            inner_hold = kwargs.get("callback_on_step_end")

            def hold_cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                out = inner_hold(p, i, t, kw) if inner_hold else kw
                if i == 0:
                    _say(f"holding {faults['hold_scene']}")
                    on_step = current["on_step"]
                    while held():
                        time.sleep(HELD_POLL_SECONDS)
                        # A live GPU, slow in its next step: the daemon's step callback goes on
                        # (pings, stop checks), never the pipeline's, which runs once per step
                        # (the reference replay checks it does).
                        if on_step is not None:
                            on_step(1, current["steps"])
                return out

            kwargs["callback_on_step_end"] = hold_cb
        return real_call(self, *args, **kwargs)

    pipe_cls.__call__ = call  # type: ignore[method-assign]

    # The scene being made, from the request the generator gets: in this process, or in a Ray
    # actor (the factory below arms the same faults there).
    gen_cls = pipeline.images.sdxl.SdxlGenerator
    real_generate = gen_cls.generate

    def generate(self: Any, req: Any, on_step: Any = None) -> Any:
        current.update(prompt=req.prompt, on_step=on_step, steps=req.steps)
        return real_generate(self, req, on_step)

    gen_cls.generate = generate  # type: ignore[method-assign]
    real_open = pipeline.images.sdxl.open_generator

    def open_generator(settings: Any) -> Any:
        """Arms the faults in the process that loads the model (a Ray actor's, too), once."""
        if not getattr(pipeline.images.sdxl, "_faults_armed", False):
            arm(faults)
        return real_open(settings)

    pipeline.images.sdxl.open_generator = open_generator  # type: ignore[assignment]
    pipeline.images.sdxl._faults_armed = True  # type: ignore[attr-defined]

    enospc = _countdown(int(faults.get("enospc_clip", 0)))
    real_clip = pipeline.render.media.render_clip

    def render_clip(*args: Any, **kwargs: Any) -> Any:
        if enospc():
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(args[1]))
        if faults.get("hold_clip") == Path(args[1]).name:
            _say(f"rendering {Path(args[1]).name}")
            while held():
                time.sleep(HELD_POLL_SECONDS)
        return real_clip(*args, **kwargs)

    pipeline.render.media.render_clip = render_clip  # type: ignore[assignment]

    eio = _countdown(int(faults.get("eio_publish", 0)))
    real_publish = daemon.run.runner.publish

    def publish(*args: Any, **kwargs: Any) -> Any:
        if eio():
            raise OSError(errno.EIO, "Input/output error (injected)", str(args[2]))
        return real_publish(*args, **kwargs)

    gate = faults.get("gate_publish")
    gated = _countdown(1 if gate else 0)

    def gated_publish(*args: Any, **kwargs: Any) -> Any:
        if gated():
            (Path(gate) / "publishing").touch()
            while not (Path(gate) / "open").exists():  # the test unmounts the share meanwhile
                time.sleep(0.02)
        return publish(*args, **kwargs)

    daemon.run.runner.publish = gated_publish  # type: ignore[assignment]

    if faults.get("hold_encode"):
        _hold_first_encode(Path(faults["hold_encode"]))


def _hold_first_encode(release: Path) -> None:
    import pipeline.video.encode

    real_write = pipeline.video.encode.H264Writer.write
    held = _countdown(1)

    def write(self: Any, frame: Any) -> None:
        real_write(self, frame)
        if held():
            print(f"FAULT holding encode until {release.name} exists", file=sys.stderr, flush=True)
            while not release.exists():
                time.sleep(0.02)

    pipeline.video.encode.H264Writer.write = write  # type: ignore[method-assign]


if __name__ == "__main__":
    arm(json.loads(sys.argv[1]))
    from daemon.cli import main

    sys.exit(main(sys.argv[2:]))
