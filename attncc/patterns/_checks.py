"""Argument checks shared by the catalogue's constructors."""


def count(what: str, value, minimum: int = 0) -> int:
    """`value` as an int >= minimum (bools refused), else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative" if minimum == 0 else f"an int >= {minimum}, not"
        raise ValueError(f"{what} must be {kind} int, got {value!r}")
    return value
