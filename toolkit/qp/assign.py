"""Distinct class assignment for a fixed selection S: top-m, cheapest-swap de-duplication, a matching, coverage.

For fixed S, X decomposes by class (each class takes its m best features of S) except for two couplings: no two
classes may use the same feature set, and every selected feature must be used by some class (the link
s_f <= sum_c X[f, c], docs/method.md#qp). Three steps, each never worse than the one before, then a repair:

1. top-m per class (the optimum without distinctness; an upper bound for this S);
2. the reference's de-duplication (docs/method.md#qp): while two classes share a set, apply the cheapest single swap
   (one feature of the set out, one other selected feature in) that creates no new collision;
3. an assignment problem over the classes that ever collided: each picks one of its best m-subsets of S (found
   best-first), subsets used by the other classes are taken, and `linear_sum_assignment` maximises the total.
   The subsets from step 2 are among the candidates, so step 3 can only improve on it. With every subset of S as
   a candidate it would be exact for this S; the candidate lists keep it fast;
4. coverage: while a selected feature is unused, the cheapest single swap that puts it into some class's set (taking
   out a feature another class still uses, creating no collision) is applied.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from toolkit.qp.problem import Assignment, Problem, duplicate_groups, top_m_assignment, unused_features

_MAX_CANDIDATES = 24  # best subsets per colliding class in the matching (more only if the matching needs them)


def _cheapest_swaps(problem: Problem, sel: np.ndarray, assignment: Assignment) -> tuple[Assignment, bool]:
    """Reference-style repair; returns (assignment, True) when it removed every collision."""
    out = list(assignment)
    used: dict[tuple[int, ...], int] = {}
    for fs in out:
        used[fs] = used.get(fs, 0) + 1
    a = problem.A
    for fs, classes in sorted(duplicate_groups(out).items()):
        for _ in range(len(classes) - 1):  # all but one class of the group must move
            best: tuple[float, int, int, int] | None = None
            current = fs
            others = np.setdiff1d(sel, np.asarray(current))
            for c in classes:
                if out[c] != current:
                    continue
                loss = a[list(current), c][:, None] - a[others, c][None, :]  # (m, k - m): A lost - A gained
                for flat in np.argsort(loss, axis=None, kind="stable"):
                    i, j = divmod(int(flat), len(others))
                    if best is not None and loss[i, j] >= best[0]:
                        break
                    new = tuple(sorted(set(current) - {current[i]} | {int(others[j])}))
                    if not used.get(new, 0):
                        best = (float(loss[i, j]), c, current[i], int(others[j]))
                        break
            if best is None:
                return out, False
            _, c, f_out, f_in = best
            new = tuple(sorted(set(out[c]) - {f_out} | {f_in}))
            used[out[c]] -= 1
            used[new] = used.get(new, 0) + 1
            out[c] = new
    return out, not duplicate_groups(out)


def best_subsets(values: np.ndarray, m: int, limit: int, skip: set[tuple[int, ...]],
                 labels: np.ndarray) -> list[tuple[float, tuple[int, ...]]]:
    """The `limit` best m-subsets by value sum, best first, leaving out subsets in `skip`.

    Args:
        values: (k,) one class's A over the selected features.
        m: subset size.
        limit: how many subsets to return (fewer if S has fewer).
        skip: subsets (as sorted tuples of labels) that are taken and must not be returned.
        labels: (k,) feature indices matching `values`.

    Returns:
        (value sum, sorted label tuple) pairs in non-increasing value order.
    """
    order = np.argsort(-values, kind="stable")
    v = values[order]
    k = len(v)
    start = tuple(range(m))
    heap = [(-float(v[list(start)].sum()), start)]
    seen = {start}
    out: list[tuple[float, tuple[int, ...]]] = []
    while heap and len(out) < limit:
        neg, ranks = heapq.heappop(heap)
        fs = tuple(sorted(int(labels[order[r]]) for r in ranks))
        if fs not in skip:
            out.append((-neg, fs))
        # Successors: move one rank down by one where that slot is free; every subset is reached once via `seen`.
        for i in range(m):
            nxt = ranks[i] + 1
            if nxt < k and (i == m - 1 or nxt < ranks[i + 1]):
                child = ranks[:i] + (nxt,) + ranks[i + 1:]
                if child not in seen:
                    seen.add(child)
                    heapq.heappush(heap, (neg + float(v[ranks[i]] - v[nxt]), child))
    return out


def _matching(problem: Problem, sel: np.ndarray, assignment: Assignment, movers: list[int]) -> Assignment:
    """Re-assign the `movers` jointly and optimally over their candidate subsets; the others keep their sets."""
    fixed = {fs for c, fs in enumerate(assignment) if c not in set(movers)}
    values = problem.A[sel]  # (k, C)
    limit = min(len(movers), _MAX_CANDIDATES)
    while True:
        cands = []
        for c in movers:
            lst = best_subsets(values[:, c], problem.m, limit, fixed, sel)
            own = assignment[c]
            if own not in fixed and all(fs != own for _, fs in lst):
                lst.append((float(problem.A[list(own), c].sum()), own))
            cands.append(lst)
        cols = sorted({fs for lst in cands for _, fs in lst})
        index = {fs: j for j, fs in enumerate(cols)}
        gain = np.full((len(movers), len(cols)), -1e18)
        for i, lst in enumerate(cands):
            for val, fs in lst:
                gain[i, index[fs]] = val
        rows, picked = linear_sum_assignment(gain, maximize=True)
        if (gain[rows, picked] > -1e17).all() or limit >= len(movers):
            break
        limit = len(movers)  # Hall's condition holds once every mover has len(movers) candidates
    out = list(assignment)
    for i, j in zip(rows, picked, strict=True):
        out[movers[i]] = cols[j]
    return out


def _cover_unused(problem: Problem, sel: np.ndarray, assignment: Assignment) -> Assignment | None:
    """Give every unused selected feature a class by the cheapest single swap; None if some feature cannot get one.

    A swap (class c: g out, f in) is allowed when g is used by another class too and the new set is not taken.
    """
    out = list(assignment)
    a = problem.A
    count: dict[int, int] = {}
    for fs in out:
        for f in fs:
            count[f] = count.get(f, 0) + 1
    used = set(out)
    for f in unused_features(sel, out):
        best: tuple[float, int, int] | None = None
        for c, fs in enumerate(out):
            for g in fs:
                if count[g] < 2:
                    continue
                loss = float(a[g, c] - a[f, c])
                if best is not None and loss >= best[0]:
                    continue
                if tuple(sorted(set(fs) - {g} | {int(f)})) not in used:
                    best = (loss, c, g)
        if best is None:
            return None
        _, c, g = best
        new = tuple(sorted(set(out[c]) - {g} | {int(f)}))
        used.discard(out[c])
        used.add(new)
        count[g] -= 1
        count[int(f)] = 1
        out[c] = new
    return out


@dataclass(frozen=True, kw_only=True)
class Distinct:
    """A collision-free assignment for one selection, with what distinctness cost."""

    assignment: Assignment  # C sorted tuples, pairwise different, covering every selected feature
    colliding: int  # classes in duplicate groups of plain top-m (0: top-m was distinct, hence optimal for S)
    loss: float  # objective units given up against top-m (>= 0; inf when no covering assignment was found)
    class_loss: np.ndarray  # (C,) the same per class (0 outside the colliding classes)


def distinct_assignment(problem: Problem, selected: np.ndarray) -> Distinct:
    """A collision-free assignment for a fixed selection (top-m, cheapest swaps, matching).

    Args:
        problem: the instance (needs binomial(k, m) >= C, checked before solving).
        selected: (k,) selected feature indices.

    Returns:
        The assignment (C sorted tuples, pairwise different, every selected feature used), the number of initially
        colliding classes and the loss against top-m, computed from the per-class values the steps used. In the
        rare case that the coverage repair finds no swap, the top-m-based assignment is returned with loss = inf
        (the caller treats the selection as infeasible).
    """
    sel = np.sort(np.asarray(selected, dtype=np.int64))
    top = top_m_assignment(problem, sel)
    groups = duplicate_groups(top)
    movers = sorted(itertools.chain.from_iterable(groups.values()))
    out = top
    if groups:
        swapped, ok = _cheapest_swaps(problem, sel, top)
        out = _matching(problem, sel, swapped if ok else top, movers)
        if duplicate_groups(out):
            raise AssertionError("distinct_assignment: matching left a collision")
    covered = _cover_unused(problem, sel, out)
    if covered is None:
        return Distinct(assignment=out, colliding=len(movers), loss=float("inf"),
                        class_loss=np.zeros(problem.n_classes))
    a = problem.A
    class_loss = np.zeros(problem.n_classes)
    changed = [c for c in range(problem.n_classes) if covered[c] != top[c]]
    for c in changed:
        class_loss[c] = problem.alpha * float(a[list(top[c]), c].sum() - a[list(covered[c]), c].sum())
    return Distinct(assignment=covered, colliding=len(movers), loss=float(class_loss.sum()), class_loss=class_loss)
