"""Backend matrix worker: ``KERAS_BACKEND=<b> python tests/backends/matrix.py OUT_DIR save|load``.

For every kfundus model family (tiny sizes), loss, layer and metric: build it with a fixed
seed; in ``save`` mode (TensorFlow, run first) write its weights to ``OUT_DIR``, in ``load``
mode read the TensorFlow weights, so every backend computes with the same numbers; run it
on fixed inputs (inference) and write the outputs to ``OUT_DIR/<case>-<backend>.npz``; then
compile it with its kfundus loss and train one ``model.fit`` step, checking the loss is
finite and the trainable weights moved. Prints one JSON line: per case ``ok`` or the error.
Input pipelines stay tf.data, so TensorFlow must be installed under every backend.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

SIZE, N = 32, 8
TINY_CLIP = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64)
TINY_VIT = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64)


def images(seed=0, n=N):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def multilabel(n=N, k=3, seed=1):
    y = np.random.default_rng(seed).integers(0, 2, (n, k)).astype("float32")
    y[0], y[1] = 1, 0  # every label has a positive and a negative
    return y


# ---------------------------------------------------------------------------
# cases: name -> fn() -> (model, inputs, targets, loss, metrics)


def case_efficientnet():
    from kfundus.losses import make_loss
    from kfundus.systems.efficientnet.model import build_efficientnet_b0

    y = multilabel()
    model = build_efficientnet_b0(3, image_size=SIZE, dropout=0.0)
    return model, images(), y, make_loss("weighted_bce", "multilabel", y), ["auc"]


def _transformer(builder, config):
    from kfundus.losses import make_loss
    from kfundus.systems.clip_lora.shadow_loss import ShadowLoss

    y = multilabel()
    model = builder(3, image_size=SIZE, encoder_config=config, lora_rank=2, dropout=0.0)
    loss = {"probabilities": make_loss("focal", "multilabel", y), "embedding": ShadowLoss(margin=0.5)}
    return model, images(), {"probabilities": y, "embedding": y}, loss, {"probabilities": ["auc"]}


def case_clip_lora():
    from kfundus.systems.clip_lora.model import build_clip_lora

    return _transformer(build_clip_lora, TINY_CLIP)


def case_vit_lora():
    from kfundus.systems.clip_lora.model import build_vit

    return _transformer(build_vit, TINY_VIT)


def case_dual_stream():
    import keras

    from kfundus.systems.dual_stream.model import build_dual_stream
    from kfundus.systems.dual_stream.objective import QuadraticWeightedKappa
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

    grades = np.random.default_rng(2).integers(0, 4, N)
    y = keras.utils.to_categorical(grades, 4).astype("float32")
    model = build_dual_stream(4, image_size=SIZE, depth=2, width=8, dropout=0.0, normal_class=None)
    loss = {"classes": WeightedLabelSmoothingLoss([1.0, 2.0, 0.5, 1.5], epsilon=0.1, mode="categorical")}
    return model, images(), {"classes": y}, loss, {"classes": [QuadraticWeightedKappa(4)]}


def case_retclip():
    from kfundus.systems.retclip.model import TINY_TEXT, build_retclip
    from kfundus.systems.retclip.objective import retclip_objective

    vocab, length = 40, 10
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, length + 1, N)
    mask = np.arange(length)[None] < lengths[:, None]
    inputs = {
        "left_image": images(4),
        "right_image": images(5),
        "token_ids": np.where(mask, rng.integers(1, vocab, (N, length)), 0).astype("int32"),
        "padding_mask": mask,
    }
    model = build_retclip(
        image_size=SIZE,
        vocabulary_size=vocab,
        sequence_length=length,
        vision_config=TINY_CLIP,
        text_config=TINY_TEXT,
        embed_dim=16,
    )
    objective = retclip_objective()
    loss, metrics = objective.loss, objective.metrics
    targets = {b: np.arange(N, dtype="int32") for b in loss}  # row i matches column i
    return model, inputs, targets, loss, metrics


CASES = {
    "efficientnet_b0": case_efficientnet,
    "clip_lora": case_clip_lora,
    "vit_lora": case_vit_lora,
    "dual_stream": case_dual_stream,
    "retclip": case_retclip,
}


def standalone_losses() -> dict:
    """Every kfundus loss and metric on fixed (y_true, y_pred): backend-computed values."""
    from kfundus.losses import WeightedBinaryCrossentropy
    from kfundus.systems.clip_lora.shadow_loss import ShadowLoss
    from kfundus.systems.dual_stream.objective import QuadraticWeightedKappa
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss
    from kfundus.systems.retclip.loss import SymmetricInfoNCE

    rng = np.random.default_rng(7)
    y = multilabel()
    p = rng.uniform(0.02, 0.98, y.shape).astype("float32")
    onehot = np.eye(4, dtype="float32")[rng.integers(0, 4, N)]
    soft = rng.dirichlet(np.ones(4), N).astype("float32")
    emb = rng.normal(size=(N, 6)).astype("float32")
    logits = rng.normal(size=(N, N)).astype("float32") * 3
    kappa = QuadraticWeightedKappa(4)
    kappa.update_state(onehot, soft)
    values = {
        "weighted_bce": WeightedBinaryCrossentropy([1.0, 4.0, 0.5])(y, p),
        "wlsr_categorical": WeightedLabelSmoothingLoss([1.0, 2.0, 0.5, 1.5], epsilon=0.1)(onehot, soft),
        "wlsr_binary": WeightedLabelSmoothingLoss([[1.0, 3.0]] * 3, epsilon=0.1, mode="binary")(y, p),
        "shadow": ShadowLoss(margin=0.5)(y, emb),
        "symmetric_infonce": SymmetricInfoNCE()(np.arange(N), logits),
        "quadratic_kappa": kappa.result(),
    }
    import keras

    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in values.items()}


def layers() -> dict:
    """kfundus layers on their own: EndTokenPooling, TripartiteLogits (RET-CLIP)."""
    from kfundus.systems.retclip.model import EndTokenPooling, TripartiteLogits

    rng = np.random.default_rng(8)
    tokens = rng.normal(size=(N, 10, 6)).astype("float32")
    mask = np.arange(10)[None] < rng.integers(2, 11, N)[:, None]
    pooled = EndTokenPooling()(tokens, mask)
    u = [rng.normal(size=(N, 5)).astype("float32") for _ in range(6)]
    u = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in u]
    logits = TripartiteLogits()(*u)
    numpy = __import__("keras").ops.convert_to_numpy  # torch tensors that require grad need it
    return {"end_token_pooling": numpy(pooled), **{f"tripartite_{k}": numpy(v) for k, v in logits.items()}}


def _flat(outputs) -> dict:
    if isinstance(outputs, dict):
        return {k: np.asarray(v, dtype="float32") for k, v in outputs.items()}
    return {"output": np.asarray(outputs, dtype="float32")}


def run_case(name, out: Path, mode: str, backend: str) -> dict:
    import keras

    keras.utils.set_random_seed(0)
    model, inputs, targets, loss, metrics = CASES[name]()
    weights = out / f"{name}.weights.h5"
    if mode == "save":
        model.save_weights(weights)
    else:
        model.load_weights(weights)
    outputs = _flat(model.predict(inputs, batch_size=N, verbose=0))
    if any(layer.name == "avg_pool" for layer in model.layers):  # EfficientNet: compare the features too
        probe = keras.Model(model.inputs, model.get_layer("avg_pool").output)
        outputs["features"] = np.asarray(probe.predict(inputs, batch_size=N, verbose=0), dtype="float32")
    np.savez(out / f"{name}-{backend}.npz", **outputs)
    before = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics)
    history = model.fit(inputs, targets, batch_size=N, epochs=1, verbose=0, shuffle=False)
    moved = max(float(np.max(np.abs(np.array(w) - b))) for w, b in zip(model.trainable_weights, before))
    step_loss = float(history.history["loss"][0])
    if not np.isfinite(step_loss) or moved == 0:
        raise AssertionError(f"train step: loss {step_loss}, largest weight change {moved}")
    return {
        "ok": True,
        "step_loss": step_loss,
        "weight_change": moved,
        "trainable_weights": len(model.trainable_weights),
    }


def main(out: str, mode: str) -> dict:
    import keras

    backend = keras.backend.backend()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"backend": backend, "cases": {}}
    for name in CASES:
        try:
            report["cases"][name] = run_case(name, out, mode, backend)
        except Exception as exc:  # recorded per case: the matrix shows what fails where
            report["cases"][name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:600],
                "trace": traceback.format_exc()[-1500:],
            }
        keras.backend.clear_session()
    for label, fn in (("losses", standalone_losses), ("layers", layers)):
        try:
            values = fn()
            np.savez(out / f"{label}-{backend}.npz", **{k: np.asarray(v) for k, v in values.items()})
            report["cases"][label] = {"ok": True}
        except Exception as exc:
            report["cases"][label] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:600],
                "trace": traceback.format_exc()[-1500:],
            }
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
