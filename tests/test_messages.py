"""messages: a few names and how many more, and an error's first line, for one-line messages."""

from __future__ import annotations

from dogscats.messages import first_line, some_names


def test_a_long_list_is_five_names_and_a_count():
    names = [f"{i}.png" for i in range(3000)]
    assert some_names(names) == "0.png, 1.png, 2.png, 3.png, 4.png and 2,995 more"
    assert some_names(iter(names), shown=2) == "0.png, 1.png and 2,998 more"


def test_a_short_list_is_shown_whole():
    assert some_names(["a.jpg", "b.jpg"]) == "a.jpg, b.jpg"
    assert some_names([f"{i}" for i in range(5)]) == "0, 1, 2, 3, 4"
    assert some_names([]) == ""


def test_an_error_is_named_by_its_first_line_else_its_type():
    assert first_line(ValueError("bad row 3\nTraceback details\n...")) == "bad row 3"
    assert first_line(OSError("\ndisk full\nmore")) == "disk full"
    assert first_line(KeyError()) == "KeyError"
