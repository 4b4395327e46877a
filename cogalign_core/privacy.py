"""Pseudonymisation of identifiers that may carry patient information.

Clinical file names often embed names or record numbers, and patient ids are identifiers by
definition, so derived tables keep only a keyed hash (HMAC-SHA256 with the workspace salt).
"""

from __future__ import annotations

import hashlib
import hmac


def salted_hash(value: str, salt: str, length: int = 16) -> str:
    """Keyed hash of ``value``: hex HMAC-SHA256 truncated to ``length`` characters.

    Deterministic for a given salt (so joins and reruns are stable), irreversible without it.
    """
    if not salt:
        raise ValueError("privacy.salt is empty: set it in params.yaml (cogalign init generates one)")
    return hmac.new(salt.encode(), value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]
