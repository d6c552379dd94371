"""Where and how the networks run: device, precision, the allocator, and the U-Net in pieces.

Nothing here changes a result: running the U-Net in row bands or a few slices at a time gives
the whole-batch output (tests compare them), and reduced precision is only used when asked for.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

from p2ch_app.errors import UserError
from p2ch_app.models import NoduleSegmenter

BATCH_PIXELS = 256 * 512  # per U-Net pass: half a 512x512 slice (its activations alone reach ~190 MiB)


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when present (this rank's GPU under torchrun), else CPU; `name` forces one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def reduced_precision_pays(device: torch.device) -> bool:
    """Whether --fast can speed this device up: a GPU, or a CPU with bfloat16 instructions. Without
    them oneDNN emulates bfloat16, many times slower than float32."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision(device: torch.device, fast: bool):
    """Full float32, or with fast the device's reduced-precision autocast (float16 on CUDA, bfloat16
    on CPU, which only pays off on CPUs with bf16 instructions). Full float32 on CUDA turns TF32 off:
    cuDNN's default TF32 convolutions keep 10 mantissa bits, far coarser than the book's results allow."""
    if not fast:
        return _without_tf32() if device.type == "cuda" else contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


@contextlib.contextmanager
def _without_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS between stages (glibc only; elsewhere a no-op):
    keep_freed_memory() stops glibc from doing it on its own, so what segmentation freed would
    otherwise stay resident under the next stages."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def keep_freed_memory() -> bool:
    """Let glibc serve blocks of up to 32 MB (every activation of a default-sized pass) from its heap
    and keep freed ones mapped until return_freed_memory(). By default it maps large blocks afresh
    and trims the heap after each pass, so every U-Net pass faults its activations' pages in again
    (measured: segmentation 14-15 s instead of 11-12 s at the same peak memory). Returns whether
    glibc took both settings."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def receptive_halo(model: NoduleSegmenter) -> int:
    """Rows (or columns) of input a U-Net output pixel reaches at most, rounded up to its pooling grid:
    23 for depth 3, halo 32."""
    return 8 * model.multiple


def around(span: slice, size: int, model: NoduleSegmenter) -> slice:
    """The rows (or columns) the U-Net must see to give, over `span` of a slice `size` long, what it
    gives over the whole slice: the span widened by receptive_halo either side, starting on the
    U-Net's pooling grid (a multiple of model.multiple), within the slice."""
    if span.start <= 0 and span.stop >= size:
        return slice(0, size)
    halo = receptive_halo(model)
    return slice(max(0, (span.start - halo) // model.multiple * model.multiple), min(size, span.stop + halo))


def in_row_bands(model: NoduleSegmenter, x: torch.Tensor, rows: int, halo: int | None = None) -> torch.Tensor:
    """model(x) computed band by band, `rows` rows at a time, each band with a halo of rows either
    side: the same result as the whole slice in a fraction of the memory (a 512x512 slice's U-Net
    activations alone reach ~190 MiB). Exact because the halo is wider than the U-Net's receptive
    field and bands start on its pooling grid (receptive_halo)."""
    height = x.shape[-2]
    if rows >= height:
        return model(x)
    halo = receptive_halo(model) if halo is None else halo
    rows = max(model.multiple, rows // model.multiple * model.multiple)
    bands = []
    for top in range(0, height, rows):
        lo, hi = max(top - halo, 0), min(top + rows + halo, height)
        bands.append(model(x[..., lo:hi, :])[..., top - lo:top - lo + min(rows, height - top), :])
    return torch.cat(bands, dim=-2)


def slices_per_pass(height: int, width: int, batch_pixels: int = BATCH_PIXELS) -> int:
    """How many whole slices fit in batch_pixels (at least one: a larger slice goes in row bands)."""
    return max(1, batch_pixels // (height * width))


def in_pieces(model: NoduleSegmenter, x: torch.Tensor, batch_pixels: int = BATCH_PIXELS) -> torch.Tensor:
    """model(x) for a batch of slice stacks, at most batch_pixels per pass: small slices a few at a
    time, large ones in row bands (in_row_bands). On this CPU two 256x256 slices per pass run 2.2x
    faster per slice than sixteen: the activations of a small pass stay in cache."""
    band_rows = max(1, batch_pixels // x.shape[-1])
    return torch.cat([in_row_bands(model, part, band_rows)
                      for part in x.split(slices_per_pass(x.shape[-2], x.shape[-1], batch_pixels))])
