"""When the hangers-on of the loop run: each a pure function of the step, so a resumed run
keeps the same schedule with nothing saved for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Schedule:
    max_steps: int
    log_every: int
    eval_every: int = 0  # 0: never (also with no val split)
    sample_every: int = 0
    checkpoint_every: int = 0
    has_val: bool = False
    always_measure_norm: bool = False  # clipping or nonfinite=skip need the norm every step

    @classmethod
    def of(cls, trainer_cfg, *, has_val: bool) -> Schedule:
        t = trainer_cfg
        return cls(
            max_steps=t.max_steps,
            log_every=t.log_every,
            eval_every=t.eval_every,
            sample_every=t.sample_every,
            checkpoint_every=t.checkpoint_every,
            has_val=has_val,
            always_measure_norm=t.clip_grad_norm > 0 or t.nonfinite == "skip",
        )

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def should_measure_norm(self, step: int) -> bool:
        """Without clipping the grad norm is measured for the log only."""
        return self.always_measure_norm or self.should_log(step)

    def should_eval(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0 and self.has_val

    def should_sample(self, step: int) -> bool:
        return bool(self.sample_every) and step % self.sample_every == 0

    def should_save(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0
