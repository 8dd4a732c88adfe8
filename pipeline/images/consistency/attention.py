"""Shared self-attention: a scene's self-attention also looks at its characters' reference tokens.

One `SharedAttention` is installed per UNet. It wraps the self-attention (`attn1`) of every
transformer block in the UNet's `up_blocks` and is in one of three modes at any moment:

- idle: the wrapped processor runs untouched, so a scene without references (and every plain
  pipeline call) computes exactly what the stock pipeline computes, bit for bit;
- capture: a reference pass. Each layer computes its attention as stock does and keeps its keys
  and values; after the last shared layer it stops the forward pass (nothing after it is needed);
- share: a scene pass. Each layer's queries attend to the scene's own keys and values followed
  by those the references left in this layer, row by row: guidance half to guidance half.

Reference rows never attend to a scene (they are computed in their own pass), so a reference is
the same whatever scene it is used in. All state lives on this object, owned by whoever installed
it; which step's keys are loaded is decided by the caller from the pipeline's scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

Mode = Literal["idle", "capture", "share"]
KeysValues = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [batch, tokens, inner_dim]
# attn1 of every transformer block in the up blocks: where StoryDiffusion and StyleAligned share.
SHARED_PREFIX = "up_blocks."
SHARED_SUFFIX = ".attn1"


class CaptureComplete(Exception):
    """Raised by the last shared layer in a reference pass: the rest of the UNet is not needed."""


@dataclass
class _State:
    """What the processors of one UNet read: the mode and the keys/values in play."""

    layers: tuple[str, ...]
    mode: Mode = "idle"
    stop_after_capture: bool = True
    captured: dict[str, KeysValues] = field(default_factory=dict)
    shared: dict[str, list[KeysValues]] = field(default_factory=dict)


def _project(attn: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value for self-attention, fused or not (as diffusers' processors do)."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        # diffusers 0.42 FusedAttnProcessor2_0, self-attention branch
        qkv = attn.to_qkv(hidden)
        split = qkv.shape[-1] // 3
        q, k, v = torch.split(qkv, split, dim=-1)
        return q, k, v
    return attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)


def attend(
    attn: Any,
    hidden_states: torch.Tensor,
    extra: list[KeysValues],
    keep: Callable[[KeysValues], None] | None = None,
) -> torch.Tensor:
    """Self-attention with `extra` keys/values appended to the scene's own, per batch row.

    Adapted from diffusers 0.42 `AttnProcessor2_0.__call__` (models/attention_processor.py), the
    self-attention path (no encoder states, no mask): the same operations in the same order, so
    with no extras it is bitwise the stock result. `keep` receives this layer's own keys/values.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        raise ValueError("shared attention does not support spatially normalised attention")
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query, key, value = _project(attn, hidden_states)
    if keep is not None:
        keep((key, value))
    if extra:
        for k, _ in extra:
            if k.shape[0] != batch_size or k.shape[2] != key.shape[2]:
                raise ValueError(
                    f"reference keys {tuple(k.shape)} do not fit this layer's {tuple(key.shape)}"
                )
        key = torch.cat([key, *(k for k, _ in extra)], dim=1)
        value = torch.cat([value, *(v for _, v in extra)], dim=1)

    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class SharedAttnProcessor:
    """The processor set on each shared layer; it keeps the one it replaced for idle mode."""

    def __init__(self, state: _State, name: str, inner: Any) -> None:
        self.state = state
        self.name = name
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        if state.mode == "idle":
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: shared attention is for plain self-attention only")
        if state.mode == "capture":
            out = attend(attn, hidden_states, [], keep=lambda kv: state.captured.__setitem__(self.name, kv))
            if state.stop_after_capture and len(state.captured) == len(state.layers):
                raise CaptureComplete
            return out
        return attend(attn, hidden_states, state.shared[self.name])


class SharedAttention:
    """The shared layers of one UNet, and the switch between idle, capture and share."""

    def __init__(self, unet: Any) -> None:
        """Wrap attn1 of every up-block transformer, keeping each layer's current processor.

        Install this last: diffusers' `load_ip_adapter`, `fuse_qkv_projections`, attention
        slicing and `set_attn_processor` all replace processors, and would drop these.
        """
        self.unet = unet
        modules = [
            (name, module)
            for name, module in unet.named_modules()
            if name.startswith(SHARED_PREFIX)
            and name.endswith(SHARED_SUFFIX)
            and hasattr(module, "set_processor")
        ]
        if not modules:
            raise ValueError("this UNet has no self-attention in its up blocks to share")
        self.state = _State(layers=tuple(name for name, _ in modules))
        self._modules = dict(modules)
        for name, module in modules:
            module.set_processor(SharedAttnProcessor(self.state, name, module.processor))

    @property
    def layers(self) -> tuple[str, ...]:
        return self.state.layers

    def installed(self) -> bool:
        """Whether every shared layer still carries our processor (a rebuild drops them)."""
        return all(
            isinstance(m.processor, SharedAttnProcessor) and m.processor.state is self.state
            for m in self._modules.values()
        )

    def uninstall(self) -> None:
        for module in self._modules.values():
            if isinstance(module.processor, SharedAttnProcessor):
                module.set_processor(module.processor.inner)

    @contextmanager
    def capturing(self, stop_early: bool = True) -> Iterator[dict[str, KeysValues]]:
        """A reference pass: yields the dict each layer's (key, value) lands in."""
        state = self.state
        before = state.mode
        state.mode, state.stop_after_capture, state.captured = "capture", stop_early, {}
        try:
            yield state.captured
        finally:
            state.mode = before  # a pass run between two steps of a scene leaves it sharing

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """A scene pass: each layer appends what `load` put there to its own keys/values."""
        if set(self.state.shared) != set(self.state.layers):
            raise RuntimeError("no reference keys loaded for this step")
        self.state.mode = "share"
        try:
            yield
        finally:
            self.state.mode = "idle"

    def load(self, per_reference: list[dict[str, KeysValues]]) -> None:
        """Set the keys/values every shared layer appends: one captured dict per reference, in order."""
        self.state.shared = {name: [ref[name] for ref in per_reference] for name in self.state.layers}

    def clear(self) -> None:
        self.state.mode, self.state.captured, self.state.shared = "idle", {}, {}
