"""The dependency-free prompt embedder: TF-IDF over hashed word and character n-grams (numpy only).

Definition (what :class:`HashedTfidf` computes; ``tests/test_align_prompts.py`` re-implements it
in plain Python, float64):

* analysed text ``a(t)``: Unicode NFKC, case-folded, whitespace runs -> one space, stripped;
* two token sequences of ``a(t)``: its characters (code points) and its words (``\\w+`` runs, each
  as the CRC-32 of its UTF-8 bytes);
* an n-gram ``s[i:i+n]`` of a sequence hashes to feature
  ``mix64(h_n) mod dim`` with ``h_0 = n``, ``h_{k+1} = (h_k * P + s[i+k]) mod 2^64``, ``P`` the
  64-bit FNV prime and ``mix64`` the splitmix64 finaliser; words use lengths ``word_ngrams``,
  characters ``char_ngrams`` (character n-grams run across word boundaries, spaces included);
* per block (words, characters) and text: ``tf(f)`` = the number of the text's n-grams hashing
  to ``f``; weight ``(1 + ln tf(f)) * idf(f)`` (``tf(f) * idf(f)`` without ``sublinear_tf``) with
  ``idf(f) = ln((1 + N) / (1 + df(f))) + 1`` over the ``N`` texts passed to :meth:`HashedTfidf.fit`
  (``df(f)``: how many of them have ``tf(f) > 0``), scikit-learn's smoothed idf;
* each block is L2-normalised, the two are concatenated and the result L2-normalised again, so
  the cosine of two texts is the mean of their word cosine and their character cosine (a text
  with no words, or empty, has a zero block; an all-zero vector has cosine 0 with everything).

Hash collisions merge features (``dim`` = 2048 per block by default): they raise cosines a
little; a larger ``dim`` lowers that at ``8 * dim`` bytes per embedded prompt.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np

FNV_PRIME = 0x100000001B3
_WORD = re.compile(r"\w+")


def analyzed(text: str) -> str:
    """``a(t)``: NFKC, case-folded, whitespace collapsed and stripped.

    >>> analyzed("  Find\\tTHE  ﬁrst x.\\n")
    'find the first x.'
    """
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def char_codes(text: str) -> np.ndarray:
    """Code points of ``text`` as ``uint64``."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)


def word_codes(text: str) -> np.ndarray:
    """CRC-32 of each ``\\w+`` word of ``text`` (UTF-8), as ``uint64``."""
    return np.array([zlib.crc32(w.encode("utf-8")) for w in _WORD.findall(text)], np.uint64)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on ``uint64`` values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ngram_features(seqs: Sequence[np.ndarray], ngrams: tuple[int, int], dim: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(row, feature)`` of every n-gram (``ngrams[0] <= n <= ngrams[1]``) of every sequence
    (``row`` = its index in ``seqs``), vectorised over the whole batch."""
    lens = np.array([len(s) for s in seqs], np.int64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if lens.sum() == 0:
        return empty
    flat = np.concatenate([np.asarray(s, np.uint64) for s in seqs])
    row = np.repeat(np.arange(len(seqs)), lens)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    rows, feats = [], []
    for n in range(ngrams[0], ngrams[1] + 1):
        m = len(flat) - n + 1
        if m <= 0:
            break
        h = np.full(m, n, np.uint64)
        for k in range(n):
            h = h * np.uint64(FNV_PRIME) + flat[k:k + m]
        ok = pos[:m] + n <= lens[row[:m]]   # the n-gram ends inside its own sequence
        rows.append(row[:m][ok])
        feats.append((mix64(h[ok]) % np.uint64(dim)).astype(np.int64))
    return (np.concatenate(rows), np.concatenate(feats)) if rows else empty


class HashedTfidf:
    """TF-IDF embedder of the module's definition. :meth:`fit` counts document frequencies,
    :meth:`embed` returns ``[n, 2 * dim]`` float32 unit rows (words block, then characters).

    >>> tf = HashedTfidf(dim=64).fit(["find x if 2x = 4", "find y if 3y = 9", "name a prime"])
    >>> e = tf.embed(["find x if 2x = 4", "Find  X if 2x = 4", "name a prime"])
    >>> round(float(e[0] @ e[1]), 6), bool(e[0] @ e[2] < 0.5)
    (1.0, True)
    """

    def __init__(self, word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] = (3, 5),
                 dim: int = 2048, sublinear_tf: bool = True):
        self.ngrams = (tuple(word_ngrams), tuple(char_ngrams))
        self.dim, self.sublinear_tf = dim, sublinear_tf
        self.df = np.zeros((2, dim), np.int64)
        self.n_docs = 0

    @property
    def width(self) -> int:
        return 2 * self.dim

    def term_counts(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per block (words, characters): ``(row, feature, tf)`` of every non-zero ``tf``."""
        a = [analyzed(t) for t in texts]
        out = []
        for codes, ngrams in zip((word_codes, char_codes), self.ngrams):
            row, feat = ngram_features([codes(t) for t in a], ngrams, self.dim)
            keys, tf = np.unique(row * self.dim + feat, return_counts=True)
            out.append((keys // self.dim, keys % self.dim, tf))
        return out

    def fit(self, texts: Sequence[str], batch_size: int = 1024) -> HashedTfidf:
        """Document frequencies over ``texts`` (replacing earlier ones); returns ``self``."""
        self.df[:] = 0
        self.n_docs = len(texts)
        for start in range(0, len(texts), batch_size):
            for block, (_, feat, _) in enumerate(self.term_counts(texts[start:start + batch_size])):
                self.df[block] += np.bincount(feat, minlength=self.dim)
        return self

    def idf(self) -> np.ndarray:
        """``[2, dim]`` float64 smoothed idf."""
        return np.log((1.0 + self.n_docs) / (1.0 + self.df)) + 1.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), 2 * dim]`` float32 unit rows (zero rows for texts with no n-gram)."""
        if self.n_docs == 0:
            raise ValueError("HashedTfidf.embed before fit: call fit(texts) first")
        idf = self.idf()
        blocks = []
        for block, (row, feat, tf) in enumerate(self.term_counts(texts)):
            w = (1.0 + np.log(tf)) if self.sublinear_tf else tf.astype(np.float64)
            m = np.zeros((len(texts), self.dim))
            m[row, feat] = w * idf[block, feat]
            blocks.append(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-300))
        e = np.concatenate(blocks, axis=1)
        return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)).astype(np.float32)
