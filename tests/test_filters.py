"""The CLIP pre-filter on planted scores, the stuff filter, and PAMR."""

from __future__ import annotations

import numpy as np
import torch

from ovdiff_cli import filters
from ovdiff_cli.extractors.base import l2n


def planted_image(cosines: list[float], dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal class embeddings and a unit image embedding with the given cosine to each class."""
    class_emb = torch.eye(dim)[: len(cosines)]
    rest = 1 - sum(c * c for c in cosines)
    image = torch.tensor([*cosines, *([0.0] * (dim - len(cosines) - 1)), rest**0.5])
    return image, class_emb


class PlantedSubsets:
    """encode_subsets stand-in: the winner embeds exactly as the image does, every other subset orthogonally."""

    def __init__(self, image: torch.Tensor, winner: tuple[int, ...]) -> None:
        self.image, self.winner, self.calls = image, winner, []

    def __call__(self, subsets):
        self.calls.append(list(subsets))
        other = l2n(torch.ones_like(self.image) - self.image * (self.image.sum()))
        return torch.stack([self.image if s == self.winner else other for s in subsets])


def test_candidates_are_at_least_one_over_c_of_a_temperature_1_softmax():
    # REFERENCE 6: raw cosines (.5, .4, .1, 0), softmax at temperature 1: e^c / sum = .3143, .2844, .2107, .1906;
    # 1/C = .25 keeps 0 and 1 (a logit scale of 100 would have kept 0 alone).
    image, classes = planted_image([0.5, 0.4, 0.1, 0.0])
    cos = classes @ image
    assert filters.candidate_classes(cos.softmax(0), cos) == [0, 1]
    assert filters.candidate_classes(cos.softmax(0), cos, eta=1) == [0]
    # Equal cosines: every probability is exactly 1/C, and ">=" keeps them all.
    flat = torch.full((3,), 0.3)
    assert filters.candidate_classes(flat.softmax(0), flat) == [0, 1, 2]
    # None reaching 1/C (only by rounding in practice): the eta best by cosine.
    assert filters.candidate_classes(torch.full((4,), 0.2), torch.tensor([0.1, 0.3, 0.2, 0.0]), eta=2) == [1, 2]
    assert filters.candidate_classes(torch.full((4,), 0.2), torch.tensor([0.1, 0.2, 0.3, 0.0]), eta=2) == [2, 1]


def test_subset_prompts_name_classes_in_probability_order():
    # REFERENCE 6: the subsets' prompts list the kept classes in the order of their probability. Cosines (.4, .5,
    # .1, 0): softmax .2844, .3143, .2107, .1906 keeps 1 then 0, so the pair's prompt is "a class1 and a class0".
    image, classes = planted_image([0.4, 0.5, 0.1, 0.0])
    cos = classes @ image
    assert filters.candidate_classes(cos.softmax(0), cos) == [1, 0]
    encode = PlantedSubsets(image, winner=(1, 0))
    assert filters.prefilter(image, classes, encode, eta=10) == (0, 1)  # the kept classes, ascending
    assert encode.calls == [[(1,), (0,), (1, 0)]]


def test_prefilter_picks_the_best_subset_among_all_of_them():
    image, classes = planted_image([0.5, 0.4, 0.1, 0.0])
    encode = PlantedSubsets(image, winner=(0, 1))
    assert filters.prefilter(image, classes, encode, eta=10) == (0, 1)
    assert encode.calls == [[(0,), (1,), (0, 1)]]
    encode = PlantedSubsets(image, winner=(1,))
    assert filters.prefilter(image, classes, encode, eta=10) == (1,)


def test_prefilter_keeps_stuff_and_counts_only_things():
    # classes: cat .5, sky (stuff) 0, dog .4, car .1. Things only: softmax of (.5, .4, .1) = .388, .351, .260;
    # 1/C with C = 3 things keeps cat and dog. sky is never scored and always kept.
    image, classes = planted_image([0.5, 0.0, 0.4, 0.1])
    encode = PlantedSubsets(image, winner=(0, 2))
    kept = filters.prefilter(image, classes, encode, stuff=[False, True, False, False])
    assert kept == (0, 1, 2)
    assert encode.calls == [[(0,), (2,), (0, 2)]]
    # Only stuff, or a single thing: nothing to filter.
    assert filters.prefilter(image, classes, encode, stuff=[True, True, True, False]) == (0, 1, 2, 3)


def test_prefilter_top_eta_then_subsets():
    # four classes reach 1/6 (probs .194 .192 .190 .188 .118 .118); eta = 2 keeps the two best, 3 subsets only
    image, classes = planted_image([0.5, 0.49, 0.48, 0.47, 0.0, 0.0])
    encode = PlantedSubsets(image, winner=(0,))
    assert filters.prefilter(image, classes, encode, eta=2) == (0,)
    assert encode.calls == [[(0,), (1,), (0, 1)]]


def test_prefilter_single_candidate_needs_no_subset_scores():
    image, classes = planted_image([0.9, 0.0, 0.0])
    encode = PlantedSubsets(image, winner=(1,))
    # softmax of (.9, 0, 0) = .551, .224, .224: only class 0 reaches 1/3
    assert filters.prefilter(image, classes, encode) == (0,)
    assert encode.calls == []


def test_subset_prompts():
    assert filters.subset_prompt(["cat"]) == "a cat"
    assert filters.subset_prompt(["cat", "potted plant"]) == "a cat and a potted plant"
    assert len(filters.all_subsets([3, 1, 2])) == 7 and filters.all_subsets([3, 1]) == [(3,), (1,), (3, 1)]


def test_clip_prefilter_with_tiny_clip(tiny_models):
    pre = filters.ClipPrefilter(tiny_models.get("clip"), ["cat", "dog", "sky"], eta=10, stuff=[False, False, True])
    assert pre.class_emb.shape == (3, 32)
    imgs = [torch.rand(3, 40, 70), torch.rand(3, 64, 64)]
    emb = pre.image_embeddings(imgs)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    kept = pre(emb[0])
    assert 2 in kept and set(kept) <= {0, 1, 2} and list(kept) == sorted(kept) and len(kept) >= 2
    memo = dict(pre._subsets)
    assert pre(emb[0]) == kept and pre._subsets == memo  # subset prompts are encoded once
    # In fixed batches (the last zero-padded), an image's embedding is the same alone or among others.
    many = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batched = pre.image_embeddings(many, batch=4)
    assert batched.shape == (5, 32)
    for i, im in enumerate(many):
        assert torch.equal(pre.image_embeddings([im], batch=4)[0], batched[i])


def test_prefilter_sees_the_references_image(tiny_models):
    """REFERENCE 6, restated with the reference's own tools: the PIL working image resized to 512x512 by PIL's
    Lanczos, torchvision's ToTensor, Resize to CLIP's input size (bilinear, no antialiasing) and Normalize with
    CLIP's mean/std. The same kernels see the same inputs, so the embedding is bit-equal."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    clip = tiny_models.get("clip")
    pre = filters.ClipPrefilter(clip, ["cat", "dog"])
    size = list(clip.visual.image_size)  # open_clip keeps it as a (height, width) pair
    rng = np.random.default_rng(0)
    working = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)  # a small stand-in for the 448 working image
    x = TF.to_tensor(Image.fromarray(working).resize((512, 512), Image.LANCZOS))
    x = TF.resize(x, size, InterpolationMode.BILINEAR, antialias=False)
    x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        expected = l2n(clip.encode_image(x[None]))[0]
    got = pre.image_embeddings([torch.from_numpy(working).permute(2, 0, 1)])[0]
    assert torch.equal(got, expected)
    # A float image in [0, 1] is resized plane by plane in PIL's float mode: the byte route's pixels but for its
    # rounding to bytes after the 512 resize (two different noise images embed about 1e-2 apart in cosine).
    as_float = pre.image_embeddings([torch.from_numpy(working).permute(2, 0, 1).float() / 255])[0]
    assert 1 - float(as_float @ expected) < 1e-5


