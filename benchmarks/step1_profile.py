"""Where a Step 1 iteration spends its time: data loading, encoder forward/backward, render forward/backward, losses,
optimizer.

    python benchmarks/step1_profile.py --img_path IMAGE_ROOT [--preset demo|paper] [--iters 10] [--device auto]

The networks, face model, losses, data loader and optimizer are built as ``Step1_Pretrain_MoFA.py`` builds them; the
iteration is the one ``utils.training.loop.train_loop`` runs, cut into phases that are timed one after the other
(with a device synchronisation at each cut, so the phases add up to slightly more than an unmeasured iteration
on CUDA, where work otherwise overlaps). The backward pass is split at the coefficients: ``autograd.grad`` of the
loss to the coefficients is the render's (and losses') backward, ``coeffs.backward(grad)`` the encoder's; together
they are exactly one ``loss.backward()``. Presets:

- ``demo``: the settings of ``make demo`` (96 px, ResNet-18, batch 16, Adam; utils/demo_pipeline.py DEMO);
- ``paper``: 224 px, ResNet-50, batch 12, Adadelta (Step 1's defaults).

Any flag given explicitly overrides the preset. The last line is ``renderer_share=<x>``: (render forward + render
backward) / iteration. Without --img_path a synthetic image root is written under --work_dir first.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

from models.face_model import FaceModel  # noqa: E402
from models.layout import CoeffLayout  # noqa: E402
from utils import losses  # noqa: E402
from utils.cli import repo_root, resolve_device  # noqa: E402
from utils.data.datasets import FaceDataset, collate_faces  # noqa: E402
from utils.host_memory import retain_freed_memory  # noqa: E402
from utils.training.builders import build_mofa  # noqa: E402
from utils.training.data_order import make_train_loader  # noqa: E402
from utils.training.objectives import LossSetup, step1_terms  # noqa: E402
from utils.training.run import make_optimizer  # noqa: E402

REPO = repo_root()

PRESETS = {
    "demo": {"image_size": 96, "encoder": "resnet18", "batch_size": 16, "optimizer": "adam", "learning_rate": 1e-3,
             "bfm": REPO / "basel_3DMM" / "demo_face_model.h5"},
    "paper": {"image_size": 224, "encoder": "resnet50", "batch_size": 12, "optimizer": "adadelta",
              "learning_rate": 0.1, "bfm": REPO / "basel_3DMM" / "demo_face_model_53k.h5"},
}
PHASES = ("data", "to_device", "encoder_fwd", "render_fwd", "losses", "render_bwd", "encoder_bwd", "optimizer")
RENDER_PHASES = ("render_fwd", "render_bwd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--img_path", default=None, help="image root (default: a synthetic one under --work_dir)")
    p.add_argument("--work_dir", default=str(REPO / "runs" / "step1_profile"), help="where synthetic data goes")
    p.add_argument("--bfm", default=None, help="face model h5 (default: the preset's demo model)")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--encoder", default=None, choices=("resnet18", "resnet34", "resnet50"))
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=("adam", "adadelta"))
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the demo uses 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the encoder on CUDA, as --amp does")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def ensure_demo_data(args: argparse.Namespace, device: torch.device) -> Path:
    """The image root to read: --img_path, or a small synthetic one (8 training batches, reused across epochs)
    written once under --work_dir; the preset's demo face model is written first when missing."""
    bfm = Path(args.bfm).resolve()
    if not bfm.is_file() and bfm in (PRESETS["demo"]["bfm"], PRESETS["paper"]["bfm"]):
        from utils.synthetic.demo_face_model import write_demo_face_model
        size = {"target_vertices": 53000} if bfm == PRESETS["paper"]["bfm"] else {}
        write_demo_face_model(bfm, seed=0, **size)
    if args.img_path:
        return Path(args.img_path)
    root = Path(args.work_dir) / f"data_{args.image_size}_{args.batch_size}"
    if not (root / "ground_truth.csv").is_file():
        from utils.synthetic import faces
        n = 10 * args.batch_size  # 80 % train: 8 batches
        code = faces.main(["--bfm", str(bfm), "--out", str(root), "--num", str(n), "--size", str(args.image_size),
                           "--device", str(device), "--overwrite"])
        if code:
            raise SystemExit(f"writing the synthetic image root {root} failed")
    return root


