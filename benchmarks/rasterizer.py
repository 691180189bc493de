"""Rasterizer benchmark: a shaded render of a BFM-sized mesh, forward + backward, against a ResNet-50 forward.

    python benchmarks/rasterizer.py [--bfm PATH] [--batch 12] [--size 224] [--repeats 5] [--device auto]
                                    [--threads N] [--cpu_time] [--system_malloc] [--compare_nvdiffrast]

Without --bfm it renders the demo face model generated at ~53k vertices / ~105k triangles (written once to
basel_3DMM/demo_face_model_53k.h5), uncropped, like the full BFM2017 mesh. Timed: coefficients -> vertices ->
normals -> SH shading -> projection -> rasterize -> interpolate -> a scalar loss, then backward to the coefficients;
and, in the same run, a torchvision ResNet-50 forward (no grad) on the same batch. The last line is
``ratio_rasterizer_to_resnet50=<x>`` (target on the 2-core development CPU: <= 0.10). On CUDA it also reports
images per second at --cuda_batch (target on an H100 at batch 64: >= 5000 images/s forward + backward).

Render and ResNet-50 calls alternate (A, B, A, B, ...) so that drifting load affects both alike; the medians of
wall time and of the process's CPU time (user + system) are printed. On a shared machine use
``--threads 1 --cpu_time``: the ratio line then uses CPU time, which other processes inflate far less than wall
time. With ``--compare_nvdiffrast`` (CUDA, package installed) it also times rasterize + interpolate forward and
backward with ``backend="nvdiffrast"`` against the default backend on the same screen vertices and reports how
many pixels see the same face. Like the training steps, the benchmark keeps freed host memory for reuse
(``utils.host_memory``);
``--system_malloc`` measures with glibc's default behaviour instead.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

from models.camera import CameraConfig  # noqa: E402
from models.face_model import FaceModel  # noqa: E402
from models.layout import CoeffLayout  # noqa: E402
from models.rasterizer import interpolate, rasterize  # noqa: E402
from models.renderer import FaceRenderer  # noqa: E402
from utils.cli import repo_root, resolve_device  # noqa: E402
from utils.host_memory import retain_freed_memory  # noqa: E402

REPO = repo_root()

DEFAULT_MODEL = REPO / "basel_3DMM" / "demo_face_model_53k.h5"
SMALL_MODEL = REPO / "basel_3DMM" / "demo_face_model.h5"  # the demo's model (written when asked for and missing)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_calls(fns: dict[str, Callable], device: torch.device, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each ``fn()``, after one warm-up each, the functions called in turn."""
    for fn in fns.values():
        fn()
        sync(device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return {name: (_median([w for w, _ in t]), _median([c for _, c in t])) for name, t in times.items()}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def render_step(renderer: FaceRenderer, coeffs: torch.Tensor):
    """One forward + backward of a shaded render; returns a closure for ``time_call``."""
    def step():
        c = coeffs.detach().requires_grad_(True)
        out = renderer(c)
        loss = (out.image * out.mask).mean()
        loss.backward()
        return c.grad
    return step


def random_coeffs(layout: CoeffLayout, batch: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.randn(batch, layout.total, generator=gen) * 0.5
    parts = layout.split(coeffs)
    parts.angles.mul_(0.4)
    parts.trans.zero_()
    parts.light.mul_(0.2)
    return coeffs.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bfm", default=None, help="face model h5 (default: the 53k-vertex demo model)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--cuda_batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--cpu_time", action="store_true", help="ratio from process CPU time instead of wall time")
    p.add_argument("--system_malloc", action="store_true", help="do not keep freed host memory for reuse")
    p.add_argument("--compare_nvdiffrast", action="store_true", help="CUDA: also time the nvdiffrast backend")
    args = p.parse_args(argv)
    if not args.system_malloc:
        retain_freed_memory()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    path = Path(args.bfm).resolve() if args.bfm else DEFAULT_MODEL
    if not path.is_file() and path in (DEFAULT_MODEL, SMALL_MODEL):
        from utils.synthetic.demo_face_model import write_demo_face_model
        print(f"writing the demo face model to {path} (once)", flush=True)
        write_demo_face_model(path, seed=0, **({"target_vertices": 53000} if path == DEFAULT_MODEL else {}))
    layout = CoeffLayout()
    face_model = FaceModel.from_h5(path, layout, crop=False).to(device)
    renderer = FaceRenderer(face_model, CameraConfig.preset("g2").resized(args.size), layout).to(device)
    print(f"device {device}, threads {torch.get_num_threads()}, mesh {face_model.n_vertices} vertices / "
          f"{face_model.n_faces} triangles, {args.size}x{args.size}, batch {args.batch}")

    coeffs = random_coeffs(layout, args.batch, device)
    with torch.no_grad():
        coverage = float(renderer(coeffs).mask.mean())
    render = render_step(renderer, coeffs)
    render()
    sync(device)
    peak_render = peak_memory_mb(device)

    import torchvision
    resnet = torchvision.models.resnet50(weights=None).to(device).eval()
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    def reference():
        with torch.no_grad():
            return resnet(images)

    times = time_calls({"render": render, "resnet": reference}, device, args.repeats)
    use_cpu = args.cpu_time and device.type == "cpu"
    t_render, t_resnet = (times[name][1 if use_cpu else 0] for name in ("render", "resnet"))
    ms_render, ms_resnet = 1000 * t_render / args.batch, 1000 * t_resnet / args.batch
    clock = "CPU time" if use_cpu else "wall time"
    print(f"face coverage {coverage:.2f} of the image")
    print(f"shaded render fwd+bwd: {ms_render:.2f} ms/image (batch {args.batch}: {1000 * t_render:.1f} ms, {clock})")
    print(f"resnet50 forward:      {ms_resnet:.2f} ms/image (batch {args.batch}: {1000 * t_resnet:.1f} ms, {clock})")
    if device.type == "cpu":
        print("median wall / CPU ms per batch: render {:.1f} / {:.1f}, resnet50 {:.1f} / {:.1f}".format(
            *(1000 * t for name in ("render", "resnet") for t in times[name])))
    print(f"peak memory after render: {peak_render:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})")
    if device.type == "cuda":
        big = random_coeffs(layout, args.cuda_batch, device)
        t_big = time_calls({"big": render_step(renderer, big)}, device, args.repeats)["big"][0]
        print(f"CUDA batch {args.cuda_batch}: {args.cuda_batch / t_big:.0f} images/s forward+backward "
              f"(target >= 5000 on an H100)")
    if args.compare_nvdiffrast:
        compare_nvdiffrast(renderer, random_coeffs(layout, args.cuda_batch, device), args.repeats)
    print(f"ratio_rasterizer_to_resnet50={ms_render / ms_resnet:.4f}")
    return 0


def compare_nvdiffrast(renderer: FaceRenderer, coeffs: torch.Tensor, repeats: int) -> None:
    """Rasterize + interpolate (forward and backward) with both backends on the same screen vertices."""
    device = coeffs.device
    if device.type != "cuda":
        print("nvdiffrast comparison: skipped (needs CUDA)")
        return
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        print("nvdiffrast comparison: skipped (nvdiffrast is not installed)")
        return
    faces, size = renderer.face_model.faces, renderer.image_size
    with torch.no_grad():
        out = renderer(coeffs)
    screen, colors = out.screen.detach().contiguous(), out.colors.detach().contiguous()

    def step(backend: str):
        def run():
            s, c = screen.clone().requires_grad_(True), colors.clone().requires_grad_(True)
            image = interpolate(c, rasterize(s, faces, (size, size), backend=backend), faces)
            image.square().mean().backward()
        return run

    times = time_calls({b: step(b) for b in ("torch", "nvdiffrast")}, device, repeats)
    with torch.no_grad():
        ours = rasterize(screen, faces, (size, size)).pix_to_face
        theirs = rasterize(screen, faces, (size, size), backend="nvdiffrast").pix_to_face
    agree = float((ours == theirs).float().mean())
    batch = coeffs.shape[0]
    print(f"nvdiffrast comparison, batch {batch}: rasterize+interpolate fwd+bwd torch {1000 * times['torch'][0]:.2f} "
          f"ms, nvdiffrast {1000 * times['nvdiffrast'][0]:.2f} ms; same face at {agree:.4f} of the pixels")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
