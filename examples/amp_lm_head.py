"""Mixed-precision training of a language-model head with fastxent.linear_cross_entropy.

    python examples/amp_lm_head.py            # CPU (bf16 autocast), or CUDA when available

The usual set-up: float32 parameters (the master weights), the forward under torch.autocast in
bf16, the optimizer on the float32 parameters. The model's last hidden states go to
``LinearCrossEntropyLoss`` with the head's weight, so the (tokens × vocabulary) logits are never
materialised; the head's gradient comes back in float32. A copy of the model trained with eager
PyTorch (``F.cross_entropy`` of the head's logits) from the same start shows the two runs agree.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import fastxent

V, D, T, B, STEPS = 4096, 64, 33, 8, 30  # vocabulary, width, context (+1 shift), batch, steps


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.body = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU())
        self.head = torch.nn.Linear(D, V, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) hidden states before the head."""
        return self.body(self.embed(tokens))


def train(steps: int = STEPS, device: torch.device | None = None) -> list[tuple[float, float]]:
    """(fastxent loss, eager loss) at each step of two copies trained side by side."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = TinyLM().to(device)
    eager = copy.deepcopy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, eager)]
    loss_fn = fastxent.LinearCrossEntropyLoss(shift=True)
    # A fixed toy language: each next token is a function of the current one.
    data = torch.randint(0, V, (64, T), generator=torch.Generator().manual_seed(1))
    data[:, 1:] = (data[:, :-1] * 7 + 3) % V
    data = data.to(device)
    history = []
    for step in range(steps):
        tokens = data[(step * B) % len(data) :][:B]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours = loss_fn(model.hidden(tokens), model.head.weight, tokens)
            logits = eager.head(eager.hidden(tokens))[:, :-1]  # position t predicts t + 1
            theirs = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        for loss, opt in zip((ours, theirs), opts, strict=True):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        history.append((float(ours.detach()), float(theirs.detach())))
    assert model.head.weight.dtype == torch.float32  # the master weights stay float32
    return history


def main() -> None:
    history = train()
    for step, (ours, theirs) in enumerate(history):
        if step % 5 == 0 or step == len(history) - 1:
            print(f"step {step:3d}  fastxent {ours:.4f}  eager {theirs:.4f}")


if __name__ == "__main__":
    main()
