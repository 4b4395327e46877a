"""Pseudonymisation of identifiers that may carry patient information.

Clinical file names often embed names or record numbers, and patient ids are identifiers by
definition, so derived tables keep only a keyed hash (HMAC-SHA256 with the workspace salt).
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath


def salted_hash(value: str, salt: str, length: int = 16) -> str:
    """Keyed hash of ``value``: hex HMAC-SHA256 truncated to ``length`` characters.

    Deterministic for a given salt (so joins and reruns are stable), irreversible without it.
    """
    if not salt:
        raise ValueError("privacy.salt is empty: set it in params.yaml (cogalign init generates one)")
    return hmac.new(salt.encode(), value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


REDACTED_NAME = "<name>"
MIN_STEM_REDACTED = 4  # shorter stems ("1", "12") cannot carry a name and would mangle numbers in the text


def redact_names(text: str, *names: str | None) -> str:
    """``text`` with every given file name removed: the path, its base name and (4+ characters) its stem.

    Detail messages are built from library errors that quote the file they failed on; the tables they
    land in leave the patient-data zone, so the names must not.
    """
    variants: set[str] = set()
    for name in names:
        if not name:
            continue
        base = posixpath.basename(name)
        stem = posixpath.splitext(base)[0]
        variants |= {name, base} | ({stem} if len(stem) >= MIN_STEM_REDACTED else set())
    for v in sorted(variants, key=len, reverse=True):
        text = text.replace(v, REDACTED_NAME)
    return text
