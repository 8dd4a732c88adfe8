"""Prompts into SDXL conditioning, for prompts of any length, and how many tokens each text was.

SDXL's text encoders see 77 tokens at a time. With `image.long_prompts` (the default) the
whole text is encoded in chunks through compel; without it, diffusers' own encoding cuts the
text at 77 tokens, and the record says how many were dropped: never silently.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.images.model import SdxlPipeline
from pipeline.images.seam import ImageRequest


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_pooled: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class LongPromptEncoder:
    """SDXL conditioning for prompts of any length, via compel, with user text taken literally.

    Compel's prompt syntax ("(word)1.2", "word+", "[neg]", ".and()", quotes, escapes) would
    re-weight or swallow parts of ordinary prose, so the parser is bypassed: each text becomes
    one unweighted fragment handed straight to compel's chunking encoder. Both encoders see the
    whole text in 77-token chunks; the pooled embedding (encoder 2) comes from the first chunk,
    as in SDXL training.
    """

    def __init__(self, pipe: SdxlPipeline) -> None:
        from compel import Compel, ReturnedEmbeddingsType

        # compel 2.5 print()s a deprecation notice for the two-encoder form; keep stdout clean
        # (this runs once, at load, before the daemon's other threads do anything).
        with contextlib.redirect_stdout(io.StringIO()):
            self.compel = Compel(
                tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                requires_pooled=[False, True],
                truncate_long_prompts=False,
            )
        self._empty: torch.Tensor | None = None

    def encode(self, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

        fragment = Fragment(text)
        fragment.text = text  # Fragment() un-escapes "\(" etc.; keep the user's characters as they are
        conditioning, _ = self.compel.build_conditioning_tensor_for_conjunction(
            Conjunction([FlattenedPrompt([fragment])])
        )
        provider = self.compel.conditioning_provider
        pooled = provider.get_pooled_embeddings([text], device=self.compel.device)
        return conditioning.to(device), pooled.to(device)

    def empty_chunk(self, device: torch.device) -> torch.Tensor:
        """The empty prompt's 77-token embedding: the padding compel itself would use, encoded once."""
        if self._empty is None:
            self._empty = self.encode("", device)[0]
        return self._empty.to(device)

    def pad_to(self, embeds: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
        """Lengthen to `length` tokens with empty-prompt chunks (compel's padder fails with two encoders)."""
        chunk = self.empty_chunk(device).to(embeds.dtype)
        parts = [embeds]
        size = embeds.shape[1]
        while size < length:
            parts.append(chunk)
            size += chunk.shape[1]
        return torch.cat(parts, dim=1)


class PromptEncoder:
    """A request's prompt and negative prompt -> `Conditioning`, with its token counts in `info`."""

    def __init__(self, pipe: SdxlPipeline, device: torch.device, long_prompts: bool) -> None:
        self.pipe = pipe
        self.device = device  # where inputs go, even while offload hooks keep the weights in host RAM
        self.long: LongPromptEncoder | None = LongPromptEncoder(pipe) if long_prompts else None

    def encode(self, req: ImageRequest) -> Conditioning:
        counts = self.token_counts(req)
        if self.long is not None:
            cond = self._encode_long(req, self.long)
        else:
            pe, npe, pooled, npooled = self.pipe.encode_prompt(
                prompt=req.prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=req.negative or None,  # empty -> zeros (SDXL's force_zeros_for_empty_prompt)
            )
            assert npe is not None and pooled is not None and npooled is not None
            cond = Conditioning(pe, npe, pooled, npooled)
        cond.info.update(counts, conditioning_tokens=int(cond.prompt_embeds.shape[1]))
        return cond

    def _encode_long(self, req: ImageRequest, long: LongPromptEncoder) -> Conditioning:
        device = self.device
        pe, pooled = long.encode(req.prompt, device)
        if not req.negative and self.pipe.config.force_zeros_for_empty_prompt:
            # As diffusers does for an empty negative: SDXL was trained with zeros as "unconditional".
            npe, npooled = torch.zeros_like(pe), torch.zeros_like(pooled)
        else:
            npe, npooled = long.encode(req.negative, device)
        length = max(pe.shape[1], npe.shape[1])
        pe, npe = long.pad_to(pe, length, device), long.pad_to(npe, length, device)
        return Conditioning(pe, npe, pooled, npooled)

    def token_counts(self, req: ImageRequest) -> dict[str, Any]:
        """How many tokens each text is, and how many the 77-token window would drop: never silent."""
        tok = self.pipe.tokenizer
        limit = int(tok.model_max_length) - 2  # the window holds start and end markers too
        long = self.long is not None

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

        n_prompt, n_negative = count(req.prompt), count(req.negative)
        return {
            "long_prompt_encoding": long,
            "token_limit": limit,
            "prompt_tokens": n_prompt,
            "negative_tokens": n_negative,
            "prompt_tokens_dropped": 0 if long else max(0, n_prompt - limit),
            "negative_tokens_dropped": 0 if long else max(0, n_negative - limit),
        }
