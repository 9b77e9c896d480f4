"""``kfundus zero-shot``: classify a labelled dataset with a converted vision-language model and
no training, and score it against the labels.

    kfundus zero-shot --config flair_zero_shot --data DIR [--split all|test] [--set key=value ...]
    kfundus zero-shot --config retclip_odir --data DIR --set model.weights=models/retclip

The model is ``model.name`` with ``model.weights`` a converted folder:

- ``flair`` (``kfundus convert --from flair``): each class is described as FLAIR does it
  (:mod:`kfundus.systems.flair.zero_shot`: expert descriptions in the caption "A fundus
  photograph of [CLS]", one class embedding per class, softmax over the scaled cosine
  similarities); one image per row, or both eyes of a patient row scored separately and the
  two probability vectors averaged;
- ``retclip`` / ``retclip_classifier`` (``kfundus convert --from retclip``, or a
  ``kfundus pretrain`` run): each class's prompts through the text tower of the branch the row
  belongs to (patient rows: the patient branch on both eyes; eye rows: the left or right branch
  by the row's ``eye``, left when unknown), embeddings averaged and re-normalised (CLIP's
  zero-shot), softmax over the branch's scaled similarities. The released RET-CLIP text tower
  reads Chinese (its vocabulary is Chinese BERT's), so its prompts are Chinese.

``zero_shot.labels`` maps each class to a label column of the dataset (``{glaucoma: G}``);
without it the label columns are the classes. Writes ``zero_shot.json``, ``zero_shot.md`` and
``predictions.csv`` under ``--out`` (default ``<output_dir>/<name>``): per class the AUROC of
its probability (one against the rest, every row), and on the rows that have exactly one of
the classes the accuracy of the arg-max (``kfundus.metrics.multiclass_report``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.config import Config, replace, save_config
from kfundus.errors import ConfigError, DataError

FLAIR_MODELS = ("flair",)
RETCLIP_MODELS = ("retclip", "retclip_classifier")
SPLITS = ("all", "train", "val", "test")


# ---------------------------------------------------------------------------
# data


def class_columns(config: Config, manifest) -> dict[str, str]:
    """``{class: label column}`` from ``zero_shot.labels`` (default: each label column is a class).

    Raises:
        ConfigError: a mapped column the dataset does not have.
    """
    mapping = dict(config.zero_shot.labels) or {c: c for c in manifest.labels}
    missing = sorted({c for c in mapping.values() if c not in manifest.frame.columns})
    if missing:
        raise ConfigError(
            f"zero_shot.labels maps classes to column(s) {missing} that {manifest.name or 'the dataset'} does not "
            f"have; its label columns: {manifest.labels} (e.g. --set 'zero_shot.labels={{glaucoma: "
            f"{manifest.labels[0]}}}')"
        )
    if len(mapping) < 2:
        raise ConfigError("zero_shot.labels: zero-shot chooses among classes; give at least two")
    return mapping


def load_rows(config: Config, data_path=None, split: str = "all"):
    """The dataset's rows (all, or one patient-level split of ``data.split``)."""
    from kfundus.data.readers import load_dataset
    from kfundus.data.splits import split_patients

    if split not in SPLITS:
        raise ConfigError(f"--split {split}: use one of {list(SPLITS)}")
    manifest = load_dataset(config.data, data_path)
    if split == "all":
        return manifest
    s = config.data.split
    parts = split_patients(manifest, val=s.val, test=s.test, seed=s.seed, use_official=s.official)
    if split not in parts:
        raise ConfigError(
            f"--split {split}: data.split has no {split} part (val={s.val}, test={s.test}); e.g. "
            f"--set data.split.{split if split != 'train' else 'test'}=0.15, or --split all"
        )
    return parts[split]


def image_batches(config: Config, manifest, batch_size: int):
    """Decoded image batches in manifest order, and the rows kept: ``(manifest, iterator)``."""
    from kfundus.data.images import Preprocess
    from kfundus.data.pipeline import make_dataset, prepare

    prepared = prepare(
        manifest,
        Preprocess.from_config(config.data),
        cache_dir=config.data.cache_dir,
        skip_unreadable=config.data.skip_unreadable,
    )
    return prepared.manifest, make_dataset(prepared, batch_size=batch_size, with_targets=False)


