"""A token trie of catalog titles, compiled to tensors for batched constrained decoding.

Each path is the full response of one item, tokenised exactly as every stage tokenises it
(``raydpo.prompt.encode_response``): the opening quote, the title, the closing quote and the
real EOS token. Because the quotes are part of the path, a BPE merge at the quote boundary
can never produce a non-title, and no "free tokens" hack is needed: every path through the
trie decodes to a quoted catalog title.

Compiled form (CSR over nodes, edges sorted by (node, token)):
    node_ptr   [n_nodes + 1]  edges of node n are node_ptr[n] : node_ptr[n+1]
    edge_tok   [n_edges]      token of each edge
    edge_child [n_edges]      child node of each edge
    edge_key   [n_edges]      node * key_base + token (sorted), for vectorised transitions
    n_under    [n_nodes]      number of items whose path passes through the node
    leaf_item  [n_nodes]      item id whose path ends at the node (after EOS), else -1
A node state of -1 means "off the trie" (only reachable by an unconstrained caller).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import DataError, RaydpoError
from ..prompt import encode_response, encode_user_text

log = logging.getLogger(__name__)
ROOT = 0
OFF = -1


@dataclass
class TitleTrie:
    node_ptr: torch.Tensor
    edge_tok: torch.Tensor
    edge_child: torch.Tensor
    edge_key: torch.Tensor
    n_under: torch.Tensor
    leaf_item: torch.Tensor
    item_paths: list[list[int]]  # node ids on each item's path (excluding the root)
    key_base: int
    eos_token_id: int
    max_depth: int

    @property
    def n_nodes(self) -> int:
        return int(self.node_ptr.shape[0] - 1)

    @property
    def n_items(self) -> int:
        return len(self.item_paths)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], eos_token_id: int) -> "TitleTrie":
        """Build from one token sequence per item (item id = position)."""
        if not sequences:
            raise DataError("cannot build a trie over an empty catalog", field="titles")
        children: list[dict[int, int]] = [{}]
        n_under = [0]
        leaf = [-1]
        paths: list[list[int]] = []
        collisions = 0
        for item, seq in enumerate(sequences):
            node = ROOT
            n_under[ROOT] += 1
            path = []
            for tok in seq:
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                    n_under.append(0)
                    leaf.append(-1)
                node = nxt
                n_under[node] += 1
                path.append(node)
            if leaf[node] >= 0:
                collisions += 1
            else:
                leaf[node] = item
            paths.append(path)
        if collisions:
            log.warning("%d titles tokenise identically to an earlier title; the earlier one is kept", collisions)
        ptr = np.zeros(len(children) + 1, dtype=np.int64)
        toks, kids = [], []
        for n, ch in enumerate(children):
            items = sorted(ch.items())
            toks += [t for t, _ in items]
            kids += [c for _, c in items]
            ptr[n + 1] = ptr[n] + len(items)
        edge_tok = torch.tensor(toks, dtype=torch.long)
        key_base = int(edge_tok.max().item()) + 1 if len(toks) else 1
        edge_node = torch.repeat_interleave(torch.arange(len(children)), torch.from_numpy(np.diff(ptr)))
        return cls(
            node_ptr=torch.from_numpy(ptr),
            edge_tok=edge_tok,
            edge_child=torch.tensor(kids, dtype=torch.long),
            edge_key=edge_node * key_base + edge_tok,
            n_under=torch.tensor(n_under, dtype=torch.long),
            leaf_item=torch.tensor(leaf, dtype=torch.long),
            item_paths=paths,
            key_base=key_base,
            eos_token_id=int(eos_token_id),
            max_depth=max(len(s) for s in sequences),
        )

    @classmethod
    def from_titles(cls, tokenizer, titles: Sequence[str]) -> "TitleTrie":
        """Tokenise each title as a response (quoted, with EOS) and build the trie."""
        if not titles:
            raise DataError("cannot build a trie over an empty catalog", field="titles")
        if tokenizer.eos_token_id is None:
            raise RaydpoError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
        seqs = []
        for i, t in enumerate(titles):
            if not encode_user_text(tokenizer, t):
                raise DataError(f"title {t!r} tokenises to nothing", record=i, field="title")
            seqs.append(encode_response(tokenizer, t))
        return cls.from_sequences(seqs, tokenizer.eos_token_id)

    def to(self, device: torch.device | str) -> "TitleTrie":
        for name in ("node_ptr", "edge_tok", "edge_child", "edge_key", "n_under", "leaf_item"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ---- batched queries ------------------------------------------------------------------------

    def root_states(self, n: int) -> torch.Tensor:
        return torch.full((n,), ROOT, dtype=torch.long, device=self.node_ptr.device)

    def step(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child state after each token (OFF where the token is not an edge)."""
        keys = states.clamp(min=0) * self.key_base + tokens.clamp(min=0, max=self.key_base - 1)
        pos = torch.searchsorted(self.edge_key, keys).clamp(max=max(len(self.edge_key) - 1, 0))
        ok = (states >= 0) & (tokens < self.key_base) & (tokens >= 0) & (self.edge_key[pos] == keys)
        return torch.where(ok, self.edge_child[pos], torch.full_like(states, OFF))

    def walk(self, token_rows: Iterable[Sequence[int]]) -> list[int]:
        """The item id each token sequence spells (stopping at EOS), or -1."""
        out = []
        for row in token_rows:
            node = ROOT
            for t in row:
                node = int(self.step(torch.tensor([node]), torch.tensor([int(t)]))[0])
                if node < 0 or int(t) == self.eos_token_id:
                    break
            out.append(int(self.leaf_item[node]) if node >= 0 else -1)
        return out

    def exclusion_index(self, excluded: Sequence[Iterable[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row counts of excluded items under each node, as sorted keys (row*n_nodes+node) and counts."""
        counts: dict[int, int] = {}
        n = self.n_nodes
        for r, items in enumerate(excluded):
            for item in set(int(i) for i in items):
                if 0 <= item < self.n_items:
                    for node in self.item_paths[item]:
                        k = r * n + node
                        counts[k] = counts.get(k, 0) + 1
        keys = torch.tensor(sorted(counts), dtype=torch.long, device=self.node_ptr.device)
        vals = torch.tensor([counts[int(k)] for k in keys], dtype=torch.long, device=self.node_ptr.device)
        return keys, vals

    def allowed_edges(
        self,
        states: torch.Tensor,
        vocab_size: int,
        rows: torch.Tensor | None = None,
        exclusions: tuple[torch.Tensor, torch.Tensor] | None = None,
        done_token_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The allowed (state index, token) pairs, sorted by state index then token.

        ``rows`` maps each state to its exclusion row (the prompt it belongs to). States with no
        allowed continuation (after EOS, or off the trie) may emit only ``done_token_id`` (the
        pad/EOS token), so that samplers never see an all-masked row.
        """
        b = states.shape[0]
        dev = states.device
        s = states.clamp(min=0)
        start = self.node_ptr[s]
        count = torch.where(states >= 0, self.node_ptr[s + 1] - start, torch.zeros_like(start))
        total = int(count.sum())
        beam = torch.repeat_interleave(torch.arange(b, device=dev), count)
        offs = torch.cumsum(count, 0) - count
        edge = start[beam] + torch.arange(total, device=dev) - offs[beam]
        tok, child = self.edge_tok[edge], self.edge_child[edge]
        keep = tok < vocab_size
        if exclusions is not None and len(exclusions[0]) and total:
            ex_keys, ex_vals = exclusions
            r = rows[beam] if rows is not None else beam
            k = r * self.n_nodes + child
            pos = torch.searchsorted(ex_keys, k).clamp(max=len(ex_keys) - 1)
            hit = ex_keys[pos] == k
            excluded = torch.where(hit, ex_vals[pos], torch.zeros_like(k))
            keep &= self.n_under[child] > excluded
        beam, tok = beam[keep], tok[keep]
        if done_token_id is not None:
            alive = torch.zeros(b, dtype=torch.bool, device=dev)
            alive[beam] = True
            dead = (~alive).nonzero().squeeze(1)
            if len(dead):
                beam = torch.cat([beam, dead])
                tok = torch.cat([tok, torch.full_like(dead, done_token_id)])
                order = torch.sort(beam, stable=True).indices
                beam, tok = beam[order], tok[order]
        return beam, tok

    def allowed_mask(
        self,
        states: torch.Tensor,
        vocab_size: int,
        rows: torch.Tensor | None = None,
        exclusions: tuple[torch.Tensor, torch.Tensor] | None = None,
        done_token_id: int | None = None,
    ) -> torch.Tensor:
        """``[B, vocab_size]`` bool: the tokens each state may emit next (see ``allowed_edges``)."""
        mask = torch.zeros((states.shape[0], vocab_size), dtype=torch.bool, device=states.device)
        beam, tok = self.allowed_edges(states, vocab_size, rows, exclusions, done_token_id)
        mask[beam, tok] = True
        return mask
