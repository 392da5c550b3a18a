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
or an exchange of two block sizes; also one step from configs within NEAR_TIE of it) and the incumbents of the
nearest batch sizes measured. Ties break by a seeded random draw.
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
# Measured configs within this fraction of the best count as incumbents too: their one-step moves join the local
# moves, except where a config differs from the best in GROUP_SIZE_M only (it only reorders the tiles: its
# neighbourhood is the best's, one GROUP_SIZE_M step off). On the recorded Qwen3-235B-A22B table, M=4096, the walk
# otherwise stopped 1.2% off in 20 of 20 seeds: its incumbent 64/128/128/16/8/3 had replaced 16/8/4, 0.05% slower,
# whose warps step is the optimum. With 0.1%, 0.2% or 0.5% every table reached 1% at 32 trials in 20 of 20 seeds;
# with 1% Qwen3-30B-A3B's M=256 missed in 20 (docs/tuning.md).
NEAR_TIE = 0.002
GEOMETRY_ROWS = 256  # candidates per block when Geometry computes every pair's distances


def is_latency(value: object) -> bool:
    """Whether ``value`` is a usable latency: a finite real number > 0 (not a bool)."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class Geometry:
    """What the search knows about a list of candidates before measuring anything: each candidate's steps along
    the tunables' ordered choices, the similarity of every pair, and the local moves. Computed once per tune and
    shared by every search state over the same candidates (a pair tune keeps three)."""

    def __init__(self, candidates: list[Config]):
        self.candidates = candidates
        self.index = {c: i for i, c in enumerate(candidates)}
        choices = [sorted({getattr(c, p) for c in candidates}) for p in FEATURES]
        steps = np.array([[choices[j].index(getattr(c, p)) for j, p in enumerate(FEATURES)]
                          for c in candidates], dtype=np.int8)  # a tunable has at most a few dozen choices
        decay = np.array([STEP_DECAY[p] for p in FEATURES])
        blocks = [PARAM_NAMES.index(p) for p in EXCHANGED]
        n = len(candidates)
        self.similarity = np.empty((n, n))
        ring1, ring2, exchange = (np.empty((n, n), dtype=bool) for _ in range(3))
        # Every pair's step distances along the seven tunables, GEOMETRY_ROWS candidates at a time: all at once they
        # are an n x n x 7 array (2,496 candidates of a TMA space: 350 MB of float64, 12 s to fill on a 2-core VM;
        # in row blocks of int8, 0.8 s). Each block's similarities are the same floating-point operations as over the
        # whole array, so the values are bit for bit the same.
        for start in range(0, n, GEOMETRY_ROWS):
            rows = slice(start, start + GEOMETRY_ROWS)
            signed = steps[rows, None, :] - steps[None, :, :]
            distance = np.abs(signed)
            # Similarity of every pair of candidates: exp(-sum of decayed step distances).
            self.similarity[rows] = np.exp(-(distance.astype(np.float64) @ decay))
            # The local moves of the pattern search: one step along one tunable (ring 1), or along two (ring 2,
            # e.g. a smaller BLOCK_SIZE_M with a larger BLOCK_SIZE_N, which single steps cannot reach past a ridge).
            total = distance.sum(axis=2, dtype=np.int16)
            ring1[rows] = total == 1
            ring2[rows] = (total == 2) & (distance.max(axis=2) == 1)
            # Exchange moves: one block size a step up, another a step down, the rest unchanged (a part of ring 2
            # searched with ring 1: it keeps the tile's size about the same).
            exchange[rows] = (ring2[rows] & (distance[:, :, blocks].sum(axis=2, dtype=np.int16) == 2)
                              & (signed[:, :, blocks].sum(axis=2, dtype=np.int16) == 0))
        self.rings = (ring1, ring2)
        self.exchange = exchange
        self.steps = steps.astype(np.int64)
        self.at_steps = {tuple(row): i for i, row in enumerate(self.steps)}


@dataclass
class SearchState:
    """What every study of one tune has learned, shared across batch sizes.

    Attributes:
        candidates: the configs allowed at all (grid filtered by block_k and the shared-memory estimate).
        measured: {M: {config: latency_us}} of completed trials (written through :meth:`record` only).
        failed: configs that failed to compile; never proposed again at any batch size.
        failed_at: {M: configs that failed to run at that batch size}.
        geometry: the candidates' :class:`Geometry`, when another state over the same candidates has it.
    """

    candidates: list[Config]
    measured: dict[int, dict[Config, float]] = field(default_factory=dict)
    failed: set[Config] = field(default_factory=set)
    failed_at: dict[int, set[Config]] = field(default_factory=dict)
    geometry: Geometry | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.geometry is None or self.geometry.candidates != self.candidates:
            self.geometry = Geometry(self.candidates)
        g = self.geometry
        self._index, self._similarity, self._rings, self._exchange = g.index, g.similarity, g.rings, g.exchange
        self._steps, self._at_steps = g.steps, g.at_steps
        # What record() has seen, as masks over the candidates (open_candidates runs on every proposal).
        self._failed_mask = np.zeros(len(self.candidates), dtype=bool)
        self._tried_mask: dict[int, np.ndarray] = {}
        # Per batch size, the model's sums over its measured candidates i: similarity[:, i] * log(latency_i) and
        # similarity[:, i]; a prediction needs only these and the batch size's best (predict() says why).
        self._sum_log: dict[int, np.ndarray] = {}
        self._sum_sim: dict[int, np.ndarray] = {}
        for config in self.failed:
            self._mark(None, config)
        for M, configs in [*self.measured.items(), *self.failed_at.items()]:
            for config in configs:
                self._mark(M, config)
        for M, results in self.measured.items():
            for config, latency_us in results.items():
                self._add(M, config, latency_us, 1.0)

    def sibling(self) -> SearchState:
        """An empty state over the same candidates, sharing their geometry (a pair tune's per-GEMM states)."""
        return SearchState(self.candidates, geometry=self.geometry)

    def record(self, M: int, config: Config, latency_us: float | None, compile_failure: bool = False) -> None:
        """One outcome. A latency that is not a finite number > 0 (a study written before such values were
        refused, or a measurer's bug) counts as a failure at M: the model takes logs of latency ratios."""
        if is_latency(latency_us):
            results = self.measured.setdefault(M, {})
            if config in results:  # the same trial observed again, or a config re-measured: replace it
                self._add(M, config, results[config], -1.0)
            results[config] = float(latency_us)
            self._add(M, config, results[config], 1.0)
        elif compile_failure:
            self.failed.add(config)
            M = None
        else:
            self.failed_at.setdefault(M, set()).add(config)
        self._mark(M, config)

    def _add(self, M: int, config: Config, latency_us: float, sign: float) -> None:
        """Add (sign 1) or take out (-1) one measurement's terms of the model's sums at M."""
        i = self._index.get(config)
        if i is None:
            return
        n = len(self.candidates)
        column = self._similarity[:, i]
        self._sum_log.setdefault(M, np.zeros(n))[:] += sign * math.log(latency_us) * column
        self._sum_sim.setdefault(M, np.zeros(n))[:] += sign * column

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
        """(predicted log-ratio to the best, uncertainty) for every candidate at batch size M.

        Each measurement (config i, batch size m) adds weight_m * similarity[:, i] * log(latency_i / best_m) to the
        numerator and weight_m * similarity[:, i] to the denominator. Summed over i at one m, that is weight_m times
        (sum_log[m] - log(best_m) * sum_sim[m]) and weight_m * sum_sim[m]: record() keeps those two sums, so a
        prediction costs one vector operation per measured batch size, not one per measurement."""
        num = np.full(len(self.candidates), PRIOR_WEIGHT * PRIOR_LOG_RATIO)
        den = np.full(len(self.candidates), PRIOR_WEIGHT)
        for m, results in self.measured.items():
            if not results or m not in self._sum_sim:
                continue
            weight_m = 1.0 if m == M else OTHER_M_WEIGHT * math.exp(-BATCH_DECAY * abs(math.log2(m / M)))
            log_best = math.log(min(results.values()))
            num += weight_m * (self._sum_log[m] - log_best * self._sum_sim[m])
            den += weight_m * self._sum_sim[m]
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
            for i in self._near_ties(results, best):
                local = local | self._rings[0][i]
            stages = [{self.candidates[i] for i in np.flatnonzero(local)} | self._nearby_incumbents(M),
                      self._pattern_moves(results), {self.candidates[i] for i in np.flatnonzero(self._rings[1][best])}]
            for near in stages:
                near = near & open_set
                if near:
                    pool = near
                    break
        return pool, score

    def _near_ties(self, results: dict[Config, float], best: int) -> list[int]:
        """The candidates measured within NEAR_TIE of the best (index ``best``) that differ from it in more than
        GROUP_SIZE_M."""
        best_us = min(results.values())
        group = FEATURES.index("GROUP_SIZE_M")
        rest = [j for j in range(len(FEATURES)) if j != group]
        out = []
        for config, us in results.items():
            i = self._index.get(config)
            if i is None or i == best or us > best_us * (1 + NEAR_TIE):
                continue
            if (self._steps[i, rest] != self._steps[best, rest]).any():
                out.append(i)
        return out

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
