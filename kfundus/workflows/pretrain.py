"""``kfundus pretrain``: RET-CLIP pre-training on fundus image pairs and their reports, and
what a pre-trained model is used for (SPECS.md section 2).

    kfundus pretrain --config configs/retclip_pretrain.yaml --data DIR [--set key=value ...]
    kfundus pretrain --run runs/NAME --evaluate        (retrieval and zero-shot again)

A run folder holds:

- ``model.keras``: the whole RET-CLIP model (both towers, heads, temperatures);
- ``vision_encoder/``: the shared CLIP vision encoder as a keras-hub preset folder. Any
  other config names it as its encoder: ``model.weights: runs/NAME/vision_encoder`` for
  ``clip_lora``, a ``retclip`` backbone in ``kfundus transfer``. Its input is CLIP-normalised
  RGB, which every kfundus CLIP model puts in front of it;
- ``tokenizer/``: the tokenizer as a keras-hub preset folder (``kfundus.text``);
- ``splits.csv`` (patients in train / val / test), ``history.csv``, ``training_curves.png``;
- ``metrics.json`` / ``metrics.md``: retrieval recall@1/5/10 (image->text and
  text->image, patient branch) and zero-shot per-eye classification, on val and test.

Choices where the paper is silent: patients are split at random into train / val / test
(``data.val``, ``data.test``); the checkpoint with the lowest validation loss is kept;
retrieval counts a hit when the retrieved report is *identical* to the query's own (many
patients share "normal fundus" in both eyes), and reports its chance level alongside.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.config import TrainConfig, _build, read_yaml, save_config
from kfundus.data.pipeline import Augment
from kfundus.errors import ConfigError, KfundusError

RETCLIP_TRAIN = {"optimizer": "adamw", "learning_rate": 3e-5, "weight_decay": 1e-3, "beta_2": 0.98,
                 "epochs": 10, "batch_size": 256, "warmup_epochs": 1.0, "monitor": "val_loss"}
RECALL_AT = (1, 5, 10)


@dataclasses.dataclass
class PairDataConfig:
    """Image-report pairs (``kfundus.data.pairs.load_pairs``): ``source`` odir | csv |
    retclip, its ``options``; preprocessing; patient fractions held out for validation and
    test. ``flip`` flips both eyes and swaps them (off: a plain flip mislabels laterality);
    ``augment``: random rotation / zoom / colour per eye during training (no ``hflip``)."""

    source: str = "odir"
    path: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    image_size: int = 224
    crop_fundus: bool = True
    cache_dir: str | None = None
    skip_unreadable: bool = False
    flip: bool = False
    augment: Augment = dataclasses.field(default_factory=Augment)
    val: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclasses.dataclass
class TextConfig:
    """``tokenizer``: null / "wordpiece" (a vocabulary built offline from the training
    reports), a keras-hub preset name, or a local tokenizer preset folder."""

    tokenizer: str | None = None
    vocabulary_size: int = 2000
    sequence_length: int = 77
    lowercase: bool = True


@dataclasses.dataclass
class RetClipConfig:
    """``kfundus.models.retclip.build_retclip`` arguments."""

    vision_weights: str | None = None
    vision_config: dict = dataclasses.field(default_factory=dict)
    text_weights: str | None = None
    text_config: dict = dataclasses.field(default_factory=dict)
    embed_dim: int = 512
    text_head_dim: int | None = None


@dataclasses.dataclass
class ZeroShotConfig:
    """Per-eye zero-shot classes: ``prompts`` maps a class to prompt templates (``{eye}`` is
    replaced by left / right; several templates are averaged, e.g. expert descriptions);
    ``labels`` maps the class to the per-eye label column of the pairs table (``N`` reads
    ``left_N`` / ``right_N``)."""

    prompts: dict = dataclasses.field(default_factory=dict)
    labels: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PretrainConfig:
    name: str = "retclip"
    output_dir: str = "runs"
    data: PairDataConfig = dataclasses.field(default_factory=PairDataConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    model: RetClipConfig = dataclasses.field(default_factory=RetClipConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(**RETCLIP_TRAIN))
    zero_shot: ZeroShotConfig = dataclasses.field(default_factory=ZeroShotConfig)
    distribution: str = "none"  # none | mirrored | multi_worker (kfundus.distribute); train.batch_size is global


def load_pretrain_config(path=None, overrides=None) -> PretrainConfig:
    """Read a pre-training YAML (train defaults: RET-CLIP's AdamW 3e-5, wd 1e-3, betas
    (0.9, 0.98), warm-up + cosine) and apply ``--set`` overrides."""
    data, where = read_yaml(path, overrides, "see configs/retclip_pretrain.yaml")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{where}.train: expected a mapping")
    data["train"] = {**RETCLIP_TRAIN, **train}
    from kfundus.distribute import check_distribution

    config = _build(PretrainConfig, data, where)
    check_distribution(config.distribution, f"{where}: distribution")
    return config


# ---------------------------------------------------------------------------
# data


def split_patients(table: pd.DataFrame, val: float, test: float, seed: int) -> pd.Series:
    """``train`` / ``val`` / ``test`` per row, patients drawn at random (a patient's rows
    stay together)."""
    patients = np.array(sorted(table["patient_id"].astype(str).unique()))
    if len(patients) < 3:
        raise ConfigError(f"only {len(patients)} patient(s) in the pairs table: pre-training needs at least 3 "
                          "(train, val and test)")
    order = np.random.default_rng(seed).permutation(patients)
    n_test = max(1, int(round(test * len(order)))) if test > 0 else 0
    n_val = max(2, int(round(val * len(order))))
    if n_test + n_val >= len(order):
        raise ConfigError(f"data.val={val} and data.test={test} leave no training patients of {len(order)}")
    split = {p: "test" for p in order[:n_test]}
    split.update({p: "val" for p in order[n_test:n_test + n_val]})
    split.update({p: "train" for p in order[n_test + n_val:]})
    return table["patient_id"].astype(str).map(split)


def _load_table(config: PretrainConfig, data_path=None) -> pd.DataFrame:
    from kfundus.data.pairs import load_pairs

    path = data_path or config.data.path
    if not path:
        raise ConfigError("no pairs data: give --data DIR or data.path in the config")
    return load_pairs(config.data.source, path, **config.data.options)


def _preprocess(config: PretrainConfig):
    from kfundus.data.pipeline import Preprocess

    return Preprocess(image_size=config.data.image_size, crop_fundus=config.data.crop_fundus)


def _prepare(config: PretrainConfig, table: pd.DataFrame):
    from kfundus.data.pairs import prepare_pairs

    return prepare_pairs(table.reset_index(drop=True), _preprocess(config), cache_dir=config.data.cache_dir,
                         skip_unreadable=config.data.skip_unreadable)


def _aligned(dataset):
    """(inputs, targets): each branch's target is the matching column, ``range(batch)``."""
    import tensorflow as tf

    def add_targets(batch):
        n = tf.shape(batch["token_ids"])[0]
        index = tf.range(n)
        inputs = {k: batch[k] for k in ("left_image", "right_image", "token_ids", "padding_mask")}
        return inputs, {"left": index, "right": index, "patient": index}

    return dataset.map(add_targets)


