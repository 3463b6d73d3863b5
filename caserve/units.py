"""Sizes written for people (``"8GiB"``, ``"512MB"``) as byte counts; shared by the GPU server and the
cluster config, so that neither imports the other (nor torch) to read one."""

from __future__ import annotations


def parse_size(text: str | int | None) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1024"`` -> bytes; ``0``/empty means unlimited."""
    if text is None or text == "":
        return 0
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):].strip()
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r}; use e.g. 8GiB, 512MB or a byte count")
    return int(float(num) * units[unit])
