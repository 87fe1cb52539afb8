"""Negative-sampling strategies: a registry of plain functions, one annotated sample in, a
:class:`Selection` out.

A strategy is a function ``fn(ctx: SampleContext) -> Selection`` (a list of item ids is accepted
too). Its docstring states its rule and its fallback. Register your own without touching the
package::

    from raydpo.sampling import Selection, register_strategy

    @register_strategy("least_likely")
    def least_likely(ctx):
        '''The candidate the model found least likely. Fallback: none (no candidates -> dropped).'''
        if not len(ctx.items):
            return Selection([], "no_candidates")
        return Selection([int(ctx.items[ctx.logprobs.argmin()])])

and use it by name (``sample_negatives(..., strategy="least_likely")``, ``raydpo sample --plugin
mymodule --strategy least_likely``).

Rules common to every built-in strategy:

* Candidates are the record's self-play candidates in beam order, with the target, history items
  and duplicates already removed (``annotate``).
* Ties always break by candidate order (beam rank), never by set or hash order.
* ``ctx.n`` (``n_negatives``) is the number of negatives *per pick*: single-pick strategies return
  up to n, the two-pick strategies (``balanced_popularity``, ``clusterin_*_clusterout_low``) up to
  2n. n = 1 reproduces the published single negatives and pairs.
* A record whose selection is empty is dropped from the dataset with its reason counted (the
  reference wrote ``""`` instead). A negative is never the target; duplicates inside one record
  are removed and counted.
* Randomness comes from ``ctx.uniforms`` (seeded by (seed, sample_id), independent of batching).

Fallback and drop reasons (the summary counts each): ``no_candidates``, ``no_in_cluster_candidate``,
``least_overlap``, ``single_candidate``, ``duplicate_replaced``, ``duplicate_dropped``,
``catalog_exhausted``, ``subset_empty_used_all``, ``no_embedded_candidate``,
``target_unseen_used_history``, ``history_unseen_used_target``, ``no_anchor``.

Built-ins also carry a vectorised implementation over a :class:`BatchContext` (``batch=``) that
gives exactly the per-record result (the tests check both on random inputs); user strategies
run record by record.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError, RaydpoError
from .context import BatchContext, SampleContext

NO_CANDIDATES = "no_candidates"
NO_IN_CLUSTER = "no_in_cluster_candidate"
LEAST_OVERLAP = "least_overlap"
SINGLE_CANDIDATE = "single_candidate"
DUPLICATE_REPLACED = "duplicate_replaced"
DUPLICATE_DROPPED = "duplicate_dropped"
CATALOG_EXHAUSTED = "catalog_exhausted"
SUBSET_EMPTY = "subset_empty_used_all"
NO_EMBEDDED = "no_embedded_candidate"
TARGET_UNSEEN = "target_unseen_used_history"
HISTORY_UNSEEN = "history_unseen_used_target"
NO_ANCHOR = "no_anchor"


@dataclass(frozen=True)
class Selection:
    """What a strategy returns for one record: negatives (item ids, in output order), the
    fallback(s) that fired (a reason string, several, or None) and how many duplicates it avoided."""

    negatives: Sequence[int] = ()
    fallback: str | Sequence[str] | None = None
    duplicates_avoided: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "negatives", tuple(int(x) for x in self.negatives))

    @property
    def reasons(self) -> tuple[str, ...]:
        if not self.fallback:
            return ()
        return (self.fallback,) if isinstance(self.fallback, str) else tuple(r for r in self.fallback if r)


@dataclass
class BatchSelection:
    """A vectorised strategy's answer for a batch: ``picks [B, W]`` item ids (-1 = none), reason
    masks, duplicates avoided per record, and rows to hand to the per-record function instead."""

    picks: np.ndarray
    reasons: dict[str, np.ndarray] = field(default_factory=dict)
    duplicates_avoided: np.ndarray | None = None
    delegate: np.ndarray | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[SampleContext], object]
    batch: Callable[[BatchContext], BatchSelection] | None = None
    default_n: int = 1
    needs_embeddings: bool = False
    uses_candidates: bool = True
    picks: int = 1
    builtin: bool = False

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.fn.__doc__ or "(undocumented)")

    @property
    def headline(self) -> str:
        return self.doc.split("\n\n")[0].replace("\n", " ")


_REGISTRY: dict[str, Strategy] = {}
_NAME = re.compile(r"^[A-Za-z0-9_.:@-]+$")


def register_strategy(name: str, fn: Callable | None = None, *, batch: Callable | None = None, default_n: int = 1,
                      needs_embeddings: bool = False, uses_candidates: bool = True, picks: int = 1,
                      replace: bool = False, _builtin: bool = False):
    """Register ``fn`` under ``name``; usable as a decorator (``@register_strategy("name")``).

    ``batch``: optional vectorised twin (``BatchContext -> BatchSelection``). ``default_n``: negatives
    per pick when the caller does not say. ``needs_embeddings``: the strategy reads LightGCN
    distances (a LightGCN is trained when none is given). ``uses_candidates=False``: the strategy
    draws from the catalog, so records without candidates are not dropped for that reason.
    ``picks``: how many negatives per n it returns (2 for a two-pick list strategy); the summary
    counts records with fewer than ``picks * n`` negatives as short. Re-registering a name raises
    unless ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise RaydpoError(f"invalid strategy name {name!r}: use letters, digits and _ . : @ -")
    if default_n < 1:
        raise RaydpoError(f"default_n must be >= 1, got {default_n}")

    def deco(f: Callable) -> Callable:
        if not callable(f):
            raise RaydpoError(f"strategy {name!r}: {f!r} is not callable")
        if name in _REGISTRY and not replace:
            raise RaydpoError(f"strategy {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = Strategy(name=name, fn=f, batch=batch, default_n=default_n,
                                   needs_embeddings=needs_embeddings, uses_candidates=uses_candidates,
                                   picks=picks, builtin=_builtin)
        return f

    return deco(fn) if fn is not None else deco


