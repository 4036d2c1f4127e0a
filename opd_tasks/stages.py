"""What a stage reports back to the flow: small and picklable (Prefect passes it between tasks)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class StageResult(BaseModel):
    stage: str
    iteration: int | None = None
    rows: int = 0
    seconds: float = 0.0
    skipped: bool = False          # the stage's manifest already existed: nothing was redone
    tokens: int = 0                # response tokens produced/consumed by this call
    metrics: dict = Field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
