"""Attribution capture (paper 3.3) checked against a manual softmax, and token lookup by tokenising."""

from __future__ import annotations

import numpy as np
import torch

from ovdiff_cli import attribution, synthesis
from ovdiff_cli.synthesis import prompt_for


def test_class_tokens_found_by_tokenising(tiny_models):
    tok = tiny_models.get("sd").tokenizer
    prompt = prompt_for("potted plant")
    pos = attribution.class_token_positions(tok, prompt, "potted plant")
    ids = tok([prompt])[0]
    # "A good picture of a" is 5 tokens after the start token; the class follows.
    assert pos == [6, 7]
    assert ids[pos].tolist() == tok.encode("potted plant")
    # A class that BPE splits into several tokens gets all of them.
    long = "donut with chocolate glaze"
    pos = attribution.class_token_positions(tok, prompt_for(long), long)
    assert len(pos) == len(tok.encode(long)) == 4


def test_class_tokens_are_found_at_their_first_occurrence(tiny_models):
    # REFERENCE 2: the authors' code takes the first match in the prompt, so a class that is also a word of the
    # template "A good picture of a {}" (positions 1-5 after the start token) gets the template's word.
    tok = tiny_models.get("sd").tokenizer
    assert tok.encode("A good picture of a") == tok.encode("a good picture of a")  # CLIP's BPE lowercases
    cases = {"a": [1], "good": [2], "picture": [3], "picture of a": [3, 4, 5], "of a": [4, 5], "cat": [6]}
    for name, expected in cases.items():
        assert attribution.class_token_positions(tok, prompt_for(name), name) == expected, name


def test_sixteen_cross_attention_layers_in_down_mid_up_order(tiny_models):
    layers = attribution.cross_attention_layers(tiny_models.get("sd").unet)
    names = [n for n, _ in layers]
    assert len(layers) == 16
    assert names[0].startswith("down_blocks.0") and names[6].startswith("mid_block")
    assert names[-1].startswith("up_blocks.3")