def unregister_strategy(name: str) -> None:
    s = _REGISTRY.get(name)
    if s is not None and s.builtin:
        raise RaydpoError(f"{name!r} is a built-in strategy")
    _REGISTRY.pop(name, None)


def strategy_names() -> list[str]:
    return list(_REGISTRY)


def get_strategy(name: "str | Strategy | Callable") -> Strategy:
    """The registered strategy ``name`` (a Strategy or a plain function is passed through)."""
    if isinstance(name, Strategy):
        return name
    if callable(name):
        return Strategy(name=getattr(name, "__name__", "custom"), fn=name)
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown strategy {name!r}; known strategies: {', '.join(_REGISTRY)}",
                        field="strategy") from None


def describe_strategies() -> str:
    """One line per strategy: name and the first paragraph of its docstring."""
    width = max(len(n) for n in _REGISTRY)
    return "\n".join(f"{n:<{width}}  {s.headline}" for n, s in _REGISTRY.items())


_LOADED_FILES: dict[str, tuple[str, ...]] = {}


def load_plugin(spec: str) -> None:
    """Import a module (``pkg.mod``) or a Python file (``path/to/file.py``) that registers strategies.

    Whatever goes wrong (not found, not UTF-8, a syntax error, an exception while importing) is
    one RaydpoError line naming the plugin and the error; nothing half-imported stays registered
    in ``sys.modules``."""
    from ..readers import check_file, decode_utf8, one_line, read_bytes

    if not isinstance(spec, str) or not spec.strip():
        raise RaydpoError(f"strategy plugin: expected a module name or a .py file, got {spec!r}")
    if spec.endswith(".py"):
        path = check_file(spec, "plugin file")
        key = str(path.resolve())
        if key in _LOADED_FILES and all(n in _REGISTRY for n in _LOADED_FILES[key]):
            return  # loaded already (configs are validated more than once); its strategies are there
        before = set(_REGISTRY)
        source = decode_utf8(read_bytes(path, "plugin file"), path)
        mod_name = f"raydpo_plugin_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)
        except SyntaxError as e:
            sys.modules.pop(mod_name, None)
            raise RaydpoError(f"strategy plugin {spec}: syntax error at line {e.lineno}: {one_line(e.msg)}") from None
        except BaseException as e:  # noqa: BLE001 - a plugin may raise anything while importing
            sys.modules.pop(mod_name, None)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise RaydpoError(f"strategy plugin {spec} failed while importing: {_plugin_error(e, str(path))}") from None
        _LOADED_FILES[key] = tuple(n for n in _REGISTRY if n not in before)
    else:
        before = set(sys.modules)
        try:
            importlib.import_module(spec)
        except ImportError as e:
            raise RaydpoError(f"cannot import strategy plugin {spec!r}: {one_line(e)}") from None
        except SyntaxError as e:
            raise RaydpoError(f"strategy plugin {spec!r}: syntax error in {e.filename} at line {e.lineno}: "
                              f"{one_line(e.msg)}") from None
        except BaseException as e:  # noqa: BLE001
            for m in set(sys.modules) - before:
                sys.modules.pop(m, None)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise RaydpoError(f"strategy plugin {spec!r} failed while importing: {_plugin_error(e)}") from None


def _plugin_error(e: BaseException, filename: str | None = None) -> str:
    """``Type: message (file, line N)`` of an exception raised by plugin code, on one line."""
    import traceback

    from ..readers import one_line

    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if filename is None or f.filename == filename]
    if mine:
        where = f" ({Path(mine[-1].filename).name}, line {mine[-1].lineno})"
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r}){where}"
    return one_line(f"{type(e).__name__}: {e}{where}")


