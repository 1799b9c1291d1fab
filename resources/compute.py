"""Which device, dtype and thread count the torch steps use."""

from typing import Literal

import dagster as dg
import torch
from pydantic import Field, field_validator

from dsdm.memory import fix_mmap_threshold

DEVICES = ("auto", "cpu", "cuda")


class ComputeResource(dg.ConfigurableResource):
    """CPU or CUDA. ``auto`` picks CUDA when one is visible."""

    device: str = Field("auto", description="Compute device: auto, cpu or cuda.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Autocast dtype on CUDA (bfloat16 is the fast path there)."
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, device: str) -> str:
        # a dg.EnvVar (DSDM_DEVICE) is checked once Dagster has resolved it
        if not isinstance(device, dg.EnvVar) and device not in DEVICES:
            raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
        return device

    def torch_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "compute device 'cuda' requested but torch sees no CUDA device "
                f"(torch {torch.__version__}); install a CUDA build of torch or set device: cpu"
            )
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def setup(self) -> torch.device:
        """Apply the thread setting, keep freed tensor buffers from staying resident
        (`dsdm.memory.fix_mmap_threshold`), and return the device."""
        fix_mmap_threshold()
        if self.threads:
            torch.set_num_threads(self.threads)
        return self.torch_device()
