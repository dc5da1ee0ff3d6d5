"""What computes a run, by name (PyTorch imported only to name a GPU, so that a benchmark can name its machine
without loading it first)."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model, as /proc/cpuinfo names it where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def processor(device) -> str:
    """What computes on `device` (a torch.device): its GPU, or the CPU's model. Their float rounding differs, and so
    a run's last digits."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_name()
