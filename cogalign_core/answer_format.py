"""The one prompt and answer format, shared by annotation rendering, SFT, rewards and evaluation.

An answer is a fixed sequence of tags, one per clinical-cognition level, each holding exactly one
taxonomy term, optionally followed by a lesion box::

    <location>colon, segment unknown</location>
    <morphology>single small lesion</morphology>
    <microvascular>not assessable</microvascular>
    <diagnosis>polyp</diagnosis>
    <box>412,300,655,571</box>

Box coordinate frame: integers in [0, 1000] on the model's square input canvas (see
:mod:`cogalign_core.canvas`), ``x1,y1,x2,y2`` with (0, 0) the canvas's top-left corner and
x to the right; the literal ``none`` means "no lesion". This is Qwen3-VL's relative grounding frame.

The parser is tolerant of whitespace and case, strict on tag order and count: it reports
problems instead of guessing, and rewards/metrics decide what a problem costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cogalign_core import taxonomy

TAGS: tuple[str, ...] = taxonomy.LEVELS
BOX_TAG = "box"
NO_BOX = "none"
BOX_SCALE = 1000

SYSTEM_PROMPT = (
    "You are an endoscopist. Reason about the image in clinical order: first the anatomical "
    "location, then the morphology of any lesion, then its microvascular pattern, then the "
    "diagnosis. Answer with one term per tag: <location>, <morphology>, <microvascular>, "
    "<diagnosis>."
)
GROUNDING_SUFFIX = " Then give the lesion box as <box>x1,y1,x2,y2</box> on a 0-1000 scale, or <box>none</box>."
QUESTION = "What does this endoscopy image show?"

_TAG_RE = re.compile(r"<(/?)([a-z]+)>", re.IGNORECASE)
_BOX_RE = re.compile(r"^\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*$")


def system_prompt(grounding: bool = False) -> str:
    """System prompt text; with ``grounding`` it also asks for the lesion box."""
    return SYSTEM_PROMPT + (GROUNDING_SUFFIX if grounding else "")


def prompt_messages(grounding: bool = False) -> list[dict[str, object]]:
    """Chat messages (TRL/transformers conversational format) with one image placeholder."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt(grounding)}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
    ]


def render_answer(labels: dict[str, str], box: tuple[int, int, int, int] | None = None,
                  grounding: bool = False) -> str:
    """Render the gold answer for one sample deterministically.

    Args:
        labels: one taxonomy term per level in :data:`TAGS`.
        box: lesion box in the 0-1000 canvas frame, or ``None`` for no lesion.
        grounding: append a ``<box>`` tag.
    """
    lines = []
    for tag in TAGS:
        term = taxonomy.normalise_term(labels[tag])
        if not taxonomy.is_term(tag, term):
            raise ValueError(f"{term!r} is not a {tag} term of taxonomy {taxonomy.TAXONOMY_VERSION}")
        lines.append(f"<{tag}>{term}</{tag}>")
    if grounding:
        lines.append(f"<{BOX_TAG}>{NO_BOX if box is None else ','.join(str(int(v)) for v in box)}</{BOX_TAG}>")
    return "\n".join(lines)


@dataclass
class ParsedAnswer:
    """Result of :func:`parse_answer`.

    ``fields`` holds each tag's normalised content for tags that occurred exactly once;
    ``problems`` lists machine-readable problems (``missing:<tag>``, ``duplicate:<tag>``,
    ``order``, ``outside_text``, ``empty:<tag>``, ``unknown_term:<tag>``, ``unclosed``,
    ``unknown_tag:<name>``, ``bad_box``).
    """

    fields: dict[str, str] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None
    box_given: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """True when the answer is in the exact format with one known term per level."""
        return not self.problems and all(t in self.fields for t in TAGS)

    def term(self, level: str) -> str | None:
        """The level's term when it is a single known vocabulary term, else ``None``."""
        value = self.fields.get(level)
        if value is None or not taxonomy.is_term(level, value):
            return None
        return value


def parse_answer(text: str, grounding: bool = False) -> ParsedAnswer:
    """Parse a completion into level terms, reporting every format problem found."""
    out = ParsedAnswer()
    expected = list(TAGS) + ([BOX_TAG] if grounding else [])
    seen: list[str] = []
    pos = 0
    open_tag: str | None = None
    open_end = 0
    outside: list[str] = []
    for m in _TAG_RE.finditer(text):
        closing, name = m.group(1) == "/", m.group(2).lower()
        if name not in expected:
            out.problems.append(f"unknown_tag:{name}")
            continue
        if not closing:
            if open_tag is not None:
                out.problems.append("unclosed")
            outside.append(text[pos:m.start()])
            open_tag, open_end = name, m.end()
            continue
        if open_tag != name:
            out.problems.append("unclosed")
            open_tag = None
            pos = m.end()
            continue
        content = " ".join(text[open_end:m.start()].split())
        seen.append(name)
        if name in out.fields or (name == BOX_TAG and out.box_given):
            out.problems.append(f"duplicate:{name}")
        elif name == BOX_TAG:
            out.box_given = True
            _parse_box(content, out)
        else:
            term = taxonomy.normalise_term(content)
            if not term:
                out.problems.append(f"empty:{name}")
            elif not taxonomy.is_term(name, term):
                out.problems.append(f"unknown_term:{name}")
            out.fields[name] = term
        open_tag = None
        pos = m.end()
    if open_tag is not None:
        out.problems.append("unclosed")
    outside.append(text[pos:] if open_tag is None else "")
    if any(s.strip() for s in outside):
        out.problems.append("outside_text")
    for tag in expected:
        if tag not in seen:
            out.problems.append(f"missing:{tag}")
    first_seen = list(dict.fromkeys(seen))
    if first_seen != [t for t in expected if t in first_seen]:
        out.problems.append("order")
    return out


def _parse_box(content: str, out: ParsedAnswer) -> None:
    if content.lower() == NO_BOX:
        out.box = None
        return
    m = _BOX_RE.match(content)
    if not m:
        out.problems.append("bad_box")
        return
    x1, y1, x2, y2 = (int(g) for g in m.groups())
    if not (0 <= x1 < x2 <= BOX_SCALE and 0 <= y1 < y2 <= BOX_SCALE):
        out.problems.append("bad_box")
        return
    out.box = (x1, y1, x2, y2)