# ---------------------------------------------------------------------------
# training


def pretrain(config: PretrainConfig, data_path=None, run_dir=None, overwrite: bool = False) -> Path:
    """Pre-train RET-CLIP; return the run folder (see the module docstring)."""
    import keras

    from kfundus.data.pairs import make_pair_dataset
    from kfundus.models.retclip import build_retclip, retclip_losses
    from kfundus.plots import plot_training_curves
    from kfundus.text import TextPacker, make_tokenizer, save_tokenizer
    from kfundus.training import _quiet, _start_or_resume, make_callbacks, make_optimizer

    run_dir = Path(run_dir or Path(config.output_dir) / config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    _start_or_resume(run_dir, overwrite)
    keras.utils.set_random_seed(config.train.seed)
    table = _load_table(config, data_path)
    table["split"] = split_patients(table, config.data.val, config.data.test, config.data.seed)
    table.to_csv(run_dir / "splits.csv", index=False)
    parts = {name: table[table["split"] == name] for name in ("train", "val")}
    print(", ".join(f"{name}: {len(part)} patients" for name, part in parts.items()))

    tokenizer = make_tokenizer(config.text.tokenizer, list(parts["train"]["report"]),
                               vocabulary_size=config.text.vocabulary_size, lowercase=config.text.lowercase)
    save_tokenizer(tokenizer, run_dir / "tokenizer")
    packer = TextPacker(tokenizer, config.text.sequence_length)
    prepared = {name: _prepare(config, part) for name, part in parts.items()}
    batch = config.train.batch_size
    # full batches only (a last batch of 2 would be a near-trivial contrastive task)
    steps = config.train.steps_per_epoch or max(1, len(prepared["train"].table) // batch)
    train_ds = _aligned(make_pair_dataset(prepared["train"], packer, batch, shuffle=True, seed=config.train.seed,
                                          flip=config.data.flip, repeat=bool(config.train.steps_per_epoch),
                                          drop_remainder=len(prepared["train"].table) >= batch,
                                          augment=config.data.augment))
    val_ds = _aligned(make_pair_dataset(prepared["val"], packer, batch))
    (run_dir / "retclip.json").write_text(json.dumps({
        "image_size": config.data.image_size, "crop_fundus": config.data.crop_fundus,
        "sequence_length": config.text.sequence_length, "vocabulary_size": int(tokenizer.vocabulary_size()),
        "source": config.data.source, "data_path": str(data_path or config.data.path),
        "patients": {n: int(len(p.table)) for n, p in prepared.items()}}, indent=1))
    save_config(config, run_dir / "config.yaml")

    previous_policy = keras.mixed_precision.global_policy().name
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        from kfundus.distribute import drop_short_batch, strategy_scope

        with strategy_scope(config.distribution) as strategy:  # "none": the default strategy, a no-op
            model = build_retclip(
                image_size=config.data.image_size, vocabulary_size=int(tokenizer.vocabulary_size()),
                sequence_length=config.text.sequence_length, vision_weights=config.model.vision_weights,
                vision_config=config.model.vision_config or None, text_weights=config.model.text_weights,
                text_config=config.model.text_config or None, embed_dim=config.model.embed_dim,
                text_head_dim=config.model.text_head_dim)
            loss, weights, metrics = retclip_losses()
            model.compile(optimizer=make_optimizer(config.train, steps), loss=loss, loss_weights=weights,
                          metrics=metrics)
        val_ds = drop_short_batch(val_ds, len(prepared["val"].table), batch, strategy.num_replicas_in_sync)
        warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")
        model.fit(train_ds, validation_data=val_ds, epochs=config.train.epochs,
                  steps_per_epoch=config.train.steps_per_epoch, callbacks=make_callbacks(run_dir, config.train),
                  verbose=2 if _quiet() else 1)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    best = run_dir / "best.keras"
    if best.exists():
        from kfundus.models import load_model

        model = load_model(best)
    model.save(run_dir / "model.keras")
    save_vision_preset(model, run_dir / "vision_encoder")
    plot_training_curves(run_dir / "history.csv", run_dir / "training_curves.png")
    print(f"pre-trained: {run_dir / 'model.keras'}; vision encoder preset: {run_dir / 'vision_encoder'}")
    evaluate_pretrained(run_dir, data_path)
    return run_dir


def save_vision_preset(model, folder: Path) -> Path:
    """The shared vision encoder of a RET-CLIP model as a keras-hub preset folder."""
    from kfundus.models.clip_lora import find_encoder

    encoder = find_encoder(model)
    encoder.save_to_preset(str(folder))
    return Path(folder)


# ---------------------------------------------------------------------------
# using a pre-trained model


def load_pretrained(run_dir):
    """(model, packer, info) of a pre-training run."""
    from kfundus.models import load_model
    from kfundus.text import TextPacker, make_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "model.keras").exists():
        raise ConfigError(f"{run_dir} is not a finished pre-training run (no model.keras); run kfundus pretrain")
    info = json.loads((run_dir / "retclip.json").read_text())
    tokenizer = make_tokenizer(str(run_dir / "tokenizer"))
    return load_model(run_dir / "model.keras"), TextPacker(tokenizer, info["sequence_length"]), info


def embed_pairs(model, packer, prepared, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Image embeddings ``z_left, z_right, z_patient``, text embeddings ``t_*`` and the
    vision features ``f_left, f_right`` of every row of prepared pairs, in table order."""
    from kfundus.data.pairs import make_pair_dataset
    from kfundus.models.retclip import embedding_models

    towers = embedding_models(model)
    out: dict[str, list] = {}
    for batch in make_pair_dataset(prepared, packer, batch_size):
        parts = {**towers["image"]([batch["left_image"], batch["right_image"]], training=False),
                 **towers["text"]([batch["token_ids"], batch["padding_mask"]], training=False),
                 "f_left": towers["features"](batch["left_image"], training=False),
                 "f_right": towers["features"](batch["right_image"], training=False)}
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

    from kfundus.models.retclip import embedding_models

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
    table = prepared.table
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
    ``metrics.json`` and ``metrics.md``."""
    run_dir = Path(run_dir)
    config = load_pretrain_config(run_dir / "config.yaml")
    model, packer, _ = load_pretrained(run_dir)
    table = pd.read_csv(run_dir / "splits.csv", dtype={"patient_id": str})
    metrics = {}
    for split in splits:
        part = table[table["split"] == split]
        if len(part) < 2:
            continue
        prepared = _prepare(config, part)
        emb = embed_pairs(model, packer, prepared)
        reports = list(prepared.table["report"])
        metrics[split] = {"retrieval": retrieval_metrics(emb["z_patient"], emb["t_patient"], reports)}
        if config.zero_shot.prompts:
            metrics[split]["zero_shot"] = zero_shot(model, packer, prepared, config.zero_shot, emb)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (run_dir / "metrics.md").write_text(_markdown(metrics))
    print(_markdown(metrics))
    return metrics


def _markdown(metrics: dict) -> str:
    lines = ["| split | patients | R@1 i→t | R@5 i→t | R@1 t→i | R@5 t→i | chance R@1 | zero-shot macro AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        r = m["retrieval"]

        def f(key):
            return f"{r[key]:.3f}" if key in r else "-"

        zs = m.get("zero_shot", {}).get("macro_auroc")
        lines.append(f"| {split} | {r['n']} | {f('image_to_text_recall@1')} | {f('image_to_text_recall@5')} | "
                     f"{f('text_to_image_recall@1')} | {f('text_to_image_recall@5')} | {f('chance@1')} | "
                     f"{'-' if zs is None else f'{zs:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kfundus pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML, e.g. configs/retclip_pretrain.yaml")
    parser.add_argument("--data", help="pairs data (overrides data.path)")
    parser.add_argument("--run-dir", help="default: <output_dir>/<name>")
    parser.add_argument("--run", help="with --evaluate: a finished pre-training run")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate --run (retrieval, zero-shot)")
    parser.add_argument("--overwrite", action="store_true", help="train a finished run again from scratch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        if args.evaluate:
            if not args.run:
                raise ConfigError("--evaluate needs --run runs/NAME")
            evaluate_pretrained(args.run, args.data)
        else:
            if not args.config:
                raise ConfigError("give --config configs/retclip_pretrain.yaml (or --run R --evaluate)")
            pretrain(load_pretrain_config(args.config, args.overrides), args.data, args.run_dir, args.overwrite)
    except KfundusError as exc:
        print(f"kfundus pretrain: error: {exc}", file=sys.stderr)
        return 2
    return 0
