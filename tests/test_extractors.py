"""Feature extractors (paper 4.1) on the tiny models: the reference's input sizes (REFERENCE 4), raw features,
determinism, batch independence, and keys checked against the libraries' own forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovdiff_cli import attribution
from ovdiff_cli.extractors import EXTRACTORS, build_extractor, parse_extractors
from ovdiff_cli.extractors.base import normalise_pixels, resize
from ovdiff_cli.extractors.clip import clip_keys
from ovdiff_cli.extractors.dino import IMAGENET_MEAN, IMAGENET_STD, vit_keys
from ovdiff_cli.filters import CLIP_MEAN, CLIP_STD

NAMES = ("sd", "dino", "clip")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    # Both at most tiny's dino_short (56) on each side: DINO sees them at their own size.
    return {
        "square": torch.rand(2, 3, 48, 48, generator=g),
        "wide": torch.rand(2, 3, 40, 56, generator=g),
    }


def _sd_layer_widths(tiny_models) -> list[int]:
    layers = attribution.cross_attention_layers(tiny_models.get("sd").unet)
    return [layers[i][1].to_q.out_features for i in tiny_models.spec.sd_feature_layers]


def _dim(name: str, tiny_models) -> int:
    if name == "sd":
        return sum(_sd_layer_widths(tiny_models))
    if name == "dino":
        return tiny_models.get("dino").embed_dim
    return tiny_models.get("clip").visual.conv1.out_channels


# --- parsing -----------------------------------------------------------------------------------------------------


def test_registered():
    assert set(NAMES) <= set(EXTRACTORS)
    assert all(EXTRACTORS[n].name == n and EXTRACTORS[n].role == n for n in NAMES)


def test_parse_extractors():
    assert parse_extractors("sd,dino,clip") == ("sd", "dino", "clip")
    assert parse_extractors(" clip , sd ") == ("clip", "sd")
    assert parse_extractors(["dino"]) == ("dino",)
    assert parse_extractors(("sd", "clip")) == ("sd", "clip")


@pytest.mark.parametrize(
    ("value", "named"),
    [("sd,vit", "'vit'"), ("", "''"), (" , ", "' , '"), ("dino,dino", "'dino,dino'"), (["sd", "sam"], "'sam'")],
)
def test_parse_extractors_errors(value, named):
    with pytest.raises(ValueError) as info:
        parse_extractors(value)
    assert named in str(info.value)


def test_build_extractor(tiny_models):
    ext = build_extractor("dino", tiny_models)
    assert type(ext) is EXTRACTORS["dino"] and ext.models is tiny_models
    with pytest.raises(ValueError, match="'nope'"):
        build_extractor("nope", tiny_models)


# --- input sizes (REFERENCE 4) ------------------------------------------------------------------------------------


def test_input_sizes_at_full_size():
    from ovdiff_cli.models import resolve_models

    class Full:
        spec = resolve_models("sd15")

    sd, dino, clip = (build_extractor(n, Full) for n in ("sd", "dino", "clip"))
    # SD: every input at 512x512 (so SD features are always 64x64).
    assert sd.input_size(448, 597, False) == sd.input_size(336, 336, True) == (512, 512)
    # DINO: native when both sides <= 448; else short side 448 with the long side at most 800; whole patches.
    assert dino.input_size(448, 448, False) == (448, 448)
    assert dino.input_size(336, 336, False) == (336, 336)
    assert dino.input_size(512, 512, True) == (448, 448)
    assert dino.input_size(448, 597, False) == (448, 600)  # 597 rounded to 75 patches of 8
    assert dino.input_size(1000, 3000, False) == (264, 800)  # 800 / 3000 x 1000 = 266.7 -> 33 patches
    # CLIP: windows at 448x448, support images at their own size.
    assert clip.input_size(336, 336, False) == clip.input_size(448, 597, False) == (448, 448)
    assert clip.input_size(512, 512, True) == (512, 512)


def test_resize_only_when_needed():
    x = torch.rand(1, 3, 8, 8)
    assert resize(x, (8, 8)) is x
    up = resize(torch.tensor([[0.0, 1.0]]).expand(1, 3, 1, 2).contiguous(), (1, 4))
    # Half-pixel centres: output cells sample input x = -0.25, 0.25, 0.75, 1.25 (clamped to the edges).
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


# --- the three extractors on the tiny models ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shapes_raw_determinism_batch_independence(tiny_models, images, name):
    ext = build_extractor(name, tiny_models)
    dim = _dim(name, tiny_models)
    # tiny: SD at 64x64 (8x8 latents), DINO at native size, CLIP windows at 56x56; 8-pixel cells everywhere.
    grids = {"sd": [(8, 8), (8, 8)], "dino": [(6, 6), (5, 7)], "clip": [(7, 7), (7, 7)]}[name]
    square, wide = ext(images["square"]), ext(images["wide"])
    for f, grid in zip((square, wide), grids, strict=True):
        assert f.shape == (2, *grid, dim) and f.dtype == torch.float32
        assert torch.isfinite(f).all()
    # Raw features: not normalised (normalisation happens at matching time).
    assert (square.norm(dim=-1) - 1).abs().max() > 1e-2
    # Deterministic, and an image's features do not depend on the rest of its batch.
    torch.testing.assert_close(ext(images["square"]), square, atol=0, rtol=0)
    torch.testing.assert_close(ext(images["square"][:1]), square[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ext(images["wide"][1:]), wide[1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ext(images["square"].flip(0)), square.flip(0), atol=1e-4, rtol=1e-4)
    # Different images, different features.
    assert (square[0] - square[1]).abs().max() > 1e-3


def test_sd_features_make_their_fixed_inputs_once(tiny_models, images, monkeypatch):
    """The empty prompt's embedding, the noise and the scheduler are the same for every call: made once per device,
    dtype and latent shape (a text-encoder pass per call before), with features equal to a fresh extractor's,
    whatever the batch size. The noise is t = 200's DDPM noising of the latents with the fixed seed's draw."""
    from diffusers import DDPMScheduler

    from ovdiff_cli.defaults import SD_FEATURE_NOISE_SEED, SD_FEATURE_TIMESTEP

    gen = tiny_models.get("sd", decoder=False)
    ext = build_extractor("sd", tiny_models)
    calls = []
    encode = type(gen).encode_text
    monkeypatch.setattr(type(gen), "encode_text", lambda self, texts: calls.append(texts) or encode(self, texts))
    first = ext(images["square"])
    again, one = ext(images["square"]), ext(images["wide"][:1])
    assert calls == [[""]]
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(one, build_extractor("sd", tiny_models)(images["wide"][:1]), atol=0, rtol=0)
    scheduler, noise, context = next(iter(ext._fixed.values()))
    expected = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(SD_FEATURE_NOISE_SEED))
    assert torch.equal(noise[0], expected) and torch.equal(context, encode(gen, [""]))
    assert isinstance(scheduler, DDPMScheduler)
    latents = torch.zeros(1, 4, 8, 8)
    t = torch.full((1,), SD_FEATURE_TIMESTEP)
    sigma = (1 - scheduler.alphas_cumprod[SD_FEATURE_TIMESTEP]) ** 0.5
    torch.testing.assert_close(scheduler.add_noise(latents, noise, t), sigma * expected[None])


def test_clip_sees_support_images_at_their_own_size(tiny_models):
    ext = build_extractor("clip", tiny_models)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert ext(x, support=True).shape[1:3] == (8, 8)
    assert ext(x).shape[1:3] == (7, 7)  # a window: resized to clip_input = 56


def test_sd_features_are_the_raw_queries_concatenated(tiny_models, images):
    widths = _sd_layer_widths(tiny_models)
    # Tiny UNet: down 32, 32, 64 / mid 64 / up 64, 32, 32 channels; layers 0, 6, 7-9, 10-12, 15.
    assert widths == [32, 64, 64, 64, 64, 32, 32, 32, 32]
    # The queries, read independently through hooks on the layers' to_q, resized to the latent grid and
    # concatenated raw (REFERENCE 4: no per-layer normalisation).
    layers = attribution.cross_attention_layers(tiny_models.get("sd").unet)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layers[i][1].to_q.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        for i in tiny_models.spec.sd_feature_layers
    ]
    try:
        feats = build_extractor("sd", tiny_models)(images["wide"])
    finally:
        for h in hooks:
            h.remove()
    assert feats.shape == (2, 8, 8, sum(widths)) and sum(widths) == 416
    parts = []
    for i in tiny_models.spec.sd_feature_layers:
        q = seen[i]
        side = round(q.shape[1] ** 0.5)
        q = q.view(2, side, side, -1).permute(0, 3, 1, 2)
        parts.append(F.interpolate(q, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(feats, torch.cat(parts, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_clip_keys_match_open_clip_forward(tiny_models, images):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert (tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)) == (CLIP_MEAN, CLIP_STD)
    model = tiny_models.get("clip")
    visual = model.visual
    x = normalise_pixels(resize(images["square"], (64, 64)), CLIP_MEAN, CLIP_STD)
    seen = {}
    block = visual.transformer.resblocks[-2]
    hook = block.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_1", o))
    try:
        with torch.no_grad():
            model.encode_image(x)
    finally:
        hook.remove()
    d = visual.conv1.out_channels
    tokens = seen["ln_1"]
    assert tokens.shape == (2, 1 + 8 * 8, d)  # batch first: class token + 8x8 patches
    w, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    expected = F.linear(tokens, w[d : 2 * d], bias[d : 2 * d])[:, 1:].reshape(2, 8, 8, d)
    with torch.no_grad():
        keys = clip_keys(visual, x)
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)
    # The extractor: ImageNet mean/std (not CLIP's, as the reference), a window at clip_input, raw keys.
    window = resize(images["square"], (56, 56))
    with torch.no_grad():
        expected = clip_keys(visual, normalise_pixels(window, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(build_extractor("clip", tiny_models)(images["square"]), expected, atol=1e-5, rtol=1e-5)


def test_dino_keys_match_timm_forward(tiny_models, images):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (IMAGENET_MEAN, IMAGENET_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    vit = tiny_models.get("dino")
    seen = {}
    attn = vit.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__(o.shape[1], o))
    xs = {name: normalise_pixels(images[name], IMAGENET_MEAN, IMAGENET_STD) for name in ("square", "wide")}
    try:
        with torch.no_grad():
            for x in xs.values():
                vit.forward_features(x)
    finally:
        hook.remove()
    d, prefix = vit.embed_dim, vit.num_prefix_tokens
    for name, gh, gw in [("square", 6, 6), ("wide", 5, 7)]:
        qkv = seen[prefix + gh * gw]
        assert qkv.shape == (2, prefix + gh * gw, 3 * d)
        # timm's qkv layout: (3, heads, head_dim) on the last axis; keys are the middle third.
        expected = qkv[..., d : 2 * d][:, prefix:].reshape(2, gh, gw, d)
        with torch.no_grad():
            keys = vit_keys(vit, xs[name])
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)
        feats = build_extractor("dino", tiny_models)(images[name])
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_params_enter_cache_keys(tiny_models):
    assert build_extractor("sd", tiny_models).params() == {
        "layers": [0, 6, 7, 8, 9, 10, 11, 12, 15],
        "timestep": 200,
        "noise_seed": 0,
        "prompt": "",
        "input": 64,
    }
    assert build_extractor("dino", tiny_models).params() == {
        "layer": "last",
        "what": "keys",
        "short": 56,
        "max_long": 96,
    }
    assert build_extractor("clip", tiny_models).params() == {
        "layer": -2,
        "what": "keys",
        "input": 56,
        "mean_std": "imagenet",
    }


def test_features_only_generator_has_no_decoder_until_generation_needs_it():
    from ovdiff_cli.models import resolve_models
    from ovdiff_cli.models.loading import Models

    models = Models(resolve_models("tiny"), torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64)
    lean = build_extractor("sd", models)(x)
    assert models._loaded["sd"].vae.decoder is None  # a segment-only run never loads the decoder
    full = models.get("sd")  # generation asks for it: the generator is reloaded whole
    assert full.vae.decoder is not None and models.get("sd", decoder=False) is full
    torch.testing.assert_close(build_extractor("sd", models)(x), lean)  # same weights, same features
