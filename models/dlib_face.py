"""dlib's pretrained face-recognition ResNet in torch, read from its own file, and an identity encoder around it.

The network is ``dlib_face_recognition_resnet_model_v1.dat`` (Davis King; 128-d descriptors, 99.38 % on LFW;
public domain / CC0 1.0), shipped by the ``face-recognition-models`` package. `load_dlib_face_net` reads that file
with the pure-Python reader below (numpy, no compiler, no dlib) into `DlibFaceNet`; `DlibIdentityEncoder` puts it
behind dlib's face chip as a `models.identity_encoder.FrozenIdentityEncoder` (the interface of
`models.arcface.IdentityEncoder`).

**Architecture** (dlib's ``anet_type`` in ``dnn_face_recognition_ex.cpp``). Input a 150x150 RGB chip. Stem: conv
7x7/2 (no padding) -> affine -> relu -> max-pool 3x3/2 (no padding): 35x35. Residual blocks
``y = affine(conv3x3(relu(affine(conv3x3/s(x)))))``, ``out = relu(y + skip)`` in five levels:
3 x 32 (35x35), then 64, 128, 256 (each a downsampling block and 3, 2, 2 more) and one last downsampling 256 block.
A downsampling block's first conv has stride 2 and no padding; its skip path is a 2x2/2 average pool of the input,
added by ``add_prev`` to the larger output with zeros for missing channels and rows/columns (dlib's 4-D addition:
no projection; at 8x8 -> 3x3 vs 4x4 the sum is 4x4). Head: global average pool -> fc 256 -> 128 without bias.
29 convs, 29 affine layers (dlib's frozen batch norm: a per-channel scale and shift; folded here into the conv).

**Input mapping.** dlib's ``input_rgb_image_sized<150>`` maps a uint8 pixel v to ``(v - mean_c) / 256`` with the
per-channel means stored in the file (122.782, 117.001, 104.298 for R, G, B). `DlibFaceNet` takes float RGB x in
[0, 1] and computes ``(255 x - mean_c) / 256``, so ``x = chip_uint8 / 255`` gives dlib's input exactly.

**File format** (dlib/serialize.h, float_details.h, dnn/core.h, dnn/layers.h, dnn/input.h, dnn/loss.h,
cuda/tensor.h; dlib 19.24). Integers: a control byte (bit 7 = negative, low 4 bits = number of magnitude bytes),
then the magnitude little-endian. Strings: an integer length, then the bytes. Bools: ASCII '1' / '0'. Scalars
(float/double): two integers, mantissa then exponent, value = mantissa * 2**exponent (exponents 32000-32002 mean
inf, -inf, nan). Tensors: version 2, then num_samples, k, nr, nc as integers, then raw little-endian float32
values (so the ~5.6 M weights are read by one ``numpy.frombuffer`` each). An ``add_layer`` writes its version,
then its whole sub-network, then its own layer, so the file holds the version numbers of all wrappers outermost
first, the input layer, and then the layers innermost first (stem conv first, fc last). Tag and skip wrappers
(``tag1``, ``tag2``, ``skip1``) write only a version. The reader walks the known ``anet_type`` structure, checks
every version tag, kernel size, stride, padding and shape, and requires the file to end exactly where the network
does.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.arcface import similarity_to_template
from models.errors import ExtraMissing, WeightsError
from models.identity_encoder import FrozenIdentityEncoder
from models.state import load_strict

log = logging.getLogger(__name__)

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PACKAGE = "face_recognition_models"
CHIP_SIZE = 150
CHIP_PADDING = 0.25
# (filters, downsampling) of every residual block, innermost (first applied) first: alevel4 ... alevel0.
BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2 + (
    (256, True),) + ((256, False),) * 2 + ((256, True),)
STEM_FILTERS = 32
DESCRIPTOR_SIZE = 128
SHALLOW_BLOCKS = 3  # the first residual level (3 x 32 filters at 35x35): see DlibFaceNet.shallow
# dlib's 5-point chip template (get_face_chip_details): chip fractions for the shape_predictor_5_face_landmarks
# parts, in its order: image-right eye outer and inner corner, image-left eye outer and inner corner, nose base.
DLIB5_TEMPLATE = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                  (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                  (0.4901123135679, 0.6277975316475))
# iBUG-68 indices of those five parts: corners 45, 42 (points 42-47), 36, 39 (points 36-41), nose base 33.
IBUG68_TO_DLIB5 = (45, 42, 36, 39, 33)


class DlibFormatError(WeightsError):
    """The dlib model file is not the face-recognition ResNet this reader knows, or it is damaged."""


# ----------------------------------------------------------------------------------------------------------------
# Locating the model files of the face-recognition-models package (without importing it: its __init__ needs
# the deprecated pkg_resources)
# ----------------------------------------------------------------------------------------------------------------

def dlib_model_path(name: str = MODEL_FILE) -> Path:
    """Path of one of the model files of the installed ``face-recognition-models`` package
    (``<package>/models/<name>``), or `ExtraMissing` naming the package (the command line adds how to install it:
    `utils.cli.cli_main`)."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (list(spec.submodule_search_locations or []) if spec else []):
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    what = "is not installed" if spec is None else f"has no models/{name}"
    raise ExtraMissing(f"the dlib model {name}: package face-recognition-models {what}")


