"""A fork made while another thread holds one of fastxent's locks: the child's copy of the lock
stays held by a thread the child does not have, so its first call waited forever. The locks
are made afresh in the child (``os.register_at_fork``)."""

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent import _autograd
from fastxent._compiled import kernel, unavailable_reason
from versions import TORCH

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork"),
    # PyTorch's own: after a torch.compile'd backward in the parent (as earlier tests run), a
    # backward in a forked child of torch 2.11 raises "Unable to handle autograd's threading in
    # combination with fork-based multiprocessing" (F.cross_entropy alone; 2.8, 2.13 do not)
    pytest.mark.skipif(TORCH == (2, 11), reason="torch 2.11: no backward in a forked child"),
]


def held_in_another_thread(module, name: str):
    """A context in which a thread of this process holds ``module.name``, a lock."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with getattr(module, name):
            holding.set()
            release.wait()

    class Held:
        def __enter__(self):
            self.thread = threading.Thread(target=hold)
            self.thread.start()
            holding.wait()

        def __exit__(self, *exc):
            release.set()
            self.thread.join()

    return Held()


def child_exit_code(work, timeout_s: float = 120.0) -> int:
    """Fork; the child runs ``work`` (True: success) and exits. The child's exit code, or a
    failure when it is still running after ``timeout_s``."""
    pid = os.fork()
    if pid == 0:  # the child: out without running the parent's teardown
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's thread pool does not survive a fork
            code = 0 if work() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    return os.waitstatus_to_exitcode(done[1])


def matches_pytorch(backend: str, n: int, v: int) -> bool:
    """One step of fastxent against F.cross_entropy on the same random case."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g)
    mine, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    fastxent.cross_entropy(mine, y, backend=backend).backward()
    F.cross_entropy(theirs, y).backward()
    return torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_the_buffer_reuse_lock():
    # a gradient of 1 MiB or more takes a storage from the reuse list, under its lock
    with held_in_another_thread(_autograd, "_spares_lock"):
        assert child_exit_code(lambda: matches_pytorch("torch", 64, 4096), 60) == 0


@pytest.mark.skipif(unavailable_reason(torch.device("cpu")) is not None, reason="no compiler")
def test_the_compiled_kernels_first_call_lock():
    def first_call():  # a variant's first call of its graph runs under the lock
        kernel._called.clear()  # (in the child) whatever this process called before
        return matches_pytorch("compiled", 24, 333)

    with held_in_another_thread(kernel, "_first_call"):
        assert child_exit_code(first_call) == 0


@pytest.mark.skipif(unavailable_reason(torch.device("cpu")) is not None, reason="no compiler")
def test_a_compile_in_a_child_forked_after_the_parent_compiled(tmp_path):
    """inductor's C++ compile threads (a ThreadPoolExecutor it keeps) are not the child's: the
    child's copy of the pool, started in the parent, counted workers it does not have."""
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads

    if get_compile_threads() <= 1:
        pytest.skip("inductor compiles in the calling thread here")
    AsyncCompile.pool().submit(int).result()  # the parent's pool, with a worker started

    def compile_afresh():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)  # nothing compiled there yet
        torch._dynamo.reset()
        kernel._called.clear()
        return matches_pytorch("compiled", 24, 333)

    assert child_exit_code(compile_afresh, 90) == 0
