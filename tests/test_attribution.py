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
    _, layer = attribution.cross_attention_layers(unet)[0]
    seen = {}
    hooks = [
        layer.to_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        layer.to_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
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
    heads = layer.heads
    q = seen["q"][b:].view(b, g * g, heads, -1).transpose(1, 2)
    k = seen["k"][b:].view(b, 77, heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    # REFERENCE 2: averaged over the class's tokens, per head; upsampled bicubic to the latent grid (here the
    # layer is already at it, so the bicubic step is the identity), clamped at 0, summed over heads.
    expected = probs[..., tokens].mean(dim=3).sum(dim=1).view(b, g, g)
    assert maps[0].shape == (b, g, g) and tap.calls[0] == 1
    torch.testing.assert_close(maps[0], expected, rtol=1e-5, atol=1e-6)
    # A coarser layer (the mid block, 1x1 here) is upsampled bicubic per head and clamped at 0, head by head.
    assert maps[6].shape == (b, g, g)
    assert bool((maps[6] >= 0).all())
    # Aggregation averages the layers (each divided by its number of steps), then min-max normalises.
    total = attribution.aggregate(tap)
    torch.testing.assert_close(total, sum(maps.values()) / 16)
    norm = attribution.minmax(total)
    assert norm.amin(dim=(1, 2)).tolist() == [0.0, 0.0] and norm.amax(dim=(1, 2)).tolist() == [1.0, 1.0]


def test_bicubic_then_clamp_per_head_by_hand():
    # Two heads on a 2x2 layer, upsampled to 4x4. Bicubic overshoots below 0 next to a step, so clamping each
    # head before summing differs from clamping the sum.
    tap = attribution.AttentionTap()
    tap.latent_hw, tap.token_span, tap.cond_slice, tap.tokens = (4, 4), slice(0, 1), slice(None), [0]
    proc = attribution._CrossAttnProcessor(0, tap)

    class Attn:
        scale = 1.0

    # q k^T chosen so that the token's probability is 1 (logit 50) or ~0 (logit -50) per pixel and head.
    logits = torch.tensor([[50.0, -50.0, -50.0, -50.0], [-50.0, 50.0, 50.0, 50.0]])  # (heads, pixels)
    q = torch.zeros(1, 2, 4, 2)
    q[0, :, :, 0] = logits
    k = torch.zeros(1, 2, 2, 2)
    k[0, :, 0, 0] = 1.0  # token 0 scores the logit, token 1 scores 0
    proc._capture(Attn(), q, k, 4)
    p = torch.softmax(torch.stack([logits, torch.zeros_like(logits)], -1), -1)[..., 0].view(2, 1, 2, 2)
    up = torch.nn.functional.interpolate(p, size=(4, 4), mode="bicubic", align_corners=False)
    assert float(up.min()) < 0  # the overshoot that the clamp removes
    torch.testing.assert_close(tap.maps[0][0], up.clamp_min(0).sum(0)[0])
    assert not torch.allclose(tap.maps[0][0], up.sum(0)[0].clamp_min(0))


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
