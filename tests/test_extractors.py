"""Feature extractors (paper 4.1) on the tiny models: shapes, unit norm, determinism, batch independence, and
keys checked against the libraries' own forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovdiff_cli import attribution
from ovdiff_cli.extractors import EXTRACTORS, build_extractor, parse_extractors, to_grid
from ovdiff_cli.extractors.base import normalise_pixels
from ovdiff_cli.extractors.clip import CLIP_MEAN, CLIP_STD, clip_keys
from ovdiff_cli.extractors.dino import IMAGENET_MEAN, IMAGENET_STD, vit_keys

NAMES = ("sd", "dino", "clip")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return {
        "square": torch.rand(2, 3, 64, 64, generator=g),
        "wide": torch.rand(2, 3, 64, 96, generator=g),
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


# --- to_grid -----------------------------------------------------------------------------------------------------


def test_to_grid_identity_when_sizes_match():
    f = torch.randn(2, 3, 5, 4)
    assert to_grid(f, (3, 5)) is f


def test_to_grid_average_then_renormalise():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    f = torch.stack([a, b]).view(1, 1, 2, 2)  # a 1x2 grid of 2-d features
    out = to_grid(f, (1, 1))
    assert out.shape == (1, 1, 1, 2) and out.dtype == torch.float32
    # Bilinear from 2 cells to 1 averages them: (1.5, 2), whose norm is 2.5.
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.6, 0.8]))


def test_to_grid_upsample_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = to_grid(torch.stack([a, b]).view(1, 1, 2, 2), (1, 4))
    # Half-pixel centres: output cells sample input x = -0.25, 0.25, 0.75, 1.25 (clamped to the edges).
    expected = torch.stack([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 1, 4))


# --- the three extractors on the tiny models ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shapes_norm_determinism_batch_independence(tiny_models, images, name):
    ext = build_extractor(name, tiny_models)
    dim = _dim(name, tiny_models)
    square = ext(images["square"])
    assert ext.stride == 8  # every tiny network has an 8-pixel cell
    assert square.shape == (2, 8, 8, dim) and square.dtype == torch.float32
    wide = ext(images["wide"])
    assert wide.shape == (2, 8, 12, dim) and wide.dtype == torch.float32
    for f in (square, wide):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(f.shape[:3]), atol=1e-5, rtol=0)
    # Deterministic, and an image's features do not depend on the rest of its batch.
    torch.testing.assert_close(ext(images["square"]), square, atol=0, rtol=0)
    torch.testing.assert_close(ext(images["square"][:1]), square[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(ext(images["wide"][1:]), wide[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ext(images["square"].flip(0)), square.flip(0), atol=1e-5, rtol=0)
    # Different images, different features.
    assert (square[0] - square[1]).abs().max() > 1e-3


def test_sd_feature_dim_is_the_selected_query_widths(tiny_models, images):
    widths = _sd_layer_widths(tiny_models)
    # Tiny UNet: down 32, 32, 64 / mid 64 / up 64, 32, 32 channels; layers 0, 6, 7-9, 10-12, 15.
    assert widths == [32, 64, 64, 64, 64, 32, 32, 32, 32]
    feats = build_extractor("sd", tiny_models)(images["wide"])
    assert feats.shape[-1] == sum(widths) == 416
    # Each layer is unit-normalised before the concatenation of 9 layers is: every slice has norm 1/3.
    slices = torch.split(feats, widths, dim=-1)
    for s in slices:
        torch.testing.assert_close(s.norm(dim=-1), torch.full(feats.shape[:3], 1 / 3), atol=1e-5, rtol=0)


def test_clip_keys_match_open_clip_forward(tiny_models, images):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert (tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)) == (CLIP_MEAN, CLIP_STD)
    model = tiny_models.get("clip")
    visual = model.visual
    x = normalise_pixels(images["square"], CLIP_MEAN, CLIP_STD)
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
    feats = build_extractor("clip", tiny_models)(images["square"])
    torch.testing.assert_close(feats, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


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
    for name, gh, gw in [("square", 8, 8), ("wide", 8, 12)]:
        qkv = seen[prefix + gh * gw]
        assert qkv.shape == (2, prefix + gh * gw, 3 * d)
        # timm's qkv layout: (3, heads, head_dim) on the last axis; keys are the middle third.
        expected = qkv[..., d : 2 * d][:, prefix:].reshape(2, gh, gw, d)
        with torch.no_grad():
            keys = vit_keys(vit, xs[name])
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)
        feats = build_extractor("dino", tiny_models)(images[name])
        torch.testing.assert_close(feats, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_params_enter_cache_keys(tiny_models):
    assert build_extractor("sd", tiny_models).params() == {
        "layers": [0, 6, 7, 8, 9, 10, 11, 12, 15],
        "timestep": 200,
        "noise_seed": 0,
        "prompt": "",
    }
    assert build_extractor("dino", tiny_models).params() == {"layer": "last", "what": "keys"}
    assert build_extractor("clip", tiny_models).params() == {"layer": -2, "what": "keys"}


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
