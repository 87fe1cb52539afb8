"""A deterministic synthetic book-recommendation dataset: the embedded default of the quickstart
and the scale tests.

The data has structure a recommender can learn, and nothing else:

* **Series.** The catalog is organised in series of 1..``max_series_len`` consecutive items
  ("The Silver Harbor (Harbor Saga, #2)"); every item of a series carries the series' genres.
* **Genre clusters.** Every user has 1..3 favourite genres and mostly reads books of them.
* **Popularity.** Series popularity follows a power law (Zipf exponent
  ``popularity_exponent``); later books of a series are read less than the first.

A user's ``history_len + 1`` items form a Markov chain: with probability ``series_prob`` the next
item is the next book of the last item's series (when there is one and it is not read yet);
otherwise, with probability ``explore_prob``, an item drawn by popularity from the whole
catalog, else an item drawn by popularity among the books of one of the user's favourite
genres. No item repeats within one user's sequence. The last item is the target; each user is
one sample, in exactly one split.

Everything is vectorised over users (numpy); the loops run over history steps and genres, so
1M users take well under a minute. The same :class:`SyntheticConfig` always gives the same
dataset (one ``numpy`` Generator per part, seeded from ``seed``); the catalog depends only on the
catalog fields and ``seed``, not on ``n_users``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..errors import DataError
from ..prompt import DEFAULT_INSTRUCTION
from .schema import Catalog, Dataset, Samples

GENRES = (
    "fantasy",
    "romance",
    "mystery",
    "science fiction",
    "thriller",
    "historical fiction",
    "young adult",
    "horror",
    "literary fiction",
    "biography",
    "children",
    "poetry",
    "comics",
    "paranormal",
    "crime",
    "nonfiction",
)

_ADJECTIVES = (
    "Silver", "Golden", "Crimson", "Hidden", "Silent", "Broken", "Burning", "Frozen", "Last", "Lost",
    "Forgotten", "Wild", "Quiet", "Bitter", "Sweet", "Hollow", "Iron", "Midnight", "Scarlet",
    "Emerald", "Shattered", "Wandering", "Sleeping", "Distant", "Fallen", "Rising", "Endless",
    "Painted", "Autumn", "Stolen", "Crooked", "Gentle", "Savage", "Restless", "Pale",
    "Velvet", "Obsidian", "Amber", "Ivory", "Radiant", "Wicked", "Little", "Sunken", "Ancient", "Borrowed",
    "Cursed", "Drowned", "Faithful", "Hungry", "Lonely", "Northern", "Southern", "Twisted", "Untamed",
    "Veiled", "Whispering", "Burnished", "Tangled", "Luminous", "Shadowed",
)
_NOUNS = (
    "Harbor", "Crown", "Garden", "River", "Throne", "Lantern", "Mirror", "Forest", "Tower", "Storm",
    "Orchard", "Kingdom", "Letter", "Promise", "Bridge", "Island", "Compass", "Feather", "Key", "Shadow",
    "Flame", "Tide", "Dawn", "Dusk", "Wolf", "Raven", "Rose", "Thorn", "Blade", "Heart", "Star", "Moon",
    "Sea", "Mountain", "Valley", "Library", "Cottage", "Manor", "Lighthouse", "Station", "Market",
    "Carnival", "Circus", "Song", "Secret", "Witness", "Heir", "Daughter", "Queen", "King", "Thief",
    "Hunter", "Keeper", "Watcher", "Stranger", "Widow", "Captain", "Alchemist", "Gardener", "Cartographer",
    "Clockmaker", "Oracle", "Dragon", "Phoenix", "Serpent", "Fox", "Sparrow", "Owl", "Stag", "Ember",
    "Ash", "Frost", "Salt", "Stone", "Glass", "Silk", "Ink", "Bone", "Smoke", "Rain", "Snow", "Wind",
    "Fire", "Winter", "Summer", "Spring", "Night", "Memory", "Dream", "Legacy", "Vow", "Debt", "Curse",
    "Spell", "Map", "Door", "Gate", "Well", "Shore", "Path",
)
_PLACES = (
    "Ashford", "Brightwater", "Calloway", "Dunmore", "Eastwick", "Fairhaven", "Glenmoor", "Hollowell",
    "Ironvale", "Juniper Bay", "Kestrel Point", "Larkspur", "Marlow", "Northmoor", "Oakhurst", "Pembrook",
    "Quillon", "Ravenscar", "Saltmarsh", "Thornbury", "Umberlee", "Valemont", "Westerly", "Yarrow",
    "Zephyr Cove", "Alder Creek", "Blackwood", "Cinderfell", "Driftmoor", "Everhollow", "Foxglove Lane",
    "Greywater", "Highgarden", "Ivywood", "Kingsbridge", "Lindenfield", "Moonfall", "Nettlebrook",
    "Oldcastle", "Pinecrest", "Rosewood", "Silverlake", "Tidewater", "Underhill", "Wyndham", "Amberley",
    "Bramblewick", "Coldharbour", "Duskwood", "Emberwell",
)
_NAMES = (
    "Ada", "Alice", "Amelia", "Anna", "Beatrice", "Clara", "Daisy", "Eleanor", "Eliza", "Emma", "Evelyn",
    "Flora", "Grace", "Hazel", "Iris", "Ivy", "June", "Lena", "Lily", "Lucy", "Mabel", "Margot", "Nora",
    "Olive", "Rose", "Ruby", "Sadie", "Stella", "Violet", "Willa", "Arthur", "Caleb", "Daniel", "Edmund",
    "Elliot", "Felix", "Finn", "Gideon", "Hugo", "Isaac", "Jasper", "Julian", "Leo", "Lucas", "Milo",
    "Nathaniel", "Oliver", "Oscar", "Owen", "Rowan", "Samuel", "Silas", "Theo", "Tobias", "Victor",
    "Walter", "Wesley", "Xavier", "Zachary", "Ezra",
)
_SERIES_KINDS = ("Saga", "Chronicles", "Cycle", "Series", "Sequence", "Trilogy", "Mysteries", "Tales")

MAX_ITEMS = 200_000  # the title space holds ~400k distinct titles; keep a wide margin

_REJECTION_ROUNDS = 4  # cheap resampling rounds before the exact (masked) draw


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of :func:`generate`; every field is checked on construction (``DataError`` names it).

    ``genres_per_user`` is the inclusive range of favourite genres per user; it is capped at the
    number of genres the catalog uses (``n_genres`` unless the catalog has fewer series than that). ``valid_fraction`` and ``test_fraction`` are shares of users (at least
    one user each when the share is positive); the rest are train users.
    """

    n_users: int = 2000
    n_items: int = 500
    n_genres: int = 8
    history_len: int = 10
    genres_per_user: tuple[int, int] = (1, 3)
    popularity_exponent: float = 1.1
    series_prob: float = 0.5
    explore_prob: float = 0.05
    max_series_len: int = 5
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_genres", "history_len", "max_series_len", "seed"):
            v = getattr(self, name)
            if not _is_int(v):
                raise DataError(f"must be an integer, got {v!r}", field=name)
        if self.n_users < 1:
            raise DataError(f"must be >= 1, got {self.n_users}", field="n_users")
        if self.history_len < 1:
            raise DataError(f"must be >= 1, got {self.history_len}", field="history_len")
        if self.n_items < self.history_len + 2:
            raise DataError(
                f"must be >= history_len + 2 = {self.history_len + 2} (a history, its target and one more), "
                f"got {self.n_items}",
                field="n_items",
            )
        if self.n_items > MAX_ITEMS:
            raise DataError(f"must be <= {MAX_ITEMS}, got {self.n_items}", field="n_items")
        if not 1 <= self.n_genres <= len(GENRES):
            raise DataError(f"must be in 1..{len(GENRES)}, got {self.n_genres}", field="n_genres")
        if not 1 <= self.max_series_len <= 50:
            raise DataError(f"must be in 1..50, got {self.max_series_len}", field="max_series_len")
        if self.seed < 0:
            raise DataError(f"must be >= 0, got {self.seed}", field="seed")
        gpu = self.genres_per_user
        if (
            not isinstance(gpu, (tuple, list))
            or len(gpu) != 2
            or not all(_is_int(x) for x in gpu)
            or not 1 <= gpu[0] <= gpu[1]
        ):
            raise DataError(f"must be a pair (lo, hi) with 1 <= lo <= hi, got {gpu!r}", field="genres_per_user")
        if gpu[0] > self.n_genres:
            raise DataError(f"needs at least {gpu[0]} genres but n_genres is {self.n_genres}",
                            field="genres_per_user")
        object.__setattr__(self, "genres_per_user", (int(gpu[0]), int(gpu[1])))
        if not _is_real(self.popularity_exponent) or not 0 <= self.popularity_exponent <= 10:
            raise DataError(f"must be in [0, 10], got {self.popularity_exponent!r}", field="popularity_exponent")
        for name in ("series_prob", "explore_prob"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= 1:
                raise DataError(f"must be a probability in [0, 1], got {v!r}", field=name)
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v < 1:
                raise DataError(f"must be in [0, 1), got {v!r}", field=name)
        if self.valid_fraction + self.test_fraction >= 1:
            raise DataError(
                f"valid_fraction + test_fraction must be < 1 (train needs users), got "
                f"{self.valid_fraction} + {self.test_fraction}",
                field="valid_fraction",
            )
        n_valid, n_test = self.split_sizes()
        if self.n_users - n_valid - n_test < 1:
            raise DataError(
                f"{self.n_users} users leave no train user with valid_fraction={self.valid_fraction} and "
                f"test_fraction={self.test_fraction}",
                field="n_users",
            )

    def split_sizes(self) -> tuple[int, int]:
        """``(n_valid, n_test)`` users; the rest are train users."""
        return _split_count(self.n_users, self.valid_fraction), _split_count(self.n_users, self.test_fraction)

    def to_json(self) -> dict:
        d = asdict(self)
        d["genres_per_user"] = list(self.genres_per_user)
        return d


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _split_count(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, int(round(n * fraction)))


# --------------------------------------------------------------------------------------------
# catalog


@dataclass(frozen=True)
class _World:
    """The catalog plus the arrays the user simulation needs."""

    catalog: Catalog
    popularity: np.ndarray  # [I] float64, sums to 1
    successor: np.ndarray  # [I] int64, next item of the series or -1
    genre_weights: np.ndarray  # [G] float64, how likely a genre is chosen (as main genre / favourite)
    pools: tuple[np.ndarray, ...]  # per genre: item ids carrying it
    pool_cdfs: tuple[np.ndarray, ...]  # per genre: cumulative popularity of the pool, last = 1
    global_cdf: np.ndarray
    n_series: int


def _base_titles(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct stand-alone titles from four patterns, each sampled without replacement."""
    A, N, P, M = len(_ADJECTIVES), len(_NOUNS), len(_PLACES), len(_NAMES)

    def the_adj_noun(i: int) -> str:
        return f"The {_ADJECTIVES[i // N]} {_NOUNS[i % N]}"

    def noun_of_place(i: int) -> str:
        return f"The {_NOUNS[i // P]} of {_PLACES[i % P]}"

    def noun_and_noun(i: int) -> str:
        a, b = divmod(i, N - 1)
        b += b >= a  # two different nouns
        return f"{_NOUNS[a]} and {_NOUNS[b]}"

    def name_and_the(i: int) -> str:
        name, rest = divmod(i, A * N)
        return f"{_NAMES[name]} and the {_ADJECTIVES[rest // N]} {_NOUNS[rest % N]}"

    patterns = [(the_adj_noun, A * N, 0.4), (noun_of_place, N * P, 0.25), (noun_and_noun, N * (N - 1), 0.15),
                (name_and_the, M * A * N, 0.2)]
    caps = np.array([c for _, c, _ in patterns])
    want = rng.multinomial(n, [p for _, _, p in patterns])
    # move what exceeds a pattern's capacity to the next patterns with room (rare: huge catalogs)
    excess = 0
    for j in range(len(patterns)):
        want[j] += excess
        excess = max(0, int(want[j] - caps[j]))
        want[j] -= excess
    j = 0
    while excess:
        room = int(caps[j] - want[j])
        take = min(room, excess)
        want[j] += take
        excess -= take
        j += 1
    out: list[str] = []
    for (fn, cap, _), k in zip(patterns, want):
        out += [fn(int(i)) for i in rng.choice(cap, size=int(k), replace=False)]
    return [out[i] for i in rng.permutation(len(out))]


def _series_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct series names."""
    A, N, P, K = len(_ADJECTIVES), len(_NOUNS), len(_PLACES), len(_SERIES_KINDS)
    # index space: "{Place} {Kind}" | "The {Noun} {Kind}" | "The {Adj} {Noun} {Kind}" | "{Noun} and {Noun} {Kind}"
    sizes = [P * K, N * K, A * N * K, N * (N - 1) * K]
    bounds = np.cumsum([0] + sizes)
    names = []
    for code in rng.choice(int(bounds[-1]), size=n, replace=False):
        code = int(code)
        part = int(np.searchsorted(bounds, code, side="right")) - 1
        i = code - int(bounds[part])
        kind = _SERIES_KINDS[i % K]
        i //= K
        if part == 0:
            names.append(f"{_PLACES[i]} {kind}")
        elif part == 1:
            names.append(f"The {_NOUNS[i]} {kind}")
        elif part == 2:
            names.append(f"The {_ADJECTIVES[i // N]} {_NOUNS[i % N]} {kind}")
        else:
            a, b = divmod(i, N - 1)
            b += b >= a
            names.append(f"{_NOUNS[a]} and {_NOUNS[b]} {kind}")
    return names


def _build_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    n_items, G = cfg.n_items, cfg.n_genres
    # series lengths: a third are stand-alone books, the rest 2..max_series_len uniformly
    if cfg.max_series_len == 1:
        lengths = np.ones(n_items, dtype=np.int64)
    else:
        probs = np.full(cfg.max_series_len, 0.7 / (cfg.max_series_len - 1))
        probs[0] = 0.3
        lengths = rng.choice(np.arange(1, cfg.max_series_len + 1), size=n_items, p=probs)
    ends = np.cumsum(lengths)
    n_series = int(np.searchsorted(ends, n_items)) + 1
    lengths = lengths[:n_series].copy()
    lengths[-1] -= int(ends[n_series - 1] - n_items)
    series_of = np.repeat(np.arange(n_series), lengths)  # [I]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos_in_series = np.arange(n_items) - starts[series_of]

    # genres: mildly skewed genre popularity; every genre is some series' main genre when possible
    genre_weights = 1.0 / np.arange(1, G + 1) ** 0.6
    genre_weights /= genre_weights.sum()
    main = rng.choice(G, size=n_series, p=genre_weights)
    if n_series >= G:
        main[rng.choice(n_series, size=G, replace=False)] = rng.permutation(G)
    n_extra = np.minimum(rng.choice(3, size=n_series, p=[0.4, 0.4, 0.2]), G - 1)
    keys = np.log(genre_weights)[None, :] + rng.gumbel(size=(n_series, G))
    keys[np.arange(n_series), main] = -np.inf
    extra = np.argsort(-keys, axis=1, kind="stable")[:, :2]
    series_genres = [
        (GENRES[main[s]],) + tuple(GENRES[g] for g in extra[s, : n_extra[s]]) for s in range(n_series)
    ]

    # popularity: Zipf over series (random ranks), later books of a series are read less
    series_rank = rng.permutation(n_series) + 1
    series_pop = series_rank.astype(np.float64) ** -cfg.popularity_exponent
    popularity = series_pop[series_of] * 0.75 ** pos_in_series
    popularity /= popularity.sum()

    successor = np.where(pos_in_series < lengths[series_of] - 1, np.arange(n_items) + 1, -1).astype(np.int64)

    base = _base_titles(rng, n_items)
    multi = np.flatnonzero(lengths > 1)
    series_name = dict(zip(multi.tolist(), _series_names(rng, len(multi))))
    titles = []
    for i in range(n_items):
        s = int(series_of[i])
        name = series_name.get(s)
        titles.append(base[i] if name is None else f"{base[i]} ({name}, #{int(pos_in_series[i]) + 1})")
    genres = tuple(series_genres[s] for s in series_of.tolist())
    present = {g for gs in series_genres for g in gs}
    catalog = Catalog(
        titles=tuple(titles),
        genres=genres,
        source_ids=tuple(f"synthetic-item-{i}" for i in range(n_items)),
        fairness_genres=tuple(g for g in GENRES[:G] if g in present),
    )

    gm = np.zeros((n_items, G), dtype=bool)
    gm[np.arange(n_items), main[series_of]] = True
    for j in range(extra.shape[1]):
        has = n_extra[series_of] > j
        gm[np.flatnonzero(has), extra[series_of[has], j]] = True
    pools, cdfs = [], []
    for g in range(G):
        pool = np.flatnonzero(gm[:, g])
        pools.append(pool)
        cdfs.append(_cdf(popularity[pool]) if len(pool) else np.empty(0))
    return _World(catalog=catalog, popularity=popularity, successor=successor, genre_weights=genre_weights,
                  pools=tuple(pools), pool_cdfs=tuple(cdfs), global_cdf=_cdf(popularity), n_series=n_series)


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights)
    return c / c[-1]


# --------------------------------------------------------------------------------------------
# users


def _draw(rng: np.random.Generator, pool: np.ndarray, cdf: np.ndarray, n: int) -> np.ndarray:
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return pool[np.minimum(idx, len(pool) - 1)]


def _draw_by_source(
    rng: np.random.Generator, world: _World, source: np.ndarray, all_items: np.ndarray
) -> np.ndarray:
    """One popularity draw per row; ``source`` is a genre index, or -1 for the whole catalog."""
    out = np.empty(len(source), dtype=np.int64)
    for g in range(-1, len(world.pools)):
        rows = np.flatnonzero(source == g)
        if len(rows):
            pool, cdf = (all_items, world.global_cdf) if g < 0 else (world.pools[g], world.pool_cdfs[g])
            out[rows] = _draw(rng, pool, cdf, len(rows))
    return out


def _draw_unused(
    rng: np.random.Generator, world: _World, pool: np.ndarray, used: np.ndarray, chunk_cells: int = 1 << 23
) -> np.ndarray:
    """Exact popularity draw from ``pool`` excluding each row's ``used`` items (Gumbel-max); -1 where
    every pool item is used."""
    out = np.full(len(used), -1, dtype=np.int64)
    logp = np.log(world.popularity[pool])
    step = max(1, chunk_cells // max(1, len(pool) * max(1, used.shape[1])))
    for lo in range(0, len(used), step):
        u = used[lo : lo + step]
        taken = (pool[None, :, None] == u[:, None, :]).any(axis=2)
        keys = np.where(taken, -np.inf, logp[None, :] + rng.gumbel(size=taken.shape))
        best = keys.argmax(axis=1)
        ok = np.isfinite(keys[np.arange(len(u)), best])
        out[lo : lo + step] = np.where(ok, pool[best], -1)
    return out


def _simulate(cfg: SyntheticConfig, world: _World, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """``[n_users, history_len + 1]`` item ids (oldest first, the last column is the target)."""
    U, T, G = cfg.n_users, cfg.history_len + 1, cfg.n_genres
    all_items = np.arange(cfg.n_items, dtype=np.int64)
    # favourite genres come from the genres some item carries (all of them unless the catalog is tiny)
    has_items = np.array([len(p) > 0 for p in world.pools])
    n_present = int(has_items.sum())
    hi = min(cfg.genres_per_user[1], n_present)
    lo = min(cfg.genres_per_user[0], hi)
    k_user = rng.integers(lo, hi + 1, size=U)
    with np.errstate(divide="ignore"):
        log_gw = np.log(np.where(has_items, world.genre_weights, 0.0)).astype(np.float32)
    favourites = np.empty((U, hi), dtype=np.int8)
    for a in range(0, U, 1 << 18):  # chunked Gumbel-top-k: favourite genres without replacement
        b = min(U, a + (1 << 18))
        keys = log_gw[None, :] - np.log(-np.log(rng.random((b - a, G), dtype=np.float32) + np.float32(1e-12)))
        favourites[a:b] = np.argsort(-keys, axis=1, kind="stable")[:, :hi]
    # a user's favourite genres are not equally favourite: weights 1, 1/2, 1/3 ...
    rank_w = 1.0 / np.arange(1, hi + 1)
    cum_by_k = np.zeros((hi + 1, hi))
    for k in range(1, hi + 1):
        cum_by_k[k, :k] = np.cumsum(rank_w[:k]) / rank_w[:k].sum()
        cum_by_k[k, k:] = 1.0
    user_cum = cum_by_k[k_user]  # [U, hi]

    seq = np.empty((U, T), dtype=np.int64)
    rows_all = np.arange(U)
    continued = 0
    for t in range(T):
        cand = np.full(U, -1, dtype=np.int64)
        if t > 0 and cfg.series_prob > 0:
            nxt = world.successor[seq[:, t - 1]]
            cont = (rng.random(U) < cfg.series_prob) & (nxt >= 0)
            cand[cont] = nxt[cont]
        explore = rng.random(U) < cfg.explore_prob
        pick = (rng.random(U)[:, None] >= user_cum).sum(axis=1)
        source = np.where(explore, -1, favourites[rows_all, np.minimum(pick, hi - 1)].astype(np.int64))
        free = np.flatnonzero(cand < 0)
        cand[free] = _draw_by_source(rng, world, source[free], all_items)
        if t == 0:
            seq[:, 0] = cand
            continue
        bad = np.flatnonzero((seq[:, :t] == cand[:, None]).any(axis=1))
        for _ in range(_REJECTION_ROUNDS):
            if not len(bad):
                break
            cand[bad] = _draw_by_source(rng, world, source[bad], all_items)
            bad = bad[(seq[bad, :t] == cand[bad, None]).any(axis=1)]
        if len(bad):  # exact draw without the used items; a genre read out falls back to the catalog
            for g in range(-1, G):
                rows = bad[source[bad] == g]
                if len(rows):
                    pool = all_items if g < 0 else world.pools[g]
                    cand[rows] = _draw_unused(rng, world, pool, seq[rows, :t])
            left = bad[cand[bad] < 0]
            if len(left):
                cand[left] = _draw_unused(rng, world, all_items, seq[left, :t])
        seq[:, t] = cand
        continued += int((world.successor[seq[:, t - 1]] == cand).sum())
    return seq, {"next_in_series_share": continued / (U * (T - 1))}


def _splits(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    n_valid, n_test = cfg.split_sizes()
    codes = np.zeros(cfg.n_users, dtype=np.int8)
    order = rng.permutation(cfg.n_users)
    codes[order[:n_valid]] = 1
    codes[order[n_valid : n_valid + n_test]] = 2
    return codes


def generate(config: SyntheticConfig | None = None) -> Dataset:
    """The synthetic dataset of ``config`` (the defaults: 2000 users, 500 items, 8 genres)."""
    cfg = config if config is not None else SyntheticConfig()
    if not isinstance(cfg, SyntheticConfig):
        raise DataError(f"expected a SyntheticConfig, got {type(cfg).__name__}", field="config")
    catalog_ss, users_ss, split_ss = np.random.SeedSequence([cfg.seed, 0x5EED]).spawn(3)
    world = _build_world(cfg, np.random.default_rng(catalog_ss))
    seq, sim_stats = _simulate(cfg, world, np.random.default_rng(users_ss))
    split_codes = _splits(cfg, np.random.default_rng(split_ss))

    L = cfg.history_len
    titles = np.array(world.catalog.titles, dtype=object)
    hist = np.ascontiguousarray(seq[:, :L])
    target = np.ascontiguousarray(seq[:, L])
    hist_titles = titles[hist]
    user_ids = [f"u{i}" for i in range(cfg.n_users)]
    frame = pd.DataFrame(
        {
            "sample_id": [f"synthetic-{i}" for i in range(cfg.n_users)],
            "user_id": user_ids,
            "split": np.array(["train", "valid", "test"], dtype=object)[split_codes],
            # one numpy row per cell, as Dataset.load gives them back
            "history_item_ids": list(hist),
            "history_titles": list(hist_titles),
            "target_item_id": target,
            "target_title": titles[target],
        }
    )
    n_valid, n_test = cfg.split_sizes()
    report = {
        "generator": "synthetic",
        "users": cfg.n_users,
        "items": cfg.n_items,
        "series": world.n_series,
        "samples": {"train": cfg.n_users - n_valid - n_test, "valid": n_valid, "test": n_test},
        "next_in_series_share": round(float(sim_stats["next_in_series_share"]), 6),
    }
    return Dataset(
        catalog=world.catalog,
        samples=Samples(frame),
        name="synthetic",
        instruction=DEFAULT_INSTRUCTION,
        meta={"source": {"format": "synthetic", "config": cfg.to_json()}},
        report=report,
    )


__all__ = ["GENRES", "MAX_ITEMS", "SyntheticConfig", "generate"]
