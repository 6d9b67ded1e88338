"""Paper 3.4's filters around eq. 4: the CLIP category pre-filter, the "stuff" filter, and PAMR refinement.

* Pre-filter: CLIP classifies the whole image against the vocabulary's thing classes (softmax over raw cosines),
  keeps those with probability at least 1/|C| (at most eta of them), then picks the best-scoring subset prompt
  "a x and a y ..." among all subsets. Stuff classes are always kept (REFERENCE 6).
* Stuff filter: thing classes' background prototypes that look like a stuff class's foreground prototypes are
  dropped, per extractor (stuff classes themselves contribute no background prototypes; see
  segmentation.build_prototype_set).
* PAMR (Araslanov & Roth, CVPR 2020): score maps are repeatedly replaced by an affinity-weighted average of their
  neighbours, the affinities coming from local colour differences, so label edges snap to image edges.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults as D
from .extractors.base import l2n, normalise_pixels
from .models.loading import CONTEXT_LENGTH

# CLIP's own pixel statistics: the pre-filter embeds whole images as CLIP was trained to see them (only the
# dense CLIP extractor uses ImageNet's, as the reference does).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- the reference's image resizes ---------------------------------------------------------------------------------


def lanczos_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize as the reference resizes its PIL images: PIL's Lanczos filter.

    Args:
        image: (3, H, W) RGB, uint8 in [0, 255] or float in [0, 1], on any device.
        size: the output (height, width).

    Returns:
        (3, *size) CPU tensor of the input's dtype: a uint8 image is resized as 8-bit RGB (PIL's fixed-point
        arithmetic, rounded and clipped to bytes, exactly the reference's pixels); a float one plane by plane in
        PIL's 32-bit float mode, clamped to [0, 1] as the byte image is clipped. An image already of that size is
        returned as it is (PIL's resize copies it unfiltered), on its own device.
    """
    from PIL import Image

    if tuple(image.shape[-2:]) == tuple(size):
        return image
    arr = image.detach().cpu()
    if arr.is_floating_point():
        planes = [Image.fromarray(c.float().numpy()).resize(size[::-1], Image.LANCZOS) for c in arr]
        return torch.from_numpy(np.stack([np.asarray(p) for p in planes])).clamp(0, 1)
    rgb = Image.fromarray(arr.permute(1, 2, 0).numpy()).resize(size[::-1], Image.LANCZOS)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] image -> float32 in [0, 1] (bytes / 255, as torchvision's ``ToTensor``)."""
    return image.float() / 255 if not image.is_floating_point() else image.float()


# --- category pre-filter ------------------------------------------------------------------------------------------


def subset_prompt(names: Sequence[str]) -> str:
    """``["cat", "sky"]`` -> ``"a cat and a sky"`` (one class gives ``"a cat"``)."""
    return D.PREFILTER_JOIN.join(D.PREFILTER_TEMPLATE.format(n) for n in names)


def candidate_classes(probs: torch.Tensor, cosines: torch.Tensor, eta: int = D.ETA) -> list[int]:
    """Classes CLIP thinks are present: probability at least 1/C, at most the ``eta`` best.

    Args:
        probs: (C,) float, the softmax over the classes for one image (sums to 1).
        cosines: (C,) float, the cosines the softmax was taken over (to rank with when none qualifies).
        eta: the most classes kept.

    Returns:
        Class indices in [0, C) in the order of their probability, highest first (ties by index), as the
        reference lists them in its subset prompts (REFERENCE 6); the ``eta`` best by cosine, in cosine order, when
        no class reaches 1/C (only possible through rounding, since the largest probability is at least the mean).
    """
    c = probs.shape[0]
    keep = (probs >= 1.0 / c).tolist()
    above = [i for i in sorted(range(c), key=lambda i: (-float(probs[i]), i)) if keep[i]]
    if not above:
        above = sorted(range(c), key=lambda i: (-float(cosines[i]), i))
    return above[:eta]


def all_subsets(candidates: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``candidates`` (2^k - 1 of them), by size, each in the candidates' order (the
    order its prompt names the classes in: "a dog and a cat" when dog is the more probable)."""
    items = list(candidates)
    return [s for r in range(1, len(items) + 1) for s in itertools.combinations(items, r)]


def prefilter(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    encode_subsets: Callable[[list[tuple[int, ...]]], torch.Tensor],
    eta: int = D.ETA,
    temperature: float = D.PREFILTER_TEMPERATURE,
    stuff: Sequence[bool] | None = None,
) -> tuple[int, ...]:
    """The classes eq. 4 should use for one image (paper 3.4, category pre-filtering, as REFERENCE 6).

    Args:
        image_emb: (D,) float, the image's CLIP embedding, unit norm.
        class_emb: (C, D) float, each class prompt's CLIP text embedding, unit rows.
        encode_subsets: subsets of class indices -> (S, D) unit text embeddings of their prompts.
        eta: the most classes considered for subsets.
        temperature: of the softmax over the raw cosines (the reference: 1, no CLIP logit scale).
        stuff: (C,) whether each class is stuff; stuff classes are not scored and are always kept.

    Returns:
        Ascending class indices in [0, C): the best subset of the thing classes, plus every stuff class.
    """
    stuff = [False] * class_emb.shape[0] if stuff is None else list(stuff)
    things = [i for i, st in enumerate(stuff) if not st]
    kept_stuff = [i for i, st in enumerate(stuff) if st]
    if len(things) <= 1:
        return tuple(range(class_emb.shape[0]))
    cosines = class_emb[things].float() @ image_emb.float()
    candidates = [things[i] for i in candidate_classes((cosines / temperature).softmax(0), cosines, eta)]
    subsets = all_subsets(candidates)
    best = subsets[0]
    if len(subsets) > 1:
        best = subsets[int((encode_subsets(subsets).float() @ image_emb.float()).argmax())]
    return tuple(sorted([*best, *kept_stuff]))


class ClipPrefilter:
    """The pre-filter bound to a CLIP model and a vocabulary; subset prompts are encoded once per process.

    Args:
        clip: an open_clip CLIP model (``encode_image``, ``encode_text``, ``visual.image_size``).
        names: the vocabulary, in the user's order.
        eta: the most classes considered for subsets.
        stuff: per class, whether it is stuff (always kept, never scored); None = all things.
    """

    def __init__(
        self, clip: torch.nn.Module, names: Sequence[str], eta: int = D.ETA, stuff: Sequence[bool] | None = None
    ) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.clip = clip
        self.names = list(names)
        self.eta = eta
        self.stuff = list(stuff) if stuff is not None else [False] * len(self.names)
        self._tokenizer = SimpleTokenizer()
        # Subset prompts are composed from each class's own tokens: an image's up to 2^eta - 1 prompts would
        # otherwise each be cleaned (ftfy) and split again, milliseconds apiece on the CPU beside a GPU.
        self._pieces = [self._tokenizer.encode(subset_prompt([n])) for n in self.names]
        self._join = self._tokenizer.encode(D.PREFILTER_JOIN)
        # Composing equals tokenising when cleaning and splitting never cross the spaces between the pieces; a name
        # for which it does not (text cleaning that looks across them) makes every prompt be tokenised whole.
        whole = tuple(range(len(self.names)))
        self._composable = self._tokenizer.encode(subset_prompt(self.names)) == self._composed(whole)
        self._param = next(clip.parameters())
        self._subsets: dict[tuple[int, ...], torch.Tensor] = {}
        self.class_emb = self._encode_ids(self.token_ids([(i,) for i in range(len(self.names))]))
        size = clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def _composed(self, subset: tuple[int, ...]) -> list[int]:
        ids = list(self._pieces[subset[0]]) if subset else []
        for i in subset[1:]:
            ids += self._join + self._pieces[i]
        return ids

    def token_ids(self, subsets: list[tuple[int, ...]]) -> torch.Tensor:
        """(S, 77) int64: exactly open_clip's ``tokenize`` of the subsets' prompts (start, tokens, end, zeros; cut
        to 77 with the end token last)."""
        if not self._composable:
            prompts = [subset_prompt([self.names[i] for i in s]) for s in subsets]
            return self._tokenizer(prompts, context_length=CONTEXT_LENGTH)
        out = torch.zeros(len(subsets), CONTEXT_LENGTH, dtype=torch.long)
        for row, subset in enumerate(subsets):
            ids = [self._tokenizer.sot_token_id, *self._composed(subset)][: CONTEXT_LENGTH - 1]
            ids.append(self._tokenizer.eot_token_id)
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    @torch.no_grad()
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return l2n(self.clip.encode_text(ids.to(self._param.device)))

    def encode_subsets(self, subsets: list[tuple[int, ...]]) -> torch.Tensor:
        """(S, D) unit text embeddings of the subsets' prompts, from the in-process memo where possible."""
        todo = [s for s in subsets if s not in self._subsets]
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            self._subsets.update(zip(chunk, self._encode_ids(self.token_ids(chunk)), strict=True))
        return torch.stack([self._subsets[s] for s in subsets])

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[torch.Tensor], batch: int | None = None) -> torch.Tensor:
        """Unit CLIP embeddings of whole images, seen as the reference's pre-filter sees them (REFERENCE 6).

        Each image is resized (not cropped, so classes at the borders still count) to ``PREFILTER_RESIZE`` square
        with PIL's Lanczos (:func:`lanczos_resize`: on the bytes of a uint8 image, as the reference resizes its PIL
        working image), then as [0, 1] floats to CLIP's input size, bilinear without antialiasing, and normalised
        with CLIP's mean/std. With ``batch``, CLIP sees batches of exactly that many images (the last one
        zero-padded), so an image's embedding does not depend on how many images it was embedded with.

        Args:
            images: each (3, H, W) RGB, uint8 in [0, 255] or float in [0, 1]: the segmenter's working images, in
                their own dtype (uint8 for byte inputs, to resize the bytes as the reference does).
            batch: the fixed batch size CLIP runs at, or None for all images at once.

        Returns:
            (B, D) float32 unit embeddings, one per image, in order.
        """
        side = (D.PREFILTER_RESIZE, D.PREFILTER_RESIZE)
        device = self._param.device
        x = torch.stack([unit_float(lanczos_resize(im, side).to(device)) for im in images])
        x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
        x = normalise_pixels(x, CLIP_MEAN, CLIP_STD).to(self._param.dtype)
        size = batch or x.shape[0]
        pad = -x.shape[0] % size
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
        return torch.cat([l2n(self.clip.encode_image(chunk)) for chunk in x.split(size)])[: len(images)]

    def __call__(self, image_emb: torch.Tensor) -> tuple[int, ...]:
        """The kept classes of one image: ascending indices into ``names``."""
        return prefilter(image_emb, self.class_emb, self.encode_subsets, self.eta, stuff=self.stuff)


