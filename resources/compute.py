"""Which device, dtype, batch size and thread count the torch steps use."""

from typing import Literal

import dagster as dg
import torch
from pydantic import Field

from dsdm.memory import fix_mmap_threshold


class ComputeResource(dg.ConfigurableResource):
    """CPU or CUDA. ``auto`` picks CUDA when one is visible."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Autocast dtype on CUDA (bfloat16 is the fast path there)."
    )
    batch_size: int = Field(32, ge=1, description="Examples per forward/backward.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

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
