"""The fast heuristic: greedy selection, 1-swap local search, distinct assignment, distinctness-aware polishing.

It works on V(S) = alpha * sum_c top_m(A[S, c]) - penalty(S), the objective of a selection S with the best
assignment ignoring distinctness (docs/method.md#qp: for fixed S the best X is each class's top m). Steps:

1. Greedy (docs/method.md#qp): every class starts with m "phantom" features worth theta_c, the
   ceil(m F / k)-th best A of its column, so early picks are not judged by one class alone; then add the feature
   with the largest marginal V (penalty included) until |S| = k.
2. Best-improvement 1-swap local search. Per class keep the m-th and (m+1)-th best values of S, so every
   (out, in) delta is exact and all k x F of them come from two (k, C) @ (C, F) products; V is updated
   incrementally by the accepted delta.
3. Distinct assignment for the final S (`assign.distinct_assignment`), then distinctness-aware polishing: swaps
   whose V-delta exceeds minus the distinctness loss are re-scored by their value *after* de-duplication, since
   the best S before de-duplication is not always the best after it (docs/method.md#qp).
4. Iterated local search (random kicks of a few features, then steps 2-3) while the time budget lasts.

Every answer is feasible: |S| = k, m features per class, pairwise different class sets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from toolkit.qp.assign import distinct_assignment
from toolkit.qp.problem import Assignment, Problem

_POLISH_CANDIDATES = 16  # swaps re-scored after de-duplication per polishing round
_KICK = 4  # features replaced by one iterated-local-search kick
_PATIENCE = 40  # kicks without improvement before iterated local search gives up


@dataclass(frozen=True, eq=False, kw_only=True)
class Candidate:
    """A feasible answer and the objective its producer claims (re-checked by `certificate.verify`)."""

    selected: np.ndarray  # (k,) sorted int64
    assignment: Assignment
    value: float
    source: str


def greedy(problem: Problem) -> np.ndarray:
    """Greedy selection against phantom thresholds; returns (k,) feature indices."""
    a, k, m = problem.A, problem.k, problem.m
    n = problem.n_features
    theta = -np.partition(-a, math.ceil(m * n / k) - 1, axis=0)[math.ceil(m * n / k) - 1]
    tops = np.tile(theta, (m, 1))  # (m, C) current m best values per class, phantoms included
    pen = np.zeros(n)
    avail = np.ones(n, dtype=bool)
    chosen: list[int] = []
    w = problem.W
    for _ in range(k):
        gain = problem.alpha * np.maximum(a - tops.min(0), 0.0).sum(1) - pen
        gain[~avail] = -np.inf
        f = int(np.argmax(gain))
        chosen.append(f)
        avail[f] = False
        pen += w[f].toarray().ravel()
        tops = -np.partition(-np.vstack([tops, a[f]]), m - 1, axis=0)[:m]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def swap_deltas(problem: Problem, sel: np.ndarray) -> np.ndarray:
    """(k, F) exact change of V when sel[i] leaves and feature g enters (-inf where g is already selected)."""
    a, m = problem.A, problem.m
    k, n_cls = len(sel), problem.n_classes
    a_s = a[sel]
    order = np.argsort(-a_s, axis=0, kind="stable")
    cols = np.arange(n_cls)
    in_top = np.zeros(a_s.shape)
    in_top[order[:m], cols] = 1.0
    t_m = a_s[order[m - 1], cols]
    t_next = a_s[order[m], cols] if k > m else np.full(n_cls, -np.inf)
    # A selected feature in a class's top m is replaced there by max(A_gc, t_{m+1,c}); one outside it lets
    # the newcomer in only if A_gc beats t_{m,c}.
    gain = in_top @ np.maximum(a, t_next).T + (1.0 - in_top) @ np.maximum(a - t_m, 0.0).T
    gain -= (in_top * a_s).sum(1)[:, None]
    w_s = problem.W[sel].toarray()  # (k, F)
    pen_out = w_s[:, sel].sum(1)  # what each leaving feature currently pays
    pen_in = w_s.sum(0)[None, :] - w_s  # what the newcomer would pay to the k - 1 that stay
    delta = problem.alpha * gain + pen_out[:, None] - pen_in
    delta[:, sel] = -np.inf
    return delta


def local_search(problem: Problem, selected: np.ndarray, deadline: float,
                 value: float | None = None) -> tuple[np.ndarray, float]:
    """Best-improvement 1-swap descent on V; returns (sorted selection, V tracked incrementally)."""
    sel = np.sort(np.asarray(selected, dtype=np.int64))
    v = problem.topm_value(sel) - problem.penalty(sel) if value is None else value
    while time.perf_counter() < deadline:
        delta = swap_deltas(problem, sel)
        i, g = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[i, g] <= 1e-9 * max(1.0, abs(v)):
            break
        v += float(delta[i, g])
        sel[i] = g
        sel.sort()
    return sel, v


def _collision_bonus(problem: Problem, sel: np.ndarray, class_loss: np.ndarray) -> np.ndarray:
    """(F,) rough value of each feature for de-duplication: a newcomer that enters the top m of a colliding class
    gives that class a set of its own, saving (about) what distinctness cost it."""
    hit = np.flatnonzero(class_loss > 0)
    if not len(hit):
        return np.zeros(problem.n_features)
    a = problem.A[:, hit]
    t_m = -np.partition(-a[sel], problem.m - 1, axis=0)[problem.m - 1]
    return ((a > t_m) * class_loss[hit]).max(1)


def finish(problem: Problem, sel: np.ndarray, v: float, deadline: float, source: str) -> Candidate:
    """Distinct assignment plus distinctness-aware polishing of a locally optimal selection.

    Swaps are ranked by their V-delta plus a de-duplication bonus and the best few are re-scored exactly, by
    their value after de-duplication; the best improving one is applied, until none improves.
    """
    res = distinct_assignment(problem, sel)
    best = Candidate(selected=sel.copy(), assignment=res.assignment, value=v - res.loss, source=source)
    while res.loss > 0 and time.perf_counter() < deadline:
        delta = swap_deltas(problem, best.selected)
        score = delta + _collision_bonus(problem, best.selected, res.class_loss)[None, :]
        flat = np.argsort(score, axis=None)[::-1][:_POLISH_CANDIDATES]
        improved = None
        for idx in flat:
            i, g = np.unravel_index(int(idx), delta.shape)
            if delta[i, g] <= -res.loss or score[i, g] <= 0:  # cannot (or is not expected to) gain
                continue
            trial = best.selected.copy()
            trial[i] = g
            trial.sort()
            vt = v + float(delta[i, g])
            rt = distinct_assignment(problem, trial)
            if vt - rt.loss > (improved[0].value if improved else best.value) + 1e-9:
                cand = Candidate(selected=trial, assignment=rt.assignment, value=vt - rt.loss, source=source)
                improved = (cand, vt, rt)
        if improved is None:
            break
        best, v, res = improved
    return best


def run_heuristic(problem: Problem, starts: list[np.ndarray], deadline: float, *, seed: int = 0,
                  max_kicks: int = 200) -> Candidate:
    """Best feasible answer from local search on each start, then iterated local search until `deadline`.

    Args:
        problem: the instance.
        starts: initial selections (k features each); the greedy one is always added.
        deadline: `time.perf_counter()` value after which no new kick starts (the first descents always finish).
        seed: seed of the kicks.
        max_kicks: upper limit on iterated-local-search kicks.

    Returns:
        The best candidate found (always feasible).
    """
    rng = np.random.default_rng(seed)
    best: Candidate | None = None
    sels = [greedy(problem), *[np.asarray(s, dtype=np.int64) for s in starts]]
    for sel in sels:
        sel, v = local_search(problem, sel, math.inf)
        cand = finish(problem, sel, v, deadline, "heuristic")
        if best is None or cand.value > best.value:
            best = cand
    assert best is not None
    return iterated_local_search(problem, best, deadline, rng=rng, max_kicks=max_kicks)


def iterated_local_search(problem: Problem, best: Candidate, deadline: float, *, rng: np.random.Generator,
                          max_kicks: int = 200, patience: int = _PATIENCE) -> Candidate:
    """Kick `_KICK` features of the best answer out for promising ones, descend again, keep improvements.

    Stops at `deadline`, after `max_kicks` kicks, or after `patience` kicks in a row without improvement.
    """
    n = problem.n_features
    kick = min(_KICK, problem.k, n - problem.k)
    if kick == 0:
        return best
    pool_size = min(n, 3 * problem.k)
    stale = 0
    for _ in range(max_kicks):
        if time.perf_counter() >= deadline or stale >= patience:
            break
        # Kick in features that look good against the current best (random ones are swapped straight back out).
        promising = np.argsort(swap_deltas(problem, best.selected).max(0))[::-1][:pool_size]
        pool = np.setdiff1d(promising, best.selected)
        if len(pool) < kick:
            pool = np.setdiff1d(np.arange(n), best.selected)
        sel = best.selected.copy()
        sel[rng.choice(len(sel), kick, replace=False)] = rng.choice(pool, kick, replace=False)
        sel, v = local_search(problem, sel, deadline)
        cand = finish(problem, sel, v, deadline, best.source)
        stale += 1
        if cand.value > best.value + 1e-9:
            best, stale = cand, 0
    return best
