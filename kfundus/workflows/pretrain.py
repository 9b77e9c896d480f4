"""``kfundus pretrain``: RET-CLIP pre-training on fundus image pairs and their reports, and
what a pre-trained model is used for (Du et al., MICCAI 2024).

    kfundus pretrain --config retclip_pretrain --data DIR [--set key=value ...]
    kfundus pretrain --run runs/NAME --evaluate        (retrieval and zero-shot again)

A run folder (``kfundus.run``) holds, besides the common files:

- ``model.keras``: the whole RET-CLIP model (both towers, heads, temperatures);
- ``vision_encoder/``: the shared CLIP vision encoder as a keras-hub preset folder. Any
  other config names it as its encoder: ``model.weights: runs/NAME/vision_encoder`` for
  ``clip_lora``, a ``retclip`` backbone in ``kfundus transfer``. Its input is CLIP-normalised
  RGB, which every kfundus CLIP model puts in front of it;
- ``tokenizer/``: the tokenizer as a keras-hub preset folder (``kfundus.text``);
- ``metrics.json`` / ``metrics.md``: retrieval recall@1/5/10 (image->text and
  text->image, patient branch) and zero-shot per-eye classification, on val and test.

Choices where the paper is silent: patients are split like every kfundus dataset
(``kfundus.data.splits.split_patients``: by patient, stratified on the patient labels
where the source has them, ``data.split``); the checkpoint with the lowest validation loss
is kept; retrieval counts a hit when the retrieved report is *identical* to the query's
own (many patients share "normal fundus" in both eyes), and reports its chance level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kfundus.config import Config, ZeroShotConfig, replace
from kfundus.errors import ConfigError, DataError
from kfundus.run import CURVES, HISTORY, RunFolder, now

RECALL_AT = (1, 5, 10)
# build_retclip arguments set from other config keys than model.options
_SET_ELSEWHERE = {"image_size", "vocabulary_size", "sequence_length", "vision_weights"}


# ---------------------------------------------------------------------------
# data


def load_pairs_dataset(config: Config, data_path=None):
    """The image-report pairs ``data`` names (a patient-level Manifest with ``text``)."""
    from kfundus.data.readers import load_pairs

    path = data_path or config.data.path
    if not path:
        raise ConfigError("no pairs data: give --data DIR (or set data.path in the config)")
    return load_pairs(config.data.source, path, **config.data.options)


def prepare_pairs(config: Config, manifest):
    from kfundus.data.images import Preprocess
    from kfundus.data.pipeline import prepare

    return prepare(
        manifest,
        Preprocess.from_config(config.data),
        cache_dir=config.data.cache_dir,
        skip_unreadable=config.data.skip_unreadable,
    )


def _aligned(dataset):
    """(inputs, targets): each branch's target is the matching column, ``range(batch)``."""
    import tensorflow as tf

    def add_targets(batch):
        index = tf.range(tf.shape(batch["token_ids"])[0])
        inputs = {k: batch[k] for k in ("left_image", "right_image", "token_ids", "padding_mask")}
        return inputs, {"left": index, "right": index, "patient": index}

    return dataset.map(add_targets)


# ---------------------------------------------------------------------------
# training


