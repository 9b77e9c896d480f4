"""FLAIR zero-shot classification with expert-knowledge prompts.

FLAIR (``FLAIRModel.compute_text_embeddings`` with ``domain_knowledge=True`` and the
``ZeroShot`` adapter of its transferability code) classifies an image without training:

1. each class gets its clinical descriptions (:data:`EXPERT_KNOWLEDGE`, FLAIR's
   ``flair/modeling/dictionary.py``), plus the class name itself when it is not among them;
2. each description is put into the caption ``"A fundus photograph of [CLS]"``;
3. the captions of one class are tokenised together, padded to the longest of them (at most
   77 tokens), encoded, and their unit text embeddings averaged: the class embedding (FLAIR
   does not re-normalise the mean);
4. ``probabilities = softmax(exp(logit_scale) * image_embedding @ class_embeddings^T)``.

kfundus does exactly that. Padding to the longest caption of the class matters because FLAIR's
text feature averages over the padding positions too (``kfundus.systems.flair.model``).

:data:`EXPERT_KNOWLEDGE` is kfundus' transcription of FLAIR's descriptions for the
conditions fundus datasets label (diabetic retinopathy grades, macular edema, glaucoma,
cataract, AMD, hypertensive retinopathy, myopia, and the RFMiD / ODIR "other" findings).
The class names are FLAIR's, lower case; map a dataset's label columns to them with
``zero_shot.labels`` (e.g. ``{glaucoma: G}``), or give your own with ``zero_shot.prompts``.
"""

from __future__ import annotations

import numpy as np

from kfundus.errors import ConfigError

# class -> descriptions (FLAIR, flair/modeling/dictionary.py ``definitions``)
EXPERT_KNOWLEDGE: dict[str, list[str]] = {
    "normal": ["healthy", "no findings", "no lesion signs", "no glaucoma", "no retinopathy"],
    "no diabetic retinopathy": ["no diabetic retinopathy", "no microaneurysms"],
    "mild diabetic retinopathy": ["only few microaneurysms"],
    "moderate diabetic retinopathy": [
        "many exudates near the macula",
        "many haemorrhages near the macula",
        "retinal thickening near the macula",
        "hard exudates",
        "cotton wool spots",
        "few severe haemorrhages",
    ],
    "severe diabetic retinopathy": [
        "venous beading",
        "many severe haemorrhages",
        "intraretinal microvascular abnormality",
    ],
    "proliferative diabetic retinopathy": ["preretinal or vitreous haemorrhage", "neovascularization"],
    "no proliferative diabetic retinopathy": [
        "diabetic retinopathy with no neovascularization",
        "no neovascularization",
    ],
    "diabetic retinopathy": ["diabetic retinopathy"],
    "no referable diabetic macular edema": ["no apparent exudates"],
    "non clinically significant diabetic macular edema": [
        "presence of exudates outside the radius of one disc diameter from the macula center",
        "presence of exudates",
    ],
    "macular edema": ["macular edema"],
    "cystoid macular edema": ["cysts in the macula region"],
    "hard exudates": ["small white or yellowish deposits with sharp margins", "bright lesion"],
    "soft exudates": [
        "pale yellow or white areas with ill-defined edges",
        "cotton-wool spot",
        "small, whitish or grey, cloud-like, linear or serpentine, slightly elevated lesions with fimbriated edges",
    ],
    "exudates": ["small white or yellowish white deposits with sharp margins", "bright lesion"],
    "cotton wool spots": ["cotton wool spots", "soft exudates"],
    "microaneurysms": ["small red dots"],
    "red small dots": ["microaneurysms"],
    "haemorrhages": ["dense, dark red, sharply outlined lesion"],
    "glaucoma": ["optic nerve abnormalities", "abnormal size of the optic cup", "anomalous size in the optic disc"],
    "no glaucoma": ["no glaucoma"],
    "large optic cup": ["abnormality in optic cup"],
    "optic disc cupping": ["optic disc cupping"],
    "increased cup disc": ["increased cup disc"],
    "cataract": ["opacity in the macular area"],
    "no cataract": ["no cataract signs", "no obscure opacities"],
    "age related macular degeneration": [
        "many small drusen",
        "few medium-sized drusen",
        "large drusen",
        "macular degeneration",
    ],
    "macular degeneration": ["macular degeneration"],
    "drusens": ["yellow deposits under the retina", "numerous uniform round yellow-white lesions"],
    "hypertensive retinopathy": [
        "possible signs of haemorraghe with blot, dot, or flame-shaped",
        "possible presence of microaneurysm, cotton-wool spot, or hard exudate",
        "arteriolar narrowing",
        "vascular wall changes",
        "optic disk edema",
    ],
    "no hypertensive retinopathy": ["no presence of hypertensive retinopathy"],
    "mild hypertensive retinopathy": [
        "mild arteriovenous ratio",
        "mild tortuosity",
        "focal arteriolar narrowing",
        "arteriovenous nicking",
    ],
    "moderate hypertensive retinopathy": [
        "moderate arteriovenous ratio",
        "moderate tortuosity",
        "cotton wool spots",
        "flame-shaped haemorrhages",
    ],
    "malignant hypertensive retinopathy": [
        "severe arteriovenous ratio",
        "severe tortuosity",
        "swelling optical disk",
        "flame-shaped haemorrhages",
    ],
    "severe hypertensive retinopathy": [
        "flame shaped hemorrhages at the disc margin, blurred disc margins, congested retinal veins, papilledema, "
        "and secondary macular exudates",
        "arterio-venous crossing changes, macular star and cotton wool spots",
    ],
    "pathologic myopia": ["anomalous disc, macular atrophy and possible tessellation"],
    "tessellation": ["large choroidal vessels at the posterior fundus"],
    "media haze": [
        "vitreous haze",
        "pathological opacity",
        "the obscuration of fundus details by vitreous cells and protein exudation",
    ],
    "branch retinal vein occlusion": ["occlusion of one of the four major branch retinal veins"],
    "central retinal vein occlusion": ["central retinal vein occlusion"],
    "epiretinal membrane": ["greyish semi-translucent avascular membrane"],
    "laser scar": [
        "round or oval, yellowish-white with variable black pigment centrally",
        "50 to 200 micron diameter lesions",
    ],
    "macular scar": ["macular scar"],
    "central serous retinopathy": ["subretinal fluid involving the fovea", "leakage"],
    "tortuous vessels": ["tortuous vessels"],
    "asteroid hyalosis": [
        "multiple sparking, yellow-white, and refractile opacities in the vitreous cavity",
        "vitreous opacities",
    ],
    "optic disc pallor": ["pale yellow discoloration that can be segmental or generalized on optic disc"],
    "optic disc edema": ["optic disc edema"],
    "macular hole": ["lesion in the macula", "grayish fovea"],
    "retinitis pigmentosa": ["pigment deposits are present in the periphery"],
    "retina detachment": ["retina detachment"],
    "optic atrophy": ["optic atrophy"],
    "nevus": ["darkly pigmented lesion found in the back of the eye"],
    "a disease": ["no healthy", "lesions"],
    "ungradable": ["no fundus", "very noisy", "noisy"],
}


