"""Versioned four-level clinical-cognition vocabulary and source-label mappings.

Levels follow how an endoscopist reasons: anatomical location -> morphology -> microvascular
pattern -> diagnosis. Every answer tag holds exactly one term of its level's vocabulary.

Morphology is honest about what the data supports: Paris classes (0-Ip ... 0-III) only when a
clinician gives them; otherwise a mask-derived description (lesion count and relative size),
never invented millimetres or Paris classes. White-light datasets carry no microvascular
information, so their microvascular level is ``not assessable``.
"""

from __future__ import annotations

from dataclasses import dataclass

TAXONOMY_VERSION = "1.0.0"

LEVELS: tuple[str, ...] = ("location", "morphology", "microvascular", "diagnosis")

NOT_ASSESSABLE = "not assessable"

LOCATION_TERMS: tuple[str, ...] = (
    # upper GI
    "esophagus",
    "z-line",
    "stomach",
    "pylorus",
    "duodenum",
    # lower GI
    "terminal ileum",
    "cecum",
    "ascending colon",
    "transverse colon",
    "descending colon",
    "sigmoid colon",
    "rectum",
    "colon, segment unknown",
    "upper gi, site unknown",
    NOT_ASSESSABLE,
)

PARIS_TERMS: tuple[str, ...] = (
    "paris 0-ip",
    "paris 0-isp",
    "paris 0-is",
    "paris 0-iia",
    "paris 0-iib",
    "paris 0-iic",
    "paris 0-iii",
)

# Mask-derived morphology: count and size relative to the frame (area fraction), not millimetres.
NO_LESION = "no lesion"
MASK_MORPHOLOGY_TERMS: tuple[str, ...] = (
    NO_LESION,
    "single small lesion",
    "single medium lesion",
    "single large lesion",
    "multiple lesions",
)
SESSILE_OR_FLAT = "sessile or flat lesion"
MORPHOLOGY_TERMS: tuple[str, ...] = (*MASK_MORPHOLOGY_TERMS, SESSILE_OR_FLAT, *PARIS_TERMS, NOT_ASSESSABLE)

MICROVASCULAR_TERMS: tuple[str, ...] = (
    "nice 1",
    "nice 2",
    "nice 3",
    "jnet 1",
    "jnet 2a",
    "jnet 2b",
    "jnet 3",
    NOT_ASSESSABLE,
)

NORMAL = "normal"
DIAGNOSIS_TERMS: tuple[str, ...] = (
    NORMAL,
    "polyp",
    "dyed lifted polyp",
    "dyed resection margin",
    "esophagitis",
    "barrett's esophagus",
    "ulcerative colitis",
    "hemorrhoids",
    "ulcer",
    "erosion",
    "angiectasia",
    "blood",
    "foreign body",
    "lymphangiectasia",
    "erythema",
    "diverticulum",
    "tumor",
)

VOCABULARY: dict[str, tuple[str, ...]] = {
    "location": LOCATION_TERMS,
    "morphology": MORPHOLOGY_TERMS,
    "microvascular": MICROVASCULAR_TERMS,
    "diagnosis": DIAGNOSIS_TERMS,
}

# Relative-size cut points on the lesion's area fraction of the frame.
SMALL_MAX_FRACTION = 0.05
MEDIUM_MAX_FRACTION = 0.20


def is_term(level: str, term: str) -> bool:
    """True when ``term`` (already normalised) belongs to ``level``'s vocabulary."""
    return term in VOCABULARY[level]


def normalise_term(term: str) -> str:
    """Lower-case and collapse whitespace, the canonical form vocabulary terms use."""
    return " ".join(term.strip().lower().split())


# Short forms an operator may type for a term (`cogalign ingest --location colon`).
TERM_ALIASES: dict[str, dict[str, str]] = {
    "location": {"colon": "colon, segment unknown", "upper gi": "upper gi, site unknown"},
}


def canonical_term(level: str, raw: str) -> str | None:
    """The vocabulary term ``raw`` names at ``level`` (normalised, aliases resolved), or None."""
    term = normalise_term(raw)
    term = TERM_ALIASES.get(level, {}).get(term, term)
    return term if is_term(level, term) else None


def validate_labels(labels: dict[str, str | None]) -> dict[str, str]:
    """Explicit labels given at ingest, checked against the vocabulary (empty values dropped).

    Raises:
        ValueError: an unknown level or term; the message lists the level's terms.
    """
    out: dict[str, str] = {}
    for level, raw in labels.items():
        if raw is None or not str(raw).strip():
            continue
        if level not in VOCABULARY:
            raise ValueError(f"unknown label level {level!r}; levels: {', '.join(LEVELS)}")
        term = canonical_term(level, str(raw))
        if term is None:
            raise ValueError(f"{raw!r} is not a {level} term; terms: {', '.join(VOCABULARY[level])}")
        out[level] = term
    return {level: out[level] for level in LEVELS if level in out}


def is_lesion_diagnosis(diagnosis: str) -> bool:
    """True when the diagnosis implies a visible finding (everything except ``normal``)."""
    return diagnosis != NORMAL


