"""The errors the daemon tells apart; kept free of torch so anything may import them cheaply."""

from __future__ import annotations


class StoryreelError(Exception):
    """Base of every error storyreel raises on purpose (as opposed to a bug)."""


class ModelNotFound(StoryreelError):
    """The weights are not on this machine; the message says where we looked and how to get them."""


class SceneOutOfMemory(StoryreelError):
    """One scene did not fit in memory even with every memory saver on: that story fails, the daemon lives."""


class GpuFatalError(StoryreelError):
    """The GPU context is poisoned (sticky CUDA error): only a fresh process can use the device again."""


class EngineUnavailable(StoryreelError):
    """The image workers cannot be reached (a Ray cluster or its head gone, or not starting):
    not the story's fault; the daemon waits and tries again, and nothing is lost."""


class SceneKillsWorkers(StoryreelError):
    """One scene took down its worker process `daemon.max_attempts` times: the poison-story rule
    applied to a pool of workers. The story fails with this reason; the workers live on."""


def first_line(err: BaseException) -> str:
    """An error in one line (its first), for logs and status: CUDA and Ray errors run to pages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
