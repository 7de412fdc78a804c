"""linear_cross_entropy's chunk size against time: fwd+bwd over three plain matmuls, interleaved.

    python benchmarks/linear_chunks.py --chunks 64,96,128,256,0     # 0: the default chunk
    python benchmarks/linear_chunks.py --chunks 0 --vocab-blocks 512,1024
    python benchmarks/linear_chunks.py --chunks 256,1024 --bare
    python benchmarks/linear_chunks.py --chunks 64,128 --bare --tiles 1024,4096
    python benchmarks/linear_chunks.py --chunks 64,82,128 --torch-mm
    python benchmarks/linear_chunks.py --chunks 80,1024 --products

Smaller chunks hold fewer logits but rewrite d_weight (V×D) once per chunk. ``--vocab-blocks``
adds the vocabulary walk (``vocab_block=B``: four matmuls, d_weight written once). ``--bare``
adds, per chunk size, the token walk's three matmuls alone (no loss kernel, buffers allocated
once): what chunking costs the matmuls themselves. ``--tiles T`` adds, per chunk size, the same
matmuls walked by vocabulary tiles of T classes so that each tile of W is read once per chunk
instead of twice (∂h and ∂W of this chunk and the logits of the next, while the tile is in
cache; the chunk's logits are held transposed, (V, rows), so a tile is a contiguous block).
``--torch-mm`` adds, per chunk size, the walk with torch.mm (MKL's sgemm) for the chunk's
logits and ∂h instead of oneDNN's linear, which the walk uses for float32 on CPU.
``--products`` adds each of the three products alone, unchunked (``z = h Wᵀ``, ``∂h = z W``,
``∂W = zᵀ h``) and, per chunk size, walked by chunks of that many rows with torch.mm: which of
the three chunking slows down.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import fastxent
from fastxent import _linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=65536)
    parser.add_argument("--chunks", default="64,96,128,256,0")
    parser.add_argument("--vocab-blocks", default="", help="vocab_block values, comma-separated")
    parser.add_argument("--bare", action="store_true", help="also time the chunked matmuls alone")
    parser.add_argument("--tiles", default="", help="vocabulary tiles of the tiled matmuls")
    parser.add_argument("--torch-mm", action="store_true", help="also walk with torch.mm products")
    parser.add_argument("--products", action="store_true", help="also time each product alone")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(args.n, args.d, generator=gen) * 0.05).requires_grad_()
    w = (torch.randn(args.v, args.d, generator=gen) * 0.05).requires_grad_()
    y = torch.randint(0, args.v, (args.n,), generator=gen)
    z, dh, dw = torch.empty(args.n, args.v), torch.empty(args.n, args.d), torch.empty_like(w)

    def matmuls() -> None:  # the floor: logits, d_hidden, d_weight
        torch.mm(h.detach(), w.detach().T, out=z)
        torch.mm(z, w.detach(), out=dh)
        torch.mm(z.T, h.detach(), out=dw)

    def fused(torch_mm: bool = False, **walk):
        def step() -> None:
            h.grad = w.grad = None
            with torch_mm_products() if torch_mm else contextlib.nullcontext():
                fastxent.linear_cross_entropy(h, w, y, **walk).backward()

        return step

    def bare(rows: int):
        zc, dw_acc = torch.empty(rows, args.v), torch.zeros_like(w)

        def step() -> None:  # per chunk: z_c = h_c Wᵀ, dh_c = z_c W, dW += z_cᵀ h_c
            dw_acc.zero_()
            for start in range(0, args.n, rows):
                hc, zz = h.detach()[start : start + rows], zc[: min(rows, args.n - start)]
                torch.mm(hc, w.detach().T, out=zz)
                torch.mm(zz, w.detach(), out=dh[start : start + rows])
                dw_acc.addmm_(zz.T, hc)

        return step

    def tiled(rows: int, tile: int):
        zt, dw_acc = torch.empty(args.v, rows), torch.zeros_like(w)  # zt: a chunk's logits, (V, n)
        hd, wd = h.detach(), w.detach()
        starts = list(range(0, args.n, rows))

        def step() -> None:
            dw_acc.zero_()
            torch.mm(wd, hd[:rows].T, out=zt[:, : min(rows, args.n)])  # the first chunk's logits
            for i, start in enumerate(starts):
                hc = hd[start : start + rows]
                dhc = dh[start : start + rows].zero_()
                nxt = hd[starts[i + 1] : starts[i + 1] + rows] if i + 1 < len(starts) else None
                for first in range(0, args.v, tile):
                    block = slice(first, first + tile)
                    g, wt = zt[block, : hc.shape[0]], wd[block]  # (T, n), (T, D)
                    dhc.addmm_(g.T, wt)
                    dw_acc[block].addmm_(g, hc)
                    if nxt is not None:  # the tile of W is in cache: the next chunk's logits
                        torch.mm(wt, nxt.T, out=zt[block, : nxt.shape[0]])

        return step

    def product(which: int, rows: int):
        hd, wd = h.detach(), w.detach()
        zc = z[:rows]  # a chunk's logits (the whole z when rows = N)

        def step() -> None:
            for start in range(0, args.n, rows):
                n, hc = min(rows, args.n - start), hd[start : start + rows]
                if which == 0:
                    torch.mm(hc, wd.T, out=zc[:n])
                elif which == 1:
                    torch.mm(zc[:n], wd, out=dh[start : start + rows])
                elif start == 0:
                    torch.mm(zc[:n].T, hc, out=dw)
                else:
                    dw.addmm_(zc[:n].T, hc)

        return step

    steps = {"3 matmuls": matmuls}
    names = ("z = h Wᵀ", "∂h = z W", "∂W = zᵀ h")
    for which, name in enumerate(names if args.products else ()):
        steps[f"{name} whole"] = product(which, args.n)
    for chunk in (int(c) or None for c in args.chunks.split(",") if c):
        steps[f"chunk {chunk or 'default'}"] = fused(chunk_size=chunk)
        if args.torch_mm:
            steps[f"  torch.mm {chunk or 'default'}"] = fused(True, chunk_size=chunk)
        if args.bare and chunk:
            steps[f"  matmuls only {chunk}"] = bare(chunk)
        for tile in (int(t) for t in args.tiles.split(",") if t and chunk):
            steps[f"  tiled {chunk}/{tile}"] = tiled(chunk, tile)
        for which, name in enumerate(names if args.products and chunk else ()):
            steps[f"  {name} {chunk}"] = product(which, chunk)
    for block in (int(b) for b in args.vocab_blocks.split(",") if b):
        steps[f"vocab block {block}"] = fused(vocab_block=block)
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["3 matmuls"])
    print(f"N={args.n} D={args.d} V={args.v} float32, {args.rounds} rounds")
    for name, runs in times.items():
        median, whole = statistics.median(runs), None
        if name.strip().startswith(names) and not name.endswith("whole"):
            whole = statistics.median(times[name.strip().rsplit(" ", 1)[0] + " whole"])
        against = f"   × whole {median / whole:5.3f}" if whole else ""
        print(
            f"  {name:18s} median {median * 1e3:8.1f} ms   × floor {median / floor:5.3f}{against}"
        )


@contextlib.contextmanager
def torch_mm_products():
    """The token walk with torch.mm's products (as without oneDNN) for as long as it lasts."""
    chosen = _linear.small_rows_linear
    _linear.small_rows_linear = lambda hidden, weight: None
    try:
        yield
    finally:
        _linear.small_rows_linear = chosen


if __name__ == "__main__":
    main()
