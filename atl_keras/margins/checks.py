"""Argument checks of the weak-label margin (plain Python, shared by every loss and source).

Each returns the validated value(s) or raises a `ValueError` that says what was wrong and
what to pass instead.
"""

from __future__ import annotations

from atl_keras.distances import max_distance

__all__ = [
    "validate_adaptive_margins",
    "validate_margin",
    "validate_margin_range",
    "validate_missing_text_margin",
    "validate_semantic_threshold",
]


def validate_margin(value: float, name: str = "margin") -> float:
    """A margin: a finite number ``>= 0`` (bools, NaN and inf are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.") from None
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0; got {value}. Use a non-negative margin.")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite; got {value}. Use a finite non-negative margin.")
    return value


def validate_margin_range(min_margin: float, max_margin: float) -> tuple[float, float]:
    """``0 <= min_margin <= max_margin``, both finite."""
    min_margin = validate_margin(min_margin, "min_margin")
    max_margin = validate_margin(max_margin, "max_margin")
    if min_margin > max_margin:
        raise ValueError(
            f"min_margin ({min_margin}) must be <= max_margin ({max_margin}); "
            "swap them, or set them equal for the plain triplet loss."
        )
    return min_margin, max_margin


def validate_semantic_threshold(semantic_threshold: float | None, distance: str) -> float | None:
    """None, or tau in ``[0, max_distance(distance)]`` (the range of unit text distances)."""
    if semantic_threshold is None:
        return None
    d_max = max_distance(distance)
    try:
        semantic_threshold = float(semantic_threshold)
    except (TypeError, ValueError):
        raise ValueError(
            f"semantic_threshold must be None or a number; got {semantic_threshold!r}."
        ) from None
    if not 0.0 <= semantic_threshold <= d_max:
        raise ValueError(
            f"semantic_threshold={semantic_threshold} is outside [0, {d_max}], the "
            f"range of the {distance!r} distance between unit text embeddings. "
            "Pass None to disable semantic masking."
        )
    return semantic_threshold


def validate_adaptive_margins(
    min_margin: float, max_margin: float, distance: str, semantic_threshold: float | None
) -> tuple[float, float, float | None]:
    """The margin range and the semantic threshold of an adaptive (text) margin."""
    min_margin, max_margin = validate_margin_range(min_margin, max_margin)
    return min_margin, max_margin, validate_semantic_threshold(semantic_threshold, distance)


def validate_missing_text_margin(
    missing_text_margin: float | None, min_margin: float, max_margin: float
) -> float:
    """``None`` -> ``(min_margin + max_margin) / 2``; else a finite number ``>= 0``."""
    if missing_text_margin is None:
        return (float(min_margin) + float(max_margin)) / 2.0
    if isinstance(missing_text_margin, bool):
        raise ValueError(f"missing_text_margin must be None or a number; got {missing_text_margin!r}.")
    try:
        value = float(missing_text_margin)
    except (TypeError, ValueError):
        raise ValueError(
            f"missing_text_margin must be None or a number; got {missing_text_margin!r}."
        ) from None
    if not 0.0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(
            f"missing_text_margin must lie in [0, inf); got {value}. Pass a finite "
            "non-negative margin, or None for (min_margin + max_margin) / 2."
        )
    return value