# ---------------------------------------------------------------------------
# models


def flair_scores(config: Config, manifest, classes: list[str], batch_size: int):
    """FLAIR zero-shot probabilities ``(rows, classes)`` and the prompts used."""
    from kfundus.systems.flair import zero_shot as zs
    from kfundus.systems.flair.model import CAPTION, flair_extractor, flair_folder, load_flair_text, read_flair_config

    if not config.model.weights:
        raise ConfigError(
            "zero-shot needs a converted FLAIR folder: --set model.weights=DIR (kfundus convert --from flair)"
        )
    weights = flair_folder(config.model.weights)
    info = read_flair_config(weights)
    text, tokenizer = load_flair_text(weights)
    z = config.zero_shot
    caption = z.caption if z.caption is not None else CAPTION
    prompts = zs.class_prompts(classes, prompts=z.prompts, expert_knowledge=z.expert_knowledge)
    class_matrix = zs.class_embeddings(text, tokenizer, prompts, caption=caption, max_tokens=info["max_tokens"])
    vision = flair_extractor(weights, config.data.image_size, features="projection")
    manifest, batches = image_batches(config, manifest, batch_size)
    scores = []
    for batch in batches:
        eyes = list(batch.values()) if isinstance(batch, dict) else [batch]
        probs = [
            zs.probabilities(np.asarray(vision(x, training=False)), class_matrix, info["logit_scale"]) for x in eyes
        ]
        scores.append(np.mean(probs, axis=0))
    return manifest, np.concatenate(scores), {c: [caption.replace("[CLS]", t) for t in p] for c, p in prompts.items()}


def retclip_scores(config: Config, manifest, classes: list[str], batch_size: int):
    """RET-CLIP zero-shot probabilities ``(rows, classes)`` and the prompts used."""
    from kfundus.convert import resolve_converted
    from kfundus.systems.retclip.model import embedding_models, load_retclip_model, logit_scales
    from kfundus.text import TextPacker, make_tokenizer
    from kfundus.workflows.pretrain import class_embeddings

    weights = config.model.weights
    if weights and not (Path(weights) / "model.keras").is_file():  # a converted folder, or retclip:PATH
        weights = resolve_converted(weights, "retclip")
    if not weights or not (Path(weights) / "tokenizer").is_dir():
        raise ConfigError(
            f"model.weights={weights!r}: zero-shot needs a RET-CLIP folder with its tokenizer (kfundus convert --from "
            "retclip CHECKPOINT --out DIR --set vocab=RET_CLIP/clip/vocab.txt, or a kfundus pretrain run)"
        )
    model = load_retclip_model(weights)
    length = int(model.get_layer("token_ids").output.shape[-1])
    packer = TextPacker(make_tokenizer(str(Path(weights) / "tokenizer")), length)
    z = config.zero_shot
    prompts = {}
    for name in classes:
        given = z.prompts.get(name, [name])
        texts = [given] if isinstance(given, str) else list(given)
        prompts[name] = [z.caption.replace("[CLS]", t) for t in texts] if z.caption else texts
    size = int(model.get_layer("left_image").output.shape[1])
    if size != config.data.image_size:
        raise ConfigError(
            f"data.image_size={config.data.image_size}: this RET-CLIP model reads {size} px "
            f"(--set data.image_size={size})"
        )
    towers, scale = embedding_models(model), logit_scales(model)
    manifest, batches = image_batches(config, manifest, batch_size)
    eyes = manifest.frame["eye"].tolist() if "eye" in manifest.frame else []
    matrices = {
        (branch, eye): class_embeddings(model, packer, prompts, branch, eye)
        for branch, eye in (("patient", "left"), ("left", "left"), ("right", "right"))
    }
    scores, row = [], 0
    for batch in batches:
        if isinstance(batch, dict):  # patient rows: the patient branch
            emb = np.asarray(towers["image"]([batch["left_image"], batch["right_image"]], training=False)["z_patient"])
            logits = scale["patient"] * emb @ matrices[("patient", "left")].T
        else:
            n = len(batch)
            sides = [("right" if e == "right" else "left") for e in (eyes[row : row + n] or ["left"] * n)]
            emb = {s: np.asarray(towers[f"eye_{s}"](batch, training=False)) for s in set(sides)}
            logits = np.stack([scale[s] * emb[s][i] @ matrices[(s, s)].T for i, s in enumerate(sides)])
            row += n
        logits = logits - logits.max(axis=1, keepdims=True)
        scores.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return manifest, np.concatenate(scores).astype(np.float32), prompts


