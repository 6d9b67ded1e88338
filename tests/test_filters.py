"""The CLIP pre-filter on planted scores, the stuff filter, and PAMR."""

from __future__ import annotations

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


def test_candidates_above_one_over_c():
    # logit scale 10 on cosines (.5, .4, .1, 0): probs .718, .264, .013, .005; 1/C = .25 keeps 0 and 1.
    image, classes = planted_image([0.5, 0.4, 0.1, 0.0])
    probs = (10 * classes @ image).softmax(0)
    assert filters.candidate_classes(probs) == [0, 1]
    assert filters.candidate_classes(probs, eta=1) == [0]


def test_prefilter_picks_the_best_subset_among_all_of_them():
    image, classes = planted_image([0.5, 0.4, 0.1, 0.0])
    encode = PlantedSubsets(image, winner=(0, 1))
    assert filters.prefilter(image, classes, encode, eta=10, logit_scale=10) == (0, 1)
    assert encode.calls == [[(0,), (1,), (0, 1)]]
    encode = PlantedSubsets(image, winner=(1,))
    assert filters.prefilter(image, classes, encode, eta=10, logit_scale=10) == (1,)


def test_prefilter_top_eta_then_subsets():
    # four classes beat 1/6; eta = 2 keeps the two best (0 and 1) and scores their 3 subsets only
    image, classes = planted_image([0.5, 0.49, 0.48, 0.47, 0.0, 0.0])
    encode = PlantedSubsets(image, winner=(0,))
    assert filters.prefilter(image, classes, encode, eta=2, logit_scale=10) == (0,)
    assert encode.calls == [[(0,), (1,), (0, 1)]]


def test_prefilter_single_candidate_needs_no_subset_scores_and_ties_keep_one():
    image, classes = planted_image([0.9, 0.0, 0.0])
    encode = PlantedSubsets(image, winner=(1,))
    assert filters.prefilter(image, classes, encode, logit_scale=100) == (0,)
    assert encode.calls == []
    assert filters.candidate_classes(torch.full((4,), 0.25)) == [0]  # nobody beats 1/C: keep the best


def test_subset_prompts():
    assert filters.subset_prompt(["cat"]) == "a cat"
    assert filters.subset_prompt(["cat", "potted plant"]) == "a cat and a potted plant"
    assert len(filters.all_subsets([3, 1, 2])) == 7 and filters.all_subsets([3, 1])[-1] == (1, 3)


def test_clip_prefilter_with_tiny_clip(tiny_models):
    pre = filters.ClipPrefilter(tiny_models.get("clip"), ["cat", "dog", "sky"], eta=10)
    assert pre.class_emb.shape == (3, 32)
    imgs = [torch.rand(3, 40, 70), torch.rand(3, 64, 64)]
    emb = pre.image_embeddings(imgs)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    kept = pre(emb[0])
    assert kept and set(kept) <= {0, 1, 2} and list(kept) == sorted(kept)
    memo = dict(pre._subsets)
    assert pre(emb[0]) == kept and pre._subsets == memo  # subset prompts are encoded once


def test_stuff_filter_direct():
    protos = {"a": l2n(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [1, 0.01]])), "b": l2n(torch.eye(2)[[0, 0, 1, 1]])}
    thing_bg = torch.tensor([True, True, False, False])
    stuff = torch.tensor([False, False, False, True])
    # ensemble similarity to the stuff row 3: row 0 (1.0 + 0)/2 = 0.5, row 1 (0.99 + 0)/2 < 0.85: both stay
    assert filters.stuff_filter(protos, thing_bg, stuff).tolist() == [True] * 4
    # with one extractor only, rows 0 and 1 are ~1.0 similar to row 3: both dropped, others untouched
    only_a = {"a": protos["a"]}
    assert filters.stuff_filter(only_a, thing_bg, stuff).tolist() == [False, False, True, True]
    assert filters.stuff_filter(only_a, thing_bg, torch.zeros(4, dtype=torch.bool)).all()


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
