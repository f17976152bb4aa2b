"""A procedural, seeded fashion shop: catalog shots, street photos and varied descriptions.

    shop = make_synthetic_shop(num_items=200, image_size=32, seed=0)    # Catalog, ~1 s on 1 core
    train = shop.split("train")
    query, gallery = shop.query_gallery()          # street photos -> catalog shots of test items

An *item* is one distinct attribute combination: a category (t-shirt, dress, trousers, skirt,
coat, sneaker, boot, heel, handbag, backpack), a colour, a pattern (solid, stripes, dots,
checks) and category attributes (sleeve length, neckline, hem length, fit, shaft height,
heel height, strap, handle, pocket ...). Each item gets

- one description built from its attributes with varied phrasing (templates, synonyms,
  word order, optional extra words), so similar items have similar, never identical texts,
  e.g. "Red striped short-sleeve t-shirt with a crew neck." / "Crew-neck tee in red stripes,
  short sleeves." Descriptions never contain the item id;
- ``catalog_per_item`` catalog renderings: light plain background, centred, small jitter;
- ``street_per_item`` street renderings: cluttered background (gradient, random shapes,
  noise), perspective warp, scale, rotation, lighting and colour shift, partial occlusion.

Garments are drawn with ``PIL.ImageDraw`` at 2x resolution (for images up to 64 px) and
downsampled, so edges are anti-aliased. Every image depends only on ``(seed, item, domain,
view)``; the same seed always gives identical arrays.

Splits are by item (disjoint): ``assign_splits`` with ``splits`` fractions; all rows of a
test item are in split ``"test"`` (street rows = query, catalog rows = gallery). Items of
``unseen_categories`` all go to test (unseen-class protocol); the other items are split by
``splits``, so the test share grows accordingly.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from atl_keras.data.catalog import Catalog, assign_splits

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "PATTERNS",
    "add_variant_listings",
    "contact_sheet",
    "describe_item",
    "design_ids",
    "make_synthetic_shop",
    "render_item",
]

Point = tuple[float, float]

# ------------------------------------------------------------------------------ vocabulary
# name -> (RGB, synonyms used in descriptions)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((200, 30, 40), ("red", "bright red", "cherry red")),
    "orange": ((240, 130, 25), ("orange", "tangerine")),
    "yellow": ((240, 205, 40), ("yellow", "mustard yellow", "sunny yellow")),
    "green": ((40, 140, 60), ("green", "forest green", "leaf green")),
    "blue": ((40, 90, 210), ("blue", "royal blue", "cobalt blue")),
    "navy": ((25, 35, 90), ("navy", "navy blue", "dark blue")),
    "purple": ((120, 50, 150), ("purple", "violet", "plum")),
    "pink": ((240, 135, 175), ("pink", "rose pink", "pale pink")),
    "brown": ((120, 75, 40), ("brown", "chocolate brown", "tan brown")),
    "beige": ((215, 195, 150), ("beige", "sand", "camel")),
    "grey": ((128, 128, 128), ("grey", "heather grey", "slate grey")),
    "black": ((28, 28, 30), ("black", "jet black")),
    "white": ((246, 246, 246), ("white", "off-white", "ivory")),
}

# name -> (adjective forms, "in ..." noun forms); solid has empty forms: the colour alone says it.
PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "solid": (("", "solid", "plain"), ("",)),
    "stripes": (("striped", "stripe-print", "pinstriped"), ("stripes", "a striped print")),
    "dots": (("polka-dot", "dotted", "spotted"), ("polka dots", "a dotted print")),
    "checks": (("checked", "plaid", "check-print"), ("checks", "a plaid print")),
}


@dataclass(frozen=True)
class _Value:
    """One attribute value: adjective phrases and/or 'with ...' phrases (at least one)."""

    adj: tuple[str, ...] = ()
    with_: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Category:
    nouns: tuple[str, ...]
    group: str  # "clothing" / "shoes" / "bags": chooses the optional extra sentence
    attributes: dict[str, dict[str, _Value]]


V = _Value
CATEGORIES: dict[str, _Category] = {
    "t-shirt": _Category(
        ("t-shirt", "tee", "T-shirt", "jersey top"),
        "clothing",
        {
            "sleeve": {
                "short": V(("short-sleeve", "short-sleeved"), ("short sleeves",)),
                "long": V(("long-sleeve", "long-sleeved"), ("long sleeves",)),
                "none": V(("sleeveless",), ("no sleeves",)),
            },
            "neckline": {
                "crew": V(("crew-neck", "round-neck"), ("a crew neck", "a round neckline")),
                "v": V(("v-neck",), ("a v-neck", "a v-shaped neckline")),
            },
        },
    ),
    "dress": _Category(
        ("dress", "frock", "day dress"),
        "clothing",
        {
            "length": {
                "mini": V(("mini", "short"), ("a mini-length skirt",)),
                "knee": V(("knee-length", "midi"), ("a knee-length hem",)),
                "maxi": V(("maxi", "floor-length", "long"), ("a floor-length hem",)),
            },
            "sleeve": {
                "none": V(("sleeveless", "strappy"), ("thin straps", "no sleeves")),
                "short": V(("short-sleeve", "cap-sleeve"), ("short sleeves", "cap sleeves")),
            },
        },
    ),
    "trousers": _Category(
        ("trousers", "pants", "slacks"),
        "clothing",
        {
            "length": {
                "full": V(("full-length", "long"), ("a full-length leg",)),
                "shorts": V(("short", "above-knee"), ("a short leg", "shorts-length legs")),
            },
            "fit": {
                "slim": V(("slim-fit", "skinny", "tapered"), ("a slim fit", "tapered legs")),
                "wide": V(("wide-leg", "flared", "loose-fit"), ("wide legs", "a relaxed wide fit")),
            },
        },
    ),
    "skirt": _Category(
        ("skirt",),
        "clothing",
        {
            "length": {
                "mini": V(("mini", "short"), ("a short hem",)),
                "midi": V(("midi", "knee-length"), ("a midi hem",)),
                "maxi": V(("maxi", "ankle-length"), ("a long hem",)),
            },
            "shape": {
                "a-line": V(("a-line", "flared", "skater"), ("a flared shape",)),
                "pencil": V(("pencil", "straight", "fitted"), ("a straight pencil cut",)),
            },
        },
    ),
    "coat": _Category(
        ("coat", "overcoat", "jacket"),
        "clothing",
        {
            "length": {
                "short": V(("cropped", "hip-length"), ("a short cut",)),
                "long": V(("long", "knee-length", "full-length"), ("a long cut",)),
            },
            "collar": {
                "lapel": V(("notch-lapel", "tailored"), ("wide lapels", "a notched collar")),
                "hood": V(("hooded",), ("a hood", "an attached hood")),
            },
        },
    ),
    "sneaker": _Category(
        ("sneakers", "trainers", "running shoes"),
        "shoes",
        {
            "top": {
                "low": V(("low-top", "low-cut"), ("a low ankle",)),
                "high": V(("high-top", "hi-top"), ("a high ankle collar",)),
            },
            "sole": {
                "white": V(("white-soled",), ("a white sole", "a white rubber sole")),
                "dark": V(("dark-soled",), ("a black sole", "a dark rubber sole")),
            },
        },
    ),
    "boot": _Category(
        ("boots", "booties"),
        "shoes",
        {
            "shaft": {
                "ankle": V(("ankle", "short"), ("an ankle-height shaft",)),
                "knee": V(("knee-high", "tall"), ("a knee-high shaft", "a tall shaft")),
            },
            "heel": {
                "flat": V(("flat",), ("a flat sole", "no heel")),
                "block": V(("block-heel", "heeled"), ("a block heel", "a chunky heel")),
            },
        },
    ),
    "heel": _Category(
        ("heels", "pumps", "court shoes"),
        "shoes",
        {
            "height": {
                "low": V(("low-heel", "kitten-heel"), ("a low heel", "a kitten heel")),
                "mid": V(("mid-heel",), ("a mid heel", "a medium heel")),
                "high": V(("high-heel", "stiletto"), ("a high heel", "a stiletto heel")),
            },
            "strap": {
                "none": V(("closed", "slip-on"), ("a closed upper",)),
                "ankle": V(("ankle-strap", "strappy"), ("an ankle strap", "thin straps")),
            },
        },
    ),
    "handbag": _Category(
        ("handbag", "purse", "tote bag"),
        "bags",
        {
            "handle": {
                "top": V(("top-handle",), ("a short top handle", "a grab handle")),
                "shoulder": V(("shoulder",), ("a long shoulder strap", "a shoulder strap")),
            },
            "closure": {
                "flap": V(("flap",), ("a fold-over flap", "a front flap")),
                "zip": V(("zip-top", "zippered"), ("a zip top", "a zip closure")),
            },
        },
    ),
    "backpack": _Category(
        ("backpack", "rucksack", "daypack"),
        "bags",
        {
            "pocket": {
                "front": V(("pocketed",), ("a front pocket", "a zip front pocket")),
                "none": V(("minimalist", "clean-front"), ("a clean front", "no front pocket")),
            },
            "size": {
                "mini": V(("mini", "small"), ("a compact size",)),
                "large": V(("large", "roomy"), ("plenty of room", "a large capacity")),
            },
        },
    ),
}

_EXTRAS = {
    "clothing": ("Everyday casual wear.", "Soft and comfortable.", "A wardrobe essential.", "Easy to style."),
    "shoes": ("Comfortable all day.", "A versatile pair.", "Easy to wear.", "Cushioned insole."),
    "bags": ("Roomy and practical.", "Goes with everything.", "Sturdy everyday carry.", "Lined inside."),
}


# ---------------------------------------------------------------------------- descriptions
def describe_item(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """One description of an item (``{"category", "colour", "pattern", <attrs>}``), phrasing drawn from ``rng``."""
    category = CATEGORIES[attributes["category"]]
    colour = str(rng.choice(COLOURS[attributes["colour"]][1]))
    pattern_adj_forms, pattern_noun_forms = PATTERNS[attributes["pattern"]]
    noun = str(rng.choice(category.nouns))
    adjs: list[str] = []
    withs: list[str] = []
    for name, values in category.attributes.items():
        value = values[attributes[name]]
        use_adj = bool(value.adj) and (not value.with_ or rng.random() < 0.5)
        (adjs if use_adj else withs).append(str(rng.choice(value.adj if use_adj else value.with_)))
    order = rng.permutation(len(withs))
    withs = [withs[i] for i in order]
    template = int(rng.integers(3))
    if template == 0:  # "Red striped short-sleeve t-shirt with a crew neck."
        pattern = str(rng.choice(pattern_adj_forms))
        words = [colour, pattern, *adjs, noun]
        text = " ".join(w for w in words if w)
        if withs:
            text += " with " + " and ".join(withs)
    elif template == 1:  # "Crew-neck tee in red stripes, short sleeves."
        pattern = str(rng.choice(pattern_noun_forms))
        text = " ".join([*adjs, noun]) + " in " + (f"{colour} {pattern}" if pattern else colour)
        if pattern.startswith("a "):
            text = " ".join([*adjs, noun]) + f" in {colour} with {pattern}"
        if withs:
            text += ", " + ", ".join(withs)
    else:  # "T-shirt: red, striped, short sleeves, crew neck."
        pattern = str(rng.choice([p for p in pattern_adj_forms if p] or [""]))
        parts = [colour] + ([pattern] if pattern else []) + adjs + [w.removeprefix("a ").removeprefix("an ") for w in withs]
        text = f"{noun}: " + ", ".join(parts)
    text = text.strip() + "."
    if rng.random() < 0.5:
        text += " " + str(rng.choice(_EXTRAS[category.group]))
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------ rendering
# A shape is a list of ops in normalised [0, 1]^2 coordinates (y down):
#   ("poly", points, fill)   ("ellipse", (x0, y0, x1, y1), fill)   ("arc", box, width)  fill: 1 add, 0 cut
# Details ("line" / "dot") are drawn on top in the outline colour.


def _sym(points: Sequence[Point]) -> list[Point]:
    """Mirror points across x = 0.5 (build the right half of a symmetric garment)."""
    return [(1.0 - x, y) for x, y in points]


def _shape_top(sleeve: str, neckline: str, bottom: float) -> list[tuple]:
    ops: list[tuple] = [("poly", [(0.3, 0.22), (0.7, 0.22), (0.7, bottom), (0.3, bottom)], 1)]
    if sleeve == "short":
        half = [(0.3, 0.22), (0.14, 0.38), (0.21, 0.46), (0.3, 0.38)]
    elif sleeve == "long":
        half = [(0.3, 0.22), (0.12, 0.72), (0.21, 0.75), (0.3, 0.42)]
    else:
        half = []
        ops = [("poly", [(0.36, 0.18), (0.64, 0.18), (0.7, 0.3), (0.7, bottom), (0.3, bottom), (0.3, 0.3)], 1)]
    if half:
        ops += [("poly", half, 1), ("poly", _sym(half), 1)]
    if neckline == "crew":
        ops.append(("ellipse", (0.42, 0.15, 0.58, 0.29), 0))
    elif neckline == "v":
        ops.append(("poly", [(0.41, 0.17), (0.59, 0.17), (0.5, 0.38)], 0))
    elif neckline == "hood":
        ops.append(("ellipse", (0.37, 0.04, 0.63, 0.3), 1))
    elif neckline == "lapel":
        ops.append(("poly", [(0.43, 0.2), (0.57, 0.2), (0.5, 0.45)], 0))
    return ops


def _shape(attrs: dict[str, str]) -> tuple[list[tuple], list[tuple]]:
    """Mask ops and detail ops of an item (see the comment above)."""
    c = attrs["category"]
    details: list[tuple] = []
    if c == "t-shirt":
        ops = _shape_top(attrs["sleeve"], attrs["neckline"], 0.84)
    elif c == "coat":
        bottom = 0.68 if attrs["length"] == "short" else 0.93
        ops = _shape_top("long", attrs["collar"], bottom)
        details += [("line", [(0.5, 0.4 if attrs["collar"] == "lapel" else 0.3), (0.5, bottom)])]
        details += [("dot", (0.46, y)) for y in np.linspace(0.48, bottom - 0.06, 3)]
        if attrs["collar"] == "lapel":
            details += [("line", [(0.43, 0.2), (0.47, 0.36)]), ("line", [(0.57, 0.2), (0.53, 0.36)])]
    elif c == "dress":
        hem = {"mini": 0.6, "knee": 0.76, "maxi": 0.93}[attrs["length"]]
        flare = {"mini": 0.2, "knee": 0.24, "maxi": 0.28}[attrs["length"]]
        ops = [
            ("poly", [(0.38, 0.18), (0.62, 0.18), (0.61, 0.42), (0.39, 0.42)], 1),
            ("poly", [(0.39, 0.42), (0.61, 0.42), (0.5 + flare, hem), (0.5 - flare, hem)], 1),
            ("ellipse", (0.44, 0.12, 0.56, 0.24), 0),
        ]
        if attrs["sleeve"] == "short":
            half = [(0.38, 0.18), (0.28, 0.3), (0.34, 0.35), (0.39, 0.28)]
            ops[2:2] = [("poly", half, 1), ("poly", _sym(half), 1)]
        else:
            ops += [("poly", [(0.39, 0.1), (0.42, 0.1), (0.42, 0.2), (0.39, 0.2)], 1),
                    ("poly", _sym([(0.39, 0.1), (0.42, 0.1), (0.42, 0.2), (0.39, 0.2)]), 1)]
        details.append(("line", [(0.39, 0.42), (0.61, 0.42)]))
    elif c == "trousers":
        hem = 0.92 if attrs["length"] == "full" else 0.5
        crotch = 0.36 if attrs["length"] == "full" else 0.3
        outer, inner = (0.33, 0.47) if attrs["fit"] == "slim" else (0.2, 0.45)
        if attrs["length"] == "shorts":
            outer, inner = (0.28, 0.48) if attrs["fit"] == "slim" else (0.2, 0.47)
        left = [(0.3, 0.12), (0.5, 0.12), (0.5, crotch), (inner, hem), (outer, hem)]
        ops = [("poly", left, 1), ("poly", _sym(left), 1),
               ("poly", [(0.3, 0.08), (0.7, 0.08), (0.7, 0.15), (0.3, 0.15)], 1)]
        details += [("line", [(0.3, 0.15), (0.7, 0.15)]), ("line", [(0.5, 0.15), (0.5, crotch)])]
    elif c == "skirt":
        hem = {"mini": 0.5, "midi": 0.72, "maxi": 0.92}[attrs["length"]]
        half = 0.3 if attrs["shape"] == "a-line" else 0.17
        ops = [("poly", [(0.34, 0.16), (0.66, 0.16), (0.5 + half, hem), (0.5 - half, hem)], 1)]
        details.append(("line", [(0.34, 0.22), (0.66, 0.22)]))
    elif c == "sneaker":
        top = 0.48 if attrs["top"] == "low" else 0.22
        ops = [("poly", [(0.1, 0.72), (0.14, 0.58), (0.4, 0.5), (0.55, top), (0.8, top), (0.86, 0.5), (0.88, 0.72)], 1)]
        details += [("sole", [(0.08, 0.7), (0.9, 0.7), (0.9, 0.8), (0.08, 0.8)], attrs["sole"])]
        details += [("line", [(0.42 + 0.05 * i, 0.5 - 0.03 * i), (0.47 + 0.05 * i, 0.56 - 0.03 * i)]) for i in range(3)]
    elif c == "boot":
        top = 0.38 if attrs["shaft"] == "ankle" else 0.06
        sole = 0.78 if attrs["heel"] == "flat" else 0.7
        ops = [("poly", [(0.12, sole), (0.16, 0.6), (0.45, 0.52), (0.52, top), (0.8, top), (0.8, sole)], 1)]
        details.append(("sole", [(0.1, sole), (0.82, sole), (0.82, sole + 0.05), (0.1, sole + 0.05)], "dark"))
        if attrs["heel"] == "block":
            details.append(("sole", [(0.66, sole), (0.8, sole), (0.79, 0.86), (0.67, 0.86)], "dark"))
    elif c == "heel":
        lift = {"low": 0.08, "mid": 0.18, "high": 0.3}[attrs["height"]]
        heel_y = 0.8 - lift  # the sole rises from the toe (0.1, 0.8) to the heel seat (0.84, heel_y)
        mid_y = 0.8 - 0.55 * lift
        toe = [(0.08, 0.8), (0.1, 0.71), (0.3, 0.66 - 0.2 * lift), (0.42, mid_y - 0.06), (0.42, mid_y + 0.02)]
        counter = [(0.66, heel_y - 0.02), (0.7, heel_y - 0.2), (0.86, heel_y - 0.22), (0.86, heel_y)]
        if attrs["strap"] == "none":  # closed pump: one upper from toe to heel with a low topline
            ops = [("poly", toe[:4] + [(0.55, heel_y - 0.1 + 0.03), (0.7, heel_y - 0.2), (0.86, heel_y - 0.22), (0.86, heel_y), (0.5, mid_y + 0.01)], 1)]
        else:  # open sandal: toe strap + heel counter + ankle strap
            ops = [("poly", toe, 1), ("poly", counter, 1),
                   ("poly", [(0.62, heel_y - 0.24), (0.9, heel_y - 0.24), (0.9, heel_y - 0.19), (0.62, heel_y - 0.19)], 1)]
        details += [("sole", [(0.08, 0.8), (0.42, mid_y + 0.02), (0.86, heel_y), (0.86, heel_y + 0.03), (0.42, mid_y + 0.05), (0.08, 0.83)], "dark"),
                    ("sole", [(0.8, heel_y), (0.86, heel_y), (0.85, 0.86), (0.83, 0.86)], "dark")]
    elif c == "handbag":
        ops = [("poly", [(0.22, 0.45), (0.78, 0.45), (0.84, 0.86), (0.16, 0.86)], 1)]
        if attrs["handle"] == "top":
            ops.append(("arc", (0.34, 0.26, 0.66, 0.62), 0.05))
        else:
            ops.append(("arc", (0.2, 0.06, 0.8, 0.84), 0.035))
        if attrs["closure"] == "flap":
            details += [("line", [(0.22, 0.45), (0.5, 0.64), (0.78, 0.45)]), ("dot", (0.5, 0.64))]
        else:
            details += [("line", [(0.24, 0.5), (0.76, 0.5)]), ("dot", (0.7, 0.54))]
    elif c == "backpack":
        s = 0.8 if attrs["size"] == "mini" else 1.0
        x0, x1, y0, y1 = 0.5 - 0.24 * s, 0.5 + 0.24 * s, 0.9 - 0.7 * s, 0.9
        ops = [("ellipse", (x0, y0, x1, y0 + 0.3 * s), 1), ("poly", [(x0, y0 + 0.15 * s), (x1, y0 + 0.15 * s), (x1, y1), (x0, y1)], 1),
               ("arc", (0.43, y0 - 0.08, 0.57, y0 + 0.06), 0.03)]
        if attrs["pocket"] == "front":
            details += [("rect", [(x0 + 0.07, y1 - 0.3 * s), (x1 - 0.07, y1 - 0.3 * s), (x1 - 0.07, y1 - 0.06), (x0 + 0.07, y1 - 0.06)])]
        details.append(("line", [(x0 + 0.02, y0 + 0.2 * s), (x1 - 0.02, y0 + 0.2 * s)]))
    else:  # pragma: no cover - CATEGORIES and _shape are kept in sync by the tests
        raise ValueError(f"No drawing for category {c!r}.")
    return ops, details


@functools.lru_cache(maxsize=64)
def _pattern_mask(name: str, size: int) -> np.ndarray:
    """bool ``[size, size]``: where the pattern's second colour goes."""
    period = max(4, size // 8)
    yy, xx = np.mgrid[0:size, 0:size]
    if name == "stripes":
        on = (yy % period) < period // 2
    elif name == "checks":
        on = ((yy // (period // 2 + 1)) + (xx // (period // 2 + 1))) % 2 == 0
    elif name == "dots":
        cy, cx = (yy % period) - period / 2 + 0.5, (xx % period) - period / 2 + 0.5
        on = cy**2 + cx**2 <= (period * 0.28) ** 2
    else:
        raise ValueError(f"Unknown pattern {name!r}; use one of {list(PATTERNS)}.")
    on.setflags(write=False)
    return on


def _pattern(name: str, colour: np.ndarray, size: int) -> np.ndarray:
    """float32 ``[size, size, 3]`` fill: the base colour with stripes, dots or checks."""
    base = np.broadcast_to(colour.astype(np.float32), (size, size, 3)).copy()
    if name == "solid":
        return base
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    second = np.array((250, 250, 250) if luminance < 140 else (30, 30, 45), np.float32)
    on = _pattern_mask(name, size)
    base[on] = 0.35 * base[on] + 0.65 * second if name == "checks" else second
    return base


def _garment_layer(attrs: dict[str, str], size: int) -> Image.Image:
    """RGBA image ``size x size`` of the item filling the canvas (alpha is 0 or 255)."""
    ops, details = _shape(attrs)
    scale = float(size)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for op in ops:
        kind = op[0]
        if kind == "poly":
            draw.polygon([(x * scale, y * scale) for x, y in op[1]], fill=255 * op[2])
        elif kind == "ellipse":
            draw.ellipse([v * scale for v in op[1]], fill=255 * op[2])
        elif kind == "arc":
            draw.arc([v * scale for v in op[1]], 180, 360, fill=255, width=max(1, round(op[2] * scale)))
    colour = np.array(COLOURS[attrs["colour"]][0], np.float32)
    rgb = _pattern(attrs["pattern"], colour, size)
    dilated = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), np.float32) / 255.0
    inside = np.asarray(mask, np.float32) / 255.0
    outline_colour = colour * 0.45 if colour.mean() > 60 else np.array((110, 110, 120), np.float32)
    rgb = rgb * inside[..., None] + outline_colour * (dilated - inside)[..., None]
    # Details: seams, buttons, soles, handles, drawn on an RGB image over the fill.
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    alpha = Image.fromarray((dilated * 255).astype(np.uint8))
    draw_rgb, draw_alpha = ImageDraw.Draw(image), ImageDraw.Draw(alpha)
    line_colour = tuple(int(v) for v in outline_colour)
    width = max(1, size // 40)
    for op in details:
        kind = op[0]
        if kind == "line":
            draw_rgb.line([(x * scale, y * scale) for x, y in op[1]], fill=line_colour, width=width)
        elif kind == "dot":
            x, y = op[1]
            r = max(1.0, size / 60)
            draw_rgb.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=line_colour)
        elif kind in ("sole", "rect"):
            points = [(x * scale, y * scale) for x, y in op[1]]
            fill = line_colour if kind == "rect" else ((236, 236, 236) if op[2] == "white" else (35, 35, 35))
            draw_rgb.polygon(points, fill=None if kind == "rect" else fill, outline=line_colour, width=width)
            draw_alpha.polygon(points, fill=255)
    image.putalpha(alpha)
    return image


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst [4, 2]`` to input ``src [4, 2]``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, np.float64), src.reshape(-1).astype(np.float64)).tolist()