# --- stuff filter -------------------------------------------------------------------------------------------------


def stuff_filter(
    prototypes: torch.Tensor,
    thing_bg: torch.Tensor,
    stuff_fg: torch.Tensor,
    threshold: float = D.STUFF_THRESHOLD,
) -> torch.Tensor:
    """Which thing-class background prototypes of one extractor survive the stuff filter (paper 3.4).

    The reference decides per extractor, in that extractor's space (REFERENCE 6).

    Args:
        prototypes: (P, D) float unit rows of one extractor.
        thing_bg: (P,) bool, the background prototypes of thing classes (the candidates for removal).
        stuff_fg: (P,) bool, the foreground prototypes of stuff classes (what they must not resemble).
        threshold: a candidate whose cosine to any stuff prototype is above this is dropped.

    Returns:
        (P,) bool keep mask: False exactly for the dropped thing-bg prototypes.
    """
    keep = torch.ones_like(thing_bg)
    if not bool(thing_bg.any()) or not bool(stuff_fg.any()):
        return keep
    sim = prototypes[thing_bg].float() @ prototypes[stuff_fg].float().T
    keep[torch.nonzero(thing_bg).flatten()[sim.max(1).values > threshold]] = False
    return keep


# --- PAMR ---------------------------------------------------------------------------------------------------------

