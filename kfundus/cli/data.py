"""``kfundus synth``: synthetic datasets in the public layouts."""

from __future__ import annotations

from kfundus.errors import ConfigError

LAYOUTS = ("odir", "rfmid", "dr", "oct", "hrdc")


def cmd_synth(args) -> int:
    import pandas as pd

    from kfundus.data import synthetic
    from kfundus.data.synthetic.fundus import RFMID_SPLITS
    from kfundus.labels import ODIR_LABELS, RFMID_46

    if args.size < 16 or args.aspect < 1 or min(args.patients, args.images) < 1:
        raise ConfigError("--size must be >= 16, --aspect >= 1, --patients and --images >= 1")
    if args.layout == "oct":
        out = synthetic.make_oct(args.out, n_patients=args.patients, size=args.size, seed=args.seed, aspect=args.aspect)
        counts = {f"{p.parent.name}/{p.name}": len(list(p.glob("*.jpeg"))) for p in sorted(out.glob("*/*"))}
        print(f"wrote synthetic OCT B-scans (Kermany layout) to {out}: {counts}")
        return 0
    if args.layout == "hrdc":
        out = synthetic.make_hrdc(args.out, n_images=args.images, size=args.size, seed=args.seed)
        print(f"wrote {args.images} images (CGI-HRDC layout) to {out}: 1-Images/, 2-Groundtruths/")
        return 0
    if args.layout == "dr":
        out = synthetic.make_dr(args.out, n_patients=args.patients, size=args.size, seed=args.seed, aspect=args.aspect)
        grades = pd.read_csv(out / "trainLabels.csv")["level"].value_counts().sort_index().to_dict()
        print(f"wrote {2 * args.patients} eyes (EyePACS layout) to {out}: trainLabels.csv, train/; grades {grades}")
        return 0
    common = dict(size=args.size, seed=args.seed, aspect=args.aspect, write_masks=not args.no_masks)
    masks = "" if args.no_masks else ", masks/"
    if args.layout == "odir":
        out = synthetic.make_odir(args.out, n_patients=args.patients, **common)
        table = pd.read_csv(out / "annotation.csv")
        print(
            f"wrote {len(table)} patients ({2 * len(table)} images, ODIR layout) to {out}: "
            f"annotation.csv, images/{masks}\npatients per label: "
            + ", ".join(f"{k} {int(table[k].sum())}" for k in ODIR_LABELS)
        )
        return 0
    out = synthetic.make_rfmid(args.out, n_images=args.images, **common)
    for split in RFMID_SPLITS:
        table = pd.read_csv(out / f"RFMiD_{split}_Labels.csv")
        positive = {c: int(table[c].sum()) for c in RFMID_46 if table[c].sum()}
        print(f"wrote {len(table)} images to {out / split}, RFMiD_{split}_Labels.csv{masks}: {positive}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset with learnable lesions in a public layout")
    add = p.add_argument
    add(
        "--layout",
        choices=LAYOUTS,
        default="odir",
        help="odir, rfmid, dr (EyePACS DR grades 0-4), oct (Kermany B-scans), hrdc (CGI-HRDC hypertension)",
    )
    add("--out", required=True, help="folder to write")
    add("--patients", type=int, default=100, help="odir, dr: patients (2 images each); oct: patients")
    add("--images", type=int, default=60, help="rfmid, hrdc: images")
    add("--size", type=int, default=128, help="image height in pixels")
    add("--aspect", type=float, default=1.0, help="width / height (>= 1)")
    add("--seed", type=int, default=0)
    add("--no-masks", action="store_true", help="do not write lesion masks")
    p.set_defaults(func=cmd_synth)