def test_captured_maps_equal_manual_softmax(tiny_models):
    gen = tiny_models.get("sd")
    unet = gen.unet
    tap = attribution.install(unet)
    layers = attribution.cross_attention_layers(unet)
    checked = (0, 2)  # a layer at the latent grid (8x8) and one at half of it (4x4)
    seen = {}
    hooks = [
        getattr(layers[i][1], proj).register_forward_hook(lambda m, inp, o, key=(i, proj): seen.__setitem__(key, o))
        for i in checked
        for proj in ("to_q", "to_k")
    ]
    b, g = 2, 8
    torch.manual_seed(0)
    latents = torch.randn(2 * b, 4, g, g)
    context = gen.encode_text(["", "", "a cat", "a dog"])
    tokens = [2, 3]
    try:
        with torch.no_grad(), attribution.capturing(tap, tokens, slice(b, 2 * b), (g, g)):
            unet(latents, 500, encoder_hidden_states=context)
            maps = dict(tap.maps)
    finally:
        for h in hooks:
            h.remove()
    assert set(maps) == set(range(16))
    for i in checked:
        heads = layers[i][1].heads
        q = seen[i, "to_q"][b:].view(b, -1, heads, seen[i, "to_q"].shape[-1] // heads).transpose(1, 2)
        k = seen[i, "to_k"][b:].view(b, 77, heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (b, heads, pixels, 77)
        side = int(q.shape[2] ** 0.5)
        # REFERENCE 2: each (head, token) map upsampled bicubic to the latent grid (the identity for layer 0) and
        # clamped at 0, summed over heads, averaged over the class's tokens.
        per = probs[..., tokens].permute(0, 1, 3, 2).reshape(-1, 1, side, side)
        up = torch.nn.functional.interpolate(per, size=(g, g), mode="bicubic", align_corners=False).clamp_min(0)
        expected = up.view(b, heads, len(tokens), g, g).sum(1).mean(1)
        assert maps[i].shape == (b, g, g) and tap.calls[i] == 1
        torch.testing.assert_close(maps[i], expected, rtol=1e-5, atol=1e-6)
    # The mid block (1x1 here) is upsampled too, and clamped at 0.
    assert maps[6].shape == (b, g, g)
    assert bool((maps[6] >= 0).all())
    # Aggregation averages the layers (each divided by its number of steps), then min-max normalises.
    total = attribution.aggregate(tap)
    torch.testing.assert_close(total, sum(maps.values()) / 16)
    norm = attribution.minmax(total)
    assert norm.amin(dim=(1, 2)).tolist() == [0.0, 0.0] and norm.amax(dim=(1, 2)).tolist() == [1.0, 1.0]


def _capture_planted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the processor's capture on planted attention logits of one image on a 2x2 layer, upsampled to 4x4.

    ``logits``: (heads, 4 pixels, T) logits of the T class tokens (context positions 0..T-1); one more context
    token scores 0 everywhere. Returns the captured (4, 4) map and the (heads, T, 2, 2) probabilities, the latter
    by a plain softmax here.
    """
    heads, n, n_tokens = logits.shape
    tap = attribution.AttentionTap()
    tap.latent_hw, tap.token_span, tap.cond_slice = (4, 4), slice(0, n_tokens), slice(None)
    tap.tokens = list(range(n_tokens))
    proc = attribution._CrossAttnProcessor(0, tap)

    class Attn:
        scale = 1.0

    # One-hot keys for the class tokens and a zero key for the last token, so q k^T is the planted logits.
    q = torch.zeros(1, heads, n, n_tokens + 1)
    q[0, :, :, :n_tokens] = logits
    k = torch.eye(n_tokens + 1)[None, None].repeat(1, heads, 1, 1)
    k[..., n_tokens, n_tokens] = 0.0
    proc._capture(Attn(), q, k, n)
    full = torch.cat([logits, torch.zeros(heads, n, 1)], -1)
    probs = torch.softmax(full, -1)[..., :n_tokens].permute(0, 2, 1).reshape(heads, n_tokens, 2, 2)
    return tap.maps[0][0], probs


def _bicubic(maps: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2) -> (..., 4, 4), bicubic, not clamped."""
    flat = maps.reshape(-1, 1, 2, 2)
    up = torch.nn.functional.interpolate(flat, size=(4, 4), mode="bicubic", align_corners=False)
    return up.view(*maps.shape[:-2], 4, 4)


def test_bicubic_then_clamp_per_head_by_hand():
    # Two heads, one token. Bicubic overshoots below 0 next to a step, so clamping each head before summing
    # differs from clamping the sum. Logit 50 makes the token's probability ~1, -50 makes it ~0.
    logits = torch.tensor([[50.0, -50.0, -50.0, -50.0], [-50.0, 50.0, 50.0, 50.0]])[..., None]  # (heads, pixels, 1)
    captured, p = _capture_planted(logits)
    up = _bicubic(p[:, 0])
    assert float(up.min()) < 0  # the overshoot that the clamp removes
    torch.testing.assert_close(captured, up.clamp_min(0).sum(0))
    assert not torch.allclose(captured, up.sum(0).clamp_min(0))


def test_multi_token_class_upsamples_and_clamps_each_token_before_averaging():
    # REFERENCE 2: each token's map is upsampled bicubic and clamped on its own, then the tokens are averaged.
    # Token 0 holds one pixel and token 1 the other three, in both heads (head 1 the other way round): their mean
    # is flat (~0.5, no overshoot) while each token alone is a step that bicubic overshoots below 0.
    step = torch.tensor([50.0, -50.0, -50.0, -50.0])
    logits = torch.stack([torch.stack([step, -step], -1), torch.stack([-step, step], -1)])  # (heads, pixels, 2)
    captured, p = _capture_planted(logits)
    up = _bicubic(p)  # (heads, tokens, 4, 4)
    assert float(up.min()) < -0.01
    torch.testing.assert_close(captured, up.clamp_min(0).sum(0).mean(0))
    averaged_first = _bicubic(p.mean(1)).clamp_min(0).sum(0)  # the old order: mean over tokens, then upsample
    assert float((captured - averaged_first).abs().max()) > 0.01


def test_maps_go_to_image_size_bilinear_and_renormalised():
    m = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    up = attribution.at_image_size(m, 4)
    ref = torch.nn.functional.interpolate(m[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, (ref - ref.min()) / (ref.max() - ref.min()))
    assert float(up.min()) == 0.0 and float(up.max()) == 1.0


def test_capture_off_leaves_output_unchanged(tiny_models):
    """The capture path only reads: the UNet's output is identical with and without it."""
    gen = tiny_models.get("sd")
    tap = attribution.install(gen.unet)
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 8)
    context = gen.encode_text(["", "a cat"])
    with torch.no_grad():
        plain = gen.unet(latents, 300, encoder_hidden_states=context).sample
        with attribution.capturing(tap, [2], slice(1, 2), (8, 8)):
            captured = gen.unet(latents, 300, encoder_hidden_states=context).sample
    assert torch.equal(plain, captured)


def test_capture_off_gives_the_same_images_and_no_maps(tiny_models):
    gen = tiny_models.get("sd")
    seeds = [synthesis.image_seed(0, "cat", i) for i in range(2)]
    on = synthesis.generate(gen, "cat", seeds, steps=2, image_size=64)
    off = synthesis.generate(gen, "cat", seeds, steps=2, image_size=64, capture=False)
    for a, b in zip(on, off, strict=True):
        assert np.array_equal(a.image, b.image)  # capturing observes; it never changes what is generated
        assert a.attribution.max() == 1.0 and not b.attribution.any()
