"""Control characters in text from outside (APSIS, a data subject): refuse or escape them.

A control character (Unicode categories Cc, Cf, Zl, Zp) in a key or an APSIS message is never
meaningful, and on a terminal it can do harm: an ESC sequence can clear the screen, set the
window title or print a fake line; a right-to-left override hides what was typed.
"""

from __future__ import annotations

import unicodedata

#: Unicode categories refused in keys and callback messages.
CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: Also escaped on a terminal: a lone surrogate cannot even be encoded to print it.
_TERMINAL_CATEGORIES = CONTROL_CATEGORIES | {"Cs"}


def has_control(text: str) -> bool:
    """Whether ``text`` contains a control character."""
    if text.isascii():
        # In ASCII the control characters (all Cc) are exactly the unprintable ones: one C
        # call instead of a category lookup per character (a download URL is ~150).
        return not text.isprintable()
    return any(unicodedata.category(ch) in CONTROL_CATEGORIES for ch in text)


def for_terminal(text: object) -> str:
    """``text`` safe to print: each control character shown as a visible escape (``\\x1b``,
    ``\\n``, ``\\u202e``); everything else unchanged."""
    value = str(text)
    if value.isascii() and value.isprintable():
        return value
    return "".join(
        ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        if unicodedata.category(ch) in _TERMINAL_CATEGORIES
        else ch
        for ch in value
    )
