"""LightGCN item embeddings for the collaborative-filtering distance strategies (method.md 5.2).

Graph: users are the distinct ``user_id`` of the training split, interactions the distinct
(user, item) pairs over each training sample's history items and target (unknown titles skipped).
The bipartite adjacency is symmetric-normalised, ``D^-1/2 A D^-1/2``, and held as a torch sparse
CSR tensor; propagation is ``n_layers`` sparse matmuls and the final embedding is the mean of
layers 0..L (He et al. 2020). The whole graph is propagated for every mini-batch (the gradient
flows through it), so the default mini-batch is large (16384 positives, lr 3e-2, 30 epochs: about
the quality of 2048 / 1e-2 / 20 epochs at a quarter of the propagations).

Training is BPR with one uniform negative per positive, sampled vectorised and re-drawn where it
hits one of the user's items (``neg_rounds`` rounds), Adam, L2 on the batch's layer-0 rows.
Everything is seeded by ``config.seed`` through a torch generator of its own (the global RNGs are
left alone), and every op is deterministic on CPU (row gathers use ``index_select``, whose
backward is deterministic, not advanced indexing): the same config and thread count give
bit-identical embeddings. Training uses one CPU thread by default (``threads=1``): the graphs this
targets (up to ~100k users) gain little from more, and on a shared machine OpenMP threads
competing with other processes made a 2-thread run 6x slower than 1 thread.

``embeddings("propagated")`` (default) is the LightGCN output; ``embeddings("layer0")`` the ego
embeddings the reference exported (fault 11.9). Items without a training interaction have no
learnt embedding: ``seen`` is False for them, ``item_vectors`` raises a DataError naming them, and
the strategies never pick them (counted as documented there).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..data.schema import Dataset
from ..errors import DataError, RaydpoError
from ..io import atomic_path

EmbeddingKind = Literal["propagated", "layer0"]


@dataclass(frozen=True)
class LightGCNConfig:
    dim: int = 64
    n_layers: int = 3
    epochs: int = 30
    batch_size: int = 16384
    lr: float = 3e-2
    reg: float = 1e-4
    init_std: float = 0.1
    neg_rounds: int = 10
    seed: int = 0
    split: str = "train"
    threads: int | None = 1  # torch CPU threads while training (None: leave torch's setting)

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise RaydpoError(f"lightgcn.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_layers < 0:
            raise RaydpoError(f"lightgcn.n_layers must be >= 0, got {self.n_layers}")


def interactions(dataset: Dataset, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user codes, item ids, user ids)``: distinct (user, item) pairs of ``split``, history + target."""
    frame = dataset.split(split).frame
    if not len(frame):
        raise DataError(f"no {split} samples to train a LightGCN on", field="split")
    users, user_ids = pd_factorize(frame["user_id"].astype(str).to_numpy())
    hist = [np.asarray(h, dtype=np.int64) for h in frame["history_item_ids"]]
    lens = np.array([len(h) for h in hist], dtype=np.int64)
    items = np.concatenate([np.concatenate(hist) if hist else np.empty(0, np.int64),
                            frame["target_item_id"].to_numpy(dtype=np.int64)])
    u = np.concatenate([np.repeat(users, lens), users])
    keep = items >= 0
    u, items = u[keep], items[keep]
    n_items = len(dataset.catalog)
    pair = np.unique(u.astype(np.int64) * n_items + items)
    return pair // n_items, pair % n_items, user_ids


def pd_factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    codes, uniques = pd.factorize(values, sort=False)
    return codes.astype(np.int64), np.asarray(uniques)