def pretrain(config: Config, data_path=None, run_dir=None, overwrite: bool = False) -> Path:
    """Pre-train RET-CLIP; return the run folder (see the module docstring)."""
    import keras

    from kfundus.data.pairs import make_pair_dataset
    from kfundus.data.splits import split_patients
    from kfundus.engine import fit
    from kfundus.evaluation.plots import plot_training_curves
    from kfundus.systems import check_options, get_system
    from kfundus.text import TextPacker, make_tokenizer, save_tokenizer
    from kfundus.workflows.supervised import data_root, splits_table

    system = get_system(config.model.name, "pretrain")
    check_options(system.build, config.model.options, f"model.options of {config.model.name}", _SET_ELSEWHERE)
    run = RunFolder(run_dir or Path(config.output_dir) / config.name)
    if data_path:
        config = replace(config, data={"path": str(data_path)})
    manifest = load_pairs_dataset(config)
    run.start(overwrite)
    run.write_config(config)
    keras.utils.set_random_seed(config.train.seed)
    s = config.data.split
    splits = split_patients(manifest, val=s.val, test=s.test, seed=s.seed, use_official=s.official)
    for name in ("train", "val"):
        if len(splits.get(name, [])) < 2:
            raise DataError(
                f"the {name} split has {len(splits.get(name, []))} patient row(s) of {len(manifest)}: "
                "pre-training needs at least 2 in train and val (raise data.split.val, e.g. "
                "--set data.split.val=0.2, or give more patients)"
            )
    prepared = {name: prepare_pairs(config, part) for name, part in splits.items()}
    run.write_splits(splits_table({name: p.manifest for name, p in prepared.items()}))
    print(", ".join(f"{name}: {len(p)} patients" for name, p in prepared.items()))

    train_reports = list(prepared["train"].manifest.frame["text"])
    tokenizer = make_tokenizer(
        config.text.tokenizer,
        train_reports,
        vocabulary_size=config.text.vocabulary_size,
        lowercase=config.text.lowercase,
    )
    save_tokenizer(tokenizer, run / "tokenizer")
    packer = TextPacker(tokenizer, config.text.sequence_length)
    t = config.train
    n_train, n_val = len(prepared["train"]), len(prepared["val"])
    # full batches only (a last batch of 2 would be a near-trivial contrastive task)
    train_ds = _aligned(
        make_pair_dataset(
            prepared["train"],
            packer,
            t.batch_size,
            shuffle=True,
            seed=t.seed,
            flip=config.data.flip,
            drop_remainder=n_train >= t.batch_size,
            augment=config.data.augment,
        )
    )
    val_ds = _aligned(make_pair_dataset(prepared["val"], packer, t.batch_size))
    run.write_info(
        {
            "name": config.name,
            "workflow": "pretrain",
            "model": config.model.name,
            "labels": list(manifest.labels),
            "task": manifest.task,
            "level": "patient",
            "image_size": config.data.image_size,
            "crop_fundus": config.data.crop_fundus,
            "sequence_length": config.text.sequence_length,
            "vocabulary_size": int(tokenizer.vocabulary_size()),
            "source": config.data.source,
            "data_path": str(config.data.path),
            "data_root": data_root(config.data.path),
            "counts": {n: {"rows": len(p)} for n, p in prepared.items()},
            "started": now(),
        }
    )
    result = fit(
        lambda: system.build(
            image_size=config.data.image_size,
            vocabulary_size=int(tokenizer.vocabulary_size()),
            sequence_length=config.text.sequence_length,
            vision_weights=config.model.weights,
            **config.model.options,
        ),
        system.objective(config),
        train_ds,
        val_ds,
        t,
        run_dir=run.path,
        distribution=config.distribution,
        train_rows=n_train if n_train < t.batch_size else None,
        val_rows=n_val,
        steps_per_epoch=t.steps_per_epoch or max(1, n_train // t.batch_size),
    )
    model = result.model
    model.save(run.model_file)
    save_vision_preset(model, run / "vision_encoder")
    run.update_info(finished=now(), epochs_trained=len(result.history), best_epoch=result.best_epoch)
    plot_training_curves(run / HISTORY, run / CURVES)
    print(f"pre-trained: {run.model_file}; vision encoder preset: {run / 'vision_encoder'}")
    evaluate_pretrained(run)
    return run.path


def save_vision_preset(model, folder: Path) -> Path:
    """The shared vision encoder of a RET-CLIP model as a keras-hub preset folder."""
    from kfundus.systems.clip_lora.encoders import find_encoder

    encoder = find_encoder(model)
    encoder.save_to_preset(str(folder))
    return Path(folder)


# ---------------------------------------------------------------------------
# using a pre-trained model


def load_pretrained(run_dir):
    """(model, packer, info) of a finished pre-training run."""
    from kfundus.systems import load_model
    from kfundus.text import TextPacker, make_tokenizer

    run = RunFolder(run_dir).require_finished("using a pre-trained model")
    info = run.read_info()
    tokenizer = make_tokenizer(str(run / "tokenizer"))
    return load_model(run.model_file), TextPacker(tokenizer, info["sequence_length"]), info


def embed_pairs(model, packer, prepared, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Image embeddings ``z_left, z_right, z_patient``, text embeddings ``t_*`` and the
    vision features ``f_left, f_right`` of every row of prepared pairs, in table order."""
    from kfundus.data.pairs import make_pair_dataset
    from kfundus.systems.retclip.model import embedding_models

    towers = embedding_models(model)
    out: dict[str, list] = {}
    for batch in make_pair_dataset(prepared, packer, batch_size):
        parts = {
            **towers["image"]([batch["left_image"], batch["right_image"]], training=False),
            **towers["text"]([batch["token_ids"], batch["padding_mask"]], training=False),
            "f_left": towers["features"](batch["left_image"], training=False),
            "f_right": towers["features"](batch["right_image"], training=False),
        }
        for key, value in parts.items():
            out.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in out.items()}


def retrieval_metrics(image_emb, text_emb, texts, ks=RECALL_AT) -> dict:
    """Recall@k both ways for row-aligned unit embeddings. A retrieved item is a hit when its
    report text equals the query's (identical reports are interchangeable); ``chance@k`` is
    the same recall for a random ranking."""
    from math import comb

    sim = np.asarray(image_emb) @ np.asarray(text_emb).T
    texts = np.asarray(texts, dtype=object)
    same = texts[:, None] == texts[None, :]
    n = len(texts)
    result = {"n": n}
    for direction, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = np.take_along_axis(same, order, axis=1)
        for k in ks:
            if k <= n:
                result[f"{direction}_recall@{k}"] = float(hits[:, :k].any(axis=1).mean())
    for k in ks:
        if k <= n:
            correct = same.sum(axis=1)
            result[f"chance@{k}"] = float(np.mean([1 - comb(n - c, k) / comb(n, k) for c in correct]))
    return result


def class_embeddings(model, packer, prompts: dict, branch: str, eye: str) -> np.ndarray:
    """(classes, dim) unit text embeddings of the ``branch`` head: each class's prompt
    templates (``{eye}`` filled in) embedded, averaged, re-normalised."""
    import tensorflow as tf

    from kfundus.systems.retclip.model import embedding_models

    text = embedding_models(model)["text"]
    rows = []
    for name, templates in prompts.items():
        templates = [templates] if isinstance(templates, str) else list(templates)
        if not templates:
            raise ConfigError(f"zero_shot.prompts.{name}: give at least one prompt")
        packed = packer(tf.constant([t.format(eye=eye) for t in templates]))
        emb = np.asarray(text([packed["token_ids"], packed["padding_mask"]], training=False)[f"t_{branch}"])
        mean = emb.mean(axis=0)
        rows.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(rows)


def zero_shot(model, packer, prepared, config: ZeroShotConfig, embeddings=None) -> dict:
    """Per-eye zero-shot classification: each eye's image embedding against the class
    embeddings of its own branch. Per class the AUROC of the similarity (one vs rest), and
    the accuracy of the arg-max over eyes with exactly one of the classes."""
    from sklearn.metrics import roc_auc_score

    classes = list(config.prompts)
    missing = [c for c in classes if c not in config.labels]
    if missing:
        raise ConfigError(f"zero_shot.labels has no label column for {missing}; map each class to a per-eye label")
    emb = embeddings or embed_pairs(model, packer, prepared)
    table = prepared.manifest.frame
    scores, truth = [], []
    for eye in ("left", "right"):
        columns = [f"{eye}_{config.labels[c]}" for c in classes]
        absent = [c for c in columns if c not in table]
        if absent:
            raise ConfigError(f"the pairs table has no column(s) {absent} for zero-shot; available: {list(table)}")
        scores.append(emb[f"z_{eye}"] @ class_embeddings(model, packer, config.prompts, eye, eye).T)
        truth.append(table[columns].to_numpy().astype(int))
    scores, truth = np.concatenate(scores), np.concatenate(truth)
    result = {"eyes": int(len(truth)), "auroc": {}}
    for j, name in enumerate(classes):
        if 0 < truth[:, j].sum() < len(truth):
            result["auroc"][name] = float(roc_auc_score(truth[:, j], scores[:, j]))
    single = truth.sum(axis=1) == 1
    if single.any():
        result["accuracy"] = float((scores[single].argmax(1) == truth[single].argmax(1)).mean())
        result["accuracy_eyes"] = int(single.sum())
        result["majority_class_accuracy"] = float(truth[single].mean(axis=0).max())
    if result["auroc"]:
        result["macro_auroc"] = float(np.mean(list(result["auroc"].values())))
    return result


def evaluate_pretrained(run_dir, data_path=None, splits=("val", "test")) -> dict:
    """Retrieval (patient branch) and zero-shot on the run's held-out patients; writes
    ``metrics.json`` and ``metrics.md``. ``data_path``: the data's folder if it moved."""
    run = RunFolder(run_dir)
    config = run.read_config()
    model, packer, _ = load_pretrained(run)
    metrics = {}
    for split in splits:
        try:
            part = run.split_manifest(split, data_root=data_path)
        except ConfigError:  # the run has no such split
            continue
        if len(part) < 2:
            continue
        prepared = prepare_pairs(config, part)
        emb = embed_pairs(model, packer, prepared)
        reports = list(prepared.manifest.frame["text"])
        metrics[split] = {"retrieval": retrieval_metrics(emb["z_patient"], emb["t_patient"], reports)}
        if config.zero_shot.prompts:
            metrics[split]["zero_shot"] = zero_shot(model, packer, prepared, config.zero_shot, emb)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (run / "metrics.md").write_text(_markdown(metrics))
    print(_markdown(metrics))
    return metrics


def _markdown(metrics: dict) -> str:
    lines = [
        "| split | patients | R@1 i→t | R@5 i→t | R@1 t→i | R@5 t→i | chance R@1 | zero-shot macro AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, m in metrics.items():
        r = m["retrieval"]

        def f(key, r=r):
            return f"{r[key]:.3f}" if key in r else "-"

        zs = m.get("zero_shot", {}).get("macro_auroc")
        lines.append(
            f"| {split} | {r['n']} | {f('image_to_text_recall@1')} | {f('image_to_text_recall@5')} | "
            f"{f('text_to_image_recall@1')} | {f('text_to_image_recall@5')} | {f('chance@1')} | "
            f"{'-' if zs is None else f'{zs:.3f}'} |"
        )
    return "\n".join(lines) + "\n"
