"""The learning rate of each optimizer step: constant | linear | cosine, after a linear warmup.

    s = Schedule.from_config(cfg)   # total = iterations x epochs x mini_batches of the run's first iteration
    s.lr_at(step)                   # step: 0-based index of the optimizer step in the run

The schedule is written into the train state (DCP "train": asdict(schedule)) and a resumed
iteration takes it from there, so raising `iterations` on resume (a mutable field) does not bend
the curve of a run under way: steps past total_steps keep lr_end.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    lr: float = 1e-4         # peak lr (after warmup)
    warmup_steps: int = 0    # lr ramps linearly from lr / warmup_steps (step 0) to lr (step warmup_steps - 1)
    total_steps: int = 1     # the run's optimizer steps: the decay reaches lr_end after this many
    lr_end: float = 0.0      # linear/cosine: lr after the decay

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"train.lr_schedule: {self.kind!r} is not one of {list(KINDS)}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"lr schedule: warmup_steps {self.warmup_steps} must be >= 0 and total_steps "
                             f"{self.total_steps} >= 1")

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """A RunConfig's schedule over its whole run (iterations x epochs x mini_batches steps)."""
        t = cfg.train
        return cls(kind=t.lr_schedule, lr=t.lr, warmup_steps=t.warmup_steps, lr_end=t.lr_end,
                   total_steps=max(1, cfg.iterations * t.epochs * t.mini_batches))

    @classmethod
    def from_state(cls, state: dict) -> "Schedule":
        return cls(**state)

    def to_state(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based over the run)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        frac = min((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 1.0)
        shape = 1.0 - frac if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr_end + (self.lr - self.lr_end) * shape
