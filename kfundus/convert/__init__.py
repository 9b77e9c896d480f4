"""Released retinal foundation-model checkpoints (PyTorch) -> kfundus/Keras model folders.

    kfundus convert --from {retfound,flair,retclip} CHECKPOINT --out DIR [--set key=value ...]

or in Python ``convert("retfound", "RETFound_cfp_weights.pth", "models/retfound_cfp")``.
The folder it writes is then named anywhere an encoder is (``model.weights: DIR``,
``transfer.backbones[].weights: DIR``). Checkpoints are read without torch and without
running pickled code (:mod:`kfundus.convert.checkpoints`); a file that is not the model it
was asked to be gets an error saying what it looks like instead (:mod:`kfundus.convert.keys`).

API for converter authors (stable; kept in this order):

- ``checkpoints.read_checkpoint(path, *, model="") -> Checkpoint`` (``.state``: ``{key:
  numpy array}``, ``.config``: a Hugging Face folder's ``config.json``, ``.format``,
  ``.wrapper``, ``.extra``, ``.sha256()``); ``checkpoints.read_state_dict(path, *, model)``
  returns only the state dict. bfloat16 arrives as float32, float16 stays float16 (use
  ``checkpoints.as_float32``).
- ``keys.check_keys(state, expected={key: shape}, *, path, model, kind, ignore=(regex, ...),
  optional=(key, ...), hint="") -> KeyReport(used, ignored, missing_optional)``; raises the
  DataError with the diagnosis. ``keys.SIGNATURES`` (a list of ``keys.Signature``) is what
  ``keys.identify``/``keys.looks_like`` recognise; add your layout there if it is missing.
- a converter: ``def convert_<kind>(checkpoint: Checkpoint, out_dir: Path, *, option=default,
  ...) -> base.Converted(model, files, ignored, details, parity, use)``, registered below as
  ``"<kind>": "<module>:<function>"`` in :data:`CONVERTERS` (one line; imported on use, so
  this package stays light). Its keyword-only arguments are the ``--set`` options; unknown
  ones are a ConfigError listing them. ``convert()`` reads the checkpoint (error messages
  name ``MODELS[kind]``), calls the converter, and writes ``conversion.json``.
- ``resolve_converted(weights, kind, option="model.weights") -> Path``: what a model builder
  calls on its ``weights`` value: a converted folder of that kind (checked through its
  ``conversion.json``), or ``KIND:/path/checkpoint`` converted once into
  ``cache_dir()`` (``$KFUNDUS_CACHE_DIR/converted``) with default options.
- fixtures: ``tests/fixtures/foundation/make_fixtures.py`` (torch venv, ``make fixtures``)
  has a ``GENERATORS`` registry (tiny, committed) and ``FULL_GENERATORS`` (full size, for
  ``make test-foundation``, written under ``.cache/foundation``); add one function each.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from kfundus.convert.base import CONVERSION_FILE, Converted, read_conversion
from kfundus.convert.checkpoints import Checkpoint, read_checkpoint, read_state_dict
from kfundus.convert.keys import check_keys, identify, looks_like
from kfundus.errors import ConfigError

# kind -> "module:function" of its converter (imported when used).
CONVERTERS: dict[str, str] = {
    "retfound": "kfundus.systems.retfound.convert:convert_retfound",
    "flair": "kfundus.systems.flair.convert:convert_flair",
    "retclip": "kfundus.systems.retclip.convert:convert_retclip",
}
# kind -> what a checkpoint given to it should be, for error messages.
MODELS: dict[str, str] = {
    "retfound": "RETFound (MAE ViT, timm layout)",
    "flair": "FLAIR (ResNet-50 + Bio_ClinicalBERT)",
    "retclip": "RET-CLIP (ViT-B/16 + Chinese RoBERTa)",
}

__all__ = [
    "CONVERSION_FILE",
    "CONVERTERS",
    "MODELS",
    "Checkpoint",
    "Converted",
    "cache_dir",
    "check_keys",
    "convert",
    "get_converter",
    "identify",
    "looks_like",
    "peak_memory_mb",
    "read_checkpoint",
    "read_conversion",
    "read_state_dict",
    "resolve_converted",
]


def get_converter(kind: str):
    """The converter function of a kind (ConfigError naming the kinds there are)."""
    if kind not in CONVERTERS:
        raise ConfigError(
            f"--from {kind}: no converter for that; use one of {sorted(CONVERTERS)} "
            f"(e.g. kfundus convert --from {sorted(CONVERTERS)[0]} CHECKPOINT --out DIR)"
        )
    module, _, name = CONVERTERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def cache_dir() -> Path:
    """Where checkpoints named as ``KIND:PATH`` are converted on first use:
    ``$KFUNDUS_CACHE_DIR/converted`` (default ``~/.cache/kfundus/converted``)."""
    root = os.environ.get("KFUNDUS_CACHE_DIR", Path.home() / ".cache" / "kfundus")
    return Path(root) / "converted"


def resolve_converted(weights, kind: str, *, option: str = "model.weights") -> Path:
    """The converted folder a weights value names, converting on first use.

    Args:
        weights: a folder ``kfundus convert`` wrote, or ``KIND:CHECKPOINT``
            (``retfound:/models/RETFound_cfp_weights.pth``): the checkpoint is converted
            with default options into :func:`cache_dir` once (keyed by its path, size and
            modification time) and that folder is returned afterwards.
        kind: the kind the caller needs (``retfound``).
        option: the config key that holds ``weights``, for messages.

    Returns:
        The folder.

    Raises:
        ConfigError: a checkpoint file given without ``KIND:``, a folder of another kind, or
            a prefix naming another kind.
        DataError: the checkpoint cannot be read or converted.
    """
    text = str(weights)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in CONVERTERS and not Path(text).exists():
        if prefix != kind:
            raise ConfigError(f"{option}={text!r} names a {prefix} checkpoint; this model needs {kind}:PATH")
        source = Path(rest).expanduser()
        if not source.exists():
            raise ConfigError(f"{option}={text!r}: no such file or folder {source}")
        stat = source.resolve().stat()
        key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        folder = cache_dir() / f"{kind}-{source.stem}-{key}"
        if not (folder / CONVERSION_FILE).is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"converting {source} ({kind}) into {folder} (once) ...", flush=True)
            convert(kind, source, tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        return folder
    folder = Path(text).expanduser()
    if folder.is_dir() and (folder / CONVERSION_FILE).is_file():
        found = read_conversion(folder).get("kind")
        if found != kind:
            raise ConfigError(f"{option}={text!r} holds a converted {found} model; this model needs {kind}")
        return folder
    if folder.is_file():
        raise ConfigError(
            f"{option}={text!r} is a checkpoint file, not a converted folder: convert it once with "
            f"`kfundus convert --from {kind} {text} --out DIR` and set {option}=DIR, or let kfundus convert it "
            f"on first use with --set {option}={kind}:{text}"
        )
    raise ConfigError(
        f"{option}={text!r}: no folder `kfundus convert` wrote there (it needs {CONVERSION_FILE}); give "
        f"the folder kfundus convert --from {kind} ... --out DIR wrote, or {kind}:/path/to/checkpoint"
    )


def peak_memory_mb() -> float:
    """The process's peak resident memory so far, in MB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def convert(kind: str, checkpoint, out_dir, *, overwrite: bool = False, **options) -> Path:
    """Convert a released checkpoint into a kfundus model folder.

    Args:
        kind: ``retfound``, ``flair`` or ``retclip`` (the keys of :data:`CONVERTERS`).
        checkpoint: the released file (``.pth``, ``.bin``, ``.safetensors``) or Hugging Face folder.
        out_dir: the folder to write (created); it must be empty or absent unless ``overwrite``.
        overwrite: replace what an earlier conversion wrote there.
        **options: the converter's options (``kfundus convert --set key=value``).

    Returns:
        ``out_dir``, holding the model files and ``conversion.json`` (source file and its
        SHA-256, kind, options, ignored keys, parity note, kfundus version, date, seconds and
        peak memory).

    Raises:
        ConfigError: unknown kind or option, or ``out_dir`` holds other files.
        DataError: the checkpoint is missing, damaged, hostile or not that model.
    """
    from kfundus import __version__
    from kfundus.systems.base import check_options

    fn = get_converter(kind)
    check_options(fn, options, f"kfundus convert --from {kind} --set", skip={"checkpoint", "out_dir"})
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--out {out_dir} already holds files; give an empty or new folder, or add --overwrite "
                "to replace an earlier conversion"
            )
        if not (out_dir / CONVERSION_FILE).is_file():
            raise ConfigError(
                f"--out {out_dir} holds files kfundus convert did not write (no {CONVERSION_FILE}); "
                "--overwrite only replaces an earlier conversion: give an empty or new folder"
            )
    start = time.perf_counter()
    ckpt = read_checkpoint(checkpoint, model=MODELS.get(kind, kind))
    read_seconds = time.perf_counter() - start
    if overwrite and (out_dir / CONVERSION_FILE).is_file():
        shutil.rmtree(out_dir)  # no stale file of the earlier conversion (a head.npz) survives
    out_dir.mkdir(parents=True, exist_ok=True)
    converted: Converted = fn(ckpt, out_dir, **options)
    seconds = time.perf_counter() - start
    record = {
        "kind": kind,
        "model": converted.model,
        "source": str(Path(checkpoint).expanduser().resolve()),
        "source_files": [str(f) for f in ckpt.files],
        "sha256": ckpt.sha256(),
        "format": ckpt.format,
        "wrapper": ckpt.wrapper,
        "stripped_prefix": ckpt.stripped_prefix,
        "stored_dtypes": ckpt.dtypes,
        "other_entries": ckpt.extra,
        "options": options,
        "files": converted.files,
        "ignored_keys": converted.ignored,
        "details": converted.details,
        "parity": converted.parity,
        "use": converted.use,
        "kfundus_version": __version__,
        "converted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "read_seconds": round(read_seconds, 2),
        "peak_memory_mb": peak_memory_mb(),
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=1, default=str))
    return out_dir
