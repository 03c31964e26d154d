"""Request text as the HTTP API accepts it: Unicode, refused by name when it is not.

JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer or UTF-8 encoder takes;
every string a request carries into a prompt is typed :data:`Text`, so such a string is a 400
naming its field instead of a failure deep in the tokenizer.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(value: str) -> str:
    # JSON decoding joins a valid surrogate pair into one character: any surrogate left is a lone one.
    found = _SURROGATE.search(value)
    if found is not None:
        raise ValueError(f"holds a lone UTF-16 surrogate ({found.group()!r} at character {found.start()}), which is "
                         "not text; send valid Unicode (a \\ud800-\\udbff escape must be followed by a "
                         "\\udc00-\\udfff one)")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""A string of Unicode text: refused with a 400 if it holds a lone surrogate."""