def dlib_models_available(name: str = MODEL_FILE) -> bool:
    """Whether `dlib_model_path(name)` would succeed."""
    try:
        dlib_model_path(name)
    except ExtraMissing:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# dlib serialisation: the primitive reader
# ----------------------------------------------------------------------------------------------------------------

_SPECIAL_EXPONENTS = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}


class _Reader:
    """Sequential reader of dlib's serialisation primitives over the bytes of one file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"dlib model {self.path}: {what} at byte {self.pos}: the file is damaged or not "
                               f"{MODEL_FILE} (it comes with the package face-recognition-models)")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file reading {n} bytes")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.pos -= 1
            raise self.fail(f"invalid integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        n = self.int()
        if not 0 <= n <= 256:
            raise self.fail(f"implausible string length {n}")
        return self.take(n).decode("ascii", errors="replace")

    def scalar(self) -> float:
        """A float or double (dlib float_details: mantissa then exponent)."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail("old ASCII float format (not written by dlib >= 18.x)")
        mantissa, exponent = self.int(), self.int()
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        return float(np.ldexp(np.float64(mantissa), exponent))

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"invalid bool byte {ch!r}")
        return ch == b"1"

    def version(self, allowed: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in allowed:
            raise self.fail(f"{what} has version {v}, expected one of {allowed}")
        return v

    def tag(self, allowed: tuple[str, ...], what: str) -> str:
        start = self.pos
        tag = self.string()
        if tag not in allowed:
            self.pos = start
            raise self.fail(f"{what}: found layer tag {tag!r}, expected {' or '.join(allowed)}")
        return tag

    def tensor(self) -> np.ndarray:
        """A dlib resizable_tensor: (num_samples, k, nr, nc) float32 (a copy, native byte order)."""
        self.version((2,), "tensor")
        shape = tuple(self.int() for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"negative tensor shape {shape}")
        n = int(np.prod(shape))
        return np.frombuffer(self.take(4 * n), dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        """A dlib alias_tensor: only its (num_samples, k, nr, nc) shape."""
        self.version((1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes after the network")


# ----------------------------------------------------------------------------------------------------------------
# The layers of anet_type and their serialised fields
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """One entry of the network as dlib nests it: kind is a layer (con, affine, relu, max_pool, avg_pool,
    add_prev, fc) or a wrapper without data (tag, skip); for con: filters, kernel and stride; for pools: window
    and stride (0 = the whole input)."""

    kind: str
    filters: int = 0
    kernel: int = 0
    stride: int = 1


def _network_spec() -> list[_Layer]:
    """anet_type below the loss, outermost first, exactly as dlib nests (and so serialises) it."""
    def block(n: int, stride: int) -> list[_Layer]:  # BN<con<N,3,3,1,1,relu<BN<con<N,3,3,s,s,SUB>>>>>
        return [_Layer("affine"), _Layer("con", n, 3, 1), _Layer("relu"), _Layer("affine"), _Layer("con", n, 3, stride)]

    spec = [_Layer("fc", DESCRIPTOR_SIZE), _Layer("avg_pool", 0, 0, 1)]
    for n, down in reversed(BLOCKS):
        if down:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUB>>>>>>>>
            spec += [_Layer("relu"), _Layer("add_prev"), _Layer("avg_pool", 0, 2, 2), _Layer("skip"), _Layer("tag"),
                     *block(n, 2), _Layer("tag")]
        else:  # relu<add_prev1<block<N,1,tag1<SUB>>>>
            spec += [_Layer("relu"), _Layer("add_prev"), *block(n, 1), _Layer("tag")]
    spec += [_Layer("max_pool", 0, 3, 2), _Layer("relu"), _Layer("affine"), _Layer("con", STEM_FILTERS, 7, 2)]
    return spec


def _default_padding(kernel: int, stride: int) -> int:
    """dlib's default padding of con_ and the pools: kernel // 2 at stride 1, else 0."""
    return kernel // 2 if stride == 1 else 0


def _read_con(r: _Reader, layer: _Layer) -> dict:
    tag = r.tag(("con_4", "con_5"), "convolution")
    params = r.tensor().reshape(-1)
    num_filters, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
    filters, biases = r.alias(), r.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.scalar()
    use_bias = r.bool() if tag == "con_5" else True  # con_5 added the use_bias flag
    pad = _default_padding(layer.kernel, layer.stride)
    expected = (layer.filters, layer.kernel, layer.kernel, layer.stride, layer.stride, pad, pad)
    if (num_filters, nr, nc, sy, sx, py, px) != expected:
        raise r.fail(f"convolution (filters, nr, nc, stride, padding) {(num_filters, nr, nc, sy, sx, py, px)}, "
                     f"expected {expected}")
    n_weights = int(np.prod(filters))
    if filters[0] != num_filters or filters[2:] != (nr, nc):
        raise r.fail(f"convolution filter shape {filters}")
    weight = params[:n_weights].reshape(filters)
    bias = params[n_weights:] if use_bias else np.zeros(num_filters, np.float32)
    if bias.size != num_filters or (use_bias and biases[1] != num_filters):
        raise r.fail(f"convolution holds {params.size} values for filters {filters} and bias {biases}")
    return {"weight": weight, "bias": bias}


def _read_affine(r: _Reader, channels: int) -> dict:
    """affine_ / affine_2 (frozen batch norm): gamma and beta. (dlib can also load a bn_con2 batch-norm layer into
    an affine one; the model file holds none, so that is refused rather than supported untested.)"""
    tag = r.tag(("affine_", "affine_2"), "affine (frozen batch norm)")
    params = r.tensor().reshape(-1)
    gamma_shape, _ = r.alias(), r.alias()
    mode = r.int()
    if tag == "affine_2" and r.bool():
        raise r.fail("a disabled affine layer")
    if mode != 0:  # dlib layer_mode: CONV_MODE = 0 (per channel), FC_MODE = 1 (per element)
        raise r.fail(f"affine layer in mode {mode}, expected the per-channel mode 0")
    n = int(np.prod(gamma_shape))
    gamma, beta = params[:n], params[n:2 * n]
    if gamma.size != channels or beta.size != channels:
        raise r.fail(f"affine layer of {gamma.size} channels after a {channels}-filter convolution")
    return {"gamma": gamma, "beta": beta}


def _read_pool(r: _Reader, layer: _Layer) -> None:
    name = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
    r.tag((name,), layer.kind)
    got = tuple(r.int() for _ in range(6))
    pad = _default_padding(layer.kernel, layer.stride)
    expected = (layer.kernel, layer.kernel, layer.stride, layer.stride, pad, pad)
    if got != expected:
        raise r.fail(f"{layer.kind} (nr, nc, stride, padding) {got}, expected {expected}")


def _read_fc(r: _Reader, layer: _Layer) -> dict:
    tag = r.tag(("fc_2", "fc_3"), "fully connected layer")
    num_outputs, num_inputs = r.int(), r.int()
    params = r.tensor().reshape(-1)
    weights, _biases = r.alias(), r.alias()
    bias_mode = r.int()
    for _ in range(4):
        r.scalar()
    if tag == "fc_3":
        r.bool()  # use_bias (irrelevant in bias mode FC_NO_BIAS)
    if bias_mode != 1 or num_outputs != layer.filters or num_inputs != BLOCKS[-1][0]:
        raise r.fail(f"fc layer {num_inputs} -> {num_outputs} (bias mode {bias_mode}), expected "
                     f"{BLOCKS[-1][0]} -> {layer.filters} without bias")
    if weights[:2] != (num_inputs, num_outputs) or params.size != num_inputs * num_outputs:
        raise r.fail(f"fc weights {weights} with {params.size} values")
    return {"weight": params.reshape(num_inputs, num_outputs).T.copy()}  # dlib computes x @ W


def _read_layer(r: _Reader, layer: _Layer, channels: int) -> dict | None:
    if layer.kind == "con":
        return _read_con(r, layer)
    if layer.kind == "affine":
        return _read_affine(r, channels)
    if layer.kind in ("max_pool", "avg_pool"):
        _read_pool(r, layer)
        return None
    if layer.kind == "fc":
        return _read_fc(r, layer)
    r.tag((layer.kind + "_",), layer.kind)  # relu_, add_prev_: no fields
    return None


def read_dlib_face_file(path: str | Path) -> dict:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into numpy arrays.

    Returns {"mean": (3,) RGB input means, "convs": [{"weight": (O, I, k, k), "bias": (O,)}] * 29 with each affine
    layer folded in (innermost first: stem, then two per block), "fc": (128, 256)}. The loss layer's training
    margin and distance threshold are read past, not kept. `DlibFormatError` on anything unexpected.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"dlib model {path}: cannot read it ({exc.strerror})") from None
    r = _Reader(data, path)
    r.version((1,), "add_loss_layer")
    loss = r.tag(("loss_metric_", "loss_metric_2"), "loss layer")
    if loss == "loss_metric_2":  # its margin and distance threshold: training settings, unused here
        r.scalar(), r.scalar()
    spec = _network_spec()
    versions = []
    for i, layer in enumerate(spec):  # wrapper headers, outermost first
        if layer.kind in ("tag", "skip"):
            versions.append(r.version((1,), f"{layer.kind} layer"))
        else:
            versions.append(r.version((2, 3) if i == len(spec) - 1 else (1, 2), f"{layer.kind} layer"))
    r.tag(("input_rgb_image_sized",), "input layer")
    mean = np.array([r.scalar() for _ in range(3)], np.float32)
    if (r.int(), r.int()) != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input size is not {CHIP_SIZE}x{CHIP_SIZE}")

    convs, fc, channels, pending = [], None, 3, None
    for i in range(len(spec) - 1, -1, -1):  # the layers themselves, innermost first
        layer, version = spec[i], versions[i]
        if layer.kind in ("tag", "skip"):
            continue
        fields = _read_layer(r, layer, channels)
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output/gradient disabled
            r.bool()
        r.tensor(), r.tensor()  # x_grad, cached_output
        if i == len(spec) - 1:  # the add_layer on the input: grad_final, then (v3) the sample expansion factor
            r.tensor()
            if version == 3:
                r.int()
        elif version == 2:
            r.tensor()  # params_grad
        if layer.kind == "con":
            pending, channels = fields, layer.filters
        elif layer.kind == "affine":
            g, b = fields["gamma"], fields["beta"]
            convs.append({"weight": pending["weight"] * g[:, None, None, None], "bias": pending["bias"] * g + b})
            pending = None
        elif layer.kind == "fc":
            fc = fields["weight"]
    r.end()
    return {"mean": mean, "convs": convs, "fc": fc}


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------

def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b on the larger (C, H, W), missing channels / rows / columns taken as 0."""
    C, H, W = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = (0, W - t.shape[3], 0, H - t.shape[2], 0, C - t.shape[1])
        return F.pad(t, pad) if any(pad) else t

    return grow(a) + grow(b)


class DlibResBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + skip), each conv with its affine layer folded in; skip = x, or a 2x2/2 average
    pool of x for a downsampling block (whose conv1 has stride 2 and no padding)."""

    def __init__(self, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(_pad_add(y, F.avg_pool2d(x, 2, 2) if self.down else x))


class DlibFaceNet(nn.Module):
    """dlib's face-recognition ResNet (module docstring): (B, 3, 150, 150) RGB in [0, 1] -> (B, 128) descriptor.

    Frozen (no parameter requires grad) and always in eval mode (it has no train-time behaviour anyway);
    differentiable w.r.t. its input; runs on any device. Built by `load_dlib_face_net`.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.stem = nn.Conv2d(3, STEM_FILTERS, 7, stride=2)
        blocks, ch = [], STEM_FILTERS
        for n, down in BLOCKS:
            blocks.append(DlibResBlock(ch, n, down))
            ch = n
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(ch, DESCRIPTOR_SIZE, bias=False)

    def train(self, mode: bool = True) -> DlibFaceNet:
        """Ignore ``mode``: the network stays frozen in eval mode under a parent's .train()."""
        return super().train(False)

    def _check(self, chips: torch.Tensor) -> None:
        if chips.ndim != 4 or chips.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"DlibFaceNet: expected (B, 3, {CHIP_SIZE}, {CHIP_SIZE}) chips, got {tuple(chips.shape)}")

    def _stem(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips * 255.0 - self.mean.view(1, 3, 1, 1)) / 256.0  # dlib's input_rgb_image_sized on v = 255 x
        return F.max_pool2d(F.relu(self.stem(x)), 3, 2)  # (B, 32, 35, 35)

    def shallow(self, chips: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) -> (B, 32, 35, 35): the output of the first residual level (3 blocks of 32 filters).

        The analogue of ArcFace's layer1 (its first residual stage, 64 x 56 x 56 at 112 px): the first features past
        the stem that went through residual blocks, on the finest grid the network has after the stem (stride ~4.3
        in the chip), so a mask still changes them locally; deeper levels are 17x17 and coarser."""
        self._check(chips)
        x = self._stem(chips)
        for block in self.blocks[:SHALLOW_BLOCKS]:
            x = block(x)
        return x

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) RGB in [0, 1] -> (B, 128), the raw dlib descriptor (not normalised; dlib calls two faces
        the same person below Euclidean distance 0.6)."""
        x = self.shallow(chips)
        for block in self.blocks[SHALLOW_BLOCKS:]:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_dlib_face_net(path: str | Path | None = None) -> DlibFaceNet:
    """dlib's face-recognition ResNet from ``path`` (default: the file in the installed face-recognition-models
    package), frozen, in eval mode, on the CPU; move it with ``.to(device)``.

    `ExtraMissing` (one line naming the package) when ``path`` is None and the package is absent;
    `WeightsError` / `DlibFormatError` for an unreadable or foreign file. Reading takes ~0.1 s (numpy).
    """
    path = dlib_model_path() if path is None else Path(path)
    if not path.is_file():
        raise WeightsError(f"dlib model {path} not found: pass the path of {MODEL_FILE}, or none to use the one of "
                           "the package face-recognition-models")
    t0 = time.perf_counter()
    parsed = read_dlib_face_file(path)
    with torch.device("meta"):  # no random initialisation: every tensor is assigned from the file
        net = DlibFaceNet()
    convs = ["stem"] + [f"blocks.{i}.conv{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    state = {"mean": torch.from_numpy(parsed["mean"]), "fc.weight": torch.from_numpy(parsed["fc"])}
    for name, p in zip(convs, parsed["convs"], strict=True):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.from_numpy(p["weight"]), torch.from_numpy(p["bias"])
    load_strict(net, state, f"dlib model {path}", error=DlibFormatError, assign=True)
    net.requires_grad_(False)
    net.train(False)
    log.debug("read %s in %.2f s", path, time.perf_counter() - t0)
    return net


# ----------------------------------------------------------------------------------------------------------------
# Face chips (dlib.get_face_chip) and the identity encoder
# ----------------------------------------------------------------------------------------------------------------

def dlib_five_points(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2) in the order of dlib's 5-point shape predictor (`IBUG68_TO_DLIB5`:
    outer and inner corner of the image-right eye, of the image-left eye, nose base). (B, 5, 2) input is taken as
    such a shape already and returned unchanged. Pixels, origin top-left.

    Not ArcFace's five points (eye centres, nose tip, mouth corners: `models.arcface.five_points`): dlib's chip
    template is defined on these."""
    if landmarks.ndim == 3 and landmarks.shape[1:] == (5, 2):
        return landmarks
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"expected (B, 68, 2) or (B, 5, 2) landmarks, got {tuple(landmarks.shape)}")
    return landmarks[:, list(IBUG68_TO_DLIB5)]


def face_chip_transform(points5: torch.Tensor, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> torch.Tensor:
    """(B, 5, 2) dlib 5-point shapes (image pixels) -> (B, 2, 3) M mapping chip pixel q to image pixel
    ``p = M[:, :, :2] q + M[:, :, 2]``, exactly as ``dlib.get_face_chip(img, shape, size, padding)`` samples.

    dlib (image_transforms/interpolation.h): the least-squares similarity T from the padded template (chip pixels)
    to the points gives angle and scale s; the chip covers the rectangle centred on T(size/2, size/2) with side
    size * s - 1 (dlib's ``centered_drect``), whose corners map to chip pixels 0 and size - 1. So M is T's rotation
    with scale (size * s - 1) / (size - 1), about that centre. Differentiable w.r.t. the points."""
    template = (torch.tensor(DLIB5_TEMPLATE, dtype=points5.dtype, device=points5.device) + padding) / (
        2 * padding + 1) * size
    T = similarity_to_template(template.expand_as(points5), points5)  # (B, 2, 3): chip -> image
    lin, t = T[:, :, :2], T[:, :, 2]
    scale = lin[:, :, 0].norm(dim=1).clamp_min(1e-8)  # (B,)
    centre = lin @ torch.full((2,), size / 2.0, dtype=points5.dtype, device=points5.device) + t  # (B, 2)
    lin = lin * ((size * scale - 1.0) / ((size - 1) * scale))[:, None, None]
    offset = centre - lin @ torch.full((2,), (size - 1) / 2.0, dtype=points5.dtype, device=points5.device)
    return torch.cat([lin, offset[..., None]], dim=2)


def extract_face_chips(images: torch.Tensor, points5: torch.Tensor, size: int = CHIP_SIZE,
                       padding: float = CHIP_PADDING) -> torch.Tensor:
    """dlib's face chips, differentiably: (B, 3, H, W) images, (B, 5, 2) dlib 5-point shapes in their pixels ->
    (B, 3, size, size), bilinear, in the images' range; 0 where a sample's four neighbours are not all inside the
    image (dlib's rule; piecewise constant, so no gradient flows through the border).

    The geometry is dlib's (`face_chip_transform`); dlib also samples bilinearly but, when the face is more than
    about 2x larger than the chip, from an image pyramid (pyramid_down<2>) instead: not reproduced (faces in this
    project's crops are near the chip's scale), so such chips are sharper than dlib's."""
    if images.ndim != 4 or points5.shape != (images.shape[0], 5, 2):
        raise ValueError(f"extract_face_chips: expected (B, 3, H, W) images and (B, 5, 2) points, got "
                         f"{tuple(images.shape)} and {tuple(points5.shape)}")
    B, _, H, W = images.shape
    M = face_chip_transform(points5.to(images.dtype), size, padding)  # (B, 2, 3)
    r = torch.arange(size, dtype=images.dtype, device=images.device)
    q = torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1).reshape(1, -1, 2)  # (1, size*size, 2) as (x, y)
    p = q @ M[:, :, :2].transpose(1, 2) + M[:, None, :, 2]  # (B, size*size, 2) image pixels
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], dtype=images.dtype, device=images.device)
    grid = (p * scale - 1.0).reshape(B, size, size, 2)
    chips = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # dlib's interpolate_bilinear gives 0 unless all four neighbours are inside: 0 <= x < W - 1, 0 <= y < H - 1
    inside = (p[..., 0] >= 0) & (p[..., 0] < W - 1) & (p[..., 1] >= 0) & (p[..., 1] < H - 1)
    return chips * inside.reshape(B, 1, size, size).to(chips.dtype)


class DlibIdentityEncoder(FrozenIdentityEncoder):
    """Frozen dlib face-recognition identity encoder (`models.identity_encoder.FrozenIdentityEncoder`, the
    interface of `models.arcface.IdentityEncoder`): dlib's 150x150 face chip, then `DlibFaceNet`; D = 128 (the
    unit-length descriptor; the raw one is ``self.net(self.align(...))``), ``shallow`` = the first residual level
    (B, 32, 35, 35) (`DlibFaceNet.shallow`).

    images: (B, 3, H, W) RGB in [0, 1]; landmarks: (B, 68, 2) iBUG points (or (B, 5, 2) dlib 5-point shapes) in
    pixels of those images. The chip is cut as dlib.get_face_chip(img, shape5, 150, 0.25) does, from the five points
    `dlib_five_points` picks. ``net`` defaults to `load_dlib_face_net(path)`.
    """

    def __init__(self, path: str | Path | None = None, net: DlibFaceNet | None = None):
        super().__init__(load_dlib_face_net(path) if net is None else net)

    def crop(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 150, 150) dlib face chip in [0, 1] (outside the image: 0)."""
        return extract_face_chips(images, dlib_five_points(landmarks))
