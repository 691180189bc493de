# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Step 2: write the preliminary occlusion masks that pretrain the UNet in Step 3.

    python Step2_UNet_trainset_generation.py --img_path ./image_root

With the Step-1 encoder (eval, no grad) every image of the chosen splits is reconstructed; its preliminary mask is
the robust loss's inlier mask (docs/method.md §9): inside the rendered face and ||I - R||_RGB < 3 sigma (0.129).
With --fit_steps N the encoder's coefficients of every image are first refined by N Adam steps on Step 1's loss for
that image (test-time fitting, utils/fitting.py; network weights untouched), and the render and mask come from the
fitted coefficients; the default 0 is the paper's feed-forward network.
Writes <save_root>/UNet_trainset/: X_org.png, X_raster.png, X_mask.png for every image X (its path relative to
IMAGE_ROOT/Dataset, extension kept, so names are unique; PNG keeps masks binary) and <split>_list.csv for each
split (what Step 3 reads). A folder holding an earlier Step-2 output is refused unless --overwrite is given, which
removes only the files that run's manifest lists (.mofa_manifest.json, written before the first sample).
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()


import argparse
import logging

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.face_model import FaceModel
from models.layout import CoeffLayout
from utils import cli, losses
from utils.data.datasets import FaceDataset, collate_faces
from utils.data.unet_trainset import SUFFIXES, check_unique, stem_for, write_list, write_sample
from utils.errors import DataError
from utils.fitting import add_fit_args, checkpoint_preset, fit_images
from utils.training import flags
from utils.training.builders import announce_spec, load_mofa, previous_checkpoint
from utils.training.run import finish_run, start_run

log = logging.getLogger("step2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_common_args(p)
    p.add_argument("--pretrained_MoFA", "--mofa_checkpoint", dest="mofa_checkpoint", default=None,
                   help="Step-1 checkpoint (default: <save_root>/pretrain_mofa/final.pt)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--splits", default="train,val", help="comma-separated splits to process (default %(default)s)")
    p.add_argument("--sigma", type=float, default=losses.SIGMA, help="robust-loss sigma; inliers are within 3 sigma")
    add_fit_args(p, "the preliminary masks")
    return cli.resolve_paths(p.parse_args(argv))


@torch.no_grad()
def write_split(mofa, dataset: FaceDataset, run, args, out_dir, preset=None) -> list[tuple[str, str]]:
    """Process this rank's share of one split; return every ``(stem, filename)`` row of the split. With
    ``args.fit_steps`` > 0 the coefficients are fitted first (``preset``: Step 1's loss preset)."""
    mine = Subset(dataset, range(run.dist.rank, len(dataset), run.dist.world_size))
    loader = DataLoader(mine, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_faces)
    for batch in tqdm(loader, desc=f"step2 {dataset.split}", disable=not run.is_main, mininterval=2.0):
        images = batch["image"].to(run.device)
        if args.fit_steps > 0:
            out = fit_images(mofa, images, batch["landmarks"].to(run.device), args.fit_steps, args.fit_lr, preset,
                             sigma=args.sigma).out
        else:
            out = mofa(images)
        masks = losses.inlier_mask(images, out.image, out.mask, sigma=args.sigma)
        for name, image, raster, mask in zip(batch["filename"], images, out.image, masks):
            write_sample(out_dir, stem_for(name), image, raster, mask)
    return [(stem_for(name), name) for name in dataset.filenames]


def generate(args) -> int:
    run = start_run(args, step=2)
    face_model = FaceModel.from_h5(args.bfm, CoeffLayout()).to(run.device)
    ckpt = previous_checkpoint(args.mofa_checkpoint, args.save_root, step=1)
    mofa, payload, spec = load_mofa(ckpt, face_model, run.device)
    announce_spec(args, spec, f"the Step-1 checkpoint {ckpt}")
    preset = checkpoint_preset(payload)
    if args.fit_steps > 0:
        log.info("test-time fitting: %d Adam steps (lr %g) per image on Step 1's loss", args.fit_steps, args.fit_lr)
    datasets = {split: FaceDataset(args.img_path, split, spec["image_size"], test_mode=True)
                for split in dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip())}
    if not datasets:
        raise DataError(f"--splits {args.splits!r}: name at least one split, e.g. train,val")
    check_unique((str(d.root.csv(split)), name) for split, d in datasets.items() for name in d.filenames)
    planned = [f"{stem_for(name)}{suffix}" for d in datasets.values() for name in d.filenames for suffix in SUFFIXES]
    run.claim(planned=planned + [f"{split}_list.csv" for split in datasets])  # its manifest: --overwrite removes these
    for split, dataset in datasets.items():
        rows = write_split(mofa, dataset, run, args, run.out_dir, preset)
        run.barrier()
        if run.is_main:
            write_list(run.out_dir / f"{split}_list.csv", rows)
            log.info("%s: %d images -> %s", split, len(rows), run.out_dir)
    finish_run(run)
    return 0


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return generate(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
