"""What a monitoring run measures and how much: the settings that go into its run folder's identity."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PersonavecError

CONDITIONS = ("graded", "many_shot")


@dataclass(frozen=True)
class MonitorSettings:
    n_questions: int | None = 10  # evaluation questions per prompt (None = all)
    rollouts: int = 1  # sampled answers per prompt × question
    max_new_tokens: int = 32  # per answer and per reference answer
    temperature: float = 1.0  # answers are samples, as in the paper; 0 = greedy (then rollouts must be 1)
    shots: tuple[int, ...] = (0, 5, 10, 15, 20)
    shot_tokens: int = 40  # tokens per many-shot example answer
    conditions: tuple[str, ...] = CONDITIONS
    judge_free: bool = True
    seed: int = 0

    def validate(self) -> None:
        if (self.n_questions is not None and self.n_questions < 1) or self.rollouts < 1 or self.max_new_tokens < 1:
            raise PersonavecError("--n-questions, --rollouts and --max-new-tokens must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonavecError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.temperature == 0 and self.rollouts > 1:
            raise PersonavecError("greedy answers (--temperature 0) are all the same; use --rollouts 1")
        if not self.conditions or any(c not in CONDITIONS for c in self.conditions):
            raise PersonavecError(f"conditions must be among {', '.join(CONDITIONS)}")
        if "many_shot" in self.conditions and (not self.shots or any(k < 0 for k in self.shots)):
            raise PersonavecError("--shots must be numbers of examples ≥ 0, e.g. 0,5,10,15,20")
        if self.shot_tokens < 1:
            raise PersonavecError("--shot-tokens must be at least 1")