# ---------------------------------------------------------------------------
# scoring


def score(truth: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Per-class AUROC over every row, and arg-max accuracy on rows with exactly one class."""
    from kfundus.metrics import multiclass_report, per_class_metrics, to_jsonable

    table = per_class_metrics(truth, probs, classes)
    auroc = {c: a for c, a in zip(classes, table["auroc"]) if np.isfinite(a)}
    result = {
        "rows": int(len(truth)),
        "auroc": auroc,
        "macro_auroc": float(np.mean(list(auroc.values()))) if auroc else None,
        "positives": {c: int(v) for c, v in zip(classes, truth.sum(axis=0))},
    }
    single = truth.sum(axis=1) == 1
    result["single_label_rows"] = int(single.sum())
    if single.any():
        report = multiclass_report(truth[single].argmax(axis=1), probs[single], classes)
        result["accuracy"] = report["accuracy"]
        result["balanced_accuracy"] = report["balanced_accuracy"]
        result["majority_class_accuracy"] = float(truth[single].mean(axis=0).max())
        result["confusion_matrix"] = report["confusion_matrix"]
    return to_jsonable(result)


def markdown(result: dict, config: Config) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"# Zero-shot: {config.model.name} ({config.model.weights}), {result['rows']} rows",
        "",
        "| class | positives | AUROC |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {result['positives'][c]} | {fmt(result['auroc'].get(c))} |" for c in result["positives"]]
    lines += [
        "",
        f"macro AUROC {fmt(result['macro_auroc'])}; on the {result['single_label_rows']} rows with exactly one class: "
        f"accuracy {fmt(result.get('accuracy'))} (majority class {fmt(result.get('majority_class_accuracy'))}), "
        f"balanced accuracy {fmt(result.get('balanced_accuracy'))}.",
    ]
    return "\n".join(lines) + "\n"


def run_zero_shot(config: Config, data_path=None, out=None, split: str = "all", batch_size: int = 16) -> dict:
    """Zero-shot classification of a dataset (see the module docstring); returns the scores
    (also written under ``out``)."""
    name = config.model.name
    if name not in FLAIR_MODELS + RETCLIP_MODELS:
        raise ConfigError(
            f"model.name={name!r}: zero-shot needs a vision-language model: one of "
            f"{list(FLAIR_MODELS + RETCLIP_MODELS)} (e.g. --set model.name=flair --set model.weights=DIR)"
        )
    if data_path:
        config = replace(config, data={"path": str(data_path)})
    out = Path(out or Path(config.output_dir) / config.name)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_rows(config, None, split)
    mapping = class_columns(config, manifest)
    classes = list(mapping)
    scorer = flair_scores if name in FLAIR_MODELS else retclip_scores
    manifest, probs, prompts = scorer(config, manifest, classes, batch_size)
    if len(manifest) == 0:
        raise DataError("no readable image rows to classify")
    truth = manifest.frame[[mapping[c] for c in classes]].to_numpy().astype(int)
    result = {"model": name, "weights": str(config.model.weights), "split": split, **score(truth, probs, classes)}
    result["classes"] = mapping
    result["prompts"] = prompts
    save_config(config, out / "config.yaml")
    (out / "zero_shot.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "zero_shot.md").write_text(markdown(result, config))
    columns = [c for c in ("patient_id", "eye", "image", "left_image", "right_image") if c in manifest.frame]
    table = manifest.frame[columns].reset_index(drop=True)
    table = pd.concat([table, pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])], axis=1)
    table = pd.concat([table, pd.DataFrame(truth, columns=[f"y_{c}" for c in classes])], axis=1)
    table.to_csv(out / "predictions.csv", index=False)
    print(markdown(result, config))
    return result
