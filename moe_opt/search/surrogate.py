"""moe_opt's search: a surrogate-guided local search that knows the shape of the launch-config space.

What it knows that a generic sampler does not:
- the tunables are ordered (powers of two, warps, stages), so nearby configs behave alike;
- a config that failed to compile fails at every batch size (compilation does not depend on M), and one that
  cannot fit shared memory is never proposed;
- a good config at M=64 is a strong hint at M=96: measurements at other batch sizes of the same shape inform
  the prediction, weighted by how close the batch sizes are;
- the block sizes trade against each other: a tile's shared memory and registers grow with BLOCK_SIZE_M x
  BLOCK_SIZE_K + BLOCK_SIZE_K x BLOCK_SIZE_N, so the optimum often lies one block size up and another down from a
  config (BLOCK_SIZE_N 128 -> 64 with BLOCK_SIZE_K 64 -> 128), past a ridge that single steps cannot cross.

The model: every measurement becomes a point (config, log2 M, log of latency over that batch size's best).
The predicted log-ratio of a candidate at batch size M is a kernel-weighted average of those points (a
Nadaraya-Watson estimate with a prior pseudo-point); the next config is the unmeasured candidate with the lowest
lower confidence bound, looked for first among the local moves of the incumbent (one step along one tunable,
or an exchange of two block sizes) and the incumbents of the nearest batch sizes measured. Ties break by a
seeded random draw.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from ..space import PARAM_NAMES, TMA_NAME, Config

# How fast similarity decays per step along each tunable's ordered choices. GROUP_SIZE_M only reorders tiles,
# so its effect is small; block sizes change the whole kernel.
STEP_DECAY = {"BLOCK_SIZE_M": 1.2, "BLOCK_SIZE_N": 1.2, "BLOCK_SIZE_K": 1.2, "GROUP_SIZE_M": 0.15,
              "num_warps": 0.8, "num_stages": 0.6, TMA_NAME: 0.6}
# USE_TMA is a feature like the others (one step: the same tiles loaded another way); where the candidates have
# no TMA config it is constant and changes nothing.
FEATURES = PARAM_NAMES + (TMA_NAME,)
BATCH_DECAY = 1.0  # per octave of batch size between the measured and the predicted M
OTHER_M_WEIGHT = 0.5  # a measurement at another batch size counts at most this much
PRIOR_LOG_RATIO = 0.35  # unexplored configs are assumed ~40% slower than the best
PRIOR_WEIGHT = 0.05
EXPLORATION = 0.12  # kappa of the lower confidence bound
PATTERN_WITHIN = 0.05  # pattern moves are made from measured configs this close to the best
EXCHANGED = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")  # the tunables an exchange move trades
# The best configs of the nearest batch sizes below and above, up to this many octaves away, are local moves too:
# a neighbouring batch size's optimum is often several steps from this one's incumbent but close to its optimum
# (on the recorded Mixtral-8x7B table M=256's optimum is M=1024's; without this the walk stopped 10% off there in 9
# of 20 seeds, with it in none).
NEARBY_OCTAVES = 2


def is_latency(value: object) -> bool:
    """Whether ``value`` is a usable latency: a finite real number > 0 (not a bool)."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class SearchState:
    """What every study of one tune has learned, shared across batch sizes.

    Attributes:
        candidates: the configs allowed at all (grid filtered by block_k and the shared-memory estimate).
        measured: {M: {config: latency_us}} of completed trials.
        failed: configs that failed to compile; never proposed again at any batch size.
        failed_at: {M: configs that failed to run at that batch size}.
    """

    candidates: list[Config]
    measured: dict[int, dict[Config, float]] = field(default_factory=dict)
    failed: set[Config] = field(default_factory=set)
    failed_at: dict[int, set[Config]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.candidates)}
        choices = [sorted({getattr(c, p) for c in self.candidates}) for p in FEATURES]
        steps = np.array([[choices[j].index(getattr(c, p)) for j, p in enumerate(FEATURES)]
                          for c in self.candidates], dtype=np.float64)
        decay = np.array([STEP_DECAY[p] for p in FEATURES])
        # Similarity of every pair of candidates, computed once: exp(-sum of decayed step distances).
        step_distance = np.abs(steps[:, None, :] - steps[None, :, :])
        self._similarity = np.exp(-(step_distance @ decay))
        # The local moves of the pattern search: one step along one tunable (ring 1), or along two (ring 2,
        # e.g. a smaller BLOCK_SIZE_M with a larger BLOCK_SIZE_N, which single steps cannot reach past a ridge).
        total_steps = step_distance.sum(axis=2)
        self._rings = (total_steps == 1, (total_steps == 2) & (step_distance.max(axis=2) == 1))
        # Exchange moves: one block size a step up, another a step down, the rest unchanged (a part of ring 2
        # searched with ring 1: it keeps the tile's size about the same).
        blocks = [PARAM_NAMES.index(p) for p in EXCHANGED]
        signed = steps[:, None, blocks] - steps[None, :, blocks]
        self._exchange = self._rings[1] & (np.abs(signed).sum(axis=2) == 2) & (signed.sum(axis=2) == 0)
        self._steps = steps.astype(np.int64)
        # What record() has seen, as masks over the candidates (open_candidates runs on every proposal).
        self._failed_mask = np.zeros(len(self.candidates), dtype=bool)
        self._tried_mask: dict[int, np.ndarray] = {}
        for config in self.failed:
            self._mark(None, config)
        for M, configs in [*self.measured.items(), *self.failed_at.items()]:
            for config in configs:
                self._mark(M, config)
        self._at_steps = {tuple(row): i for i, row in enumerate(self._steps)}

    def record(self, M: int, config: Config, latency_us: float | None, compile_failure: bool = False) -> None:
        """One outcome. A latency that is not a finite number > 0 (a study written before such values were
        refused, or a measurer's bug) counts as a failure at M: the model takes logs of latency ratios."""
        if is_latency(latency_us):
            self.measured.setdefault(M, {})[config] = float(latency_us)
        elif compile_failure:
            self.failed.add(config)
            M = None
        else:
            self.failed_at.setdefault(M, set()).add(config)
        self._mark(M, config)

    def _mark(self, M: int | None, config: Config) -> None:
        """``config`` tried at M (None: failed to compile, so tried at every M) in the masks."""
        i = self._index.get(config)
        if i is None:
            return
        if M is None:
            self._failed_mask[i] = True
        else:
            self._tried_mask.setdefault(M, np.zeros(len(self.candidates), dtype=bool))[i] = True

    def tried(self, M: int) -> set[Config]:
        return set(self.measured.get(M, {})) | self.failed_at.get(M, set()) | self.failed

    def open_candidates(self, M: int) -> list[Config]:
        """The candidates not tried at M, in the candidates' order."""
        tried = self._failed_mask | self._tried_mask.get(M, False)
        return [self.candidates[i] for i in np.flatnonzero(~tried)]

    def predict(self, M: int) -> tuple[np.ndarray, np.ndarray]:
        """(predicted log-ratio to the best, uncertainty) for every candidate at batch size M."""
        num = np.full(len(self.candidates), PRIOR_WEIGHT * PRIOR_LOG_RATIO)
        den = np.full(len(self.candidates), PRIOR_WEIGHT)
        for m, results in self.measured.items():
            if not results:
                continue
            weight_m = 1.0 if m == M else OTHER_M_WEIGHT * math.exp(-BATCH_DECAY * abs(math.log2(m / M)))
            best = min(results.values())
            rows = [self._index[c] for c in results if c in self._index]
            if not rows:
                continue
            y = np.array([math.log(results[self.candidates[r]] / best) for r in rows])
            k = weight_m * self._similarity[:, rows]
            num += k @ y
            den += k.sum(axis=1)
        return num / den, 1.0 / np.sqrt(den)

    def propose(self, M: int, rng: random.Random, exclude: set[Config] = frozenset()) -> Config | None:
        """The next config to measure at batch size M, or None when every candidate has been tried."""
        pool, score = self._pool(M, exclude)
        if not pool:
            return None
        best_score = min(score[self._index[c]] for c in pool)
        ties = [c for c in pool if score[self._index[c]] <= best_score + 1e-9]
        return rng.choice(sorted(ties))

    def lookahead(self, M: int, k: int) -> list[Config]:
        """The k configs most likely to be proposed next at M (for compiling ahead)."""
        pool, score = self._pool(M, frozenset())
        return sorted(pool, key=lambda c: (score[self._index[c]], c))[:k]

    def _pool(self, M: int, exclude) -> tuple[set[Config], np.ndarray]:
        """The configs the next proposal is chosen from, and the acquisition score of every candidate."""
        open_set = set(self.open_candidates(M)) - set(exclude)
        if not open_set:
            return set(), np.zeros(0)
        mean, sigma = self.predict(M)
        score = mean - EXPLORATION * sigma
        pool = open_set
        results = self.measured.get(M)
        if results:
            # Pattern search first: the untried local moves of the incumbent (one step, or an exchange of block
            # sizes) and the nearby batch sizes' incumbents, best predicted first; then the pattern moves (a step
            # that improved, taken once more); then two-step neighbours.
            best = self._index[min(results, key=results.get)]
            local = self._rings[0][best] | self._exchange[best]
            stages = [{self.candidates[i] for i in np.flatnonzero(local)} | self._nearby_incumbents(M),
                      self._pattern_moves(results), {self.candidates[i] for i in np.flatnonzero(self._rings[1][best])}]
            for near in stages:
                near = near & open_set
                if near:
                    pool = near
                    break
        return pool, score

    def _nearby_incumbents(self, M: int) -> set[Config]:
        """The best configs of the nearest batch sizes measured below and above M, within NEARBY_OCTAVES."""
        out = set()
        for side in ([m for m in self.measured if m < M], [m for m in self.measured if m > M]):
            near = [m for m in side if self.measured[m] and abs(math.log2(m / M)) <= NEARBY_OCTAVES]
            if near:
                results = self.measured[min(near, key=lambda m: abs(math.log2(m / M)))]
                out.add(min(results, key=results.get))
        return out

    def _pattern_moves(self, results: dict[Config, float]) -> set[Config]:
        """Hooke-Jeeves pattern moves: where a one-step move p -> c improved the latency and c is within
        PATTERN_WITHIN of the best, the next step in that direction, c + (c - p). Finds optima two steps along one
        tunable from the start (num_stages 3 -> 4 -> 5) when the first step's neighbour was not the incumbent."""
        best_us = min(results.values())
        rows = {c: self._index[c] for c in results if c in self._index}
        out = set()
        for c, i in rows.items():
            if results[c] > best_us * (1 + PATTERN_WITHIN):
                continue
            for p, j in rows.items():
                if results[p] <= results[c] or not self._rings[0][i, j]:
                    continue
                k = self._at_steps.get(tuple(2 * self._steps[i] - self._steps[j]))
                if k is not None:
                    out.add(self.candidates[k])
        return out