def _warp(layer: Image.Image, rng: np.random.Generator, scale: float, angle: float, shift: float, persp: float) -> Image.Image:
    """Scale / rotate / shift / perspective-jitter an RGBA layer about the canvas centre."""
    size = layer.size[0]
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    centred = corners - size / 2
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = centred @ rotation.T * scale + size / 2 + rng.uniform(-shift, shift, size=2) * size
    dst += rng.uniform(-persp, persp, size=(4, 2)) * size
    # Pillow premultiplies RGBA around a bilinear transform, so edges do not darken.
    return layer.transform((size, size), Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, corners), Image.Resampling.BILINEAR)


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.round(values), 0, 255))  # type: ignore[return-value]


def _catalog_view(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light plain background, item centred with a small jitter."""
    size = layer.size[0]
    image = Image.new("RGB", (size, size), _rgb(rng.uniform(236, 255) + rng.uniform(-4, 4, size=3)))
    warped = _warp(layer, rng, scale=rng.uniform(0.9, 1.0), angle=rng.uniform(-3, 3), shift=0.03, persp=0.0)
    image.paste(warped, (0, 0), warped)
    return image


def _street_background(size: int, rng: np.random.Generator) -> Image.Image:
    """A colour gradient with 3-7 random rectangles and ellipses."""
    a, b = rng.uniform(30, 230, size=(2, 3))
    ramp = Image.linear_gradient("L").resize((size, size))
    if rng.random() < 0.5:
        ramp = ramp.transpose(Image.Transpose.ROTATE_90)
    image = Image.composite(Image.new("RGB", (size, size), _rgb(b)), Image.new("RGB", (size, size), _rgb(a)), ramp)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x0, y0, x0 + w, y0 + h], fill=_rgb(rng.uniform(0, 255, size=3)))
    return image


def _street_view(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cluttered background, stronger warp, partial occlusion (lighting and noise come later)."""
    size = layer.size[0]
    image = _street_background(size, rng)
    warped = _warp(layer, rng, scale=rng.uniform(0.62, 0.92), angle=rng.uniform(-25, 25), shift=0.12, persp=0.07)
    image.paste(warped, (0, 0), warped)
    if rng.random() < 0.6:  # an object in front hides part of the item, entering from one edge
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = [(cx, 0.1 * size), (0.9 * size, cy), (cx, 0.9 * size), (0.1 * size, cy)][int(rng.integers(4))]
        ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=_rgb(rng.uniform(20, 235, size=3)))
    return image