def test_stuff_filter_direct():
    protos = l2n(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [1, 0.01]]))
    thing_bg = torch.tensor([True, True, False, False])
    stuff_fg = torch.tensor([False, False, False, True])
    # rows 0 and 1 are ~1.0 similar to the stuff row 3: both dropped, others untouched
    assert filters.stuff_filter(protos, thing_bg, stuff_fg).tolist() == [False, False, True, True]
    # cos(row 0, row 3) = 0.99995 stays above 0.999; cos(row 1, row 3) = 0.9949 does not
    assert filters.stuff_filter(protos, thing_bg, stuff_fg, threshold=0.999).tolist() == [False, True, True, True]
    assert filters.stuff_filter(protos, thing_bg, torch.zeros(4, dtype=torch.bool)).all()


def _pamr_by_hand(image: np.ndarray, scores: np.ndarray, dilations: list[int], iters: int) -> np.ndarray:
    """PAMR written out pixel by pixel: image (3, H, W), scores (K, H, W)."""
    _, h, w = image.shape
    offs = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(a: np.ndarray, y: int, x: int) -> np.ndarray:  # replicate padding
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = np.zeros((len(offs), h, w))
    for y in range(h):
        for x in range(w):
            centre = image[:, y, x]
            # the deviation pools the 3x3 neighbourhood (centre included) of every dilation: 9 x D samples
            samples = [centre] * len(dilations) + [at(image, y + oy, x + ox) for oy, ox in offs]
            sigma = np.std(np.stack(samples), axis=0, ddof=1)
            logits = [np.mean(-np.abs(at(image, y + oy, x + ox) - centre) / (1e-8 + 0.1 * sigma)) for oy, ox in offs]
            e = np.exp(np.array(logits) - max(logits))
            weights[:, y, x] = e / e.sum()
    out = scores.astype(np.float64)
    for _ in range(iters):
        nxt = np.zeros_like(out)
        for y in range(h):
            for x in range(w):
                nxt[:, y, x] = sum(weights[j, y, x] * at(out, y + oy, x + ox) for j, (oy, ox) in enumerate(offs))
        out = nxt
    return out


