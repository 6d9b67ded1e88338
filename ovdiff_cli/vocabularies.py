"""Built-in knowledge about class names: which are "stuff" (paper 3.4), in two tables.

* ``paper`` (the default): the authors' list (REFERENCE 8). Everything not in it is a thing, including building,
  tree, sea, earth, field, sand and river. Benchmark numbers are made with this table.
* ``extended``: ovdiff's broader list for everyday vocabularies: it also calls the amorphous regions of COCO-Stuff,
  ADE20K and Cityscapes stuff (trees, buildings, sea, sand, ...), spelled raw or readable. Where a benchmark calls
  an everyday object stuff (COCO-Stuff's "house", "light", "food"), it keeps the everyday reading: a thing.

Users override either per class with ``--stuff`` or a ``stuff``/``thing`` column in a classes file.
"""

from __future__ import annotations

PAPER = "paper"
EXTENDED = "extended"
STUFF_TABLES = (PAPER, EXTENDED)

_PAPER_STUFF = """
background, bedclothes, ceiling, cloth, curtain, fence, floor, grass, ground, mountain, platform, road, rock,
sidewalk, sky, snow, track, wall, water, wood, step, trade name, lake, blanket, tray, glass
"""

# Comma-separated names, grouped by what they are; matched through stuff_key (so "sky-other" = "sky other").
_EXTENDED_STUFF = """
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


def _table(text: str) -> frozenset[str]:
    return frozenset(stuff_key(n) for n in text.replace("\n", ",").split(",") if n.strip())


STUFF_CLASSES: dict[str, frozenset[str]] = {PAPER: _table(_PAPER_STUFF), EXTENDED: _table(_EXTENDED_STUFF)}


def is_stuff(name: str, table: str = PAPER) -> bool:
    """Whether stuff table ``table`` calls ``name`` a stuff class (``"Sky"`` and ``"sky"`` both are).

    Raises ValueError for an unknown table, naming the accepted ones.
    """
    if table not in STUFF_CLASSES:
        raise ValueError(f"--stuff-table {table!r}: expected one of {', '.join(STUFF_TABLES)}")
    return stuff_key(name) in STUFF_CLASSES[table]