def render_item(attributes: dict[str, str], image_size: int, domain: str, rng: np.random.Generator) -> np.ndarray:
    """One rendering uint8 ``[image_size, image_size, 3]`` of an item in ``"catalog"`` or ``"street"`` style."""
    layer = _garment_layer(attributes, image_size * _supersample(image_size))
    return _render_view(layer, image_size, domain, rng)


def _supersample(image_size: int) -> int:
    return 2 if image_size <= 64 else 1


def _render_view(layer: Image.Image, image_size: int, domain: str, rng: np.random.Generator) -> np.ndarray:
    if domain == "catalog":
        image = _catalog_view(layer, rng)
    elif domain == "street":
        image = _street_view(layer, rng)
    else:
        raise ValueError(f"domain must be 'catalog' or 'street', got {domain!r}.")
    if image.size[0] != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BOX)
    if domain == "catalog":
        return np.asarray(image, np.uint8)
    # Street lighting: global gain, white-balance shift, offset, then sensor noise.
    gain = (rng.uniform(0.7, 1.15) * rng.uniform(0.9, 1.1, size=3)).astype(np.float32)
    pixels = np.asarray(image, np.float32) * gain + np.float32(rng.uniform(-20, 20))
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ the shop
def _all_items(categories: Sequence[str]) -> dict[str, list[dict[str, str]]]:
    """Every attribute combination of each category (times colours and patterns)."""
    out: dict[str, list[dict[str, str]]] = {}
    for name in categories:
        attributes = CATEGORIES[name].attributes
        keys = list(attributes)
        combos = itertools.product(*(attributes[k] for k in keys), COLOURS, PATTERNS)
        out[name] = [
            {"category": name, "colour": combo[-2], "pattern": combo[-1], **dict(zip(keys, combo[:-2]))}
            for combo in combos
        ]
    return out


