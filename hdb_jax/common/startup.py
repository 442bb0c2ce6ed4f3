"""What a command line does before it imports the rest of the library."""

from __future__ import annotations

import sys


def skip_torch() -> None:
    """Makes ``import torch`` fail in this process, as if PyTorch were not installed.

    Our command lines never use PyTorch, but diffusers imports it whenever it is installed
    (``diffusers.utils.distributed_utils``, whatever ``USE_TORCH`` says): seconds at every start on
    a small machine. diffusers and transformers then run as they do without torch, a supported
    setup (torch is a test-only dependency). Call it before anything imports diffusers; where torch
    is already imported (a notebook, a test process) it changes nothing. ``export_base``, which
    writes PyTorch weights, does not call it.
    """
    sys.modules.setdefault("torch", None)
