"""How a one-line message names many things: the first few, then how many more.

A message that listed every one of 3,000 misnamed files would be 40,000 characters on one
line; the full list belongs in a report file (report.csv) or a listing the user can make.
"""

from __future__ import annotations

from collections.abc import Iterable

SHOWN = 5  # names a message shows before "and N more"


def some_names(names: Iterable[str], shown: int = SHOWN) -> str:
    """'a, b, c, d, e and 2,995 more' (all of them when there are at most `shown`)."""
    names = list(names)
    text = ", ".join(names[:shown])
    rest = len(names) - shown
    return f"{text} and {rest:,} more" if rest > 0 else text