def _sample_items(num_items: int, categories: Sequence[str], rng: np.random.Generator) -> list[dict[str, str]]:
    """``num_items`` distinct items, categories as balanced as their sizes allow."""
    pools = _all_items(categories)
    total = sum(len(p) for p in pools.values())
    if num_items > total:
        raise ValueError(f"num_items={num_items} exceeds the {total} distinct items of categories {list(categories)}.")
    orders = {name: rng.permutation(len(pool)) for name, pool in pools.items()}
    taken = {name: 0 for name in pools}
    items: list[dict[str, str]] = []
    while len(items) < num_items:
        for name in categories:
            if len(items) == num_items:
                break
            if taken[name] < len(pools[name]):
                items.append(pools[name][orders[name][taken[name]]])
                taken[name] += 1
    return items


def add_variant_listings(
    items: Sequence[dict[str, str]], fraction: float, max_listings: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    """Turn distinct designs into a catalog where some designs are listed several times.

    Walks `items` in order; each design becomes a *variant design* with probability
    `fraction` and then takes 2..`max_listings` listings (uniform), which replace the next
    items of the list, so the number of listings stays ``len(items)``. Each extra listing is,
    with equal probability, a ``"relisting"`` (the same attributes: the same product under a
    new id, its description a fresh paraphrase) or a ``"colour variant"`` (another colour, a
    combination not otherwise in the catalog). Item-id supervision calls these listings
    negatives of each other; their descriptions say they are (nearly) the same product.

    Returns:
        ``len(items)`` attribute dicts, each with ``"design"`` (``"design_00000"``...) and
        ``"listing"``; listings of one design are adjacent.
    """
    items = [dict(a) for a in items]
    taken = {tuple(sorted(a.items())) for a in items}
    out: list[dict[str, str]] = []
    source = iter(items)
    design = 0
    while len(out) < len(items):
        base = next(source)
        tag = f"design_{design:05d}"
        design += 1
        out.append({**base, "design": tag, "listing": "original"})
        if rng.random() >= fraction:
            continue
        for _ in range(int(rng.integers(2, max_listings + 1)) - 1):
            if len(out) == len(items):
                break
            next(source)  # this listing replaces the next sampled design
            variant = dict(base)
            kind = "relisting"
            if rng.random() < 0.5:
                free = [c for c in COLOURS if tuple(sorted({**base, "colour": c}.items())) not in taken]
                if free:
                    variant["colour"] = str(rng.choice(free))
                    taken.add(tuple(sorted(variant.items())))
                    kind = "colour variant"
            out.append({**variant, "design": tag, "listing": kind})
    return out


def design_ids(catalog: Catalog) -> np.ndarray:
    """``[M]`` int64 design group of each item: listings of one design share it (see
    `add_variant_listings`); without variant listings every item is its own design."""
    attributes = catalog.item_attributes or [{} for _ in catalog.item_ids]
    names = [str(a.get("design", f"item:{i}")) for i, a in enumerate(attributes)]
    first: dict[str, int] = {}
    return np.array([first.setdefault(n, len(first)) for n in names], np.int64)  # order of first listing


def make_synthetic_shop(
    num_items: int = 200,
    catalog_per_item: int = 3,
    street_per_item: int = 3,
    image_size: int = 32,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.1, 0.3),
    unseen_categories: Sequence[str] = (),
    categories: Sequence[str] | None = None,
    variant_fraction: float = 0.0,
    max_listings: int = 3,
) -> Catalog:
    """Build a seeded synthetic shop (see the module docstring).

    Args:
        num_items: distinct items (attribute combinations), spread evenly over categories.
        catalog_per_item, street_per_item: renderings per item in each domain (>= 0, sum >= 1).
        image_size: square output size in pixels (>= 16).
        seed: int; the same arguments give identical catalogs.
        splits: train / val / test fractions over items (summing to 1).
        unseen_categories: categories whose items all go to test (never trained on).
        categories: categories to draw from (default: all of `CATEGORIES`).
        variant_fraction: share of *designs* listed 2..`max_listings` times under different
            item ids (the weak-label testbed, see `add_variant_listings`); 0 (default) gives
            the classic shop, one listing per design, bit-identical to earlier versions.
        max_listings: most listings of one variant design (>= 2).
    Returns:
        `Catalog` with ``images`` uint8 ``[N, S, S, 3]``, ``N = num_items * (catalog_per_item +
        street_per_item)``, rows grouped by item (catalog views first), item ids
        ``"item_00000"``..., domains ``"catalog"`` / ``"street"``, splits ``"train"`` / ``"val"``
        / ``"test"``, and ``item_attributes`` (category, colour, pattern, ... per item; with
        variants also ``"design"``, shared by the listings of one design, and ``"listing"``:
        ``"original"``, ``"relisting"`` or ``"colour variant"``). All listings of a design are
        in the same split.
    """
    categories = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in [*categories, *unseen_categories] if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"Unknown categories {unknown}; choose from {list(CATEGORIES)}.")
    if not categories:
        raise ValueError("categories must not be empty.")
    if set(unseen_categories) - set(categories):
        raise ValueError(f"unseen_categories {list(unseen_categories)} must be among categories {categories}.")
    if set(unseen_categories) >= set(categories):
        raise ValueError("unseen_categories cannot cover every category: nothing would be left to train on.")
    if num_items < 1 or catalog_per_item < 0 or street_per_item < 0 or catalog_per_item + street_per_item < 1:
        raise ValueError(
            f"Need num_items >= 1 and at least one rendering per item, got num_items={num_items}, "
            f"catalog_per_item={catalog_per_item}, street_per_item={street_per_item}."
        )
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}.")
    if not 0.0 <= variant_fraction <= 1.0:
        raise ValueError(f"variant_fraction must be in [0, 1], got {variant_fraction}.")
    if max_listings < 2:
        raise ValueError(f"max_listings must be >= 2, got {max_listings}.")

    rng = np.random.default_rng(seed)
    items = _sample_items(num_items, categories, rng)
    if variant_fraction > 0:  # own generator: the classic shop's draws stay unchanged
        items = add_variant_listings(items, variant_fraction, max_listings, np.random.default_rng([seed, 7]))
    item_ids = [f"item_{i:05d}" for i in range(num_items)]
    descriptions: list[str] = []
    seen: set[str] = set()
    for attrs in items:
        for _ in range(100):  # distinct items give distinct texts by construction; guard anyway
            text = describe_item(attrs, rng)
            if text not in seen:
                break
        seen.add(text)
        descriptions.append(text)

    unseen = set(unseen_categories)
    if variant_fraction > 0:  # split by design: a design's listings never straddle splits
        designs = sorted({a["design"] for a in items if a["category"] not in unseen})
        by_design = assign_splits(designs, splits, seed=seed)
        assignment = {i: by_design.get(a["design"], "test") for i, a in zip(item_ids, items)}
    else:
        seen_ids = [i for i, attrs in zip(item_ids, items) if attrs["category"] not in unseen]
        assignment = assign_splits(seen_ids, splits, seed=seed)
        assignment.update({i: "test" for i, attrs in zip(item_ids, items) if attrs["category"] in unseen})

    views = [("catalog", k) for k in range(catalog_per_item)] + [("street", k) for k in range(street_per_item)]
    n = num_items * len(views)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.repeat(np.arange(num_items, dtype=np.int64), len(views))
    domains = np.array([d for _ in range(num_items) for d, _ in views])
    row = 0
    canvas = image_size * _supersample(image_size)
    for index, attrs in enumerate(items):
        layer = _garment_layer(attrs, canvas)  # shared by the item's views
        for domain, k in views:
            view_rng = np.random.default_rng([seed, index, 0 if domain == "catalog" else 1, k])
            images[row] = _render_view(layer, image_size, domain, view_rng)
            row += 1
    return Catalog(
        item_ids=item_ids,
        descriptions=list(descriptions),
        labels=labels,
        domains=domains,
        splits=np.array([assignment[item_ids[i]] for i in labels]),
        images=images,
        image_paths=None,
        item_attributes=[dict(a) for a in items],
    )


def contact_sheet(catalog: Catalog, items: Sequence[int], scale: int = 3) -> np.ndarray:
    """uint8 image grid: one row per item index in ``items``, its renderings left to right (catalog first)."""
    if catalog.images is None:
        raise ValueError("contact_sheet needs a catalog with images in memory (see Catalog.with_images).")
    rows = []
    for item in items:
        views = catalog.images[catalog.labels == item]
        if len(views) == 0:
            raise ValueError(f"Item index {item} has no rows in this catalog.")
        rows.append(np.concatenate(list(views), axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(rows, axis=0)
    return np.kron(grid, np.ones((scale, scale, 1), np.uint8))
