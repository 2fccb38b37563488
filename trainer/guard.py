"""`trainer.nonfinite`: what a NaN or Inf loss or grad norm does to a run.

- halt (default): every rank stops, with the same verdict, before the weights of a window
  with a non-finite loss or grad norm are evaluated, shown or saved; the error names the
  first bad step and its rank(s), and which checkpoint is kept.
- skip: a step whose global grad norm is non-finite is left out (the backend did not apply
  it) and counted; `trainer.nonfinite_max_skips` of them in a row end the run.

The window's losses and measured norms stay on the device, unreduced, until they are
looked at (no host sync per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or grad norm under trainer.nonfinite=halt (or too many skips in a row)."""


class LossWindow:
    """The kept steps' losses and measured grad norms since the last log step, on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.norms: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if norm is not None:
            self.norms.append(norm.detach())

    def sums(self) -> torch.Tensor:
        """[loss sum, grad norm sum], float64 on the device. A NaN or Inf anywhere makes a sum
        non-finite, so the sums say whether to look closer."""
        out = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.losses:
            out[0] = torch.stack(self.losses).sum(dtype=torch.float64)
        if self.norms:
            out[1] = torch.stack(self.norms).sum(dtype=torch.float64)
        return out


class NonFiniteGuard:
    def __init__(
        self,
        backend,
        *,
        policy: str,
        max_skips: int,
        kept_checkpoint: Callable[[], str],
        say: Callable[[str], None] = print,
    ):
        self.backend, self.skip, self.max_skips = backend, policy == "skip", max_skips
        self.kept_checkpoint, self.say = kept_checkpoint, say
        self.window = LossWindow(backend.device)
        self.skips_in_a_row = 0

    def observe(self, state, step: int, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        """A finished step: into the window, or (skip, non-finite norm) counted and left out.
        The norm is global, so every rank decides alike."""
        if self.skip and not torch.isfinite(norm):
            state.skipped_nonfinite += 1
            self.skips_in_a_row += 1
            self.say(
                f"step {step}: grad norm {norm.item()}, step skipped "
                f"(trainer.nonfinite=skip; {state.skipped_nonfinite} so far)"
            )
            if self.skips_in_a_row >= self.max_skips:
                raise NonFiniteError(
                    f"{self.skips_in_a_row} non-finite steps in a row up to step {step} "
                    f"(trainer.nonfinite_max_skips={self.max_skips}); {self.kept_checkpoint()}"
                )
            return
        self.skips_in_a_row = 0
        self.window.add(step, loss, norm)

    def check(self, step: int, reduced: list[float] | None = None) -> None:
        """Under halt, stop every rank if the window's summed loss or norm is not finite.
        Collective: `reduced` is the window's sums already reduced over ranks, else they are."""
        if self.skip:
            return
        if reduced is None:
            reduced = self.backend.reduce_sum(self.window.sums()).tolist()
        if math.isfinite(reduced[0]) and math.isfinite(reduced[1]):
            return
        b, w = self.backend, self.window
        slots = torch.zeros(b.world_size, dtype=torch.float64, device=b.device)  # summed: who, when
        if w.losses:
            bad = [s for s, v in zip(w.steps, torch.stack(w.losses).tolist()) if not math.isfinite(v)]
            slots[b.rank] = bad[0] if bad else 0
        found = {r: int(s) for r, s in enumerate(b.reduce_sum(slots).tolist()) if s}
        if found:
            at = min(found.values())
            where = f"loss at step {at} on rank(s) {[r for r, s in found.items() if s == at]}"
        else:
            first = w.steps[0] if w.steps else step
            where = "grad norm in steps " + (f"{first}-{step}" if first < step else str(step))
        raise NonFiniteError(
            f"non-finite {where} (caught at step {step}, trainer.nonfinite=halt); "
            f"{self.kept_checkpoint()}. Resume from it with a lower optim.lr or "
            "trainer.clip_grad_norm, or set trainer.nonfinite=skip"
        )
