"""The registry layout's file names and the rules for registry names and tags."""

from __future__ import annotations

import re

from quantmill import constants as C
from quantmill.errors import PublishRefused

ENTRY, CARD, PROVENANCE, SIGNATURE, LINEAGE, TAGS = (C.REGISTRY_ENTRY_FILE, C.MODEL_CARD_FILE, "provenance.json",
                                                     "provenance.sig.json", "lineage.json", "tags.json")
REPORT = C.REPORT_PAGE_FILE
CATALOGUE = "index.html"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise PublishRefused(f"registry name {name!r} is invalid; use letters, digits, '.', '_' and '-' "
                             f"(no path separators or '..')")
    return name
