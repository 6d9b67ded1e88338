"""Feature extractors (paper 4.1) on the tiny models: the reference's input sizes (REFERENCE 4), raw features,
determinism, batch independence, and keys checked against the libraries' own forward passes."""

from __future__ import annotations

import copy
import math

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


def _torchvision_resize_with_max_size(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """torchvision 0.13's ``Resize(size, max_size=max_size)`` output (h, w), restated from its
    ``_compute_resized_output_size``: short side ``size``, long side ``int(size * long / short)``; past
    ``max_size``, long side ``max_size`` and short side ``int(max_size * size / long)``."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def test_input_sizes_at_full_size():
    from ovdiff_cli.models import resolve_models

    class Full:
        spec = resolve_models("sd15")

    sd, dino, clip = (build_extractor(n, Full) for n in ("sd", "dino", "clip"))
    # SD: every input at 512x512 (so SD features are always 64x64).
    assert sd.input_size(448, 597, False) == sd.input_size(336, 336, True) == (512, 512)
    # DINO support images at their native 512x512: a 64x64 grid of 8-pixel patches (REFERENCE 4).
    assert dino.input_size(512, 512, True) == (512, 512)
    # DINO windows: native when both sides <= 448, whatever the patch remainder (the grid is stretched over it).
    assert dino.input_size(448, 448, False) == (448, 448)
    assert dino.input_size(336, 336, False) == (336, 336)
    assert dino.input_size(444, 437, False) == (444, 437)
    # Else torchvision's Resize(448, max_size=800): the pixels kept, never rounded to whole patches.
    assert dino.input_size(512, 512, False) == (448, 448)
    assert dino.input_size(448, 597, False) == (448, 597)  # 597 % 8 = 5: kept (75 patches, not 600 pixels)
    assert dino.input_size(300, 500, False) == (448, 746)  # 500 x 448 / 300 = 746.7, truncated
    assert dino.input_size(1000, 3000, False) == (266, 800)  # long 1344 > 800: 800 x 448 / 1344 = 266.7
    assert dino.input_size(3000, 1000, False) == (800, 266)
    assert dino.input_size(448, 900, False) == (398, 800)  # 800 x 448 / 900 = 398.2
    for h, w in [(448, 597), (300, 500), (1000, 3000), (3000, 1000), (448, 900), (449, 1201), (601, 449)]:
        assert dino.input_size(h, w, False) == _torchvision_resize_with_max_size(h, w, 448, 800), (h, w)
    # CLIP: windows at 448x448, support images at their own size.
    assert clip.input_size(336, 336, False) == clip.input_size(448, 597, False) == (448, 448)
    assert clip.input_size(512, 512, True) == (512, 512)


def _bilinear_matrix(out_len: int, in_len: int) -> torch.Tensor:
    """(out_len, in_len) float64 weights of torchvision 0.13's tensor resize along one axis, restated: bilinear,
    half-pixel centres (output i samples input (i + 0.5) * in / out - 0.5, clamped to the edges), no antialiasing
    (only the two nearest input samples, whatever the scale)."""
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    for i in range(out_len):
        x = max((i + 0.5) * in_len / out_len - 0.5, 0.0)
        j = min(int(x), in_len - 1)
        m[i, j] += 1 - (x - j)
        m[i, min(j + 1, in_len - 1)] += x - j
    return m


def test_resize_is_torchvisions_tensor_resize_without_antialias():
    x = torch.rand(1, 3, 8, 8)
    assert resize(x, (8, 8)) is x
    up = resize(torch.tensor([[0.0, 1.0]]).expand(1, 3, 1, 2).contiguous(), (1, 4))
    # Half-pixel centres: output cells sample input x = -0.25, 0.25, 0.75, 1.25 (clamped to the edges).
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # Shrinking by 3 samples every third pixel exactly (x = 3i + 1): no antialiasing filter spreads the others in.
    x = torch.rand(2, 3, 30, 33, generator=torch.Generator().manual_seed(4))
    assert torch.equal(resize(x, (10, 11)), x[..., 1::3, 1::3])
    # Any other shrink or stretch: the two nearest samples per axis. Torch computes sample positions and weights in
    # float32 (about 1e-6 off here) against this float64 statement; an antialiasing filter would be off by 1e-1.
    for size in [(7, 9), (13, 8), (45, 50)]:
        expected = _bilinear_matrix(size[0], 30) @ x.double() @ _bilinear_matrix(size[1], 33).T
        torch.testing.assert_close(resize(x, size), expected.float(), atol=5e-6, rtol=0)
    # MaskCut's input keeps its antialiased resize (REFERENCE does not pin it): a different, smoothed result.
    assert (resize(x, (10, 11), antialias=True) - x[..., 1::3, 1::3]).abs().max() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_windows_are_resized_into_each_network_without_antialias(tiny_models, name):
    """A window three times each network's input (SD 64, CLIP 56, DINO's short side 56 on tiny) goes in as every
    third pixel, bit for bit, as torchvision 0.13's non-antialiased bilinear resize gives (REFERENCE 4)."""
    ext = build_extractor(name, tiny_models)
    side = {"sd": 64, "clip": 56, "dino": 56}[name]
    window = torch.rand(2, 3, 3 * side, 3 * side, generator=torch.Generator().manual_seed(5))
    assert ext.input_size(3 * side, 3 * side, False) == (side, side)
    assert torch.equal(ext(window), ext(window[..., 1::3, 1::3].contiguous()))


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


