"""Argument checks shared by the catalogue's constructors."""
import numbers


def count(what: str, value, minimum: int = 0) -> int:
    """`value` as an int >= minimum (numpy ints taken, bools refused), else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative" if minimum == 0 else f"an int >= {minimum}, not"
        raise ValueError(f"{what} must be {kind} int, got {value!r}")
    return int(value)


def integer(what: str, value) -> int:
    """`value` as an int of any sign (numpy ints taken, bools refused), else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return int(value)


def flag(what: str, value) -> bool:
    """`value` if it is a bool, else a ValueError naming `what` (never read by truthiness)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value
