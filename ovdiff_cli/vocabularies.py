"""Built-in knowledge about class names: which are "stuff" (paper 3.4).

The paper asked ChatGPT to sort each benchmark's classes into things (countable objects) and stuff (amorphous
regions such as sky or water). This table does the same once, for the names of PASCAL Context, COCO-Stuff,
ADE20K and Cityscapes (raw benchmark spellings and their readable forms). Where a benchmark calls an everyday
object stuff (COCO-Stuff's "house", "light", "food"), the table keeps the everyday reading: a thing. Users
override it per class with ``--stuff`` or a ``stuff``/``thing`` column in a classes file.
"""

from __future__ import annotations

# Comma-separated names, grouped by what they are; matched through stuff_key (so "sky-other" = "sky other").
_STUFF = """
sky, sky other, clouds, fog
wall, wall brick, wall concrete, wall other, wall panel, wall stone, wall tile, wall wood, brick wall
floor, floor marble, floor other, floor stone, floor tile, floor wood, ceiling, ceiling other, ceiling tile
ground, ground other, earth, land, terrain, field, playingfield, playing field, dirt, dirt track, mud, sand, gravel
grass, moss, straw, hay, leaves, bush, shrub, vegetation, plant other, tree, trees, palm
road, sidewalk, pavement, path, runway, railroad, track, railway, platform
water, water other, sea, ocean, river, lake, waterfall, waterdrops, snow, ice
mountain, hill, rock, stone, cliff
building, building other, skyscraper, roof, fence, railing, bridge, structural other
wood, metal, plastic, paper, cardboard, cloth, textile other, solid other
carpet, rug, mat, curtain, blanket, bedclothes, towel, napkin, banner, net
food other
"""


def stuff_key(name: str) -> str:
    """Lookup form of a class name: case-folded, ``-`` and ``_`` as spaces, single-spaced."""
    return " ".join(name.replace("-", " ").replace("_", " ").casefold().split())


STUFF_CLASSES: frozenset[str] = frozenset(stuff_key(n) for n in _STUFF.replace("\n", ",").split(",") if n.strip())


def is_stuff(name: str) -> bool:
    """Whether the built-in table calls ``name`` a stuff class (``"sky-other"`` and ``"Sky"`` both are)."""
    return stuff_key(name) in STUFF_CLASSES
