"""Self-play candidates and predictions from one model, for a batch of samples (no Ray here).

``CandidateGenerator.candidates(frame)`` returns, per sample, the model's candidate items in
beam-score order with their sequence log-probabilities, de-duplicated stably, optionally with
each candidate's log-probability under the reference model (for DPO without a reference pass).

``CandidateGenerator.predictions(frame)`` returns the published predictions format
``{prompt, prediction, ground_truth}``: greedy free generation (the published protocol) or the
top constrained beam.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..data.schema import Catalog
from ..errors import RaydpoError
from ..prompt import encode_prompt, render_prompt
from .decoding import TrieLogitsProcessor, beam_search
from .trie import TitleTrie

Mode = Literal["diverse_beam", "beam", "sample", "greedy"]


@dataclass
class DecodeConfig:
    """How candidates are decoded. Defaults follow the published "Div_10_1.0" setting: diverse
    beam search, 10 return sequences, 20 beams in 10 groups, Hamming penalty 1.0."""

    mode: Mode = "diverse_beam"
    num_return_sequences: int = 10
    num_beams: int | None = None  # default: 2n for diverse_beam, n for beam
    num_beam_groups: int | None = None  # default: n for diverse_beam
    diversity_penalty: float = 1.0
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    constrained: bool = True
    exclude_history: bool = True
    exclude_target: bool = True
    max_new_tokens: int | None = None  # default: the trie depth (constrained) or 50 (free)
    batch_size: int = 16
    seed: int = 0
    reference_logprobs: bool = False
    shared_prefill: bool = True
    shared_attention: bool | None = None  # None: where the model supports it (see shared_attention.py)

    def __post_init__(self) -> None:
        if self.mode not in ("diverse_beam", "beam", "sample", "greedy"):
            raise RaydpoError(f"decode.mode: unknown mode {self.mode!r}; expected diverse_beam, beam, sample or greedy")
        if self.num_return_sequences < 1:
            raise RaydpoError("decode.num_return_sequences must be >= 1")
        if self.mode == "greedy":
            self.num_return_sequences = 1
        n = self.num_return_sequences
        if self.num_beams is None:
            self.num_beams = 2 * n if self.mode == "diverse_beam" else n
        if self.num_beam_groups is None:
            self.num_beam_groups = n if self.mode == "diverse_beam" else 1
        if self.mode in ("beam", "diverse_beam"):
            if self.num_beams % self.num_beam_groups:
                raise RaydpoError(f"decode.num_beams ({self.num_beams}) must be divisible by num_beam_groups "
                                  f"({self.num_beam_groups})")
            if n > self.num_beams:
                raise RaydpoError(f"decode.num_return_sequences ({n}) exceeds num_beams ({self.num_beams})")
        if self.temperature <= 0:
            raise RaydpoError("decode.temperature must be > 0")
        if self.batch_size < 1:
            raise RaydpoError("decode.batch_size must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CandidateGenerator:
    model: object
    tokenizer: object
    catalog: Catalog
    config: DecodeConfig = field(default_factory=DecodeConfig)
    instruction: str | None = None

    def __post_init__(self) -> None:
        from ..models import check_tokenizer

        check_tokenizer(self.tokenizer)
        self.device = next(self.model.parameters()).device
        self.trie = TitleTrie.from_titles(self.tokenizer, self.catalog.titles).to(self.device) \
            if self.config.constrained else None
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.seed)

    # ---- helpers --------------------------------------------------------------------------------

    def prompts(self, frame: pd.DataFrame) -> list[str]:
        return [render_prompt(self.tokenizer, list(h), self.instruction) for h in frame["history_titles"]]

    def _batches(self, frame: pd.DataFrame) -> Iterator[tuple[np.ndarray, list[str], torch.Tensor, torch.Tensor]]:
        """``(row positions, prompts, input ids, attention mask)`` per batch of similar prompt length
        (less padding), left-padded. Every prompt is rendered, tokenised and checked against the
        model's context once, before any decoding."""
        from ..models import check_token_lengths

        prompts = self.prompts(frame)
        tokens = [encode_prompt(self.tokenizer, p) for p in prompts]
        max_new = self.config.max_new_tokens or (self.trie.max_depth if self.trie is not None else 50)
        try:
            check_token_lengths(self.model, [len(x) for x in tokens], max_new)
        except RaydpoError as e:
            m = re.match(r"prompt (\d+) ", str(e))
            if m:
                raise RaydpoError(f"sample {frame['sample_id'].iloc[int(m.group(1))]!r}: {e}") from None
            raise
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        order = np.argsort(np.asarray([len(x) for x in tokens], dtype=np.int64), kind="stable")
        for start in range(0, len(order), self.config.batch_size):
            pos = order[start : start + self.config.batch_size]
            width = max(len(tokens[i]) for i in pos)
            input_ids = torch.full((len(pos), width), pad, dtype=torch.long)
            mask = torch.zeros((len(pos), width), dtype=torch.long)
            for row, i in enumerate(pos):
                input_ids[row, width - len(tokens[i]):] = torch.tensor(tokens[i])
                mask[row, width - len(tokens[i]):] = 1
            yield pos, [prompts[i] for i in pos], input_ids.to(self.device), mask.to(self.device)

    def _exclusions(self, frame: pd.DataFrame) -> list[list[int]] | None:
        c = self.config
        if not (c.exclude_history or c.exclude_target):
            return None
        out = []
        for hist, tgt in zip(frame["history_item_ids"], frame["target_item_id"]):
            ex = [int(h) for h in hist if h >= 0] if c.exclude_history else []
            if c.exclude_target and int(tgt) >= 0:
                ex.append(int(tgt))
            out.append(ex)
        return out

    # ---- candidates -----------------------------------------------------------------------------

    @torch.no_grad()
    def candidates(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per sample: ``sample_id, candidate_item_ids, candidate_titles, candidate_logprobs,
        candidate_scores`` (+ ``candidate_ref_logprobs``), in beam-score order, de-duplicated."""
        if self.trie is None:
            raise RaydpoError("candidates need the trie constraint (decode.constrained: true)")
        c = self.config
        rows = [None] * len(frame)
        for pos, prompts, ids, mask in self._batches(frame):
            part = frame.iloc[pos]
            ex = self._exclusions(part)
            if c.mode in ("beam", "diverse_beam"):
                out = beam_search(self.model, ids, mask, self.trie, c.num_beams, c.num_return_sequences,
                                  num_groups=c.num_beam_groups, diversity_penalty=c.diversity_penalty,
                                  length_penalty=c.length_penalty, max_new_tokens=c.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, exclusions=ex,
                                  shared_prefill=c.shared_prefill, shared_attention=c.shared_attention)
                items, logps, scores = out.items.cpu(), out.logprobs.cpu(), out.scores.cpu()
            else:
                items, logps = self._sample(ids, mask, ex)
                scores = logps
            for j, sid in enumerate(part["sample_id"]):
                seen: set[int] = set()
                ci, cl, cs = [], [], []
                for item, lp, sc in zip(items[j].tolist(), logps[j].tolist(), scores[j].tolist()):
                    if item < 0 or item in seen:
                        continue
                    seen.add(item)
                    ci.append(item)
                    cl.append(lp)
                    cs.append(sc)
                rows[pos[j]] = {"sample_id": sid, "prompt": prompts[j], "candidate_item_ids": ci,
                                "candidate_titles": [self.catalog.titles[i] for i in ci],
                                "candidate_logprobs": cl, "candidate_scores": cs}
        result = pd.DataFrame(rows)
        if c.reference_logprobs:
            result["candidate_ref_logprobs"] = self.reference_logprobs(result)
        return result

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, ex) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        proc = TrieLogitsProcessor(self.trie, ids.shape[0], exclusions=ex, done_token_id=self.tokenizer.pad_token_id)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        n = c.num_return_sequences
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=c.mode == "sample", num_beams=1,
            num_return_sequences=n, temperature=c.temperature if c.mode == "sample" else None,
            top_k=c.top_k if c.mode == "sample" else None, top_p=c.top_p if c.mode == "sample" else None,
            max_new_tokens=c.max_new_tokens or self.trie.max_depth, logits_processor=[proc],
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True)
        gen = out.sequences[:, ids.shape[1]:]
        # summed log-probs of the sampled tokens under the model itself (raw logits), up to EOS
        steps = torch.stack(out.logits, 1).float().log_softmax(-1)
        tok_lp = steps.gather(2, gen[:, : steps.shape[1], None]).squeeze(2)
        eos = self.tokenizer.eos_token_id
        alive = ((gen == eos).long().cumsum(1) - (gen == eos).long()) == 0
        lp = torch.where(alive[:, : tok_lp.shape[1]], tok_lp, torch.zeros_like(tok_lp)).sum(1)
        items = torch.tensor(self.trie.walk(gen.tolist()))
        b = ids.shape[0]
        return items.view(b, n), lp.cpu().view(b, n)

    def reference_logprobs(self, cands: pd.DataFrame) -> list[list[float]]:
        """Each candidate's summed response log-probability under this model (teacher forcing)."""
        from ..models import sequence_logprobs

        prompts, titles, sizes = [], [], []
        for p, ts in zip(cands["prompt"], cands["candidate_titles"]):
            prompts += [p] * len(ts)
            titles += list(ts)
            sizes.append(len(ts))
        if not titles:
            return [[] for _ in sizes]
        lp = sequence_logprobs(self.model, self.tokenizer, prompts, titles,
                               batch_size=self.config.batch_size * 4).tolist()
        out, k = [], 0
        for n in sizes:
            out.append(lp[k : k + n])
            k += n
        return out

    # ---- predictions ----------------------------------------------------------------------------

    @torch.no_grad()
    def predictions(self, frame: pd.DataFrame) -> list[dict]:
        """Published-format rows. Free greedy generation when unconstrained, else the top beam."""
        c = self.config
        out_rows = [None] * len(frame)
        for pos, prompts, ids, mask in self._batches(frame):
            part = frame.iloc[pos]
            if self.trie is None:
                gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                          max_new_tokens=c.max_new_tokens or 50,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id)[:, ids.shape[1]:]
                texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            else:
                ex = self._exclusions(part) if c.exclude_history else None
                if ex is not None and c.exclude_target:
                    raise RaydpoError("predictions must not exclude the target (decode.exclude_target: false)")
                out = beam_search(self.model, ids, mask, self.trie, c.num_beams, 1, num_groups=c.num_beam_groups,
                                  diversity_penalty=c.diversity_penalty, length_penalty=c.length_penalty,
                                  pad_token_id=self.tokenizer.pad_token_id, exclusions=ex,
                                  shared_prefill=c.shared_prefill, shared_attention=c.shared_attention)
                texts = self.tokenizer.batch_decode(out.sequences[:, 0], skip_special_tokens=True)
            for j, (p, text, gt) in enumerate(zip(prompts, texts, part["target_title"])):
                out_rows[pos[j]] = {"prompt": p, "prediction": text.strip(), "ground_truth": gt}
        return out_rows
