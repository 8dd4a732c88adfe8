"""`storyreel` with faults injected, for fault-injection tests. Test code only.

    python tests/faulty.py FAULTS_JSON run --config FILE [--once]

FAULTS_JSON is an object; each key arms one fault (counts are per process):
    {"oom": N}            the first N denoising calls raise torch.OutOfMemoryError
    {"gpu_fatal": true}   every denoising call raises a sticky CUDA error
    {"crash_on": TEXT}    the process dies of SIGSEGV while making a scene whose prompt contains TEXT
    {"enospc_clip": N}    the first N clip renders fail with ENOSPC (disk full)
    {"eio_publish": N}    the first N publishes fail with EIO (share gone)
    {"slow_step": S}      every denoising step takes S seconds longer
    {"slow_clip": S}      every clip render takes S seconds longer (and says so on stderr)
    {"gate": PATH}        while PATH exists, denoising holds after each step, calling the step
                          callback every 50 ms as a slow GPU's steps would (tests hold a scene)
The production code has no hooks for any of this: the faults are patched in here,
at the same seams a real failure would come through.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _countdown(n: int) -> Any:
    left = {"n": n}

    def fire() -> bool:
        if left["n"] > 0:
            left["n"] -= 1
            return True
        return False

    return fire


def arm(faults: dict[str, Any]) -> None:
    import diffusers
    import torch

    import daemon.worker
    import pipeline.render

    pipe_cls = diffusers.StableDiffusionXLPipeline
    real_call = pipe_cls.__call__
    oom = _countdown(int(faults.get("oom", 0)))
    current = {"prompt": ""}

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
                return inner(p, i, t, kw) if inner else kw

            kwargs["callback_on_step_end"] = slow_cb
        gate = faults.get("gate")
        if gate:
            held = kwargs.get("callback_on_step_end")

            def gate_cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                while os.path.exists(gate):
                    time.sleep(0.05)  # the scene held by the test: a GPU still busy with this step
                    if held:
                        held(p, i, t, kw)
                return held(p, i, t, kw) if held else kw

            kwargs["callback_on_step_end"] = gate_cb
        return real_call(self, *args, **kwargs)

    pipe_cls.__call__ = call  # type: ignore[method-assign]

    real_scene_request = pipeline.render.scene_request

    def scene_request(plan: Any, settings: Any) -> Any:
        current["prompt"] = plan.prompt
        return real_scene_request(plan, settings)

    pipeline.render.scene_request = scene_request  # type: ignore[assignment]

    enospc = _countdown(int(faults.get("enospc_clip", 0)))
    real_clip = pipeline.render.render_clip

    def render_clip(*args: Any, **kwargs: Any) -> Any:
        if enospc():
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(args[1]))
        if faults.get("slow_clip"):
            print(f"FAULT rendering {Path(args[1]).name}", file=sys.stderr, flush=True)
            time.sleep(float(faults["slow_clip"]))
        return real_clip(*args, **kwargs)

    pipeline.render.render_clip = render_clip  # type: ignore[assignment]

    eio = _countdown(int(faults.get("eio_publish", 0)))
    real_publish = daemon.worker.publish

    def publish(*args: Any, **kwargs: Any) -> Any:
        if eio():
            raise OSError(errno.EIO, "Input/output error (injected)", str(args[2]))
        return real_publish(*args, **kwargs)

    daemon.worker.publish = publish  # type: ignore[assignment]


if __name__ == "__main__":
    arm(json.loads(sys.argv[1]))
    from daemon.cli import main

    sys.exit(main(sys.argv[2:]))
