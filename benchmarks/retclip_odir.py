"""Does RET-CLIP pre-training help? On ../shared/data/odir-sample:

1. ``kfundus pretrain`` a small encoder on the training patients, the per-eye diagnostic
   keywords as reports (retrieval and zero-shot on held-out patients in its metrics.md);
2. linear-probe per-eye normal / glaucoma / cataract (logistic regression, balanced, C =
   0.316: ``kfundus.workflows.transfer.fit_linear_probe``) on the vision features of the training
   patients' eyes, and score the held-out test patients' eyes;
3. the same with the same encoder at its random initialisation (same sizes, same seed).

    .venv/bin/python benchmarks/retclip_odir.py [--out runs/retclip_odir] [--epochs 30] [--size 64]

Prints and writes ``<out>/linear_probe.md``. The run folder's ``vision_encoder`` is what
``kfundus transfer`` names as its ``retclip`` backbone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISION = {"patch_size": 8, "hidden_dim": 64, "num_layers": 4, "num_heads": 4, "intermediate_dim": 128}
TEXT = {"embedding_dim": 64, "hidden_dim": 64, "num_layers": 2, "num_heads": 4, "intermediate_dim": 128}
CLASSES = {"normal": "N", "glaucoma": "G", "cataract": "C"}


def eye_features(model, packer, prepared):
    """(features, labels) of every eye of ``prepared``: left and right rows stacked."""
    from kfundus.workflows.pretrain import embed_pairs

    emb = embed_pairs(model, packer, prepared)
    table = prepared.manifest.frame
    x = np.concatenate([emb["f_left"], emb["f_right"]])
    y = np.concatenate([table[[f"{eye}_{c}" for c in CLASSES.values()]].to_numpy() for eye in ("left", "right")])
    return x, y.astype(int)


def probe(train, test) -> dict:
    from sklearn.metrics import roc_auc_score

    from kfundus.config import LinearProbeConfig
    from kfundus.workflows.transfer import fit_linear_probe, probe_predict

    (x_train, y_train), (x_test, y_test) = train, test
    out = {}
    for j, name in enumerate(CLASSES):
        w, b = fit_linear_probe(x_train, y_train[:, j], LinearProbeConfig(solver="sklearn", C=0.316))
        out[name] = float(roc_auc_score(y_test[:, j], probe_predict(x_test, w, b)))
    out["macro"] = float(np.mean(list(out.values())))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "odir-sample"))
    parser.add_argument("--out", default="runs/retclip_odir")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    if not Path(args.data, "annotation.csv").exists():
        print(f"skipped: no ODIR sample at {args.data} (annotation.csv)")
        return 0

    from kfundus.config import load_config
    from kfundus.run import RunFolder
    from kfundus.systems.retclip.model import build_retclip
    from kfundus.workflows.pretrain import load_pretrained, prepare_pairs, pretrain

    out = Path(args.out)
    run = out / "pretrain"
    config = load_config(
        "retclip_pretrain",
        [
            f"data.image_size={args.size}",
            "data.split.val=0.1",
            "data.split.test=0.2",
            f"model.options.vision_config={json.dumps(VISION)}",
            f"model.options.text_config={json.dumps(TEXT)}",
            "model.options.embed_dim=64",
            "text.vocabulary_size=500",
            "text.sequence_length=48",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch}",
            "train.learning_rate=1e-3",
            "train.warmup_epochs=2",
        ],
    )
    start = time.perf_counter()
    if not (run / "model.keras").exists():
        pretrain(config, args.data, run)
    minutes = (time.perf_counter() - start) / 60
    model, packer, info = load_pretrained(run)
    train = prepare_pairs(config, RunFolder(run).split_manifest("train"))
    test = prepare_pairs(config, RunFolder(run).split_manifest("test"))
    random = build_retclip(
        image_size=args.size,
        vocabulary_size=info["vocabulary_size"],
        sequence_length=info["sequence_length"],
        vision_config=VISION,
        text_config=TEXT,
        embed_dim=64,
    )
    rows = {
        "RET-CLIP pre-trained": probe(eye_features(model, packer, train), eye_features(model, packer, test)),
        "random init": probe(eye_features(random, packer, train), eye_features(random, packer, test)),
    }
    y_test = eye_features(random, packer, test)[1]
    lines = [
        f"Linear probe, per eye, held-out test patients ({len(test)} patients, "
        f"{2 * len(test)} eyes; positives "
        + ", ".join(f"{name} {int(y_test[:, j].sum())}" for j, name in enumerate(CLASSES))
        + "); "
        f"encoder ViT {VISION} at {args.size} px, pre-trained {args.epochs} epochs on "
        f"{len(train)} patients ({minutes:.1f} min):",
        "",
        "| encoder | " + " | ".join(f"AUROC {c}" for c in CLASSES) + " | macro |",
        "|---|" + "---|" * (len(CLASSES) + 1),
    ]
    for name, result in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{result[c]:.3f}" for c in CLASSES) + f" | {result['macro']:.3f} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_probe.md").write_text(text)
    print((run / "metrics.md").read_text())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
