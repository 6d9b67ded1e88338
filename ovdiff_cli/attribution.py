"""Attribution maps (paper 3.3): cross-attention probabilities of a class's tokens, DAAM-style.

One attention processor replaces diffusers' default on the UNet's *cross*-attention layers only; self-attention
keeps the library's fused SDPA processor. The processor computes its output with fused SDPA too, and only when a
capture is active does it additionally form the softmax for the conditional half of the guidance batch and keep
the class-token columns. As the authors' code does (REFERENCE 2), every layer's map of every step is upsampled
*bicubic* to the latent grid per head and per class token, clamped at 0 (bicubic overshoots below zero), summed
over heads, averaged over the class's tokens, and accumulated; :func:`aggregate` averages over layers and steps.
The same processor can record the layer's queries, which is how the SD feature extractor reads the UNet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's cross-attention modules (``attn2``) in down-mid-up order (SD 1.5 has 16)."""
    found = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]

    def order(item: tuple[str, torch.nn.Module]) -> tuple:
        parts = item[0].split(".")
        return (_BLOCK_ORDER[parts[0]], *[int(p) for p in parts if p.isdigit()])

    return sorted(found, key=order)


class AttentionTap:
    """Shared state of every :class:`_CrossAttnProcessor` of one UNet: what to record and what was recorded.

    Attributes:
        tokens: class-token positions (into the 77-token context) to capture, or None when not capturing.
        cond_slice: which rows of the UNet batch are the conditional half of classifier-free guidance.
        maps: per layer index, (B_cond, G_h, G_w) float32 sums over steps of the maps summed over heads and
            averaged over the class's tokens, each (head, token) map upsampled bicubic to the latent grid and
            clamped at 0 on its own.
        calls: per layer index, how many steps were added into ``maps``.
        queries: per layer index in ``query_layers``, the (B, h_l*w_l, C) queries of the last forward.
    """

    def __init__(self) -> None:
        self.tokens: list[int] | None = None
        self.token_span = slice(0, 0)
        self.cond_slice = slice(None)
        self.latent_hw: tuple[int, int] = (0, 0)
        self.maps: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}
        self.query_layers: frozenset[int] = frozenset()
        self.queries: dict[int, torch.Tensor] = {}

    def layer_hw(self, n_pixels: int) -> tuple[int, int]:
        """Spatial shape of a layer with ``n_pixels`` query positions, from the latent's shape."""
        h, w = self.latent_hw
        for down in range(8):
            hh, ww = -(-h // 2**down), -(-w // 2**down)  # ceil: diffusers' stride-2 convs round up
            if hh * ww == n_pixels:
                return hh, ww
        raise ValueError(f"cannot place {n_pixels} attention positions on a {h}x{w} latent")

    def reset(self) -> None:
        self.maps.clear()
        self.calls.clear()
        self.queries.clear()


class _CrossAttnProcessor:
    """SDPA cross-attention (as diffusers' AttnProcessor2_0 for SD's attn2) with optional capture."""

    def __init__(self, index: int, tap: AttentionTap) -> None:
        self.index = index
        self.tap = tap

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        tap = self.tap
        b, n, _c = hidden_states.shape
        query = attn.to_q(hidden_states)
        if self.index in tap.query_layers:
            tap.queries[self.index] = query
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        if tap.tokens:
            self._capture(attn, q, k, n)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def _capture(self, attn, q: torch.Tensor, k: torch.Tensor, n: int) -> None:
        tap = self.tap
        qc, kc = q[tap.cond_slice].float(), k[tap.cond_slice].float()
        # Softmax over all 77 context tokens (the denominator needs them), then keep the class's columns: a
        # contiguous run of token positions, so a view rather than a gather.
        probs = torch.softmax(qc @ kc.transpose(-1, -2) * attn.scale, dim=-1)
        cols = probs[..., tap.token_span].transpose(-1, -2)  # (B, heads, T, n)
        b, heads, n_tokens = cols.shape[:3]
        # Each (head, token) map is upsampled and clamped on its own before the tokens are averaged, as the authors'
        # code does: bicubic overshoot makes this differ from averaging the tokens first.
        cols = cols.reshape(b * heads * n_tokens, 1, *tap.layer_hw(n))
        up = F.interpolate(cols, size=tap.latent_hw, mode="bicubic", align_corners=False).clamp_min_(0)
        m = up.view(b, heads * n_tokens, *tap.latent_hw).sum(1).div_(n_tokens)
        if self.index in tap.maps:
            tap.maps[self.index].add_(m)
            tap.calls[self.index] += 1
        else:
            tap.maps[self.index] = m
            tap.calls[self.index] = 1


def install(unet: torch.nn.Module) -> AttentionTap:
    """Put capture processors on the cross-attention layers of ``unet`` (idempotent); return their tap."""
    existing = getattr(unet, "_ovdiff_tap", None)
    if existing is not None:
        return existing
    tap = AttentionTap()
    for index, (_name, module) in enumerate(cross_attention_layers(unet)):
        module.set_processor(_CrossAttnProcessor(index, tap))
    unet._ovdiff_tap = tap
    return tap


@contextmanager
def capturing(tap: AttentionTap, tokens: list[int], cond_slice: slice, latent_hw: tuple[int, int]) -> Iterator[None]:
    """Capture class-token attention for the duration of the block (maps accumulate across UNet calls)."""
    tap.reset()
    first = tokens[0] if tokens else 0
    if list(tokens) != list(range(first, first + len(tokens))):
        raise ValueError(f"class token positions {', '.join(map(str, tokens))} are not contiguous")
    tap.tokens, tap.cond_slice, tap.latent_hw = list(tokens), cond_slice, latent_hw
    tap.token_span = slice(first, first + len(tokens))
    try:
        yield
    finally:
        tap.tokens = None


@contextmanager
def recording_queries(tap: AttentionTap, layers: tuple[int, ...], latent_hw: tuple[int, int]) -> Iterator[None]:
    """Record the queries of ``layers`` during the block (the SD feature extractor)."""
    tap.reset()
    tap.query_layers, tap.latent_hw = frozenset(layers), latent_hw
    try:
        yield
    finally:
        tap.query_layers = frozenset()


def aggregate(tap: AttentionTap) -> torch.Tensor:
    """The mean over layers and steps of the captured maps: (B, G_h, G_w) float32, not normalised."""
    if not tap.maps:
        raise RuntimeError("no cross-attention was captured")
    return sum(m / tap.calls[i] for i, m in tap.maps.items()) / len(tap.maps)


def at_image_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, G, G) min-max normalised maps -> (N, size, size): bilinear upsampling, then min-max again.

    The authors' code selects masks and applies its thresholds on these image-resolution maps (REFERENCE 2).
    """
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return minmax(up)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of (B, H, W) maps to [0, 1] (a constant map becomes zeros)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return ((maps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def class_token_positions(tokenizer, prompt: str, class_name: str) -> list[int]:
    """Positions (in the 77-token context, start token = 0) of the class's tokens inside ``prompt``.

    Found by tokenising, so multi-word and multi-token classes ("potted plant", "donut with chocolate glaze")
    get all their tokens. The *first* occurrence of the class's token sequence is used, as in the authors' code
    (REFERENCE 2): a class that is also a word of the template ("a", "good", "picture" in "A good picture of a
    {}") therefore gets the template's word, not the class slot at the end. Positions cut off by the 77-token
    limit are dropped; an empty result means the class was entirely truncated away.
    """
    ids = tokenizer.encode(prompt)
    sub = tokenizer.encode(class_name)
    if not sub:
        raise ValueError(f"class {class_name!r} has no tokens")
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return [1 + start + j for j in range(len(sub)) if 1 + start + j < 76]
    raise ValueError(f"class {class_name!r} does not appear in prompt {prompt!r} after tokenisation")
