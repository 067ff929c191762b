"""Semantic density of vocabulary tokens (docs/SPEC.md §3) and the SRA token weights derived from it.

    p_t = (c_t + α) / (T + α·V)          add-α smoothed unigram probability (V = vocabulary size)
    I_t = −log p_t
    ρ_t = (I_t − I_min) / (I_max − I_min) over the non-special tokens of the vocabulary
    w_j = f + (1 − f) · ρ_j^κ            SRA weight of a prompt token (0 for padding)

Frequent, low-information tokens ("a", "the", ",") get ρ near 0; rare, informative tokens ρ near 1.
Special tokens (pad, BOS, EOS, ...) take a configured density instead (default 0).
If every non-special token has the same count, I_max = I_min and ρ = 1 for all of them (no token
dominates, so none is treated as low-density).

Counts come from a caption corpus run through the model's own tokenizer (:meth:`TokenDensity.fit`)
or from general word frequencies (:meth:`TokenDensity.from_wordfreq`). Only the non-zero counts are
stored (sparse); files are JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Iterable, Mapping

import numpy as np
import torch

__all__ = ["TokenDensity", "tokenizer_vocab_size", "strip_word_piece_markers"]

_FORMAT = "dare_kernels.TokenDensity"
_FORMAT_VERSION = 1

# markers that tokenizers put on word pieces: SentencePiece (▁ = word start), byte-level BPE
# (Ġ = leading space, Ċ = newline), WordPiece (## = continuation), CLIP-style BPE (</w> = word end)
_PREFIX_MARKERS = ("\u2581", "\u0120", "\u010a", "##")
_SUFFIX_MARKERS = ("</w>",)


# ---------------------------------------------------------------------------------------------
# tokenizer access (anything with the Hugging Face tokenizer interface)
# ---------------------------------------------------------------------------------------------

def tokenizer_vocab_size(tokenizer) -> int:
    """Number of token ids a tokenizer can emit: max(len(tokenizer), tokenizer.vocab_size) of those present."""
    sizes = []
    try:
        sizes.append(int(len(tokenizer)))
    except TypeError:
        pass
    vs = getattr(tokenizer, "vocab_size", None)
    if isinstance(vs, (int, np.integer)) and not isinstance(vs, bool):
        sizes.append(int(vs))
    if not sizes and callable(getattr(tokenizer, "get_vocab_size", None)):  # a raw `tokenizers.Tokenizer`
        sizes.append(int(tokenizer.get_vocab_size()))
    if not sizes:
        raise TypeError(
            f"tokenizer must expose its vocabulary size as `vocab_size` or `len(tokenizer)` "
            f"(Hugging Face tokenizer interface), got {type(tokenizer).__name__}"
        )
    size = max(sizes)
    if size <= 0:
        raise ValueError(f"tokenizer reports an empty vocabulary (size {size})")
    return size


def _special_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return sorted({int(i) for i in ids if i is not None})


def _batch_encoder(tokenizer):
    """A function list[str] -> list[list[int]] (no special tokens added) built from `__call__` or `encode`."""
    if callable(tokenizer) and not isinstance(tokenizer, type):
        def encode_call(batch):
            try:
                out = tokenizer(batch, add_special_tokens=False)
            except TypeError:
                out = tokenizer(batch)
            ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
            return [list(x) for x in ids]
        return encode_call
    if hasattr(tokenizer, "encode") and callable(tokenizer.encode):
        def encode_each(batch):
            res = []
            for text in batch:
                try:
                    ids = tokenizer.encode(text, add_special_tokens=False)
                except TypeError:
                    ids = tokenizer.encode(text)
                res.append(list(getattr(ids, "ids", ids)))
            return res
        return encode_each
    raise TypeError(
        f"tokenizer must be callable on a list of strings (returning {{'input_ids': ...}}) or have an "
        f"`encode(text)` method (Hugging Face tokenizer interface), got {type(tokenizer).__name__}"
    )


def strip_word_piece_markers(piece: str) -> str:
    """A vocabulary piece without its word-piece markers: '▁cat' → 'cat', '##ing' → 'ing', 'Ġdog' → 'dog', 'cat</w>' → 'cat'."""
    changed = True
    while changed:
        changed = False
        for m in _PREFIX_MARKERS:
            if piece.startswith(m):
                piece, changed = piece[len(m):], True
        for m in _SUFFIX_MARKERS:
            if piece.endswith(m):
                piece, changed = piece[: -len(m)], True
    return piece.strip()


def _is_punctuation_or_space(text: str) -> bool:
    return all(not ch.isalnum() for ch in text)


# ---------------------------------------------------------------------------------------------
# TokenDensity
# ---------------------------------------------------------------------------------------------

def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class TokenDensity:
    """Semantic density ρ ∈ [0, 1] of every token of a vocabulary (docs/SPEC.md §3).

    Args:
        vocab_size: V, number of token ids (ids are 0 .. V−1).
        ids, counts: the non-zero (pseudo-)counts, sparse: int64 ids and float64 counts of equal length.
        alpha: add-α smoothing, > 0.
        special_ids: ids that take a configured density instead of the fitted one.
        pad_id: the padding id (also treated as special), or None.
        special_density: density of special tokens other than pad: a float in [0, 1], or a mapping
            {id: density} (ids missing from the mapping get 0).
        pad_density: density of the pad token (default 0).
        num_captions: how many captions the counts came from (bookkeeping; summed by :meth:`merge`).
        source: a short description of where the counts came from.

    Build one with :meth:`fit` (caption corpus) or :meth:`from_wordfreq` (general word frequencies).
    """

    def __init__(
        self,
        vocab_size: int,
        ids=None,
        counts=None,
        *,
        alpha: float = 1.0,
        special_ids: Iterable[int] = (),
        pad_id: int | None = None,
        special_density: float | Mapping[int, float] = 0.0,
        pad_density: float = 0.0,
        num_captions: int = 0,
        source: str = "",
    ):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size = int(vocab_size)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha (add-α smoothing) must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

        ids = np.zeros(0, np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        counts = np.zeros(0, np.float64) if counts is None else np.asarray(counts, dtype=np.float64).reshape(-1)
        if ids.shape != counts.shape:
            raise ValueError(f"ids and counts must have the same length, got {ids.size} and {counts.size}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        if counts.size and (not np.all(np.isfinite(counts)) or counts.min() < 0):
            raise ValueError("counts must be finite and non-negative")
        dense = np.bincount(ids, weights=counts, minlength=self.vocab_size) if ids.size else \
            np.zeros(self.vocab_size, np.float64)
        nz = np.flatnonzero(dense)
        self._ids, self._counts = nz.astype(np.int64), dense[nz]

        self.pad_id = None if pad_id is None else int(pad_id)
        specials = {int(i) for i in special_ids}
        if self.pad_id is not None:
            specials.add(self.pad_id)
        bad = [i for i in specials if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special_ids/pad_id must lie in [0, vocab_size={self.vocab_size}), got {sorted(bad)}")
        self.special_ids = sorted(specials)
        if isinstance(special_density, Mapping):
            self.special_density = {int(k): _check_unit_interval(f"special_density[{k}]", v)
                                    for k, v in special_density.items()}
        else:
            self.special_density = _check_unit_interval("special_density", special_density)
        self.pad_density = _check_unit_interval("pad_density", pad_density)
        self.num_captions = int(num_captions)
        self.source = str(source)
        self._rho: torch.Tensor | None = None
        self._rho_by_device: dict = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        captions: Iterable[str],
        tokenizer,
        *,
        alpha: float = 1.0,
        batch_size: int = 1024,
        progress: bool | None = None,
        special_density: float | Mapping[int, float] = 0.0,
        pad_density: float = 0.0,
    ) -> "TokenDensity":
        """Count tokens over a caption corpus with the model's own tokenizer.

        Streams ``captions`` (any iterable of str, e.g. a generator over millions of lines) in
        batches of ``batch_size`` through ``tokenizer`` (Hugging Face interface: ``tokenizer(list)``
        returning ``{"input_ids": ...}``, or ``encode(text)``; ``vocab_size`` or ``len()``;
        ``all_special_ids`` and ``pad_token_id`` when present). No special tokens are added and
        special tokens in the text are not counted. Memory: one float64 count per vocabulary entry
        plus one batch, whatever the corpus size; the result keeps only non-zero counts.
        ``progress``: tqdm bar (None = only on a terminal).

        Raises ValueError for an empty corpus (or one without a single non-special token),
        TypeError for a caption that is not a str or a tokenizer without the needed methods.
        """
        encode = _batch_encoder(tokenizer)
        vocab_size = tokenizer_vocab_size(tokenizer)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(captions, (str, bytes)):
            raise TypeError("captions must be an iterable of str (a corpus), got a single string")
        specials = _special_ids(tokenizer)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        total = len(captions) if hasattr(captions, "__len__") else None

        from tqdm.auto import tqdm

        dense = np.zeros(vocab_size, dtype=np.float64)
        n_captions = 0
        it = iter(captions)
        with tqdm(total=total, disable=(None if progress is None else not progress), unit="caption",
                  desc="TokenDensity.fit", mininterval=1.0) as bar:
            while True:
                batch = list(itertools.islice(it, batch_size))
                if not batch:
                    break
                for c in batch:
                    if not isinstance(c, str):
                        raise TypeError(f"captions must be str, got {type(c).__name__} ({c!r:.60})")
                ids = encode(batch)
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
                if flat.size:
                    if flat.min() < 0 or flat.max() >= vocab_size:
                        raise ValueError(
                            f"tokenizer produced ids outside [0, vocab_size={vocab_size}): "
                            f"range [{flat.min()}, {flat.max()}]")
                    dense += np.bincount(flat, minlength=vocab_size)
                n_captions += len(batch)
                bar.update(len(batch))
        if n_captions == 0:
            raise ValueError("captions is empty: TokenDensity.fit needs at least one caption")
        if specials:
            dense[specials] = 0.0
        if not dense.any():
            raise ValueError(f"the {n_captions} caption(s) contain no non-special tokens: nothing to count")
        nz = np.flatnonzero(dense)
        return cls(vocab_size, nz, dense[nz], alpha=alpha, special_ids=specials, pad_id=pad_id,
                   special_density=special_density, pad_density=pad_density, num_captions=n_captions,
                   source=f"corpus ({n_captions} captions, {type(tokenizer).__name__})")

    @classmethod
    def from_wordfreq(
        cls,
        tokenizer,
        lang: str = "en",
        *,
        wordlist: str = "best",
        total: float = 1e9,
        alpha: float = 1.0,
        special_density: float | Mapping[int, float] = 0.0,
        pad_density: float = 0.0,
    ) -> "TokenDensity":
        """A prior from general word frequencies (the ``wordfreq`` package) for users without a corpus.

        Every vocabulary piece is read with ``convert_ids_to_tokens`` (else ``decode([id])``), its
        word-piece markers are stripped (SentencePiece '▁', byte-level BPE 'Ġ'/'Ċ', WordPiece '##',
        '</w>'), and the rest is looked up with ``wordfreq.word_frequency(piece, lang, wordlist)``;
        the pseudo-count is ``frequency · total``. How pieces are handled:

        - a known word (or a piece that is itself a frequent word or fragment, like 's' or 'ing'):
          its frequency;
        - punctuation / whitespace only (',', '.', a bare '▁'): the frequency of the language's most
          frequent word, i.e. treated as a function token with density ≈ 0;
        - unknown pieces (frequency 0: rare fragments, foreign scripts, byte tokens): count 0, i.e.
          only the α smoothing: density 1, the most informative class, so they are never suppressed
          and keep full SRA weight (we do not suppress what we cannot judge);
        - special tokens: ``special_density`` / ``pad_density`` as in :meth:`fit`.
        """
        try:
            import wordfreq
        except ImportError as exc:  # pragma: no cover - wordfreq is an optional dependency
            raise ImportError("TokenDensity.from_wordfreq needs the `wordfreq` package "
                              "(pip install 'dare_kernels[density]' or pip install wordfreq)") from exc
        vocab_size = tokenizer_vocab_size(tokenizer)
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"lang must be a language code such as 'en', got {lang!r}")
        if not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
            raise ValueError(f"total must be a finite number > 0, got {total!r}")
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        elif hasattr(tokenizer, "decode"):
            pieces = [tokenizer.decode([i]) for i in range(vocab_size)]
        else:
            raise TypeError(
                f"tokenizer must have `convert_ids_to_tokens` or `decode` (Hugging Face tokenizer interface), "
                f"got {type(tokenizer).__name__}")
        top = wordfreq.top_n_list(lang, 1, wordlist=wordlist)
        if not top:
            raise ValueError(f"wordfreq has no word list for lang={lang!r}")
        top_freq = wordfreq.word_frequency(top[0], lang, wordlist=wordlist)
        specials = set(_special_ids(tokenizer))
        counts = np.zeros(vocab_size, dtype=np.float64)
        cache: dict[str, float] = {}
        for i, piece in enumerate(pieces):
            if i in specials or piece is None:
                continue
            word = strip_word_piece_markers(str(piece)).lower()
            if word not in cache:
                cache[word] = top_freq if _is_punctuation_or_space(word) else \
                    wordfreq.word_frequency(word, lang, wordlist=wordlist)
            counts[i] = cache[word] * total
        nz = np.flatnonzero(counts)
        return cls(vocab_size, nz, counts[nz], alpha=alpha, special_ids=specials,
                   pad_id=getattr(tokenizer, "pad_token_id", None), special_density=special_density,
                   pad_density=pad_density, source=f"wordfreq:{lang}:{wordlist}")

    # -- the table ---------------------------------------------------------------------------

    @property
    def counts(self) -> dict[int, float]:
        """The non-zero (pseudo-)counts as {token id: count}."""
        return {int(i): float(c) for i, c in zip(self._ids, self._counts)}

    def probabilities(self) -> torch.Tensor:
        """Smoothed unigram probabilities p_t over the non-special vocabulary, float64 [V] (0 at special ids)."""
        dense = np.zeros(self.vocab_size, dtype=np.float64)
        dense[self._ids] = self._counts
        special = np.zeros(self.vocab_size, dtype=bool)
        special[self.special_ids] = True
        n_regular = int((~special).sum())
        dense[special] = 0.0
        p = (dense + self.alpha) / (dense.sum() + self.alpha * n_regular)
        p[special] = 0.0
        return torch.from_numpy(p)

    def table(self) -> torch.Tensor:
        """ρ for every token id, float32 [V] (special tokens take their configured density)."""
        if self._rho is None:
            p = self.probabilities().numpy()
            special = np.zeros(self.vocab_size, dtype=bool)
            special[self.special_ids] = True
            rho = np.ones(self.vocab_size, dtype=np.float64)
            if (~special).any():
                info = -np.log(p[~special])
                lo, hi = info.min(), info.max()
                rho[~special] = (info - lo) / (hi - lo) if hi > lo else 1.0
            for i in self.special_ids:
                if isinstance(self.special_density, dict):
                    rho[i] = self.special_density.get(i, 0.0)
                else:
                    rho[i] = self.special_density
            if self.pad_id is not None:
                rho[self.pad_id] = self.pad_density
            self._rho = torch.from_numpy(np.clip(rho, 0.0, 1.0).astype(np.float32))
            self._rho_by_device = {}
        return self._rho

    def _table_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        t = self._rho_by_device.get(key)
        if t is None:
            t = self.table().to(device)
            self._rho_by_device[key] = t
        return t

    def _check_ids(self, token_ids, name="token_ids") -> torch.Tensor:
        if not isinstance(token_ids, torch.Tensor):
            try:
                token_ids = torch.as_tensor(token_ids)
            except Exception as exc:
                raise TypeError(f"{name} must be an integer tensor (or nested lists of ints), got {type(token_ids).__name__}") from exc
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {token_ids.dtype}")
        if token_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{name} must lie in [0, vocab_size={self.vocab_size}), got range [{lo}, {hi}]")
        return token_ids

    def density(self, token_ids) -> torch.Tensor:
        """ρ of each token id: float32 tensor of the shape of ``token_ids`` (integer tensor, any shape), on its device."""
        token_ids = self._check_ids(token_ids)
        return self._table_on(token_ids.device)[token_ids.long()]

    def weights(
        self,
        token_ids,
        floor: float = 0.1,
        kappa: float = 1.0,
        pad_id: int | None = -1,
        *,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SRA token weights w_j = f + (1 − f) · ρ_j^κ, float32 [B, M], 0 for padding (SPEC §3).

        Args:
            token_ids: integer [B, M] (or [M]) prompt token ids.
            floor: f ∈ (0, 1]; the weight of a density-0 token. kappa: κ > 0, sharpens (κ > 1) or flattens.
            pad_id: positions holding this id get weight 0. Default (-1): the pad id given at fit
                time; None: no id is padding.
            key_padding_mask: optional bool [B, M], True = real token; False positions get weight 0
                (use it when the pad id doubles as a real token, e.g. EOS).
        """
        token_ids = self._check_ids(token_ids)
        if token_ids.dim() not in (1, 2):
            raise ValueError(f"token_ids must be [B, M] or [M], got shape {tuple(token_ids.shape)}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0.0 < floor <= 1.0):
            raise ValueError(f"floor must be a float in (0, 1], got {floor!r}")
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a finite float > 0, got {kappa!r}")
        rho = self.density(token_ids)
        w = floor + (1.0 - floor) * rho.pow(kappa)
        if pad_id == -1:
            pad_id = self.pad_id
        if pad_id is not None:
            w = w.masked_fill(token_ids == int(pad_id), 0.0)
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = real token)")
            if key_padding_mask.shape != token_ids.shape:
                raise ValueError(f"key_padding_mask must have the shape of token_ids {tuple(token_ids.shape)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            w = w.masked_fill(~key_padding_mask.to(w.device), 0.0)
        return w.to(torch.float32)

    # -- combination and files ----------------------------------------------------------------

    def merge(self, other: "TokenDensity") -> "TokenDensity":
        """A new TokenDensity with the summed counts of two fits over the same vocabulary (α, specials from ``self``)."""
        if not isinstance(other, TokenDensity):
            raise TypeError(f"can only merge with a TokenDensity, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge fits over different vocabularies: vocab_size {self.vocab_size} vs {other.vocab_size}")
        if other.special_ids != self.special_ids or other.pad_id != self.pad_id:
            raise ValueError("cannot merge fits with different special tokens / pad id (different tokenizers?)")
        return TokenDensity(
            self.vocab_size, np.concatenate([self._ids, other._ids]), np.concatenate([self._counts, other._counts]),
            alpha=self.alpha, special_ids=self.special_ids, pad_id=self.pad_id,
            special_density=self.special_density, pad_density=self.pad_density,
            num_captions=self.num_captions + other.num_captions,
            source=f"merge({self.source}; {other.source})")

    def __add__(self, other: "TokenDensity") -> "TokenDensity":
        return self.merge(other)

    def to_dict(self) -> dict:
        """A JSON-serialisable description (sparse counts)."""
        sd = ({str(k): v for k, v in self.special_density.items()} if isinstance(self.special_density, dict)
              else self.special_density)
        return {
            "format": _FORMAT, "version": _FORMAT_VERSION, "vocab_size": self.vocab_size, "alpha": self.alpha,
            "special_ids": self.special_ids, "pad_id": self.pad_id, "special_density": sd,
            "pad_density": self.pad_density, "num_captions": self.num_captions, "source": self.source,
            "ids": self._ids.tolist(), "counts": self._counts.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "TokenDensity":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} description (missing or wrong 'format' field)")
        if d.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported {_FORMAT} version {d.get('version')!r} (expected {_FORMAT_VERSION})")
        try:
            sd = d["special_density"]
            if isinstance(sd, Mapping):
                sd = {int(k): float(v) for k, v in sd.items()}
            return cls(int(d["vocab_size"]), d["ids"], d["counts"], alpha=float(d["alpha"]),
                       special_ids=d["special_ids"], pad_id=d["pad_id"], special_density=sd,
                       pad_density=float(d["pad_density"]), num_captions=int(d.get("num_captions", 0)),
                       source=str(d.get("source", "")))
        except KeyError as exc:
            raise ValueError(f"{_FORMAT} description lacks the field {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (no pickle)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenDensity":
        """Read a file written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return (f"TokenDensity(vocab_size={self.vocab_size}, nonzero={self._ids.size}, alpha={self.alpha}, "
                f"specials={len(self.special_ids)}, source={self.source!r})")
