"""Label schemas of the public retinal datasets kfundus reads.

One place for every label vocabulary, so that readers, the synthetic generator, metrics
and exported model bundles all spell the labels the same way.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# ODIR-5K: 8 patient-level labels, decided from both eyes.
ODIR_LABELS = ["N", "D", "G", "C", "A", "H", "M", "O"]
# The official ODIR-5K annotation table's columns (what the reader reads and the synthetic
# generator writes).
ODIR_COLUMNS = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *ODIR_LABELS,
]
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

# Per-eye diagnostic keywords of ODIR-5K -> label: the 94 distinct keywords of the training
# annotation as Kaggle's per-image table ``full_df.csv`` has it (3,358 of the 3,500 patients).
# The table was derived from that file and checked against its label columns: mapping each
# eye's keywords with it and taking the patient union (``odir_patient_labels``) reproduces
# the graders' N..O of all 3,358 patients. Keywords that say nothing about disease (image
# quality, lens dust, ...) map to None: the organisers ignore them when they derive the
# patient-level labels. A keyword that is not in this table (a typo, another vocabulary) is
# *not* taken for an "other" finding silently: see ``UNKNOWN_KEYWORDS``.
ODIR_KEYWORDS: dict[str, str | None] = {
    # N: normal
    "normal fundus": "N",
    # D: diabetic retinopathy, every grade
    "diabetic retinopathy": "D",
    "mild nonproliferative retinopathy": "D",
    "moderate non proliferative retinopathy": "D",
    "proliferative diabetic retinopathy": "D",
    "severe nonproliferative retinopathy": "D",
    "severe proliferative diabetic retinopathy": "D",
    "suspected diabetic retinopathy": "D",
    "suspected moderate non proliferative retinopathy": "D",
    "suspicious diabetic retinopathy": "D",
    # G: glaucoma
    "glaucoma": "G",
    "suspected glaucoma": "G",
    # C: cataract
    "cataract": "C",
    "suspected cataract": "C",
    # A: age-related macular degeneration
    "age-related macular degeneration": "A",
    "dry age-related macular degeneration": "A",
    "wet age-related macular degeneration": "A",
    # H: hypertensive retinopathy
    "hypertensive retinopathy": "H",
    # M: pathological myopia
    "myopia retinopathy": "M",
    "myopic maculopathy": "M",
    "pathological myopia": "M",
    # O: other diseases and abnormalities
    "abnormal pigment": "O",
    "arteriosclerosis": "O",
    "atrophic change": "O",
    "atrophy": "O",
    "branch retinal artery occlusion": "O",
    "branch retinal vein occlusion": "O",
    "central retinal artery occlusion": "O",
    "central retinal vein occlusion": "O",
    "central serous chorioretinopathy": "O",
    "chorioretinal atrophy": "O",
    "chorioretinal atrophy with pigmentation proliferation": "O",
    "choroidal nevus": "O",
    "congenital choroidal coloboma": "O",
    "depigmentation of the retinal pigment epithelium": "O",
    "diffuse chorioretinal atrophy": "O",
    "diffuse retinal atrophy": "O",
    "drusen": "O",
    "epiretinal membrane": "O",
    "epiretinal membrane over the macula": "O",
    "fundus laser photocoagulation spots": "O",
    "glial remnants anterior to the optic disc": "O",
    "idiopathic choroidal neovascularization": "O",
    "intraretinal hemorrhage": "O",
    "intraretinal microvascular abnormality": "O",
    "laser spot": "O",
    "macular coloboma": "O",
    "macular epiretinal membrane": "O",
    "macular hole": "O",
    "macular pigmentation disorder": "O",
    "maculopathy": "O",
    "morning glory syndrome": "O",
    "myelinated nerve fibers": "O",
    "old branch retinal vein occlusion": "O",
    "old central retinal vein occlusion": "O",
    "old chorioretinopathy": "O",
    "old choroiditis": "O",
    "optic disc edema": "O",
    "optic discitis": "O",
    "optic disk epiretinal membrane": "O",
    "optic nerve atrophy": "O",
    "oval yellow-white atrophy": "O",
    "peripapillary atrophy": "O",
    "pigment epithelium proliferation": "O",
    "pigmentation disorder": "O",
    "post laser photocoagulation": "O",
    "post retinal laser surgery": "O",
    "refractive media opacity": "O",
    "retina fold": "O",
    "retinal detachment": "O",
    "retinal pigment epithelial hypertrophy": "O",
    "retinal pigment epithelium atrophy": "O",
    "retinal pigmentation": "O",
    "retinal vascular sheathing": "O",
    "retinitis pigmentosa": "O",
    "retinochoroidal coloboma": "O",
    "silicone oil eye": "O",
    "spotted membranous change": "O",
    "suspected abnormal color of optic disc": "O",
    "suspected macular epimacular membrane": "O",
    "suspected microvascular anomalies": "O",
    "suspected retinal vascular sheathing": "O",
    "tessellated fundus": "O",
    "vessel tortuosity": "O",
    "vitreous degeneration": "O",
    "vitreous opacity": "O",
    "wedge white line change": "O",
    "white vessel": "O",
    # non-diagnostic: image quality and acquisition remarks (no label)
    "anterior segment image": None,
    "image offset": None,
    "lens dust": None,
    "low image quality": None,
    "no fundus image": None,
    "optic disk photographically invisible": None,
}

# What an unrecognised ODIR keyword becomes (``data.options.unknown_keywords``): ``error``
# (the default: the reader stops and lists every one with its rows), ``other`` (the O
# label, ODIR's own rule for findings outside the seven named classes) or ``ignore`` (no
# label from that keyword).
UNKNOWN_KEYWORDS = ("error", "other", "ignore")

# Keyword separators: the comma, the full-width comma of the official annotation (``，``),
# the ideographic comma (``、``) and semicolons (``;``, ``；``).
_KEYWORD_SEPARATORS = re.compile(r"[,，、;；]")


def _compact(keyword: str) -> str:
    """A keyword without case, spaces, hyphens or punctuation: "non-proliferative" and
    "non proliferative" (both spellings occur in ODIR) look up the same entry."""
    return re.sub(r"[^0-9a-z]", "", keyword.lower())


_BY_COMPACT = {_compact(k): v for k, v in ODIR_KEYWORDS.items()}


def split_keywords(text: str) -> list[str]:
    """Split an ODIR keyword cell into normalised keywords (lower case, single spaces).

    Separators: ``,``, the full-width ``，`` of the official annotation, ``、``, ``;`` and ``；``.
    """
    if text is None:
        return []
    text = str(text)
    if text.lower() == "nan":
        return []
    return [" ".join(k.strip().lower().split()) for k in _KEYWORD_SEPARATORS.split(text) if k.strip()]


def is_odir_keyword(keyword: str) -> bool:
    """Whether ``keyword`` is in :data:`ODIR_KEYWORDS` (ignoring case, spaces and hyphens)."""
    return _compact(keyword) in _BY_COMPACT


def odir_keyword_label(keyword: str, unknown: str = "error") -> str | None:
    """The ODIR label a single keyword stands for (None for non-diagnostic remarks).

    Args:
        keyword: one keyword ("glaucoma"); case, spacing and hyphens do not matter.
        unknown: what a keyword outside :data:`ODIR_KEYWORDS` gives: ``"error"`` raises,
            ``"other"`` gives ``"O"``, ``"ignore"`` gives None.

    Raises:
        DataError: for an unknown keyword when ``unknown="error"``.
    """
    if unknown not in UNKNOWN_KEYWORDS:
        raise ValueError(f"unknown={unknown!r}: use one of {UNKNOWN_KEYWORDS}")
    key = _compact(keyword)
    if key in _BY_COMPACT:
        return _BY_COMPACT[key]
    if unknown == "error":
        from kfundus.errors import DataError

        raise DataError(
            f"{keyword!r} is not an ODIR-5K diagnostic keyword; map unknown keywords to the O label "
            "with --set data.options.unknown_keywords=other (or =ignore for no label)"
        )
    return "O" if unknown == "other" else None


def odir_keywords_to_labels(text: str, unknown: str = "error") -> dict[str, int]:
    """Per-eye multi-hot ODIR labels from one eye's diagnostic keywords.

    ``N`` is set only when the eye has no disease finding: "normal fundus" next to a
    disease keyword (it happens) counts as the disease. An eye whose keywords are all
    non-diagnostic ("lens dust", "low image quality") gets no label at all. ``unknown``:
    as in :func:`odir_keyword_label`.
    """
    found = {odir_keyword_label(k, unknown) for k in split_keywords(text)} - {None}
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