# The 8 neighbours of a pixel, as (dy, dx) steps; each dilation d looks at (d*dy, d*dx).
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: torch.Tensor, dilations: Sequence[int]) -> list[torch.Tensor]:
    """x (B, C, H, W) -> one (B, C, H, W) view per (dilation, neighbour): the neighbour's value at each pixel,
    with the border replicated outward."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        out += [padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w] for dy, dx in _NEIGHBOURS]
    return out


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = D.PAMR_DILATIONS) -> torch.Tensor:
    """Neighbour weights of PAMR from colour differences, as Araslanov & Roth's code computes them.

    The scale is one standard deviation per pixel and channel, pooled over the 3x3 neighbourhoods (centre
    included) of every dilation: 9 x len(dilations) samples, unbiased. A neighbour's logit is minus its absolute
    colour difference to the pixel divided by (1e-8 + 0.1 x that deviation), averaged over channels; the weights
    are the softmax over all 8 x len(dilations) neighbours.

    Args:
        image: (B, 3, H, W) float RGB (any range; only differences matter).

    Returns:
        (B, 8 * len(dilations), H, W) float32 weights summing to 1 over dim 1.
    """
    image = image.float()
    nbrs = torch.stack(_shifted(image, dilations), dim=2)  # (B, 3, 8 * len(dilations), H, W)
    centre = image[:, :, None].expand(-1, -1, len(dilations), -1, -1)
    sigma = torch.cat([centre, nbrs], dim=2).std(dim=2, keepdim=True)
    return (-(nbrs - image[:, :, None]).abs() / (1e-8 + 0.1 * sigma)).mean(1).softmax(dim=1)


def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    iters: int = D.PAMR_ITERS,
    dilations: Sequence[int] = D.PAMR_DILATIONS,
) -> torch.Tensor:
    """Pixel-adaptive mask refinement of score maps.

    Args:
        image: (B, 3, H, W) float RGB the maps belong to.
        scores: (B, K, H, W) float class scores at the image's resolution.
        iters: number of propagation steps.
        dilations: neighbourhood dilations in pixels.

    Returns:
        (B, K, H, W) float32 refined scores. Each step is a convex combination of neighbours, so a constant map
        stays constant and values never leave their original range.
    """
    if image.shape[-2:] != scores.shape[-2:] or image.shape[0] != scores.shape[0]:
        raise ValueError(f"image {tuple(image.shape)} and scores {tuple(scores.shape)} must share B, H and W")
    weights = pamr_affinity(image, dilations)
    out = scores.float()
    for _ in range(iters):
        nxt = torch.zeros_like(out)
        for j, nbr in enumerate(_shifted(out, dilations)):
            nxt += weights[:, j : j + 1] * nbr
        out = nxt
    return out
