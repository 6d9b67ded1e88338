"""Paper 4.5: why did a pixel get its label? The prototypes behind the decision and the support regions they
were pooled from.

The image is segmented exactly as ``segment`` does it. At the pixel, every prototype's similarity is measured the
way eq. 4 measures it: in its own extractor's space, averaged over the windows covering the pixel. Each
extractor's best prototypes of the winning class (the ones whose max makes that extractor's vote for the class)
are followed through their provenance in the class's bank (ExtractorPrototypes.support_pixels) to the support
images and cells they were pooled from. For each of them a region map says which pixels of the query image that
prototype wins: pixels of its class where it beats every other prototype of the class in the same extractor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import defaults as D
from .outputs import colour, count_noun, draw_outlines, load_font
from .prototypes import KIND_NAMES, REGION_NAMES, PrototypeBank
from .segmentation import BACKGROUND_NAME, EXCLUDED_SCORE, Segmentation, Segmenter

# Layout of the explanation PNG: a header with the query image, then one row per prototype.
HEADER_H = 336  # query image (at most 320 high) + padding
ROW_H = 200  # region map / crops (THUMB high) + two caption lines + padding
THUMB = 160
TEXT_W = 280
CROP_MARGIN = 0.25  # crop = the region's bounding box grown by this fraction of its size on every side


@dataclass
class SupportRegion:
    """Where in one support image a prototype was pooled from.

    Attributes:
        index: the support image's index n in its class's support set.
        key: the support image's cache key.
        box: (x0, y0, x1, y1) bounding box of the pixels in support-image pixels, end exclusive.
        cells: number of feature-grid cells pooled.
        mask: (h, w) bool, the pooled cells on the extractor's grid.
        photo: for one of the user's photos: its file name (as it is called now); None for a generated image.
        sha256: that photo's content digest.
    """

    index: int
    key: str
    box: tuple[int, int, int, int]
    cells: int
    mask: np.ndarray
    photo: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        """How captions name it: ``photo mug/3.jpg`` or ``image 7``."""
        return f"photo {self.photo}" if self.photo is not None else f"image {self.index}"


@dataclass
class Evidence:
    """One prototype behind a pixel's label.

    Attributes:
        extractor: the feature space the prototype lives in.
        row: the prototype's row in the segmenter's ExtractorSet for that extractor.
        class_name: the class whose support set it was pooled from (for a background prototype: whose
            support images' backgrounds).
        kind: "class", "instance" or "part"; region: "fg" or "bg".
        bank_index: its row in that class's bank for the extractor; image / part: the instance's image or the
            part's cluster (None for other kinds).
        similarity: cosine similarity at the pixel, averaged over the covering windows.
        support: the support regions it was pooled from, most cells first.
        wins: (H, W) bool, the query pixels this prototype wins.
    """

    extractor: str
    row: int
    class_name: str
    kind: str
    region: str
    bank_index: int
    image: int | None
    part: int | None
    similarity: float
    support: list[SupportRegion]
    wins: np.ndarray


@dataclass
class Explanation:
    """Why pixel (x, y) of an image got its label. Label ids and names are those of segment's legend.json."""

    pixel: tuple[int, int]
    size: tuple[int, int]
    label_id: int
    label: str
    score: float
    runner_up: tuple[int, str, float] | None
    kept: list[str]
    labels: np.ndarray
    prototypes: list[Evidence]
    names: list[str] = field(default_factory=list)  # every label id's name (index = id), for the picture's legend

    def to_json(self) -> dict:
        """The facts as JSON-able data (no arrays)."""
        runner = None
        if self.runner_up is not None:
            rid, name, score = self.runner_up
            runner = {"label": name, "label_id": rid, "score": round(score, 6)}
        return {
            "pixel": list(self.pixel),
            "size": [self.size[1], self.size[0]],
            "label": self.label,
            "label_id": self.label_id,
            "score": round(self.score, 6),
            "runner_up": runner,
            "kept": self.kept,
            "prototypes": [
                {
                    "rank": rank,
                    "extractor": ev.extractor,
                    "class": ev.class_name,
                    "kind": ev.kind,
                    "region": ev.region,
                    "bank_index": ev.bank_index,
                    "image": ev.image,
                    "part": ev.part,
                    "similarity": round(ev.similarity, 6),
                    "wins_pixels": int(ev.wins.sum()),
                    "support": [
                        {
                            "index": r.index,
                            "key": r.key,
                            "box": list(r.box),
                            "cells": r.cells,
                            **({"photo": r.photo, "sha256": r.sha256} if r.photo is not None else {}),
                        }
                        for r in ev.support
                    ],
                }
                for rank, ev in enumerate(self.prototypes, start=1)
            ],
        }


def label_names(segmenter: Segmenter) -> list[str]:
    """Name of every label id: "background" for 0, then the classes (as in segment's legend.json)."""
    return [BACKGROUND_NAME] + [c.name for c in segmenter.protoset.classes]


def _support_regions(pixels: torch.Tensor, bank: PrototypeBank, support_size: int) -> list[SupportRegion]:
    """(N, h, w) bool pooled cells -> one region per support image that has any, most cells first. The user's
    photos (the last support images of a bank that records ``photos`` in its meta) are named by file."""
    sy, sx = support_size / pixels.shape[-2], support_size / pixels.shape[-1]
    keys = bank.support_keys
    photos = bank.meta.get("photos", [])
    first_photo = len(keys) - len(photos)
    out = []
    for n in torch.nonzero(pixels.flatten(1).any(1)).flatten().tolist():
        mask = pixels[n].numpy()
        ys, xs = np.nonzero(mask)
        box = (int(xs.min() * sx), int(ys.min() * sy), int((xs.max() + 1) * sx), int((ys.max() + 1) * sy))
        photo = photos[n - first_photo] if n >= first_photo else {}
        out.append(SupportRegion(n, keys[n], box, int(mask.sum()), mask, photo.get("file"), photo.get("sha256")))
    return sorted(out, key=lambda r: (-r.cells, r.index))


def _region_maps(
    segmenter: Segmenter,
    work: torch.Tensor,
    name: str,
    allowed: torch.Tensor,
    rows: torch.Tensor,
    label: int,
    labels: np.ndarray,
) -> list[np.ndarray]:
    """For each prototype in ``rows`` (all of extractor ``name`` and class ``label``): the query pixels of that
    class where its window-averaged similarity beats every other allowed prototype of the class in ``name``."""
    ps = segmenter.protoset.sets[name]
    rows = rows.to(segmenter.device)
    others = (ps.channel == label) & allowed.to(segmenter.device)
    others[rows] = False

    def reduce(_name: str, feats: torch.Tensor, _allow: torch.Tensor) -> torch.Tensor:
        sims = segmenter.similarities(name, feats)  # (B, h, w, P_e)
        if bool(others.any()):
            rest = sims[..., others].amax(-1, keepdim=True)
        else:
            rest = torch.full_like(sims[..., :1], EXCLUDED_SCORE)
        return torch.cat([sims[..., rows], rest], dim=-1).permute(0, 3, 1, 2)

    canvas = segmenter.accumulate([work], {name: allowed[None]}, reduce, len(rows) + 1, extractors=[name])[0]
    best = Segmentation(canvas.cpu(), labels.shape, ()).labels()
    return [(labels == label) & (best == i) for i in range(len(rows))]


@torch.no_grad()
def explain(
    segmenter: Segmenter, image: np.ndarray, x: int, y: int, support_size: int, top: int = D.EXPLAIN_TOP
) -> Explanation:
    """Explain the label of pixel (x, y) of ``image``.

    Args:
        segmenter: built with banks (its PrototypeSet.banks holds the provenance).
        image: (H, W, 3) uint8 RGB, as segment reads it.
        x, y: the pixel, 0 <= x < W, 0 <= y < H.
        support_size: the support images' side in pixels (the model set's image size), for boxes.
        top: how many of the winning class's prototypes to report per extractor (fewer if it has fewer).

    Returns:
        An :class:`Explanation`; its label is the one ``segment`` writes for that pixel.
    """
    h_in, w_in = image.shape[:2]
    if not (0 <= x < w_in and 0 <= y < h_in):
        raise ValueError(f"pixel ({x}, {y}) is outside the {w_in} x {h_in} image")
    ps = segmenter.protoset
    names = label_names(segmenter)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    seg = segmenter([tensor])[0]
    labels = seg.labels()
    label = int(labels[y, x])
    scores = seg.pixel_scores(x, y)
    competing = set(seg.kept) | ({0} if ps.background else set())
    rivals = [int(c) for c in scores.argsort(descending=True) if int(c) != label and int(c) in competing]
    runner = (rivals[0], names[rivals[0]], float(scores[rivals[0]])) if rivals else None

    work = segmenter.working_image(tensor)
    h, w = work.shape[-2:]
    per = segmenter.pixel_similarities(
        work, min(h - 1, int((y + 0.5) * h / h_in)), min(w - 1, int((x + 0.5) * w / w_in))
    )
    allowed = {e: a.cpu() for e, a in ps.allowed(seg.kept).items()}
    evidence = []
    for name in sorted(ps.sets):
        eset = ps.sets[name]
        candidates = torch.nonzero((eset.channel.cpu() == label) & allowed[name]).flatten()
        rows = candidates[per[name][candidates].argsort(descending=True, stable=True)][:top]
        if not len(rows):
            continue
        wins = _region_maps(segmenter, work, name, allowed[name], rows, label, labels)
        for row, won in zip(rows.tolist(), wins, strict=True):
            bank = ps.banks[int(eset.source[row]) - 1]
            protos = bank[name]
            b = int(eset.index[row])
            evidence.append(
                Evidence(
                    extractor=name,
                    row=row,
                    class_name=bank.class_name,
                    kind=KIND_NAMES[int(protos.kind[b])],
                    region=REGION_NAMES[int(protos.region[b])],
                    bank_index=b,
                    image=int(protos.image[b]) if int(protos.image[b]) >= 0 else None,
                    part=int(protos.part[b]) if int(protos.part[b]) >= 0 else None,
                    similarity=float(per[name][row]),
                    support=_support_regions(protos.support_pixels(b), bank, support_size),
                    wins=won,
                )
            )
    return Explanation(
        pixel=(x, y),
        size=(h_in, w_in),
        label_id=label,
        label=names[label],
        score=float(scores[label]),
        runner_up=runner,
        kept=[names[i] for i in seg.kept],
        labels=labels,
        prototypes=evidence,
        names=names,
    )


# --- the picture --------------------------------------------------------------------------------------------------

OUTLINE_W = 2  # outline width in the picture's pixels (plus a 1-pixel halo: outputs.draw_outlines)
SWATCH = 18  # side of a legend entry's outline sample


def support_text(regions: Sequence[SupportRegion]) -> str:
    """``"12 support images"``, or ``"12 support images (3 of them your photos)"``."""
    photos = sum(r.photo is not None for r in regions)
    mine = f" ({photos} of them your photos)" if photos and photos < len(regions) else ""
    if photos and photos == len(regions):
        return count_noun(photos, "photo") + " of yours"
    return count_noun(len(regions), "support image") + mine


def _fit(img, box: tuple[int, int]):
    """Resize a PIL image to fit inside box (w, h), keeping its aspect ratio (pixels kept sharp when enlarged)."""
    from PIL import Image

    scale = min(box[0] / img.width, box[1] / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if scale >= 1 or img.mode not in ("RGB", "L") else Image.BICUBIC)


def _style(labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """How the picture outlines label ids: ((K, 3) uint8 colours, (K,) bool dashed) for ids < K = max + 1. A
    class is outlined solid in its colour, background (id 0) dashed black and white."""
    k = max(labels, default=0) + 1
    colours = np.array([colour(i) for i in range(k)], dtype=np.uint8)
    dashed = np.arange(k) == 0
    return colours, dashed


def _highlight(image: np.ndarray, mask: np.ndarray, label: int) -> np.ndarray:
    """Dim everything outside ``mask`` and outline it as label ``label`` is outlined (see :func:`_style`).

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool.

    Returns:
        (H, W, 3) uint8.
    """
    out = image.astype(np.float32)
    out[~mask] *= 0.35
    colours, dashed = _style([label])
    inside = np.where(mask, label, -1)  # the mask as label ``label``, the rest -1 (not drawn on: where=mask)
    draw_outlines(out, inside, OUTLINE_W, colours, where=mask, dashed=dashed, frame=True)
    return out.astype(np.uint8)


def _crop(support: np.ndarray, region: SupportRegion, label: int):
    """The (S, S, 3) uint8 support image around the region (box plus margin), fitted to THUMB x THUMB, the region
    highlighted as label ``label`` (outlined at the thumbnail's scale), as a PIL image."""
    from PIL import Image

    size = support.shape[0]
    mask = np.array(Image.fromarray(region.mask).resize((size, size), Image.NEAREST))
    x0, y0, x1, y1 = region.box
    mx, my = max(4, int((x1 - x0) * CROP_MARGIN)), max(4, int((y1 - y0) * CROP_MARGIN))
    x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(size, x1 + mx), min(size, y1 + my)
    crop = _fit(Image.fromarray(support[y0:y1, x0:x1]), (THUMB, THUMB))
    inside = np.array(Image.fromarray(mask[y0:y1, x0:x1]).resize(crop.size, Image.NEAREST))
    return Image.fromarray(_highlight(np.array(crop.convert("RGB")), inside, label))


def _no_wins(thumb, font, class_name: str):
    """The region map of a prototype that wins no pixel: the query, faded, saying so."""
    from PIL import Image, ImageDraw

    faded = Image.blend(thumb.convert("RGB"), Image.new("RGB", thumb.size, (255, 255, 255)), 0.6)
    draw = ImageDraw.Draw(faded)
    lines = ("wins no pixel:", f"on every '{class_name}' pixel", "another of its class's", "prototypes is closer")
    for i, text in enumerate(lines):
        draw.text((8, 8 + 16 * i), text, fill=(0, 0, 0), font=font)
    return faded


def _missing(font):
    """The stand-in for a support image that is not in this cache (banks imported without their images)."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (THUMB, THUMB), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    for i, text in enumerate(("support image", "not in this cache", "(ovdiff synth", "regenerates it)")):
        draw.text((10, 40 + 18 * i), text, fill=(80, 80, 80), font=font)
    return tile


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels long (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _short(text: str, font, width: int) -> str:
    """``text`` cut with '...' in the middle until it fits ``width`` pixels (a long photo name keeps its
    start and its end)."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 4 and font.getlength(text[: keep // 2] + "..." + text[len(text) - keep // 2 :]) > width:
        keep -= 1
    return text[: keep // 2] + "..." + text[len(text) - keep // 2 :]


def _swatch(label: int):
    """A legend entry's sample: a SWATCH x SWATCH white square outlined as label ``label`` is (PIL image)."""
    from PIL import Image

    colours, dashed = _style([label])
    sample = np.full((SWATCH, SWATCH, 3), 255, dtype=np.uint8)
    draw_outlines(sample, np.full((SWATCH, SWATCH), label), OUTLINE_W, colours, dashed=dashed, frame=True)
    return Image.fromarray(sample)


def _legend(
    expl: Explanation, font, x0: int, y0: int, width: int
) -> tuple[list[tuple[int, int, int | None, str]], int]:
    """Lay out the legend of the picture's outlines in the box from (x0, y0), ``width`` wide: a heading, one entry
    per label of the segmentation (an outline sample, then the name) flowing left to right, and a key saying how
    background is drawn and what the rows' outlines mark.

    Returns:
        ([(x, y, label, text)]: a sample of ``label`` at (x, y) followed by its name, or with label None a line of
        text), the y just below the legend.
    """
    names = dict(enumerate(expl.names))
    names.setdefault(expl.label_id, expl.label)
    if expl.runner_up is not None:
        names.setdefault(expl.runner_up[0], expl.runner_up[1])
    shown = sorted({int(i) for i in np.unique(expl.labels)} | {expl.label_id})
    line = max(SWATCH, font.getbbox("Ag")[3]) + 6
    items: list[tuple[int, int, int | None, str]] = [(x0, y0, None, "outline colours:")]
    x, y = x0, y0 + line
    for label in shown:
        name = names.get(label, f"label {label}")
        entry = SWATCH + 6 + int(np.ceil(font.getlength(name)))
        if x > x0 and x + entry > x0 + width:
            x, y = x0, y + line
        items.append((x, y, label, name))
        x += entry + 16
    key = ["solid: a class's regions" + ("; dashed: background's" if 0 in shown else "")]
    if expl.prototypes:
        rows = f"rows: a prototype's pixels (left) and support regions (crops), outlined as '{expl.label}'"
        if expl.label_id == 0:
            rows += "; a background prototype's crops outline the support image's background (outside the masks)"
        key.append(rows)
    y += line
    for text in key:
        for part in _wrap(text, font, width):
            items.append((x0, y, None, part))
            y += font.getbbox("Ag")[3] + 4
    return items, y


def render(
    expl: Explanation,
    image: np.ndarray,
    load_support: Callable[[str], np.ndarray | None],
    title: str = "",
    max_crops: int = D.EXPLAIN_CROPS,
):
    """The explanation as one picture.

    Header: the query image with the segmentation's outlines and the pixel marked, the label, score and
    runner-up, and a legend of the outlines (each label's outline sample and name; solid for a class, dashed for
    background). Then one row per prototype: its region map on the query image, a caption (class, kind, fg/bg,
    similarities), and crops of up to ``max_crops`` support images around the region it was pooled from,
    highlighted. Every outline has a contrasting halo or dashes (see :func:`outputs.draw_outlines`), so it shows
    on dark and light pictures alike. The picture is HEADER_H (more when the legend needs it) + ROW_H x (number
    of prototypes) pixels high.

    Args:
        expl: from :func:`explain`.
        image: (H, W, 3) uint8, the query image.
        load_support: support cache key -> (S, S, 3) uint8 support image, or None if it is not cached.
        title: an extra header line (e.g. the file and model set).

    Returns:
        A PIL RGB image.
    """
    from PIL import Image, ImageDraw

    big, small = load_font(15), load_font(12)
    query = Image.fromarray(image)
    head = _fit(query, (2 * 320, 320))
    lab = np.array(Image.fromarray(expl.labels.astype(np.int32)).resize(head.size, Image.NEAREST))
    # Each region outlined as in the legend (a class solid in its colour, background dashed), so a region's
    # colour names its label.
    colours, dashed = _style([int(lab.max())])
    head = Image.fromarray(draw_outlines(np.array(head.convert("RGB")), lab, OUTLINE_W, colours, dashed=dashed))

    rows = []
    for rank, ev in enumerate(expl.prototypes, start=1):
        thumb = _fit(query, (2 * THUMB, THUMB))
        if ev.wins.any():
            wins = np.array(Image.fromarray(ev.wins).resize(thumb.size, Image.NEAREST))
            region_map = Image.fromarray(_highlight(np.array(thumb.convert("RGB")), wins, expl.label_id))
        else:  # not an all-dimmed picture: say it
            region_map = _no_wins(thumb, small, ev.class_name)
        crops = []
        for r in ev.support[:max_crops]:
            support = load_support(r.key)
            crops.append((r, _crop(support, r, expl.label_id) if support is not None else _missing(small)))
        rows.append((rank, ev, region_map, crops))

    # The caption starts right after the region map (every map has the query's aspect ratio): no empty gap.
    map_w = max((m.width for _, _, m, _ in rows), default=0)
    width = max([head.width + 16 + 2 * TEXT_W] + [map_w + TEXT_W + 24 + len(c) * (THUMB + 8) for _, _, _, c in rows])
    text_x = head.width + 24
    lines = [f"pixel ({expl.pixel[0]}, {expl.pixel[1]})", f"label: {expl.label} (score {expl.score:.3f})"]
    if expl.runner_up is not None:
        lines.append(f"runner-up: {expl.runner_up[1]} (score {expl.runner_up[2]:.3f})")
    lines += [f"classes considered: {', '.join(expl.kept)}", title]
    lines = [part for text in lines if text for part in _wrap(text, big, width - text_x - 8)]
    legend, legend_end = _legend(expl, small, text_x, 16 + 22 * len(lines) + 10, width - text_x - 8)
    header_h = max(HEADER_H, legend_end + 12)

    canvas = Image.new("RGB", (width, header_h + ROW_H * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    canvas.paste(head, (8, 8))
    sx, sy = head.width / image.shape[1], head.height / image.shape[0]
    px, py = 8 + (expl.pixel[0] + 0.5) * sx, 8 + (expl.pixel[1] + 0.5) * sy
    for r, c in ((7, (0, 0, 0)), (5, (255, 230, 0))):
        draw.ellipse([px - r, py - r, px + r, py + r], outline=c, width=2)
    draw.line([px - 12, py, px - 6, py], fill=(255, 230, 0), width=2)
    draw.line([px + 6, py, px + 12, py], fill=(255, 230, 0), width=2)
    for i, text in enumerate(lines):
        draw.text((text_x, 16 + 22 * i), text, fill=(0, 0, 0), font=big)
    for x, y, label, text in legend:
        if label is not None:
            canvas.paste(_swatch(label), (x, y))
            x += SWATCH + 6
        draw.text((x, y + 2 if label is not None else y), text, fill=(0, 0, 0), font=small)

    for rank, ev, region_map, crops in rows:
        top = header_h + ROW_H * (rank - 1)
        draw.line([0, top - 4, width, top - 4], fill=(210, 210, 210))
        canvas.paste(region_map, (8, top))
        instance = ev.support[0].label if ev.kind == "instance" and ev.support else f"support image {ev.image}"
        source = {"instance": instance, "part": f"part cluster {ev.part}"}.get(ev.kind, "all masks")
        caption = [
            f"#{rank} {ev.extractor}: {ev.kind} prototype ({ev.region}) of '{ev.class_name}'",
            f"{source}, pooled from {support_text(ev.support)}",
            f"similarity {ev.similarity:.3f} ({ev.extractor} features)",
            f"wins {count_noun(int(ev.wins.sum()), 'pixel')} of the query (left)",
        ]
        x0 = 16 + map_w
        for i, text in enumerate(caption):
            draw.text((x0, top + 18 * i), text, fill=(0, 0, 0), font=small)
        x = x0 + TEXT_W
        for region, crop in crops:
            fitted = _fit(crop, (THUMB, THUMB))
            canvas.paste(fitted, (x, top))
            draw.text(
                (x, top + THUMB + 4),
                _short(f"{region.label}: {count_noun(region.cells, 'cell')}", small, THUMB),
                fill=(0, 0, 0),
                font=small,
            )
            x += THUMB + 8
    return canvas
