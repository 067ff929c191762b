"""TokenDensity (SPEC §3): values on a corpus with known counts, weights, word-frequency prior, JSON, merge, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dare_kernels import TokenDensity
from dare_kernels.density import strip_word_piece_markers


class WhitespaceTokenizer:
    """Minimal object with the Hugging Face tokenizer interface (whitespace split, fixed vocabulary)."""

    def __init__(self, words, specials=("<pad>", "</s>")):
        self.vocab = {w: i for i, w in enumerate(list(specials) + list(words))}
        self.inv = {i: w for w, i in self.vocab.items()}
        self.pad_token_id = self.vocab.get("<pad>")
        self.all_special_ids = [self.vocab[s] for s in specials]
        self.calls = 0

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, add_special_tokens=True):
        self.calls += 1
        ids = [[self.vocab[w] for w in t.split()] for t in texts]
        if add_special_tokens:
            ids = [x + [self.vocab["</s>"]] for x in ids]
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids):
        return [self.inv[i] for i in ids]


WORDS = ["the", "cat", "dog", "sat", "zebra"]
CORPUS = ["the cat", "the dog", "the cat sat", "</s>"]   # the:3 cat:2 dog:1 sat:1 zebra:0 (</s> is special)


def expected_rho(counts, alpha):
    """ρ per SPEC §3 computed by hand in float64 from a {word: count} table."""
    total, V = sum(counts.values()), len(counts)
    info = {w: -math.log((c + alpha) / (total + alpha * V)) for w, c in counts.items()}
    lo, hi = min(info.values()), max(info.values())
    return {w: (i - lo) / (hi - lo) for w, i in info.items()}


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_density_matches_known_counts(alpha):
    tok = WhitespaceTokenizer(WORDS)
    d = TokenDensity.fit(CORPUS, tok, alpha=alpha, progress=False)
    assert d.counts == {tok.vocab["the"]: 3, tok.vocab["cat"]: 2, tok.vocab["dog"]: 1, tok.vocab["sat"]: 1}
    exp = expected_rho({"the": 3, "cat": 2, "dog": 1, "sat": 1, "zebra": 0}, alpha)
    ids = torch.tensor([[tok.vocab[w] for w in WORDS]])
    rho = d.density(ids)
    assert rho.dtype == torch.float32 and rho.shape == (1, 5)
    torch.testing.assert_close(rho[0].double(), torch.tensor([exp[w] for w in WORDS], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    # monotone: more frequent -> lower density; extremes are 0 and 1
    assert rho[0, 0] == 0.0 and rho[0, 4] == 1.0
    assert rho[0, 0] < rho[0, 1] < rho[0, 2] == rho[0, 3] < rho[0, 4]
    # probabilities sum to 1 over the non-special vocabulary
    p = d.probabilities()
    assert abs(float(p.sum()) - 1.0) < 1e-12 and p[tok.pad_token_id] == 0


def test_special_tokens_get_configured_density():
    tok = WhitespaceTokenizer(WORDS)
    eos = tok.vocab["</s>"]
    d = TokenDensity.fit(CORPUS, tok, progress=False, special_density=0.7)
    assert float(d.density(torch.tensor([tok.pad_token_id]))) == 0.0
    assert float(d.density(torch.tensor([eos]))) == pytest.approx(0.7)
    d2 = TokenDensity.fit(CORPUS, tok, progress=False, special_density={eos: 0.3}, pad_density=0.1)
    assert float(d2.density(torch.tensor([eos]))) == pytest.approx(0.3)
    assert float(d2.density(torch.tensor([tok.pad_token_id]))) == pytest.approx(0.1)


def test_uniform_counts_give_density_one():
    tok = WhitespaceTokenizer(["a", "b"])
    d = TokenDensity.fit(["a b", "b a"], tok, progress=False)
    assert torch.equal(d.density(torch.tensor([2, 3])), torch.ones(2))


@pytest.mark.parametrize("floor,kappa", [(0.1, 1.0), (0.25, 2.0), (1.0, 0.5)])
def test_weights_formula_and_padding(floor, kappa):
    tok = WhitespaceTokenizer(WORDS)
    d = TokenDensity.fit(CORPUS, tok, progress=False)
    pad = tok.pad_token_id
    ids = torch.tensor([[tok.vocab["the"], tok.vocab["zebra"], tok.vocab["cat"], pad, pad],
                        [tok.vocab["dog"], tok.vocab["sat"], tok.vocab["the"], tok.vocab["the"], pad]])
    w = d.weights(ids, floor=floor, kappa=kappa)
    assert w.dtype == torch.float32 and w.shape == ids.shape
    rho = d.density(ids).double()
    exp = floor + (1 - floor) * rho ** kappa
    exp[ids == pad] = 0
    torch.testing.assert_close(w.double(), exp, atol=1e-6, rtol=0)
    assert (w[ids != pad] >= floor - 1e-7).all()
    # pad_id=None keeps padding positions; key_padding_mask zeroes positions too
    assert (d.weights(ids, floor=floor, kappa=kappa, pad_id=None) > 0).all()
    kpm = torch.ones_like(ids, dtype=torch.bool)
    kpm[1, 0] = False
    w2 = d.weights(ids, floor=floor, kappa=kappa, key_padding_mask=kpm)
    assert w2[1, 0] == 0 and torch.equal(w2[0], w[0])


def test_fit_streams_in_batches_and_is_batch_size_independent():
    tok = WhitespaceTokenizer(WORDS)
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, size=rng.integers(1, 6), p=[.4, .3, .15, .1, .05])) for _ in range(3000)]
    a = TokenDensity.fit(iter(corpus), tok, batch_size=1000, progress=False)   # a generator: no len()
    assert tok.calls == 3
    b = TokenDensity.fit(corpus, tok, batch_size=7, progress=False)
    assert a.counts == b.counts and a.num_captions == b.num_captions == 3000
    assert torch.equal(a.table(), b.table())


def test_fit_progress_bar(capsys):
    tok = WhitespaceTokenizer(WORDS)
    TokenDensity.fit(CORPUS * 10, tok, batch_size=4, progress=True)
    assert "TokenDensity.fit" in capsys.readouterr().err


def test_merge_equals_fit_on_concatenation():
    tok = WhitespaceTokenizer(WORDS)
    c1, c2 = ["the cat", "the the dog"], ["zebra sat", "cat"]
    merged = TokenDensity.fit(c1, tok, progress=False).merge(TokenDensity.fit(c2, tok, progress=False))
    whole = TokenDensity.fit(c1 + c2, tok, progress=False)
    assert merged.counts == whole.counts and merged.num_captions == 4
    assert torch.equal(merged.table(), whole.table())
    other = TokenDensity.fit(["a"], WhitespaceTokenizer(["a"]), progress=False)
    with pytest.raises(ValueError, match="vocab"):
        merged.merge(other)
    with pytest.raises(TypeError):
        merged.merge({"the": 1})


def test_json_round_trip(tmp_path):
    tok = WhitespaceTokenizer(WORDS)
    d = TokenDensity.fit(CORPUS, tok, alpha=0.5, progress=False, special_density={1: 0.4}, pad_density=0.05)
    path = tmp_path / "density.json"
    d.save(path)
    raw = json.loads(path.read_text())          # plain JSON, sparse counts
    assert raw["format"] == "dare_kernels.TokenDensity" and len(raw["ids"]) == 4
    e = TokenDensity.load(path)
    assert e.counts == d.counts and e.alpha == 0.5 and e.pad_id == d.pad_id and e.special_ids == d.special_ids
    assert torch.equal(e.table(), d.table())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        TokenDensity.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format"):
        TokenDensity.load(path)


def test_strip_word_piece_markers():
    assert strip_word_piece_markers("\u2581cat") == "cat"
    assert strip_word_piece_markers("##ing") == "ing"
    assert strip_word_piece_markers("\u0120dog") == "dog"
    assert strip_word_piece_markers("cat</w>") == "cat"
    assert strip_word_piece_markers("\u2581") == ""


def test_from_wordfreq_handles_pieces_punctuation_and_unknowns():
    pytest.importorskip("wordfreq", reason="wordfreq (the [density] extra) is not installed here")
    pieces = ["<pad>", "</s>", "\u2581the", "\u2581cat", "##s", "\u0120dog", ",", "\u2581", "xqzvkj",
              "\u2581photograph", "\u2581a"]

    class PieceTokenizer(WhitespaceTokenizer):
        def __init__(self):
            super().__init__(pieces[2:])

    tok = PieceTokenizer()
    d = TokenDensity.from_wordfreq(tok, "en")
    rho = {p: float(d.density(torch.tensor([i]))) for i, p in enumerate(pieces)}
    assert rho["<pad>"] == 0.0 and rho["</s>"] == 0.0
    assert rho["\u2581the"] == 0.0                             # the most frequent word of English
    assert rho[","] == 0.0 and rho["\u2581"] == 0.0               # punctuation / bare marker: function tokens
    assert rho["xqzvkj"] == 1.0                                 # unknown piece: most informative
    assert rho["\u2581the"] < rho["\u2581a"] < rho["\u2581cat"] < rho["\u2581photograph"] < 1.0
    assert 0.0 < rho["\u0120dog"] < 1.0 and 0.0 < rho["##s"] < 1.0
    assert d.source.startswith("wordfreq:en")


def test_real_tokenizer_built_locally():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers, trainers

    captions = ["a cat on a mat", "a dog in the park", "the zebra runs", "a cat and a dog"] * 5
    raw = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    d = TokenDensity.fit(captions, tok, progress=False)
    ids = tok(["a zebra"], add_special_tokens=False)["input_ids"]
    rho = d.density(torch.tensor(ids))
    assert rho[0, 0] == 0.0 and rho[0, 1] > 0.5           # "a" is the most frequent token
    assert float(d.density(torch.tensor([tok.pad_token_id]))) == 0.0
    assert d.from_wordfreq(tok).vocab_size == len(tok)


def test_bad_input():
    tok = WhitespaceTokenizer(WORDS)
    with pytest.raises(ValueError, match="empty"):
        TokenDensity.fit([], tok, progress=False)
    with pytest.raises(ValueError, match="no non-special tokens"):
        TokenDensity.fit(["", "  "], tok, progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        TokenDensity.fit(CORPUS, object(), progress=False)
    with pytest.raises(TypeError, match="vocab"):
        TokenDensity.fit(CORPUS, lambda batch: {"input_ids": [[0]]}, progress=False)
    with pytest.raises(TypeError, match="str"):
        TokenDensity.fit(["the", 3], tok, progress=False)
    with pytest.raises(TypeError, match="single string"):
        TokenDensity.fit("the cat", tok, progress=False)
    with pytest.raises(TypeError, match="convert_ids_to_tokens"):
        TokenDensity.from_wordfreq(type("T", (), {"vocab_size": 3})())
    with pytest.raises(ValueError, match="alpha"):
        TokenDensity.fit(CORPUS, tok, alpha=0.0, progress=False)
    d = TokenDensity.fit(CORPUS, tok, progress=False)
    with pytest.raises(ValueError, match="token_ids must lie"):
        d.density(torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="token_ids must lie"):
        d.weights(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        d.density(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="floor"):
        d.weights(torch.tensor([[2]]), floor=0.0)
    with pytest.raises(ValueError, match="floor"):
        d.weights(torch.tensor([[2]]), floor=1.5)
    with pytest.raises(ValueError, match="kappa"):
        d.weights(torch.tensor([[2]]), kappa=0.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        d.weights(torch.tensor([[2, 3]]), key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="special_density"):
        TokenDensity.fit(CORPUS, tok, special_density=1.5, progress=False)
    with pytest.raises(ValueError, match="same length"):
        TokenDensity(5, [1, 2], [1.0])
    with pytest.raises(ValueError, match="ids must lie"):
        TokenDensity(5, [7], [1.0])