def _dino_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``, restated: (1, 1 + g0*g0, D) -> (1, 1 + gh*gw, D), plain bicubic with
    the scale factors (g + 0.1) / g0 and ``recompute_scale_factor=False``."""
    n, d = pos.shape[1] - 1, pos.shape[-1]
    g0 = int(math.sqrt(n))
    if grid == (g0, g0):
        return pos
    patch = F.interpolate(
        pos[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2),
        scale_factor=((grid[0] + 0.1) / g0, (grid[1] + 0.1) / g0),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


def _timm_keys(vit, x: torch.Tensor, dino_positions: bool = True) -> torch.Tensor:
    """The last block's keys of timm's own forward pass over normalised x (B, 3, H, W), H and W multiples of the
    patch: the middle third of its qkv output (timm's layout: (3, heads, head_dim) on the last axis). With
    ``dino_positions`` the position embeddings are DINO's interpolation (REFERENCE 4's DINO), planted into a copy
    whose trained grid is x's, so timm's own (antialiased) resampling does nothing."""
    p = vit.patch_embed.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    if dino_positions:
        vit = copy.deepcopy(vit)
        vit.pos_embed = torch.nn.Parameter(_dino_pos_embed(vit.pos_embed.detach(), grid))
        vit.patch_embed.grid_size = grid
    seen = []
    hook = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            vit.forward_features(x)
    finally:
        hook.remove()
    p, d = vit.patch_embed.patch_size[0], vit.embed_dim
    b, _, h, w = x.shape
    return seen[0][..., d : 2 * d][:, vit.num_prefix_tokens :].reshape(b, h // p, w // p, d)


@pytest.fixture
def hub_vit():
    """timm's hub architecture of DINO ViT-S/8, as the real DINO's loader builds it (``dynamic_img_size=True``,
    models/loading.py), with one block to keep the tests quick; random weights, seeded."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch8_224.dino", pretrained=False, num_classes=0, dynamic_img_size=True, depth=1
    ).eval()


def test_dino_position_embeddings_are_interpolated_as_dinos_own_code(hub_vit):
    """The reference's DINO interpolates its 28x28 trained position embeddings plain bicubic with scale factors
    (g + 0.1) / 28 (DINO's interpolate_pos_encoding); timm's resampling antialiases, another kernel. ViT-S/8's hub
    layout with one block; a 64x64 grid is a 512 support image's."""
    vit = hub_vit
    x = torch.randn(1, 3, 512, 448)
    with torch.no_grad():
        keys = vit_keys(vit, x)
    torch.testing.assert_close(keys, _timm_keys(vit, x), atol=1e-5, rtol=1e-5)
    assert (keys - _timm_keys(vit, x, dino_positions=False)).abs().max() > 1e-3  # the rule matters: 100x the tolerance
    square = torch.randn(1, 3, 224, 224)  # the trained grid: the embeddings as they are
    torch.testing.assert_close(vit_keys(vit, square), _timm_keys(vit, square, dino_positions=False))


def test_dino_sees_support_images_at_their_own_size(tiny_models):
    """REFERENCE 4: support images go into DINO at their native size (tiny: 64, so 8x8 patches; sd15: 512, 64x64),
    not shrunk to a window's dino_short (tiny 56: 7x7). The keys are timm's own forward on the unresized image."""
    ext = build_extractor("dino", tiny_models)
    assert tiny_models.spec.image_size == 64 and tiny_models.spec.dino_short == 56
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    support = ext(x, support=True)
    assert support.shape[1:3] == (8, 8)
    expected = _timm_keys(tiny_models.get("dino"), normalise_pixels(x, IMAGENET_MEAN, IMAGENET_STD))
    # The same network on the same pixels through timm's blocks or ours: rounding only.
    torch.testing.assert_close(support, expected, atol=1e-5, rtol=1e-5)
    assert ext(x).shape[1:3] == (7, 7)  # a window of 64: resized to short side 56


