"""slmfast: fused kernels, recomputation and distillation for training small language models.

Importing slmfast loads the compiled extension slmfast._C when it is built (registering the C++
ops under torch.ops.slmfast) and the Triton ops when triton is installed; without either, every
op still runs on its plain-PyTorch reference. `python -m slmfast info` says what is available.
"""

import torch  # noqa: F401  (slmfast._C links against torch: import it first)

from slmfast import backends, functional, nn
from slmfast._version import __version__

__all__ = ["__version__", "backends", "functional", "nn"]
