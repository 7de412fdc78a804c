"""The distributed examples' first and last steps: join torchrun's group (with a clear message
outside torchrun), and leave the process without the interpreter's shutdown."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def init_group_from_torchrun(backend: str) -> None:
    """``init_process_group(backend)`` from torchrun's environment; outside torchrun, exit with
    the command to run instead of PyTorch's "environment variable RANK expected"."""
    if "RANK" not in os.environ:
        script = os.path.relpath(sys.argv[0])
        sys.exit(
            f"{script} is a distributed example: run it as torchrun --nproc-per-node 2 {script}"
        )
    dist.init_process_group(backend)


def destroy_group_and_exit(status: int = 0) -> None:
    """``destroy_process_group()``, then ``os._exit(status)`` from inside ``main``.

    gloo's worker threads can outlive ``destroy_process_group()`` while anything still holds the
    group (DDP's internals do). One that frees a tensor during the interpreter's shutdown aborts
    the process ("terminate called without an active exception", pytorch/pytorch#179291), which
    torchrun reports as a failure; and releasing ``main``'s locals (the DDP model) after the
    group is destroyed hung in about half of the runs, with plain ``nn.CrossEntropyLoss`` too.
    So the process ends here, before ``main`` returns.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