def test_dino_window_keeps_pixels_the_patch_grid_does_not_cover(tiny_models):
    """REFERENCE 4: a window side that is not a multiple of 8 is not resized; the stride-8 patch convolution drops
    the remainder, so a 48x53 window gives 6x6 patches: those of its first 48x48 pixels."""
    ext = build_extractor("dino", tiny_models)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 48, 53, generator=g)
    assert ext.input_size(48, 53, False) == (48, 53)
    feats = ext(x)
    assert feats.shape[1:3] == (6, 6)
    crop = normalise_pixels(x[..., :48].contiguous(), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(feats, _timm_keys(tiny_models.get("dino"), crop), atol=1e-5, rtol=1e-5)
    # The dropped columns change nothing (the same kernels on the same 48x48 pixels); the last kept one does.
    y = x.clone()
    y[..., 48:] = torch.rand(2, 3, 48, 5, generator=g)
    assert torch.equal(ext(y), feats)
    y[..., 47] = 1 - y[..., 47]
    assert (ext(y) - feats).abs().max() > 1e-3


def test_vit_keys_drop_the_remainder_on_timms_hub_architecture(hub_vit):
    """The real DINO's loader builds timm's hub architecture with ``dynamic_img_size=True`` (models/loading.py),
    whose patch embedding asserts whole patches: ``vit_keys`` hands it the whole patches of any size, the position
    embeddings interpolated to that grid."""
    vit = hub_vit
    x = torch.randn(1, 3, 61, 43)
    with torch.no_grad():
        keys = vit_keys(vit, x)
    assert keys.shape == (1, 7, 5, vit.embed_dim)
    torch.testing.assert_close(keys, _timm_keys(vit, x[..., :56, :40].contiguous()), atol=1e-5, rtol=1e-5)


def test_segmentation_stretches_dino_grid_over_the_whole_window(tiny_models):
    """The whole-image window of a 48x53 working image: DINO's 6x6 grid covers 48x48 pixels, and its maps are
    upsampled bilinear over all 48x53 pixels of the window (REFERENCE 4 and 6), not over 48x48 nor from 6x7."""
    from planted import protoset

    from ovdiff_cli import segmentation as S

    ext = build_extractor("dino", tiny_models)
    d = tiny_models.get("dino").embed_dim
    options = S.SegmentOptions(scales=(48,), stride=48, short_side=48, whole_image=True, batch_size=2)
    seg = S.Segmenter(protoset({"dino": [[1.0] * d, [-1.0] * d]}, [1, 2], [1, 2]), {"dino": ext}, options)
    work = torch.rand(3, 48, 53, generator=torch.Generator().manual_seed(8))
    # Sliding windows (48x48 at x = 0 and 5) come as a batch of 2 and add zeros; the whole image comes alone.
    whole = {}

    def reduce(name, feats, allowed):
        if feats.shape[0] == 2:
            return feats.new_zeros(2, 1, *feats.shape[1:3])
        whole["map"] = feats[..., :1].permute(0, 3, 1, 2).tanh()
        return whole["map"]

    allowed = {"dino": torch.ones(1, 2, dtype=torch.bool)}
    canvas = seg.accumulate([work], allowed, reduce, channels=1)[0][0]
    grid = whole["map"][0, 0].double()
    assert grid.shape == (6, 6)
    stretched = _bilinear_matrix(48, 6) @ grid @ _bilinear_matrix(53, 6).T
    counts = torch.full((48, 53), 3.0, dtype=torch.float64)  # every pixel: the whole image and two 48x48 windows
    counts[:, :5] = counts[:, 48:] = 2  # except those only one 48x48 window covers
    # Float32 interpolation and averaging of values in (-1, 1) against a float64 statement: a few ulps.
    torch.testing.assert_close(canvas, (stretched / counts).float(), atol=1e-6, rtol=0)


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
    for name, gh, gw in [("square", 6, 6), ("wide", 5, 7)]:
        x = normalise_pixels(images[name], IMAGENET_MEAN, IMAGENET_STD)
        expected = _timm_keys(vit, x)
        assert expected.shape == (2, gh, gw, vit.embed_dim)
        with torch.no_grad():
            keys = vit_keys(vit, x)
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
