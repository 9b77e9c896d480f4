"""LoRA vs full fine-tuning for a ViT-B/16-sized CLIP vision encoder (random weights).

Measures, for the kfundus ``clip_lora`` model built from config (CLIP ViT-B/16 sizes:
patch 16, hidden 768, 12 layers, 12 heads, MLP 3072; per-eye input):

- trainable parameters at LoRA rank 8 on query/value as a share of the encoder (target
  < 1 %), with kfundus' default (the paper's rank-8 update of each ``hidden x hidden``
  projection, ``kfundus.systems.clip_lora.lora.LoRAEinsumDense``) and with Keras' per-head factorisation
  (``lora_per_head: true``, Keras' plain ``enable_lora``);
- one training step's time (median of timed steps after a warm-up step) and the peak
  resident memory of the process, each LoRA variant vs full fine-tuning, as ratios. Each
  mode runs in its own subprocess so that peaks do not mix.

    python benchmarks/lora.py [--image-size 224] [--batch 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def one_mode(mode: str, image_size: int, batch: int, steps: int) -> dict:
    import keras
    import numpy as np

    from kfundus.systems.clip_lora.lora import lora_parameter_count, parameter_summary
    from kfundus.systems.clip_lora.model import build_clip_lora
    from kfundus.systems.clip_lora.shadow_loss import ShadowLoss

    keras.utils.set_random_seed(0)
    rank = 0 if mode == "full" else 8
    model = build_clip_lora(
        8,
        image_size=image_size,
        lora_rank=rank,
        lora_alpha=16,
        lora_targets=["query", "value"],
        lora_per_head=mode == "lora_per_head",
        trainable_blocks=-1,
    )
    encoder = model.get_layer("encoder")
    counts = parameter_summary(model)
    result = {"mode": mode, "trainable": counts["trainable"], "total": counts["total"]}
    if rank:
        result.update(lora_parameter_count(encoder))
    model.compile(
        keras.optimizers.Adam(1e-4),
        loss={"probabilities": keras.losses.BinaryCrossentropy(), "embedding": ShadowLoss(0.5)},
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32")
    y = (rng.uniform(size=(batch, 8)) < 0.3).astype("float32")
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.train_on_batch(x, {"probabilities": y, "embedding": y})
        times.append(time.perf_counter() - start)
    result["step_seconds"] = float(np.median(times[1:]))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # the subprocess
        print("RESULT " + json.dumps(one_mode(args.mode, args.image_size, args.batch, args.steps)))
        return 0
    results = {}
    for mode in ("lora", "lora_per_head", "full"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--image-size",
                str(args.image_size),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(line[0][len("RESULT ") :])
    lora, per_head, full = results["lora"], results["lora_per_head"], results["full"]
    print(f"CLIP ViT-B/16 vision encoder, {args.image_size} px, batch {args.batch}, per-eye, CPU")
    print(f"encoder parameters: {lora['encoder_parameters']:,}")
    verdict = "meets" if lora["lora_share"] < 0.01 else "MISSES"
    print(
        f"LoRA rank 8 on query/value (kfundus default, the paper's factorisation): {lora['lora_parameters']:,} "
        f"= {100 * lora['lora_share']:.2f} % of the encoder ({verdict} the < 1 % target)"
    )
    print(
        f"  with Keras' per-head factorisation (lora_per_head: true): {per_head['lora_parameters']:,} "
        f"= {100 * per_head['lora_share']:.2f} %"
    )
    print(
        f"trainable with the head: LoRA {lora['trainable']:,}, per-head {per_head['trainable']:,}, "
        f"full {full['trainable']:,}"
    )
    for name, row in (("LoRA", lora), ("LoRA per-head", per_head)):
        print(
            f"{name} vs full fine-tuning: step {row['step_seconds']:.2f} s vs {full['step_seconds']:.2f} s "
            f"(ratio {row['step_seconds'] / full['step_seconds']:.2f}); peak RSS {row['peak_rss_mb']:.0f} MB vs "
            f"{full['peak_rss_mb']:.0f} MB (ratio {row['peak_rss_mb'] / full['peak_rss_mb']:.2f})"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
