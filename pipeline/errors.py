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
