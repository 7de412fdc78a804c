"""What a forked child inherits that it cannot use. A fork made while another thread holds one
of fastxent's locks: the child's copy of the lock stays held by a thread the child does not
have, so its first call waited forever; the locks are made afresh in the child
(``os.register_at_fork``). Inductor's compile threads, and, before torch 2.12, kernels that keep
the parent's OpenMP thread count: the compiled backend is then unavailable in the child."""

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
from versions import COMPILED_UNAVAILABLE, TORCH, compiled_backend

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


# what fastxent's own fork hook decides (kernel._note_fixed_teams_in_child)
CHILD_LOSES_COMPILED = kernel.kernels_fix_their_teams()
compiled_in_a_child = pytest.mark.skipif(
    CHILD_LOSES_COMPILED,
    reason="before torch 2.12 the compiled backend is unavailable in a forked child",
)


@pytest.mark.parametrize("n", [64, 2048])
def test_auto_in_a_child_forked_after_the_parent_ran_kernels(n):
    """Before torch 2.12, inductor's kernels keep the parent's OpenMP thread count, and in a
    forked child a kernel first run there waited forever for threads the child lacks (torch
    2.6, 2.7, 2.9-2.11), after torch.set_num_threads(1) too. "auto" takes the portable kernel in
    such a child; from 2.12 on it keeps the compiled one."""
    matches_pytorch("auto", n, 4096)  # the parent's kernels and OpenMP threads run

    def other_shapes():  # a kernel this process has not run (V <= 4096 is a graph of its own)
        reason = unavailable_reason(torch.device("cpu"))
        if CHILD_LOSES_COMPILED and COMPILED_UNAVAILABLE is None:
            assert reason is not None and "forked" in reason
        return matches_pytorch("auto", n, 3000)

    assert child_exit_code(other_shapes, 90) == 0


@compiled_backend
def test_a_fork_of_a_torch_before_2_12_refuses_the_compiled_backend(monkeypatch):
    """What the child of a fork does there (run in this process, as a stand-in): the compiled
    backend is unavailable with the reason, "auto" takes the portable kernel, and an explicit
    backend="compiled" raises rather than wait forever."""
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(kernel, "forked_with_fixed_teams", None)
    kernel._note_fixed_teams_in_child()
    z, y = torch.randn(256, 4096), torch.randint(0, 4096, (256,))
    with pytest.raises(RuntimeError, match=r"forked from one running 2 threads.*'spawn'"):
        fastxent.cross_entropy(z, y, backend="compiled")
    name, _ = fastxent.functional.resolve_backend("auto", z.device, z.numel())
    assert name == "torch"
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    monkeypatch.setattr(kernel, "forked_with_fixed_teams", None)
    kernel._note_fixed_teams_in_child()
    assert kernel.forked_with_fixed_teams is None


@compiled_backend
@compiled_in_a_child
def test_the_compiled_kernels_first_call_lock():
    def first_call():  # a variant's first call of its graph runs under the lock
        kernel._called.clear()  # (in the child) whatever this process called before
        return matches_pytorch("compiled", 24, 333)

    with held_in_another_thread(kernel, "_first_call"):
        assert child_exit_code(first_call) == 0


@compiled_backend
@compiled_in_a_child
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
