"""Training-step throughput and model FLOP utilisation (MFU) on Keras 3 + JAX.

    KERAS_BACKEND=jax python benchmarks/gpu.py                 # GPU: 224 px, full sizes
    KERAS_BACKEND=jax python benchmarks/gpu.py --small         # CPU: 64 px, batch 8, 3 steps

Two kfundus models, each trained with a jitted stateless step (forward, backward,
optimizer update: what ``model.fit`` runs per batch) on in-memory random data:

- ``efficientnet_b0``: kfundus' EfficientNet-B0 classifier (random weights, all trainable);
- ``clip_lora``: the CLIP ViT-B/16 vision encoder with LoRA rank 8 on query/value (only the
  adapters and the head train), as in the shipped ``odir_clip_lora_shadow`` config.

Mixed precision (``--precision mixed_bfloat16``, the default: bf16 compute, float32
weights; no loss scaling needed) or float32. Images/s is the batch over the median step
time after ``--warmup`` steps (compilation excluded).

FLOPs (the choice made here): MFU counts *model* FLOPs from an analytic formula
(``model_flops``): EfficientNet-B0 0.39 G multiply-adds per 224-px image (Tan & Le 2019),
scaled by (size/224)^2, x2 FLOP/MAC, x3 for a training step (forward + backward for
activations and weights); ViT-B/16 the matmuls of patch embedding, attention projections,
attention scores and MLP, x2 for the LoRA training step (the frozen weights need no weight
gradients; the adapters' share is negligible). XLA's count of the compiled step (jax cost
analysis: includes elementwise work and the optimizer) is reported beside it.
MFU = (model FLOPs per step / step time) / device peak, the peak from a table of dense
bf16/fp16 tensor-core (or fp32) figures for known GPUs ("unknown" otherwise, and on CPU).
Nothing here imports TensorFlow: it runs where only JAX is installed.
Results go to stdout (a markdown table) and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense (no sparsity) peak FLOP/s per device: (bf16/fp16 tensor core, fp32), vendor data sheets.
PEAKS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM / HBM3
    "A100": (312e12, 19.5e12),
    "A10G": (70e12, 31.2e12),  # before "A10": more specific names first
    "A10": (125e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
    "RTX 4090": (165e12, 82.6e12),
}


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None) if device.platform == "gpu" else None
    return {
        "platform": device.platform,
        "device": kind,
        "count": jax.device_count(),
        "peak_mixed": peak[0] if peak else None,
        "peak_fp32": peak[1] if peak else None,
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def model_flops(name: str, image_size: int, encoder: dict) -> float:
    """Analytic model FLOPs of one training step per image (see the module docstring)."""
    if name == "efficientnet_b0":
        return 3 * 2 * 0.39e9 * (image_size / 224) ** 2
    p, d, layers = encoder["patch_size"], encoder["hidden_dim"], encoder["num_layers"]
    patches = (image_size // p) ** 2
    n = patches + 1
    forward = 2 * patches * p * p * 3 * d  # patch embedding
    forward += layers * (2 * n * 4 * d * d + 2 * 2 * n * d * encoder["intermediate_dim"] + 2 * 2 * n * n * d)
    return 2 * forward


def build(name: str, image_size: int, tiny: bool):
    """(model, loss) of a kfundus model family, random weights."""
    import keras

    from kfundus.systems.clip_lora.model import build_clip_lora
    from kfundus.systems.efficientnet.model import build_efficientnet_b0

    if name == "efficientnet_b0":
        return build_efficientnet_b0(8, image_size=image_size), keras.losses.BinaryCrossentropy()
    model = build_clip_lora(8, image_size=image_size, encoder_config=encoder_config(tiny), lora_rank=8, lora_alpha=16)
    return model, keras.losses.BinaryCrossentropy()


def encoder_config(tiny: bool) -> dict:
    from kfundus.systems.clip_lora.encoders import CLIP_B16

    return dict(CLIP_B16, hidden_dim=64, num_layers=2, num_heads=2, intermediate_dim=128) if tiny else dict(CLIP_B16)


def measure(name: str, image_size: int, batch: int, steps: int, warmup: int, tiny: bool) -> dict:
    import jax
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model, loss_fn = build(name, image_size, tiny)
    optimizer = keras.optimizers.AdamW(1e-4)
    optimizer.build(model.trainable_variables)
    multi_output = isinstance(model.output, dict)

    def loss_of(trainable, non_trainable, x, y):
        y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        if multi_output:
            y_pred = y_pred["probabilities"]
        return loss_fn(y, y_pred), non_trainable

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32"))
    y = jax.numpy.asarray(rng.integers(0, 2, (batch, 8)).astype("float32"))
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, x, y).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss, state = compiled(state, x, y)
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = float(np.median(times))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.variables)
    model_step = model_flops(name, image_size, encoder_config(tiny)) * batch
    return {
        "model": name,
        "image_size": image_size,
        "batch": batch,
        "steps": steps,
        "step_s": step,
        "images_per_s": batch / step,
        "model_gflops_per_image": model_step / batch / 1e9,
        "xla_flops_per_step": flops,
        "xla_gflops_per_image": flops / batch / 1e9,
        "achieved_tflops": model_step / step / 1e12,
        "compile_s": compile_s,
        "loss": float(loss),
        "trainable_params": trainable,
        "params": total,
        "tiny_encoder": tiny,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU size: 64 px, batch 8, 3 steps")
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "clip_lora"])
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="default 128 (GPU) / 8 (--small)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["mixed_bfloat16", "float32"], default="mixed_bfloat16")
    parser.add_argument("--tiny-encoder", action="store_true", help="a 2-layer CLIP encoder (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark_gpu.json"))
    args = parser.parse_args(argv)

    import keras

    if keras.backend.backend() != "jax":
        parser.error(f"KERAS_BACKEND={keras.backend.backend()}: this benchmark is for the JAX backend")
    keras.mixed_precision.set_global_policy(args.precision)
    info = device_info()
    size = args.image_size or (64 if args.small else 224)
    batch = args.batch or (8 if args.small else 128)
    steps = args.steps or (3 if args.small else 20)
    peak = info["peak_mixed"] if args.precision != "float32" else info["peak_fp32"]
    rows = []
    for name in args.models:
        row = measure(name, size, batch, steps, args.warmup, args.tiny_encoder)
        row["mfu"] = row["achieved_tflops"] * 1e12 / peak if peak else None
        rows.append(row)
        print(
            f"{name}: {row['images_per_s']:.1f} img/s, {row['model_gflops_per_image']:.2f} GFLOP/img (train step), "
            f"{row['achieved_tflops']:.2f} TFLOP/s, MFU {row['mfu'] if row['mfu'] is None else round(row['mfu'], 3)}",
            flush=True,
        )
    result = {"device": info, "precision": args.precision, "command": " ".join(["python", *sys.argv]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
    print(
        f"\ndevice: {info['device']} x{info['count']} ({info['platform']}), peak {peak_text}, {args.precision}, "
        f"jax {info['jax']}\n"
    )
    print("| model | px | batch | img/s | model GFLOP/img (train) | XLA GFLOP/img | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['images_per_s']:.1f} | "
            f"{r['model_gflops_per_image']:.2f} | {r['xla_gflops_per_image']:.2f} | "
            f"{r['achieved_tflops']:.3f} | {mfu} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