def main(argv=None) -> int:
    args = parse_args(argv)
    retain_freed_memory()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    root = ensure_demo_data(args, device)
    layout = CoeffLayout()
    face_model = FaceModel.from_h5(args.bfm, layout).to(device)  # cropped, as Step 1 loads it
    spec = {"encoder": args.encoder, "image_size": args.image_size, "camera": "g2",
            "layout": {"n_shape": layout.n_shape, "n_exp": layout.n_exp, "n_tex": layout.n_tex},
            "unet_width": 64, "face_model": face_model.config()}
    mofa = build_mofa(spec, face_model, restoring=True).to(device)
    setup = LossSetup(layout, torch.tensor(losses.LANDMARK_WEIGHTS_G2), landmark_scale=224.0 / args.image_size)
    weights = losses.Step1Weights()
    dataset = FaceDataset(root, "train", args.image_size)
    loader, sampler = make_train_loader(dataset, args.batch_size, 0, args.workers, collate_fn=collate_faces)
    optimizer = make_optimizer(args.optimizer, mofa.encoder.parameters(), args.learning_rate)
    use_amp = args.amp and device.type == "cuda"
    print(f"device {device}, threads {torch.get_num_threads()}, {args.encoder}, {args.image_size} px, batch "
          f"{args.batch_size}, {args.optimizer}, mesh {face_model.n_vertices} vertices / {face_model.n_faces} "
          f"triangles, workers {args.workers}", flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def clock() -> tuple[float, float]:
        sync()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime

    totals = {name: [0.0, 0.0] for name in PHASES}
    batches, done = iter_forever(loader, sampler), 0
    mofa.encoder.train()
    while done < args.warmup + args.iters:
        marks = [clock()]
        batch = next(batches)
        marks.append(clock())
        images, landmarks = batch["image"].to(device), batch["landmarks"].to(device)
        marks.append(clock())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            coeffs = mofa.encoder(images)
        coeffs = coeffs.float()
        marks.append(clock())
        out = mofa.renderer(coeffs)
        marks.append(clock())
        terms, _ = step1_terms(out, images, landmarks, setup, None)
        loss = losses.weighted_sum(terms, weights)
        marks.append(clock())
        (grad_coeffs,) = torch.autograd.grad(loss, coeffs)
        marks.append(clock())
        coeffs.backward(grad_coeffs)
        marks.append(clock())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(clock())
        done += 1
        if done > args.warmup:
            for name, start, stop in zip(PHASES, marks[:-1], marks[1:]):
                totals[name][0] += stop[0] - start[0]
                totals[name][1] += stop[1] - start[1]
    report(totals, args, device)
    return 0


def iter_forever(loader, sampler):
    """Batches across epochs (the sampler's order, as the training loop reads it)."""
    epoch = 0
    while True:
        sampler.set_position(epoch, 0)
        yield from loader
        epoch += 1


def report(totals: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Per-phase mean ms per iteration (wall, and CPU on CPU) and shares of the wall total."""
    n = args.iters
    wall = sum(t[0] for t in totals.values())
    use_cpu = device.type == "cpu"
    print(f"| phase | ms / iteration (wall) |{' CPU ms |' if use_cpu else ''} share |")
    print(f"|---|---|{'---|' if use_cpu else ''}---|")
    for name in PHASES:
        w, c = totals[name]
        cpu = f" {1000 * c / n:.1f} |" if use_cpu else ""
        print(f"| {name} | {1000 * w / n:.1f} |{cpu} {100 * w / wall:.1f} % |")
    print(f"iteration: {1000 * wall / n:.1f} ms wall, {n / wall:.2f} it/s, {n * args.batch_size / wall:.1f} images/s")
    render = sum(totals[name][0] for name in RENDER_PHASES)
    print(f"renderer_share={render / wall:.4f}")


if __name__ == "__main__":
    sys.exit(main())
