"""Where a detector computes: ``device="auto" | "cpu" | "cuda" | "cuda:N"``.

``"auto"`` is CUDA when ``torch.cuda.is_available()``, else the CPU. The backbone, the coreset
selection, the Gaussian fit and the nearest-neighbour search run on the chosen device; learned
tensors are kept (and saved) on the CPU, with a cached copy on the device for scoring
(:class:`Placement`), and scores and maps come back to the CPU. A model file holds no device.

Importing this module imports no torch (the functions that need it import it), so
:func:`parse_device` serves the torch-free runtime and the argument parser too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from patchad.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Device names accepted everywhere (``cuda:N`` picks the N-th GPU).
DEVICE_NAMES = ("auto", "cpu", "cuda")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")
MB = 1024 * 1024


def parse_device(name: str) -> str:
    """``name`` checked: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (no torch needed).

    Raises:
        ConfigError: anything else, in one line.
    """
    if isinstance(name, str) and (name in DEVICE_NAMES or _CUDA_INDEX.fullmatch(name)):
        return name
    raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def cuda_index(name: str) -> int:
    """The GPU index of a checked device name (0 for ``"cuda"``)."""
    match = _CUDA_INDEX.fullmatch(name)
    return int(match.group(1)) if match else 0


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` a device name stands for.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: an unknown name, CUDA asked for where torch sees no GPU, or a GPU index
            past the last one.
    """
    import torch

    name = parse_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}); "
            "use device 'cpu' or 'auto'"
        )
    index = cuda_index(name)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)"
        )
    return torch.device("cuda", index)


def to_cpu(tensor: Tensor) -> Tensor:
    """``tensor`` on the CPU: itself when it is there already (no copy)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


class Placement:
    """A compute device and cached copies of learned (CPU) tensors on it.

    :meth:`put` returns a tensor itself when it is on the device already (so CPU runs compute
    on the very tensors they did before), else a copy made once per tensor object: a learned
    tensor that is replaced (by a refit, an update or a load) is copied again.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copies: dict[int, tuple[Tensor, Tensor]] = {}

    def put(self, tensor: Tensor) -> Tensor:
        """``tensor`` on :attr:`device`."""
        if tensor.device == self.device:
            return tensor
        hit = self._copies.get(id(tensor))
        if hit is not None and hit[0] is tensor:  # the source is kept, so its id is not reused
            return hit[1]
        copy = tensor.to(self.device)
        self._copies[id(tensor)] = (tensor, copy)
        return copy


class OnDevice:
    """Device methods of :class:`~patchad.detectors.base.Detector`: the compute device its
    ``fit`` and ``predict`` chose, and its learned tensors there."""

    @property
    def device_in_use(self) -> torch.device:
        """Where the detector computes: as last chosen by ``fit``, ``predict`` or
        :func:`~patchad.detectors.load` (the CPU before any of them)."""
        import torch

        placement = getattr(self, "_placement", None)
        return torch.device("cpu") if placement is None else placement.device

    def _use_device(self, device: str | torch.device) -> None:
        """Compute on ``device`` (a name for :func:`~patchad.devices.resolve_device`, or a
        ``torch.device``) from now on; learned tensors stay on the CPU (:meth:`_placed`)."""
        import torch

        resolved = device if isinstance(device, torch.device) else resolve_device(device)
        if self.device_in_use != resolved or not hasattr(self, "_placement"):
            self._placement = Placement(resolved)

    def _placed(self, tensor: Tensor) -> Tensor:
        """A learned tensor on :attr:`device_in_use`: itself on the CPU, else a cached copy."""
        placement = getattr(self, "_placement", None)
        return tensor if placement is None else placement.put(tensor)


def free_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device's memory (``torch.cuda.mem_get_info``); None on the
    CPU, whose memory the estimates count as RAM."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def check_device_memory(device: torch.device, need: int, what: str) -> None:
    """Refuse, before any work, a fit whose estimated device memory exceeds what is free.

    Args:
        device: the compute device (nothing is checked on the CPU).
        need: estimated bytes the fit holds on the device at its peak.
        what: what is being fitted, for the message (e.g. ``"fitting 209 images"``).

    Raises:
        ConfigError: ``need`` is more than the device's free memory.
    """
    info = free_memory(device)
    if info is not None and need > info[0]:
        raise ConfigError(
            f"{what} needs about {need / MB:.0f} MiB on {device}, which has "
            f"{info[0] / MB:.0f} MiB free of {info[1] / MB:.0f} MiB; use device 'cpu' or "
            "lower the estimate (see the memory estimate line)"
        )


def describe_device(device: torch.device) -> str:
    """One line: the device, its name and free memory (CUDA), for the CLI's fit and predict."""
    import torch

    info = free_memory(device)
    if info is None:
        return f"device: cpu ({torch.get_num_threads()} torch threads)"
    name = torch.cuda.get_device_name(device)
    return f"device: {device} ({name}, {info[0] / MB:,.0f} of {info[1] / MB:,.0f} MiB free)"
