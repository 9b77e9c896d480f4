"""Label schemas of the public retinal datasets kfundus reads.

One place for every label vocabulary, so that readers, the synthetic generator, metrics
and exported model bundles all spell the labels the same way.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# ODIR-5K: 8 patient-level labels, decided from both eyes.
ODIR_LABELS = ["N", "D", "G", "C", "A", "H", "M", "O"]
ODIR_NAMES = {
    "N": "normal",
    "D": "diabetic retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "age-related macular degeneration",
    "H": "hypertensive retinopathy",
    "M": "pathological myopia",
    "O": "other diseases/abnormalities",
}

# Per-eye diagnostic keywords of the official annotation -> label. Keywords that say
# nothing about disease (image quality, lens dust, ...) map to None: the ODIR organisers
# ignore them when they derive the patient-level labels. Every other keyword that is not
# listed here is an "other" (O) finding, as in the official rules.
ODIR_KEYWORDS: dict[str, str | None] = {
    "normal fundus": "N",
    # diabetic retinopathy, every grade
    "mild nonproliferative retinopathy": "D",
    "moderate non proliferative retinopathy": "D",
    "severe nonproliferative retinopathy": "D",
    "proliferative diabetic retinopathy": "D",
    "severe proliferative diabetic retinopathy": "D",
    "diabetic retinopathy": "D",
    "suspected diabetic retinopathy": "D",
    "suspicious diabetic retinopathy": "D",
    "suspected moderate non proliferative retinopathy": "D",
    # glaucoma
    "glaucoma": "G",
    "suspected glaucoma": "G",
    # cataract
    "cataract": "C",
    "suspected cataract": "C",
    # age-related macular degeneration
    "dry age-related macular degeneration": "A",
    "wet age-related macular degeneration": "A",
    "age-related macular degeneration": "A",
    # hypertension
    "hypertensive retinopathy": "H",
    # pathological myopia
    "pathological myopia": "M",
    "myopia retinopathy": "M",
    "myopic maculopathy": "M",
    # non-diagnostic: quality and acquisition remarks
    "lens dust": None,
    "low image quality": None,
    "optic disk photographically invisible": None,
    "image offset": None,
    "anterior segment image": None,
    "no fundus image": None,
}

_KEYWORD_SEPARATORS = re.compile(r"[,，;；]")


def split_keywords(text: str) -> list[str]:
    """Split an ODIR keyword cell into normalised keywords.

    The annotation separates keywords with a comma, sometimes a full-width one (``，``).
    """
    if text is None:
        return []
    text = str(text)
    if text.lower() == "nan":
        return []
    return [k.strip().lower() for k in _KEYWORD_SEPARATORS.split(text) if k.strip()]


def odir_keyword_label(keyword: str) -> str | None:
    """The ODIR label a single keyword stands for (None for non-diagnostic remarks)."""
    keyword = " ".join(keyword.strip().lower().split())
    if keyword in ODIR_KEYWORDS:
        return ODIR_KEYWORDS[keyword]
    return "O"


def odir_keywords_to_labels(text: str) -> dict[str, int]:
    """Per-eye multi-hot ODIR labels from one eye's diagnostic keywords.

    ``N`` is set only when the eye has no disease finding: "normal fundus" next to a
    disease keyword (it happens) counts as the disease. An eye whose keywords are all
    non-diagnostic ("lens dust", "low image quality") gets no label at all.
    """
    found = {odir_keyword_label(k) for k in split_keywords(text)} - {None}
    if len(found) > 1:
        found.discard("N")
    return {label: int(label in found) for label in ODIR_LABELS}


def odir_patient_labels(left: dict[str, int], right: dict[str, int]) -> dict[str, int]:
    """Patient-level labels from the two eyes' labels: a disease in either eye counts,
    ``N`` only when neither eye has one (the official ODIR convention)."""
    out = {k: int(left.get(k, 0) or right.get(k, 0)) for k in ODIR_LABELS if k != "N"}
    out["N"] = int(not any(out.values()) and bool(left.get("N", 0) or right.get("N", 0)))
    return {k: out[k] for k in ODIR_LABELS}


# ---------------------------------------------------------------------------
# RFMiD: Disease_Risk + 45 disease columns. RIADD (the challenge) used Disease_Risk,
# the 27 more frequent diseases, and OTHER pooling the 18 rare ones: 29 columns.
RFMID_46 = [
    "Disease_Risk",
    "DR",
    "ARMD",
    "MH",
    "DN",
    "MYA",
    "BRVO",
    "TSLN",
    "ERM",
    "LS",
    "MS",
    "CSR",
    "ODC",
    "CRVO",
    "TV",
    "AH",
    "ODP",
    "ODE",
    "ST",
    "AION",
    "PT",
    "RT",
    "RS",
    "CRS",
    "EDN",
    "RPEC",
    "MHL",
    "RP",
    "CWS",
    "CB",
    "ODPM",
    "PRH",
    "MNF",
    "HR",
    "CRAO",
    "TD",
    "CME",
    "PTCR",
    "CF",
    "VH",
    "MCA",
    "VS",
    "BRAO",
    "PLQ",
    "HPED",
    "CL",
]
RFMID_RARE = [
    "CWS",
    "CB",
    "ODPM",
    "PRH",
    "MNF",
    "HR",
    "CRAO",
    "TD",
    "CME",
    "PTCR",
    "CF",
    "VH",
    "MCA",
    "VS",
    "BRAO",
    "PLQ",
    "HPED",
    "CL",
]
RIADD_29 = [c for c in RFMID_46 if c not in RFMID_RARE] + ["OTHER"]

# ---------------------------------------------------------------------------
# Diabetic retinopathy grades (International Clinical DR scale), ordinal.
DR_GRADES = ["no_dr", "mild", "moderate", "severe", "proliferative"]

# OCT B-scan classes of Kermany et al. 2018.
OCT_CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]

# Hypertensive retinopathy (CGI-HRDC), binary.
HR_LABELS = ["hypertensive_retinopathy"]