def class_prompts(classes, *, prompts: dict | None = None, expert_knowledge: bool = True) -> dict[str, list[str]]:
    """Each class's descriptions, as FLAIR builds them: ``prompts[c]`` if given; else, with
    ``expert_knowledge``, :data:`EXPERT_KNOWLEDGE` for ``c`` plus ``c`` itself (when not
    already among them); else ``[c]``.

    Raises:
        ConfigError: a class with an empty prompt list.
    """
    prompts = prompts or {}
    out = {}
    for name in classes:
        if name in prompts:
            given = prompts[name]
            texts = [given] if isinstance(given, str) else list(given)
        elif expert_knowledge and name in EXPERT_KNOWLEDGE:
            texts = list(EXPERT_KNOWLEDGE[name])
            texts += [name] if name not in texts else []
        else:
            texts = [name]
        if not texts:
            raise ConfigError(f"zero_shot.prompts.{name}: give at least one description")
        out[name] = texts
    return out


def captioned(texts, caption: str | None) -> list[str]:
    """Each text put into ``caption`` at ``[CLS]`` (None: as it is)."""
    return list(texts) if not caption else [caption.replace("[CLS]", t) for t in texts]


def pack(tokenizer, texts, max_tokens: int = 77) -> dict:
    """Token ids and padding mask of ``texts``, ``[CLS] tokens [SEP]``, padded to the longest
    (``transformers``' ``padding=True, truncation=True``), at most ``max_tokens`` long."""
    from kfundus.text import special_ids

    start, end, pad = special_ids(tokenizer)
    rows = [[int(i) for i in np.asarray(tokenizer(str(t))).ravel()][: int(max_tokens) - 2] for t in texts]
    length = max(len(r) for r in rows) + 2
    ids = np.full((len(rows), length), pad, dtype="int32")
    mask = np.zeros((len(rows), length), dtype="int32")
    for i, r in enumerate(rows):
        ids[i, : len(r) + 2] = [start, *r, end]
        mask[i, : len(r) + 2] = 1
    return {"token_ids": ids, "padding_mask": mask}


def text_embeddings(text_model, tokenizer, texts, max_tokens: int = 77) -> np.ndarray:
    """Unit text embeddings of ``texts`` encoded as one batch (padded to its longest)."""
    packed = pack(tokenizer, texts, max_tokens)
    return np.asarray(text_model(packed, training=False)["embedding"], dtype=np.float32)


def class_embeddings(text_model, tokenizer, prompts: dict, *, caption: str | None, max_tokens: int = 77) -> np.ndarray:
    """``(classes, dim)``: per class, the mean of its captioned descriptions' unit embeddings
    (each class encoded as its own batch, as FLAIR does; not re-normalised)."""
    rows = [
        text_embeddings(text_model, tokenizer, captioned(texts, caption), max_tokens).mean(axis=0)
        for texts in prompts.values()
    ]
    return np.stack(rows)


def probabilities(image_embeddings, class_embedding_matrix, logit_scale: float) -> np.ndarray:
    """``softmax(exp(logit_scale) * images @ classes^T)`` over the classes (float64 inside)."""
    logits = (
        float(np.exp(logit_scale))
        * np.asarray(image_embeddings, np.float64)
        @ np.asarray(class_embedding_matrix, np.float64).T
    )
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