@dataclass
class LightGCN:
    """Trained item embeddings (numpy), the training history, and which items were seen."""

    layer0: np.ndarray  # [I, d] float32
    propagated: np.ndarray  # [I, d] float32
    seen: np.ndarray  # [I] bool
    config: LightGCNConfig = field(default_factory=LightGCNConfig)
    losses: list[float] = field(default_factory=list)  # mean BPR loss per epoch
    initial_loss: float | None = None  # BPR loss of the initial embeddings on the first epoch's samples
    n_users: int = 0
    n_interactions: int = 0
    seconds: float = 0.0

    @property
    def n_items(self) -> int:
        return self.layer0.shape[0]

    def embeddings(self, kind: EmbeddingKind = "propagated") -> np.ndarray:
        """``[n_items, dim]``: the propagated LightGCN output (default) or the layer-0 embeddings."""
        if kind == "propagated":
            return self.propagated
        if kind == "layer0":
            return self.layer0
        raise RaydpoError(f"unknown embedding kind {kind!r}; expected propagated or layer0")

    def item_vectors(self, item_ids: Sequence[int], kind: EmbeddingKind = "propagated") -> np.ndarray:
        """Embeddings of ``item_ids``; a DataError names ids outside the catalog or never seen in training."""
        ids = np.asarray(item_ids, dtype=np.int64)
        out_of_range = ids[(ids < 0) | (ids >= self.n_items)]
        if len(out_of_range):
            raise DataError(f"item ids {out_of_range[:5].tolist()} are outside the catalog (0..{self.n_items - 1})",
                            field="item_id")
        unseen = ids[~self.seen[ids]]
        if len(unseen):
            raise DataError(f"the LightGCN never saw items {unseen[:5].tolist()}"
                            f"{' ...' if len(unseen) > 5 else ''} ({len(unseen)} of {len(ids)}) in its "
                            f"{self.config.split} interactions: they have no learnt embedding", field="item_id")
        return self.embeddings(kind)[ids]

    def summary(self) -> dict:
        return {"config": asdict(self.config), "n_users": self.n_users, "n_items": self.n_items,
                "n_interactions": self.n_interactions, "items_seen": int(self.seen.sum()),
                "initial_loss": self.initial_loss, "losses": [round(x, 6) for x in self.losses],
                "seconds": round(self.seconds, 3)}

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        meta = {k: v for k, v in self.summary().items()}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, layer0=self.layer0, propagated=self.propagated, seen=self.seen,
                         meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LightGCN":
        path = Path(path)
        if not path.exists():
            raise DataError("file not found", path=path)
        try:
            z = np.load(path)
            meta = json.loads(bytes(z["meta"]).decode())
            return cls(layer0=z["layer0"], propagated=z["propagated"], seen=z["seen"].astype(bool),
                       config=LightGCNConfig(**meta["config"]), losses=meta["losses"],
                       initial_loss=meta["initial_loss"], n_users=meta["n_users"],
                       n_interactions=meta["n_interactions"], seconds=meta["seconds"])
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"not a LightGCN embedding file: {e}", path=path) from None

    # -- training ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, dataset: Dataset, config: LightGCNConfig | None = None, **overrides) -> "LightGCN":
        cfg = config or LightGCNConfig()
        if overrides:
            cfg = LightGCNConfig(**{**asdict(cfg), **overrides})
        u, i, user_ids = interactions(dataset, cfg.split)
        return cls.fit_interactions(u, i, n_users=len(user_ids), n_items=len(dataset.catalog), config=cfg)

    @classmethod
    def fit_interactions(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                         config: LightGCNConfig | None = None) -> "LightGCN":
        import torch

        cfg = config or LightGCNConfig()
        old_threads = torch.get_num_threads()
        if cfg.threads is not None:
            torch.set_num_threads(max(1, int(cfg.threads)))
        try:
            return cls._fit(users, items, n_users, n_items, cfg)
        finally:
            torch.set_num_threads(old_threads)

    @classmethod
    def _fit(cls, users, items, n_users: int, n_items: int, cfg: LightGCNConfig) -> "LightGCN":
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if len(users) != len(items) or not len(users):
            raise DataError("need one item per user and at least one interaction", field="interactions")
        if items.min() < 0 or items.max() >= n_items or users.min() < 0 or users.max() >= n_users:
            raise DataError("interaction ids out of range", field="interactions")
        pair = np.unique(users * n_items + items)
        users, items = pair // n_items, pair % n_items
        U, I, d = n_users, n_items, cfg.dim
        adj = _normalised_adjacency(users, items, U, I)
        seen = np.bincount(items, minlength=I) > 0

        gen = torch.Generator().manual_seed(cfg.seed)
        ego = torch.nn.Parameter(torch.randn(U + I, d, generator=gen) * cfg.init_std)
        opt = torch.optim.Adam([ego], lr=cfg.lr)
        keys = torch.from_numpy(pair)  # sorted (user * I + item)
        tu, ti = torch.from_numpy(users), torch.from_numpy(items)
        P = len(pair)

        def propagate(e: torch.Tensor) -> torch.Tensor:
            layers = [e]
            for _ in range(cfg.n_layers):
                layers.append(_SymmetricSpMM.apply(adj, layers[-1]))
            return torch.stack(layers).mean(0)

        def negatives(u: torch.Tensor) -> torch.Tensor:
            neg = torch.randint(I, (len(u),), generator=gen)
            for _ in range(cfg.neg_rounds):
                q = u * I + neg
                pos = torch.searchsorted(keys, q).clamp_max(P - 1)
                hit = keys[pos] == q
                if not bool(hit.any()):
                    break
                neg = torch.where(hit, torch.randint(I, (len(u),), generator=gen), neg)
            return neg

        # index_select, not ``x[idx]``: its backward (index_add) is deterministic on CPU with several
        # threads; advanced-indexing backward (index_put accumulate) is not.
        def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return torch.index_select(x, 0, idx)

        def bpr(final: torch.Tensor, u, p, n) -> torch.Tensor:
            ue, pe, ne = rows(final, u), rows(final, U + p), rows(final, U + n)
            return -F.logsigmoid((ue * pe).sum(-1) - (ue * ne).sum(-1)).mean()

        losses: list[float] = []
        initial = None
        for epoch in range(cfg.epochs):
            perm = torch.randperm(P, generator=gen)
            total, count = 0.0, 0
            for lo in range(0, P, cfg.batch_size):
                idx = perm[lo : lo + cfg.batch_size]
                u, p = tu[idx], ti[idx]
                n = negatives(u)
                final = propagate(ego)
                loss = bpr(final, u, p, n)
                if initial is None:
                    initial = float(loss.detach())
                reg = cfg.reg * 0.5 * (rows(ego, u).pow(2).sum() + rows(ego, U + p).pow(2).sum()
                                       + rows(ego, U + n).pow(2).sum()) / len(u)
                opt.zero_grad(set_to_none=True)
                (loss + reg).backward()
                opt.step()
                total += float(loss.detach()) * len(u)
                count += len(u)
            losses.append(total / max(count, 1))
        with torch.no_grad():
            final = propagate(ego)
        layer0 = ego.detach()[U:].numpy().astype(np.float32).copy()
        prop = final[U:].numpy().astype(np.float32).copy()
        return cls(layer0=layer0, propagated=prop, seen=seen, config=cfg, losses=losses, initial_loss=initial,
                   n_users=U, n_interactions=P, seconds=time.perf_counter() - t0)


def _symmetric_spmm():
    import torch

    class SymmetricSpMM(torch.autograd.Function):
        """``A @ x`` for a symmetric sparse ``A``: the backward is ``A @ grad`` (no transpose)."""

        @staticmethod
        def forward(ctx, adj, x):
            ctx.adj = adj
            return torch.sparse.mm(adj, x)

        @staticmethod
        def backward(ctx, grad):
            return None, torch.sparse.mm(ctx.adj, grad)

    return SymmetricSpMM


class _Lazy:
    def __init__(self, factory):
        self.factory, self.obj = factory, None

    def __getattr__(self, name):
        if self.obj is None:
            self.obj = self.factory()
        return getattr(self.obj, name)


_SymmetricSpMM = _Lazy(_symmetric_spmm)


def _normalised_adjacency(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int):
    import torch

    n = n_users + n_items
    rows = np.concatenate([users, n_users + items])
    cols = np.concatenate([n_users + items, users])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    inv = np.zeros(n)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    vals = (inv[rows] * inv[cols]).astype(np.float32)
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=crow[1:])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" / invariant-check notices
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols.astype(np.int64)),
                                       torch.from_numpy(vals), size=(n, n), check_invariants=False)