def morphology_from_mask(lesion_count: int, area_fraction: float) -> str:
    """Mask-derived morphology term from connected-component count and lesion area fraction."""
    if lesion_count <= 0 or area_fraction <= 0:
        return NO_LESION
    if lesion_count > 1:
        return "multiple lesions"
    if area_fraction <= SMALL_MAX_FRACTION:
        return "single small lesion"
    if area_fraction <= MEDIUM_MAX_FRACTION:
        return "single medium lesion"
    return "single large lesion"


@dataclass(frozen=True)
class SourceLabel:
    """What a dataset's own label tells us, level by level (``None`` = not given by the source)."""

    location: str | None
    diagnosis: str
    microvascular: str | None = NOT_ASSESSABLE
    morphology: str | None = None


# Dataset-level defaults: every image of these datasets carries this label.
_POLYP_COLONOSCOPY = SourceLabel(location="colon, segment unknown", diagnosis="polyp")

DATASET_LABELS: dict[str, SourceLabel] = {
    "kvasir-seg": _POLYP_COLONOSCOPY,
    "cvc-clinicdb": _POLYP_COLONOSCOPY,
    "kvasir-sessile": SourceLabel(location="colon, segment unknown", diagnosis="polyp",
                                  morphology=SESSILE_OR_FLAT),
}

# Class-folder labels of Kvasir v2 and HyperKvasir (folder name -> label).
CLASS_LABELS: dict[str, SourceLabel] = {
    "normal-cecum": SourceLabel(location="cecum", diagnosis=NORMAL, morphology=NO_LESION),
    "cecum": SourceLabel(location="cecum", diagnosis=NORMAL, morphology=NO_LESION),
    "normal-pylorus": SourceLabel(location="pylorus", diagnosis=NORMAL, morphology=NO_LESION),
    "pylorus": SourceLabel(location="pylorus", diagnosis=NORMAL, morphology=NO_LESION),
    "normal-z-line": SourceLabel(location="z-line", diagnosis=NORMAL, morphology=NO_LESION),
    "z-line": SourceLabel(location="z-line", diagnosis=NORMAL, morphology=NO_LESION),
    "retroflex-rectum": SourceLabel(location="rectum", diagnosis=NORMAL, morphology=NO_LESION),
    "retroflex-stomach": SourceLabel(location="stomach", diagnosis=NORMAL, morphology=NO_LESION),
    "ileum": SourceLabel(location="terminal ileum", diagnosis=NORMAL, morphology=NO_LESION),
    "bbps-0-1": SourceLabel(location="colon, segment unknown", diagnosis=NORMAL, morphology=NOT_ASSESSABLE),
    "bbps-2-3": SourceLabel(location="colon, segment unknown", diagnosis=NORMAL, morphology=NO_LESION),
    "polyps": _POLYP_COLONOSCOPY,
    "polyp": _POLYP_COLONOSCOPY,
    "dyed-lifted-polyps": SourceLabel(location="colon, segment unknown", diagnosis="dyed lifted polyp"),
    "dyed-resection-margins": SourceLabel(location="colon, segment unknown", diagnosis="dyed resection margin"),
    "esophagitis": SourceLabel(location="z-line", diagnosis="esophagitis"),
    "esophagitis-a": SourceLabel(location="z-line", diagnosis="esophagitis"),
    "esophagitis-b-d": SourceLabel(location="z-line", diagnosis="esophagitis"),
    "barretts": SourceLabel(location="z-line", diagnosis="barrett's esophagus"),
    "barretts-short-segment": SourceLabel(location="z-line", diagnosis="barrett's esophagus"),
    "ulcerative-colitis": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-0-1": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-1": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-1-2": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-2": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-2-3": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "ulcerative-colitis-grade-3": SourceLabel(location="colon, segment unknown", diagnosis="ulcerative colitis"),
    "hemorrhoids": SourceLabel(location="rectum", diagnosis="hemorrhoids"),
}


def dataset_from_name(name: str) -> str:
    """Canonical dataset id from a source folder name (``custom`` when unrecognised)."""
    n = name.strip().lower()
    if "kvasir-seg" in n or "kvasir_seg" in n:
        return "kvasir-seg"
    if "clinicdb" in n or "cvc" in n:
        return "cvc-clinicdb"
    if "hyper" in n:
        return "hyperkvasir"
    if "kvasir" in n:
        return "kvasir-v2"
    return "custom"


def label_for(dataset: str, class_label: str | None, sessile: bool | None = None) -> SourceLabel | None:
    """Map a source (dataset, class folder, Kvasir-Sessile flag) to a :class:`SourceLabel`.

    Returns ``None`` when the source carries no usable label (the annotation stage then rejects
    the sample with a reason rather than guessing).
    """
    if class_label:
        key = normalise_term(class_label).replace(" ", "-").replace("_", "-")
        if key in CLASS_LABELS:
            return CLASS_LABELS[key]
        return None
    if dataset == "kvasir-seg" and sessile:
        return DATASET_LABELS["kvasir-sessile"]
    return DATASET_LABELS.get(dataset)
