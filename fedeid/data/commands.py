"""``fedeid generate``: write the synthetic benchmark to disk as the real-data loader reads it.

Seeing the data, and feeding it back through :func:`fedeid.data.loaders.load_csv`, is how a user
checks that the synthetic benchmark and the real-data path agree: the same images, patients and
labels come back.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fedeid.commands import add_config_args, add_output_args, config_from_args
from fedeid.config import Config
from fedeid.io import OutputFolder, atomic_open, atomic_save, atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", description="Render the synthetic benchmark of the chosen preset (every site's training "
                    "patients and the held-out test patients) into OUT: 16-bit grey PNGs under "
                    "OUT/site<k>/ and OUT/test/, one row per image in OUT/labels.csv (path, patient_id, "
                    "site, then one 0/1 column per finding) and the configuration in OUT/config.json. "
                    "labels.csv is the format `--set data.source=OUT/labels.csv` loads; held-out patients "
                    "have ids from 10000000 up. Every file is written atomically; a file in OUT that no "
                    "fedeid run recorded in OUT/fedeid-manifest.json is never replaced without --overwrite.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    add_output_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    written = write_synthetic(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {written} images and labels.csv to {args.out}; "
          f"load them with --set data.source={args.out / 'labels.csv'}")
    return 0


def write_synthetic(cfg: Config, out: Path, overwrite: bool = False, progress: bool = True) -> int:
    """Render and write every split, then ``labels.csv`` last (so a complete CSV means a complete set).

    Each split's files are all claimed before any is written, so a file fedeid may not replace
    stops the command before it writes that split (the files already written are in the manifest).
    """
    folder = OutputFolder(out, [], "generate", overwrite=overwrite)  # refuse a bad OUT before any work
    import numpy as np
    from PIL import Image

    from fedeid.data.loaders import CSV_PATH, CSV_PATIENT, CSV_SITE
    from fedeid.data.synthetic import generate_site, generate_test
    from fedeid.progress import Progress

    d = cfg.data
    total = (d.n_sites * d.patients_per_site + d.test_patients) * d.images_per_patient
    splits = [(f"site{s}", lambda s=s: generate_site(d, s)) for s in range(d.n_sites)]
    splits.append(("test", lambda: generate_test(d)))
    rows: list[list[object]] = []
    names: tuple[str, ...] = ()
    folder.info = {"config": cfg.to_dict()}
    with folder, Progress(total, "generate", "image", enabled=progress) as bar:
        for split, make in splits:
            data = make()
            names = data.finding_names
            count: dict[int, int] = {}
            batch = []
            for img, pid, lab, site in zip(data.images, data.patient_ids, data.labels, data.sites):
                j = count[int(pid)] = count.get(int(pid), -1) + 1
                rel = f"{split}/p{int(pid)}_{j}.png"
                batch.append((folder.claim(rel), rel, img, [rel, int(pid), int(site), *(int(v) for v in lab)]))
            for target, rel, img, row in batch:
                pixels = np.round(img * 65535).astype(np.uint16)
                atomic_save(target, lambda fh, px=pixels: Image.fromarray(px).save(fh, format="PNG"))
                folder.record(rel, rel, "written")
                rows.append(row)
                bar.update()
        for rel in ("config.json", "labels.csv"):
            folder.claim(rel)
        atomic_write_json(out / "config.json", cfg.to_dict())
        folder.record("config.json", "config.json", "written")
        with atomic_open(out / "labels.csv", "w") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([CSV_PATH, CSV_PATIENT, CSV_SITE, *names])
            writer.writerows(rows)
        folder.record("labels.csv", "labels.csv", "written")
    return len(rows)
