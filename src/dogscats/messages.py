"""One-line messages: many things named by the first few and how many more; an error by
its first line.

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


def first_line(error: BaseException) -> str:
    """An error's own first line (libraries' messages run to pages), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
