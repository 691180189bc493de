"""Cost of the dlib identity network: forward + backward per image against a ResNet-50 forward.

    python benchmarks/dlib_face.py [--batch 12] [--size 224] [--repeats 5] [--device auto] [--threads N]

Timed (median of --repeats after one warm-up, per image):
- **identity**: `DlibIdentityEncoder` on (batch, 3, size, size) images with 68 landmarks: the differentiable 150x150
  face chip, the ResNet forward, the identity loss against a fixed target, backward to the images (what Step 1's and
  Step 4's identity term costs per image, besides the target's forward);
- **shallow**: `DlibIdentityEncoder.shallow` forward + backward (one of the three calls of Step 4's preserve / dist);
- **reference**: a torchvision ResNet-50 forward (no grad) at the same batch and size.
Also the time to read the model file. Last line: ``ratio_dlib_fwd_bwd_to_resnet50=<x>``.
Wall time, so meaningful on a quiet machine only; on CPU it also reports single-process CPU time (user + system),
which a shared machine disturbs less.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

from models.dlib_face import DlibIdentityEncoder, load_dlib_face_net  # noqa: E402
from utils.cli import resolve_device  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_call(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of ``fn()`` in seconds, after one warm-up call."""
    fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def face_landmarks(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """68 plausible landmarks of a centred face filling about half of a size x size image (eye corners, nose base
    are what the chip uses; the other points only need to exist)."""
    lm = torch.full((68, 2), size / 2.0)
    s = size / 224.0
    lm[36], lm[39], lm[42], lm[45] = (torch.tensor(p) * s for p in ((72.0, 100.0), (98.0, 101.0), (126.0, 101.0),
                                                                    (152.0, 100.0)))
    lm[33] = torch.tensor((112.0, 140.0)) * s
    return lm.expand(batch, 68, 2).clone().to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    net = load_dlib_face_net()
    load_s = time.perf_counter() - t0
    encoder = DlibIdentityEncoder(net=net).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    landmarks = face_landmarks(args.batch, args.size, device)
    with torch.no_grad():
        target = encoder(images.flip(3), landmarks)

    def identity_step():
        x = images.detach().requires_grad_(True)
        (1.0 - torch.nn.functional.cosine_similarity(encoder(x, landmarks), target, dim=1)).mean().backward()

    def shallow_step():
        x = images.detach().requires_grad_(True)
        encoder.shallow(x, landmarks).mean().backward()

    import torchvision

    resnet = torchvision.models.resnet50().to(device).eval()

    def reference():
        with torch.no_grad():
            resnet(images)

    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, images {args.size}x{args.size}")
    print(f"model file read in {load_s * 1000:.0f} ms")
    results = {}
    for name, fn in (("identity", identity_step), ("shallow", shallow_step), ("resnet50", reference)):
        wall, cpu = time_call(fn, device, args.repeats)
        results[name] = (wall, cpu)
        cpu_part = f", CPU {cpu / args.batch * 1000:.2f} ms/image" if device.type == "cpu" else ""
        print(f"{name:9s} {wall / args.batch * 1000:8.2f} ms/image wall{cpu_part}")
    if device.type == "cpu":
        print(f"ratio_cpu_time={results['identity'][1] / results['resnet50'][1]:.4f}")
    print(f"ratio_dlib_fwd_bwd_to_resnet50={results['identity'][0] / results['resnet50'][0]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