# ------------------------------------------------------------------------------------------------
# applying a strategy to a batch


def reason_label(reasons) -> str:
    """Canonical per-record reason string: sorted distinct reasons joined by '+' ('' = none)."""
    return "+".join(sorted(set(reasons)))


def _normalise(out, name: str, sample_id) -> Selection:
    if isinstance(out, Selection):
        return out
    if out is None:
        return Selection(())
    if isinstance(out, (list, tuple, np.ndarray)):
        return Selection(list(np.asarray(out, dtype=np.int64).reshape(-1)))
    raise RaydpoError(f"strategy {name!r} returned {type(out).__name__} for sample {sample_id!r}; "
                      "expected a Selection or a list of item ids")


def apply_strategy(strategy, batch: BatchContext, engine: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a strategy over a batch: ``(picks [B, W] left-aligned, -1 pad; reason labels [B] (object);
    duplicates avoided [B])``. Picks are checked (catalog ids, never the target) and de-duplicated.

    ``engine``: ``auto`` (vectorised when the strategy has a batch twin), ``batch`` or ``record``.
    """
    st = get_strategy(strategy)
    if engine not in ("auto", "batch", "record"):
        raise RaydpoError(f"unknown engine {engine!r}; expected auto, batch or record")
    if engine == "batch" and st.batch is None:
        raise RaydpoError(f"strategy {st.name!r} has no vectorised implementation; use engine='record' or 'auto'")
    B = len(batch)
    labels = np.full(B, "", dtype=object)
    dups = np.zeros(B, dtype=np.int64)
    if st.batch is not None and engine != "record":
        bs = st.batch(batch)
        picks = np.asarray(bs.picks, dtype=np.int64)
        picks = picks.reshape(B, -1) if B else np.full((0, max(picks.shape[-1] if picks.ndim == 2 else 1, 1)), -1,
                                                            np.int64)
        if bs.reasons:
            names = list(bs.reasons)
            code = np.zeros(B, dtype=np.int64)
            for bit, nm in enumerate(names):
                code |= np.asarray(bs.reasons[nm], dtype=bool).astype(np.int64) << bit
            uniq, inv = np.unique(code, return_inverse=True)
            lab = np.array([reason_label(nm for bit, nm in enumerate(names) if (int(c) >> bit) & 1) for c in uniq],
                           dtype=object)
            labels = lab[inv]
        if bs.duplicates_avoided is not None:
            dups = np.asarray(bs.duplicates_avoided, dtype=np.int64).copy()
        rows = np.flatnonzero(bs.delegate) if bs.delegate is not None else np.empty(0, np.int64)
    else:
        picks = np.full((B, 1), -1, dtype=np.int64)
        rows = np.arange(B)
    if len(rows):
        sels = [_normalise(st.fn(batch.row(int(i))), st.name, batch.sample_ids[i]) for i in rows]
        width = max([picks.shape[1]] + [len(s.negatives) for s in sels])
        if width > picks.shape[1]:
            picks = np.concatenate([picks, np.full((B, width - picks.shape[1]), -1, np.int64)], 1)
        for i, s in zip(rows.tolist(), sels):
            if s.negatives and min(s.negatives) < 0:
                raise DataError(f"strategy {st.name!r} returned a negative item id {min(s.negatives)}",
                                record=str(batch.sample_ids[i]), field="rejected_item_ids")
            picks[i] = -1
            picks[i, : len(s.negatives)] = s.negatives
            labels[i] = reason_label(s.reasons)
            dups[i] = int(s.duplicates_avoided)
    return _check_picks(picks, batch, st.name, labels, dups)


def _check_picks(picks, batch: BatchContext, name: str, labels, dups):
    n_items = batch.state.n_items
    bad = (picks < -1) | (picks >= n_items)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"strategy {name!r} returned item id {int(picks[i, j])}, outside the catalog "
                        f"(0..{n_items - 1})", record=str(batch.sample_ids[i]), field="rejected_item_ids")
    is_t = (picks >= 0) & (picks == batch.target[:, None])
    if is_t.any():
        i = int(np.flatnonzero(is_t.any(1))[0])
        raise DataError(f"strategy {name!r} chose the target item {int(batch.target[i])} as a negative",
                        record=str(batch.sample_ids[i]), field="rejected_item_ids")
    W = picks.shape[1]
    present = picks >= 0
    dup = np.zeros_like(present)
    for j in range(1, W):
        dup[:, j] = present[:, j] & (picks[:, :j] == picks[:, j : j + 1]).any(1)
    if dup.any():
        dups = dups + dup.sum(1)
        present &= ~dup
    if not present.all():  # compact left, keeping order
        order = np.argsort(~present, axis=1, kind="stable")
        picks = np.where(np.take_along_axis(present, order, 1), np.take_along_axis(picks, order, 1), -1)
        keep = (picks >= 0).any(0)
        keep[0] = True
        picks = picks[:, : int(np.flatnonzero(keep).max()) + 1]
    return picks, labels, dups


# ------------------------------------------------------------------------------------------------
# shared helpers (per record: plain Python; per batch: numpy)


def _order(key: list, mask: list, descending: bool) -> list[int]:
    """Positions where ``mask`` holds, by key (descending or ascending), ties by position."""
    idx = [j for j, ok in enumerate(mask) if ok]
    if descending:
        idx.sort(key=lambda j: (-key[j], j))
    else:
        idx.sort(key=lambda j: (key[j], j))
    return idx


def _rank_b(key: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """``[B, min(n, C)]`` positions of the n smallest keys among ``mask`` (stable: ties by position), -1 pad."""
    k = np.where(mask, key.astype(np.float64), np.inf)
    order = np.argsort(k, axis=1, kind="stable")[:, :n]
    return np.where(np.take_along_axis(mask, order, 1), order, -1)


def _take(b: BatchContext, pos: np.ndarray, arr: np.ndarray | None = None) -> np.ndarray:
    src = b.items if arr is None else arr
    return np.where(pos >= 0, np.take_along_axis(src, np.maximum(pos, 0), 1), -1)


def _lex(b: BatchContext, high: bool) -> np.ndarray:
    """Integer key ordering by (overlap asc, exposure asc|desc)."""
    e_max = int(b.exposure.max()) if b.exposure.size else 0
    exp = (e_max - b.exposure) if high else b.exposure
    return b.overlap.astype(np.int64) * (e_max + 1) + exp


def _lists(ctx: SampleContext) -> tuple[list, list, list]:
    return ctx.items.tolist(), ctx.exposure.tolist(), ctx.overlap.tolist()


# ------------------------------------------------------------------------------------------------
# cluster and exposure strategies (method.md 5.1, faults of section 11 fixed)


def _in_cluster_record(ctx: SampleContext, high: bool) -> Selection:
    items, exp, ov = _lists(ctx)
    if not items:
        return Selection((), NO_CANDIDATES)
    order = _order(exp, [o > 0 for o in ov], descending=high)
    if not order:
        return Selection((), NO_IN_CLUSTER)
    return Selection([items[j] for j in order[: ctx.n]])


def _in_cluster_batch(high: bool):
    def run(b: BatchContext) -> BatchSelection:
        pos = _rank_b(-b.exposure if high else b.exposure, b.in_cluster, b.n)
        none = b.lengths == 0
        return BatchSelection(_take(b, pos), {NO_CANDIDATES: none, NO_IN_CLUSTER: ~none & ~b.in_cluster.any(1)})
    return run


def _out_cluster_record(ctx: SampleContext, high: bool) -> Selection:
    items, exp, ov = _lists(ctx)
    if not items:
        return Selection((), NO_CANDIDATES)
    sign = -1 if high else 1
    order = sorted(range(len(items)), key=lambda j: (ov[j], sign * exp[j], j))[: ctx.n]
    return Selection([items[j] for j in order], LEAST_OVERLAP if any(ov[j] > 0 for j in order) else None)


def _out_cluster_batch(high: bool):
    def run(b: BatchContext) -> BatchSelection:
        pos = _rank_b(_lex(b, high), b.valid, b.n)
        fell = ((_take(b, pos, b.overlap) > 0) & (pos >= 0)).any(1)
        return BatchSelection(_take(b, pos), {NO_CANDIDATES: b.lengths == 0, LEAST_OVERLAP: fell})
    return run


def _exposure_record(ctx: SampleContext, high: bool) -> Selection:
    items, exp, _ = _lists(ctx)
    if not items:
        return Selection((), NO_CANDIDATES)
    return Selection([items[j] for j in _order(exp, [True] * len(items), descending=high)[: ctx.n]])


def _exposure_batch(high: bool):
    def run(b: BatchContext) -> BatchSelection:
        pos = _rank_b(-b.exposure if high else b.exposure, b.valid, b.n)
        return BatchSelection(_take(b, pos), {NO_CANDIDATES: b.lengths == 0})
    return run


def clusterin_high(ctx: SampleContext) -> Selection:
    """In-cluster candidate with the highest exposure.

    Rule: among candidates sharing a genre with the interest cluster (overlap > 0), the highest
    exposure count; ties by beam rank. n > 1: the n highest.
    Fallback: none. A record without an in-cluster candidate gets no negative
    (``no_in_cluster_candidate``) and is dropped; the reference wrote ``""``.
    """
    return _in_cluster_record(ctx, high=True)


def clusterin_low(ctx: SampleContext) -> Selection:
    """In-cluster candidate with the lowest exposure.

    Rule: among candidates with overlap > 0, the lowest exposure count; ties by beam rank.
    n > 1: the n lowest.
    Fallback: none. Without an in-cluster candidate the record is dropped
    (``no_in_cluster_candidate``).
    """
    return _in_cluster_record(ctx, high=False)


def clusterout_low(ctx: SampleContext) -> Selection:
    """Out-of-cluster candidate with the lowest exposure.

    Rule: among candidates with overlap 0, the lowest exposure; ties by beam rank.
    Fallback (``least_overlap``): no candidate is out of the cluster, so take the candidates with
    the smallest overlap and, among them, the lowest exposure (as the reference). Formally the
    candidates are ordered by (overlap, exposure, beam rank) and the first n are taken; the
    fallback is counted when a taken one has overlap > 0.
    """
    return _out_cluster_record(ctx, high=False)


def clusterout_high(ctx: SampleContext) -> Selection:
    """Out-of-cluster candidate with the highest exposure.

    Rule: among candidates with overlap 0, the highest exposure; ties by beam rank.
    Fallback (``least_overlap``): no candidate is out of the cluster, so take the candidates with
    the *smallest* overlap and, among them, the highest exposure. Order: (overlap asc, exposure
    desc, beam rank). FIXED: the reference fell back to the *largest* overlap, i.e. to the most
    in-cluster items (method.md 11.10).
    """
    return _out_cluster_record(ctx, high=True)


def low_exposure(ctx: SampleContext) -> Selection:
    """Candidate with the lowest exposure.

    Rule: argmin exposure over all candidates, ties by beam rank; n > 1: the n lowest.
    Fallback: none. A record without candidates is dropped (``no_candidates``); the reference crashed.
    """
    return _exposure_record(ctx, high=False)


def high_exposure(ctx: SampleContext) -> Selection:
    """Candidate with the highest exposure.

    Rule: argmax exposure over all candidates, ties by beam rank; n > 1: the n highest.
    Fallback: none. A record without candidates is dropped (``no_candidates``); the reference crashed.
    """
    return _exposure_record(ctx, high=True)


def balanced_popularity(ctx: SampleContext) -> Selection:
    """One popular and one unpopular candidate, drawn at random (seeded).

    Rule: sort the candidates by exposure descending (stable: ties by beam rank); with m candidates
    and s = m // 2, the high half is the first s, the low half the rest. Draw n without replacement
    from each half with the record's uniforms (u_j for sorted position j; the n smallest u win) and
    output the high picks then the low picks, each in sorted order. FIXED: the reference used
    the unseeded global ``random``.
    Fallback (``single_candidate``): with one candidate the high half is empty; that candidate alone.
    No candidates: dropped (``no_candidates``).
    """
    items, exp, _ = _lists(ctx)
    m = len(items)
    if not m:
        return Selection((), NO_CANDIDATES)
    order = sorted(range(m), key=lambda j: (-exp[j], j))
    s = m // 2
    u = ctx.uniforms(m).tolist()
    high = sorted(sorted(range(s), key=lambda j: (u[j], j))[: ctx.n])
    low = sorted(sorted(range(s, m), key=lambda j: (u[j], j))[: ctx.n])
    return Selection([items[order[j]] for j in high + low], SINGLE_CANDIDATE if m == 1 else None)


def _balanced_batch(b: BatchContext) -> BatchSelection:
    C = b.width
    order = np.argsort(np.where(b.valid, -b.exposure, np.iinfo(np.int64).max), axis=1, kind="stable")
    m = b.lengths
    s = m // 2
    u = b.uniforms(0, C)
    j = np.arange(C)[None, :]

    def pick(mask: np.ndarray) -> np.ndarray:
        sel = np.argsort(np.where(mask, u, np.inf), axis=1, kind="stable")[:, : b.n]
        sel = np.where(np.take_along_axis(mask, sel, 1), sel, C)
        sel.sort(axis=1)
        return sel

    sel = np.concatenate([pick(j < s[:, None]), pick((j >= s[:, None]) & (j < m[:, None]))], 1)
    pos = np.where(sel < C, np.take_along_axis(order, np.minimum(sel, C - 1), 1), -1)
    return BatchSelection(_take(b, pos), {NO_CANDIDATES: m == 0, SINGLE_CANDIDATE: m == 1})


def _composite_record(ctx: SampleContext, first_high: bool) -> Selection:
    items, exp, ov = _lists(ctx)
    if not items:
        return Selection((), NO_CANDIDATES)
    first = _order(exp, [o > 0 for o in ov], descending=first_high)[: ctx.n]
    second = sorted(range(len(items)), key=lambda j: (ov[j], exp[j], j))
    top = second[: ctx.n]
    taken = set(first)
    dups = sum(1 for j in top if j in taken)
    rest = [j for j in second if j not in taken][: ctx.n]
    reasons = []
    if not first:
        reasons.append(NO_IN_CLUSTER)
    if any(ov[j] > 0 for j in rest):
        reasons.append(LEAST_OVERLAP)
    if dups:
        reasons.append(DUPLICATE_REPLACED if len(rest) == len(top) else DUPLICATE_DROPPED)
    return Selection([items[j] for j in first + rest], tuple(reasons), duplicates_avoided=dups)


def _composite_batch(first_high: bool):
    def run(b: BatchContext) -> BatchSelection:
        B, C = b.items.shape
        rows = np.arange(B)[:, None]
        first = _rank_b(-b.exposure if first_high else b.exposure, b.in_cluster, b.n)
        second = _rank_b(_lex(b, False), b.valid, C)
        in_a = np.zeros((B, C + 1), dtype=bool)
        in_a[rows, np.where(first >= 0, first, C)] = True
        in_a = in_a[:, :C]
        top = second[:, : b.n]
        dups = ((top >= 0) & in_a[rows, np.maximum(top, 0)]).sum(1)
        cand = (second >= 0) & ~in_a[rows, np.maximum(second, 0)]
        idx = np.argsort(~cand, axis=1, kind="stable")[:, : b.n]
        ok = np.take_along_axis(cand, idx, 1)
        rest = np.where(ok, np.take_along_axis(second, idx, 1), -1)
        n_top, n_rest = (top >= 0).sum(1), ok.sum(1)
        none = b.lengths == 0
        reasons = {NO_CANDIDATES: none, NO_IN_CLUSTER: ~none & (first < 0).all(1),
                   LEAST_OVERLAP: ((_take(b, rest, b.overlap) > 0) & (rest >= 0)).any(1),
                   DUPLICATE_REPLACED: (dups > 0) & (n_rest == n_top),
                   DUPLICATE_DROPPED: (dups > 0) & (n_rest < n_top)}
        return BatchSelection(np.concatenate([_take(b, first), _take(b, rest)], 1), reasons, dups)
    return run


def clusterin_high_clusterout_low(ctx: SampleContext) -> Selection:
    """Two negatives: ``clusterin_high`` then ``clusterout_low`` (a list, for S-DPO).

    Rule: the first pick as ``clusterin_high`` (omitted when there is no in-cluster candidate,
    reason ``no_in_cluster_candidate``), then ``clusterout_low`` in its (overlap, exposure, beam
    rank) order, including its ``least_overlap`` fallback.
    Duplicates: FIXED. When the second pick equals the first, the next distinct candidate in
    ``clusterout_low`` order replaces it (``duplicate_replaced``; ``duplicate_dropped`` when no
    other candidate exists). The reference emitted identical pairs (7/1024).
    """
    return _composite_record(ctx, first_high=True)


def clusterin_low_clusterout_low(ctx: SampleContext) -> Selection:
    """Two negatives: ``clusterin_low`` then ``clusterout_low`` (a list, for S-DPO).

    Rule: as ``clusterin_high_clusterout_low`` with ``clusterin_low`` as the first pick.
    Duplicates: FIXED. The reference returned the same item twice in 442/1024 records (when every
    candidate is in-cluster both picks are the least exposed one); here the second pick moves to
    the next distinct candidate in ``clusterout_low`` order (``duplicate_replaced``), or is
    dropped when there is none (``duplicate_dropped``).
    """
    return _composite_record(ctx, first_high=False)


# ------------------------------------------------------------------------------------------------
# baselines


def selfplay(ctx: SampleContext) -> Selection:
    """SPRec self-play: the model's own top prediction.

    Rule: the first candidate in beam order (the target and history items were removed, so this is
    the model's best wrong catalog item); n > 1: the first n.
    Fallback: none. No candidates: dropped (``no_candidates``).
    """
    items = ctx.items.tolist()
    if not items:
        return Selection((), NO_CANDIDATES)
    return Selection(items[: ctx.n])


def top_n(ctx: SampleContext) -> Selection:
    """The top n candidates in beam order (multi-negative S-DPO data; n defaults to 5).

    Rule: the first n candidates (fewer when fewer exist; never padded).
    Fallback: none. No candidates: dropped (``no_candidates``).
    """
    return selfplay(ctx)


def _head_batch(b: BatchContext) -> BatchSelection:
    return BatchSelection(b.items[:, : b.n], {NO_CANDIDATES: b.lengths == 0})


def _random_draws(n: int) -> int:
    return 2 * n + 8


def random(ctx: SampleContext) -> Selection:
    """n random catalog items, never the target or a history item, without repetition (seeded).

    Rule: draw item = floor(u_j * n_items) for the record's uniforms u_0, u_1, ... (2n + 8 of
    them), skipping the target, history items and items already drawn, until n are accepted; if
    the draws run out, the rest is drawn exactly from the remaining allowed items (sorted ids,
    index floor(u * size) with further uniforms). Candidates are not used. FIXED: the reference
    (RN) was unseeded and could return the target (2/1024).
    Fallback (``catalog_exhausted``): fewer than n allowed items exist; all of them are returned.
    """
    n, N = ctx.n, ctx.n_items
    excluded = set(ctx.history.tolist())
    if ctx.target >= 0:
        excluded.add(ctx.target)
    M = _random_draws(n)
    out: list[int] = []
    seen: set[int] = set()
    for x in np.minimum((ctx.uniforms(M) * N).astype(np.int64), N - 1).tolist():
        if x in excluded or x in seen:
            continue
        seen.add(x)
        out.append(x)
        if len(out) == n:
            return Selection(out)
    allowed = np.setdiff1d(np.arange(N), np.fromiter(excluded | seen, dtype=np.int64)).tolist()
    t = 0
    while len(out) < n and allowed:
        u = float(ctx.uniforms(1, start=M + t)[0])
        t += 1
        out.append(allowed.pop(min(int(u * len(allowed)), len(allowed) - 1)))
    return Selection(out, CATALOG_EXHAUSTED if len(out) < n else None)


def _random_batch(b: BatchContext) -> BatchSelection:
    n, N = b.n, b.state.n_items
    M = _random_draws(n)
    draws = np.minimum((b.uniforms(0, M) * N).astype(np.int64), N - 1)
    excl = (draws == b.target[:, None]) | (draws[:, :, None] == b.history[:, None, :]).any(-1)
    dup = np.zeros_like(excl)
    for j in range(1, M):
        dup[:, j] = (draws[:, :j] == draws[:, j : j + 1]).any(1)
    acc = ~excl & ~dup
    take = acc & (np.cumsum(acc, 1) <= n)
    idx = np.argsort(~take, axis=1, kind="stable")[:, :n]
    picks = np.where(np.take_along_axis(take, idx, 1), np.take_along_axis(draws, idx, 1), -1)
    return BatchSelection(picks, {}, delegate=take.sum(1) < n)


# ------------------------------------------------------------------------------------------------
# LightGCN distances (method.md 5.2; propagated embeddings by default, fault 11.9)

_LGCN_DOC = """{title}

Rule: L2 distance in LightGCN item space between each candidate and {anchor_text}; the
{extreme} candidate{subset_text}, ties by beam rank; n > 1: the n {extreme}.
Candidates without an embedding (items the LightGCN never saw in training) are never chosen.
Fallbacks: {subset_fallback}{anchor_fallback}; no embedded candidate: dropped
(``no_embedded_candidate``); neither anchor exists: dropped (``no_anchor``); no candidates: dropped
(``no_candidates``). FIXED: the reference crashed when the target had no embedding and used the
layer-0 embeddings (``embedding_kind="layer0"`` reproduces that).
"""


def _lgcn_record(ctx: SampleContext, anchor: str, farthest: bool, subset: str | None) -> Selection:
    items = ctx.items.tolist()
    if not items:
        return Selection((), NO_CANDIDATES)
    reasons: list[str] = []
    use = anchor
    if anchor == "chosen" and not ctx.chosen_ok:
        if not ctx.past_ok:
            return Selection((), NO_ANCHOR)
        use = "past"
        reasons.append(TARGET_UNSEEN)
    elif anchor == "past" and not ctx.past_ok:
        if not ctx.chosen_ok:
            return Selection((), NO_ANCHOR)
        use = "chosen"
        reasons.append(HISTORY_UNSEEN)
    dist = (ctx.dist_past if use == "past" else ctx.dist_chosen).tolist()
    emb = ctx.embedded.tolist()
    if not any(emb):
        return Selection((), tuple(reasons) + (NO_EMBEDDED,))
    mask = emb
    if subset:
        inc = ctx.in_cluster.tolist()
        sub = [e and (c if subset == "in" else not c) for e, c in zip(emb, inc)]
        if any(sub):
            mask = sub
        else:
            reasons.append(SUBSET_EMPTY)
    order = _order(dist, mask, descending=farthest)[: ctx.n]
    return Selection([items[j] for j in order], tuple(reasons))


def _lgcn_batch(anchor: str, farthest: bool, subset: str | None):
    def run(b: BatchContext) -> BatchSelection:
        none = b.lengths == 0
        po, co = b.past_ok, b.chosen_ok
        primary, alt_ok = (co, po) if anchor == "chosen" else (po, co)
        no_anchor = ~none & ~primary & ~alt_ok
        alt = ~none & ~primary & alt_ok
        other = "past" if anchor == "chosen" else "chosen"
        dist = b.dist_chosen if anchor == "chosen" else b.dist_past
        if alt.any():  # the other anchor only when some record needs it
            dist = np.where(alt[:, None], b.dist_past if other == "past" else b.dist_chosen, dist)
        emb = b.embedded
        no_emb = ~none & ~no_anchor & ~emb.any(1)
        reasons = {NO_CANDIDATES: none, NO_ANCHOR: no_anchor,
                   (TARGET_UNSEEN if anchor == "chosen" else HISTORY_UNSEEN): alt, NO_EMBEDDED: no_emb}
        mask = emb
        if subset:
            sub = emb & (b.in_cluster if subset == "in" else ~b.in_cluster)
            has = sub.any(1)
            mask = np.where(has[:, None], sub, emb)
            reasons[SUBSET_EMPTY] = ~none & ~no_anchor & ~no_emb & ~has
        mask = mask & ~no_anchor[:, None]
        pos = _rank_b(-dist if farthest else dist, mask, b.n)
        return BatchSelection(_take(b, pos), reasons)
    return run


def _make_lgcn(name: str, anchor: str, farthest: bool, subset: str | None):
    def fn(ctx: SampleContext) -> Selection:
        return _lgcn_record(ctx, anchor, farthest, subset)

    anchor_text = ("the target's embedding (``chosen``)" if anchor == "chosen" else
                   "the mean embedding of the embedded history items (``past``)")
    extreme = "farthest" if farthest else "nearest"
    subset_text = {None: "", "in": " among in-cluster candidates",
                   "out": " among out-of-cluster candidates"}[subset]
    subset_fb = (f"no {subset}-cluster embedded candidate: all embedded candidates (``subset_empty_used_all``, "
                 "as the reference); " if subset else "")
    anchor_fb = ("target without an embedding: the history centroid (``target_unseen_used_history``)"
                 if anchor == "chosen" else
                 "no history item with an embedding: the target (``history_unseen_used_target``)")
    title = (f"LightGCN: the candidate {extreme} {'to' if extreme == 'nearest' else 'from'} the "
             f"{'target' if anchor == 'chosen' else 'history centroid'}"
             f"{ {'out': ' among out-of-cluster candidates', 'in': ' among in-cluster candidates'}.get(subset, '')}.")
    fn.__doc__ = _LGCN_DOC.format(title=title,
                                  anchor_text=anchor_text, extreme=extreme, subset_text=subset_text,
                                  subset_fallback=subset_fb, anchor_fallback=anchor_fb)
    fn.__name__ = fn.__qualname__ = name
    return fn


CLUSTER_EXPOSURE_STRATEGIES = ["clusterin_high", "clusterin_low", "clusterout_low", "clusterout_high",
                               "low_exposure", "high_exposure", "balanced_popularity",
                               "clusterin_high_clusterout_low", "clusterin_low_clusterout_low"]
_BUILTINS = [
    (clusterin_high, _in_cluster_batch(True), {}),
    (clusterin_low, _in_cluster_batch(False), {}),
    (clusterout_low, _out_cluster_batch(False), {}),
    (clusterout_high, _out_cluster_batch(True), {}),
    (low_exposure, _exposure_batch(False), {}),
    (high_exposure, _exposure_batch(True), {}),
    (balanced_popularity, _balanced_batch, {"picks": 2}),
    (clusterin_high_clusterout_low, _composite_batch(True), {"picks": 2}),
    (clusterin_low_clusterout_low, _composite_batch(False), {"picks": 2}),
    (selfplay, _head_batch, {}),
    (top_n, _head_batch, {"default_n": 5}),
    (random, _random_batch, {"uses_candidates": False}),
]
for _fn, _batch, _kw in _BUILTINS:
    register_strategy(_fn.__name__, _fn, batch=_batch, _builtin=True, **_kw)

LIGHTGCN_STRATEGIES: list[str] = []
for _subset in (None, "in", "out"):
    for _anchor in ("past", "chosen"):
        for _far in (False, True):
            _name = f"{_subset + '_' if _subset else ''}{_anchor}_{'farthest' if _far else 'nearest'}"
            _fn = _make_lgcn(_name, _anchor, _far, _subset)
            globals()[_name] = _fn
            register_strategy(_name, _fn, batch=_lgcn_batch(_anchor, _far, _subset), needs_embeddings=True,
                              _builtin=True)
            LIGHTGCN_STRATEGIES.append(_name)