def test_pamr_matches_a_pixel_by_pixel_computation():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 5, 6, generator=g)
    scores = torch.rand(1, 2, 5, 6, generator=g)
    got = filters.pamr(image, scores, iters=2, dilations=(1, 2))
    want = _pamr_by_hand(image[0].double().numpy(), scores[0].double().numpy(), [1, 2], 2)
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-5)


def test_pamr_keeps_a_constant_map_constant():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 24, 30)
    scores = torch.full((1, 3, 24, 30), 0.3)
    out = filters.pamr(image, scores)
    torch.testing.assert_close(out, scores)


def test_pamr_moves_a_label_edge_to_the_image_edge():
    torch.manual_seed(0)
    image = torch.full((1, 3, 20, 40), 0.1)
    image[..., 20:] = 0.9  # image edge between columns 19 and 20
    image += torch.rand(image.shape) * 0.02
    a = torch.zeros(1, 1, 20, 40)
    a[..., :14] = 1  # label edge between columns 13 and 14
    out = filters.pamr(image, torch.cat([a, 1 - a], 1))
    assert (out.argmax(1) == 0).sum(-1).flatten().tolist() == [20] * 20  # every row: class 0 up to the image edge
    assert float(out.min()) >= 0 and float(out.max()) <= 1 + 1e-6  # convex combinations (up to rounding)


def test_subset_token_ids_are_open_clips_tokenisation(tiny_models):
    """Issue 15: subset prompts are composed from each class's tokens instead of being tokenised whole, with the
    same ids as open_clip's tokenize, also for multi-word, punctuated and accented names and past 77 tokens."""
    from open_clip.tokenizer import tokenize

    names = [
        "potted plant",
        "t-shirt",
        "children's toy",
        "café",
        "tv/monitor",
        " ".join(["zebra crossing"] * 30),
        "Dining  Table",
    ]
    pre = filters.ClipPrefilter(tiny_models.get("clip"), names)
    assert pre._composable
    subsets = filters.all_subsets(range(len(names)))
    prompts = [filters.subset_prompt([names[i] for i in s]) for s in subsets]
    expected = tokenize(prompts)
    assert int((expected[:, -1] != 0).sum()) > 0  # some prompts are cut at 77 tokens
    assert torch.equal(pre.token_ids(subsets), expected)
    pre._composable = False  # the fallback tokenises whole prompts: the same ids
    assert torch.equal(pre.token_ids(subsets), expected)
