"""Published re-initialisation schedules as plans: neighbours of the cascade, run as its controls.

Each is a baseline (stage 0) followed by rounds (the sources' generations) that start from the
round before, accepted or not, change its weights with a reset (``resets.py``) and train every
block with the cascade's stage recipe. Validation chooses among the baseline and the rounds, as
it chooses among a cascade's stages; by default there are as many rounds as the cascade has
stages after its baseline, so each spends the cascade's budget. docs/schedules.md says what each
source specifies and where ours differs.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from topdown.plan import Plan, cascade_splits
from topdown.resets import KelsSplit, Reinit, RescaleToInit, Reset, ShrinkPerturb
from topdown.schedule import LrSchedule
from topdown.stage import StageSpec

SPLIT_RATE = 0.5  # Knowledge Evolution's main() (train_KE_cls.py)
SHRINK, PERTURB = 0.4, 0.1  # Ash & Adams' defaults (warm_start run.py)


class Rounds(Plan):
    """A baseline, then ``rounds()`` rounds (``Plan.rounds``): round r + 1 starts from round r's
    model (the baseline for the first), applies ``reset(r)`` and trains every block."""

    role: str = "round"

    def reset(self, round_index: int) -> tuple[Reset, ...]:
        raise NotImplementedError

    def split(self, round_index: int) -> int | None:
        """The split a round is recorded under (None: it has none)."""
        return None

    def stages(self) -> Iterator[StageSpec]:
        yield self.stage_zero()
        for r in range(self.rounds()):
            yield StageSpec(
                self.role,
                self.all_blocks(),
                start=r,
                reset=self.reset(r),
                split=self.split(r),
                train=LrSchedule.stage_recipe(self.config),
            )


class Layerwise(Rounds):
    """Bottom-up layerwise re-initialisation (Alabdulmohsin et al., arXiv 2109.00267): round k
    rescales blocks 1..k to their initial norms, re-initialises the blocks above and trains all;
    k rises through the cascade's splits (1, 2, ..., L-1 by default)."""

    procedure = "layerwise"
    procedure_options = ()
    role = "layerwise"

    def rounds(self) -> int:
        return len(self._splits())

    def _splits(self) -> list[int]:
        return sorted(cascade_splits(self.config, self.blocks))

    def check(self) -> None:
        for k in self._splits():
            self.check_split(k, "cascade.splits")

    def split(self, round_index: int) -> int:
        return self._splits()[round_index]

    def reset(self, round_index: int) -> tuple[Reset, ...]:
        kept, fresh = self.blocks.split(self.split(round_index))
        return RescaleToInit(tuple(kept)), Reinit(tuple(fresh))


class KnowledgeEvolution(Rounds):
    """Knowledge Evolution (Taha et al., CVPR 2021): each generation keeps every weight tensor's
    fit part (KELS, ``procedure.split_rate``), re-draws its reset part and trains all blocks."""

    procedure = "knowledge-evolution"
    procedure_options = ("rounds", "split_rate")
    role = "generation"

    def reset(self, round_index: int) -> tuple[Reset, ...]:
        return (self._split(),)

    def _split(self) -> KelsSplit:
        rate = self.config.procedure.split_rate
        return KelsSplit(self.all_blocks(), SPLIT_RATE if rate is None else rate)

    def reported_models(self) -> dict[str, nn.Module]:
        """The slim model (the fit part alone, ``KelsSplit.slim``), which the source evaluates after
        every generation."""
        return {"slim": self._split().slim(self.model, self.blocks)}


class ShrinkAndPerturb(Rounds):
    """Shrink and perturb (Ash & Adams, NeurIPS 2020): each round sets θ ← λ·θ + p·θ_fresh over every
    block (``procedure.shrink``, ``procedure.perturb``) and trains all blocks."""

    procedure = "shrink-perturb"
    procedure_options = ("rounds", "shrink", "perturb")
    role = "shrink-perturb"

    def reset(self, round_index: int) -> tuple[Reset, ...]:
        pc = self.config.procedure
        shrink = SHRINK if pc.shrink is None else pc.shrink
        perturb = PERTURB if pc.perturb is None else pc.perturb
        return (ShrinkPerturb(self.all_blocks(), shrink, perturb),)


class Restarts(Rounds):
    """A control, not a published schedule: the same rounds with nothing reset. Each round starts
    from the round before with a fresh optimizer and the stage recipe's learning-rate schedule and
    trains all blocks, so what a schedule gains beyond it is its reset's, not its restarts' (the
    equal-epochs baseline spends its epochs in one run, under one schedule)."""

    procedure = "restarts"
    procedure_options = ("rounds",)
    role = "restart"
    control = True

    def reset(self, round_index: int) -> tuple[Reset, ...]:
        return ()


SCHEDULES: tuple[type[Plan], ...] = (Layerwise, KnowledgeEvolution, ShrinkAndPerturb, Restarts)
