"""Starting Ray (2.60) in the driver child: the private instance or a cluster, and the actors.

Runs in the Ray driver (pipeline/images/ray_child.py), never in the daemon:
1. connect: a private instance (address "") or a cluster          `connect`
2. how many workers: count, or one per GPU Ray reports             `count_workers`
3. one actor each, its model loaded in __init__                    `ImageWorkerActor`, `actor_class`

An actor gets its generator factory and settings as the daemon pickled them, and hands back
pickled images and errors: the driver passes bytes along and never imports torch.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pickle
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import GpuFatalError, first_line
from pipeline.images.ray_signals import DRIVER_ENV, init_keeping_signals
from pipeline.images.ray_wire import dumps, dumps_error
from pipeline.settings import ConfigError, Settings

# Before `import ray`: Ray reads it once, at import. On Linux, Ray takes this machine's
# routable address as the node address even when told 127.0.0.1 (services.resolve_ip_for_localhost),
# and its gRPC servers then listen on every interface. With this switch off, the node address
# is the loopback one and every listener of a private instance binds 127.0.0.1 (checked with
# `ss -ltnp`; see bench/README.md). Set for private instances only: a cluster needs its real address.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray starts its worker processes at nice 15 (its config `worker_niceness`, read from the
# environment by the raylet it starts), and our actors are those workers: the image makers, the
# box's main work. At 15 they get the CPU only when the daemon's own clip encoding leaves it
# free: under load on 2 cores an actor took over 5 minutes to import torch. Nice 0, as the
# daemon. (The cluster units set the same for `ray start`: systemd/storyreel-ray-*.service.)
_NICENESS = "RAY_worker_niceness"
# A private instance: the environment it needs before `import ray`, and its ray.init arguments
# ("local": never one named by RAY_ADDRESS; this one dies with the daemon). tests/test_ray_network.py
# starts exactly this on the host and in a loopback-only network namespace (PrivateNetwork=yes).
PRIVATE_ENV = {_LOOPBACK_SWITCH: "0", _NICENESS: "0"}
PRIVATE_INIT: dict[str, Any] = {"address": "local", "include_dashboard": False}

# Ray session folders need short paths: their Unix sockets must fit in 107 bytes.
_MAX_TEMP_DIR_CHARS = 44
_OBJECT_STORE_BYTES = 512 << 20  # images are a few MB each; a few dozen are ever in flight


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            'workers.engine = "ray" needs Ray: pip install "storyreel[ray]" (or set engine = "local")'
        ) from None
    return ray


class ImageWorkerActor:
    """The body of one Ray actor: a warm generator. Made into an actor class by `actor_class`.

    A model that fails to load is kept as the error (not raised): `hello` hands it to the driver
    as bytes, which tells a missing model (stop start-up) from a lost worker (restart it)."""

    def __init__(self, settings: bytes, factory: bytes, torch_threads: int, worker: str) -> None:
        self.worker, self.generator, self.error = worker, None, b""
        try:
            import torch

            # Ray sets OMP_NUM_THREADS=1 in actors, and CPU results depend on the thread count:
            # the same count as the daemon's own process keeps PNGs byte-identical to engine=local.
            if torch_threads > 0:
                torch.set_num_threads(torch_threads)
            config: Settings = pickle.loads(settings)
            make_generator: Callable[[Settings], Any] = pickle.loads(factory)
            self.generator = make_generator(config)
            if config.model.warmup:
                self.generator.warm_up()
        except Exception as err:
            self.error = dumps_error(err)

    def hello(self) -> dict[str, Any]:
        """Who this worker is: asked once it is ready, and again after every restart."""
        import ray

        if self.generator is None:
            return {"error": self.error, "pid": os.getpid()}
        model = self.generator.describe()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        device = str(model.get("device"))
        return {
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "device": f"{device} [GPU {','.join(gpus)}]" if gpus else device,
            "model": model,
        }

    def generate(self, request: bytes) -> tuple[str, bytes, str]:
        """("image", pickled GeneratedImage, "") or ("error"|"gpu_fatal", pickled error, its line)."""
        assert self.generator is not None
        try:
            made = self.generator.generate(pickle.loads(request))
        except GpuFatalError as err:
            return "gpu_fatal", dumps_error(err), first_line(err)
        except Exception as err:
            return "error", dumps_error(err), f"{type(err).__name__}: {first_line(err)}"
        facts = self.hello()
        made.info["worker"] = {"id": self.worker} | {k: facts[k] for k in ("node", "ip", "device")}
        return "image", dumps(made), ""


def actor_class(ray: Any, settings: Settings) -> Any:
    """The actor class: one GPU share and one CPU each; restarted by Ray whenever it dies (a kill,
    an OOM, its node lost: on any node with room), never retrying a scene by itself. SPREAD puts
    the workers of a cluster on as many nodes as it can."""
    return ray.remote(ImageWorkerActor).options(
        num_gpus=settings.workers.gpus_per_worker,
        num_cpus=1,
        max_restarts=-1,
        max_task_retries=0,
        scheduling_strategy="SPREAD",
    )


def connect(settings: Settings) -> Any:
    """Step 1: `ray`, initialised. Raises what ray.init raised (the driver says why)."""
    w = settings.workers
    if not w.address:
        os.environ.update(PRIVATE_ENV)
    os.environ.update(DRIVER_ENV)  # no absl SIGTERM handler in the driver (ray_signals.py)
    ray = import_ray()
    options = private_options(settings) if not w.address else cluster_options(w.address)
    init_keeping_signals(ray, **options)
    return ray


def cluster_options(address: str) -> dict[str, Any]:
    """ray.init's arguments for joining the cluster at `address`.

    Joined by an IP address, the driver takes that address as its own node's: on the head's box
    its driver then belongs to the raylet registered under it, not to Ray's guess of this box's
    address (another one, where several addresses are the box's: 127.0.0.2 and up in the tests)."""
    options: dict[str, Any] = {"address": address, "log_to_driver": True, "configure_logging": False}
    host, _, port = address.rpartition(":")
    with contextlib.suppress(ValueError):
        if port.isdigit() and ipaddress.ip_address(host.strip("[]")).is_loopback:
            options["_node_ip_address"] = host.strip("[]")
    return options


def private_options(settings: Settings) -> dict[str, Any]:
    """A Ray instance of our own: loopback only, no dashboard, its files under the state folder."""
    w, state = settings.workers, settings.paths.state
    temp = state / "ray"
    options: dict[str, Any] = {
        **PRIVATE_INIT,
        "num_cpus": max(os.cpu_count() or 1, w.count),  # CPU workers each take one
        "object_store_memory": _OBJECT_STORE_BYTES,
        "log_to_driver": True,  # the actors' output goes to the daemon's log (journald)
        "configure_logging": False,
    }
    if len(str(temp)) <= _MAX_TEMP_DIR_CHARS:
        temp.mkdir(parents=True, exist_ok=True)
        _prune_sessions(temp)
        options["_temp_dir"] = str(temp)
    return options  # else under /tmp/ray: the state folder's path is too long for its sockets


def count_workers(ray: Any, settings: Settings) -> int:
    """Step 2: `workers.count`, or one per GPU Ray reports; ConfigError when that makes no sense."""
    w = settings.workers
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if w.count == 0:
        count = gpu_workers(gpus, w.gpus_per_worker)
        if count == 0:
            raise ConfigError(
                f"workers.count = 0 means one worker per GPU, and Ray reports {gpus:g} GPUs "
                f"for {w.gpus_per_worker:g} per worker; set workers.count"
            )
        return count
    if w.gpus_per_worker and w.count * w.gpus_per_worker > gpus and not w.address:
        raise ConfigError(
            f"workers.count = {w.count} with gpus_per_worker = {w.gpus_per_worker:g} needs "
            f"{w.count * w.gpus_per_worker:g} GPUs; Ray reports {gpus:g} on this machine"
        )
    return w.count


def gpu_workers(gpus: float, per_worker: float) -> int:
    """How many workers `count = 0` means for this many GPUs in the cluster."""
    return int(gpus // per_worker) if per_worker else 0


def _prune_sessions(temp: Path, keep: int = 3) -> None:
    """Ray leaves one session folder (logs, sockets) per start; the spool lock makes this daemon
    the only user of this state folder, so older sessions are dead ones: keep the last few."""
    sessions = sorted(p for p in temp.glob("session_2*") if p.is_dir())
    for old in sessions[:-keep] if len(sessions) > keep else []:
        shutil.rmtree(old, ignore_errors=True)


def creation_error(err: BaseException) -> BaseException:
    """The exception an actor's __init__ raised, from the error Ray reports for it."""
    for attr in ("cause", "creation_task_error", "error_msg"):
        value = getattr(err, attr, None)
        if isinstance(value, BaseException):
            return creation_error(value) if value is not err else value
    return err
