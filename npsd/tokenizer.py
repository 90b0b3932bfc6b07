"""CLIP's tokenizer: text -> the 77 token ids that Stable Diffusion v1.x conditions on.

Built on the `tokenizers` library, configured exactly as transformers' CLIPTokenizer (what SD
pipelines use), which reproduces OpenAI's simple_tokenizer.py apart from its ftfy/HTML cleanup
(docs/clip.md lists the differences). The steps:

1. special tokens: a literal "<|startoftext|>" / "<|endoftext|>" in the text is its own id;
2. normalise: Unicode NFC, every whitespace run -> one space, lower case;
3. pre-tokenise with CLIP's regex: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single
   digits, runs of other non-space characters; whitespace is dropped;
4. byte-level: each piece's UTF-8 bytes become printable characters (CLIP's bytes_to_unicode);
5. BPE with the 48,894 merges, the last symbol of each piece carrying the end-of-word mark "</w>";
6. wrap in <|startoftext|> = 49406 ... <|endoftext|> = 49407, pad with 49407 to 77 (truncate to 77
   with a warning), or, in chunk mode, split into 75-token chunks each wrapped and padded to 77.

Added words (textual inversion, npsd/embeddings.py): add_word(word, n) gives a word n new ids after
the vocabulary; wherever the word's own tokens occur in a prompt, encode() puts the new ids instead.
"""

import warnings

import numpy as np
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .errors import InputError, TruncationWarning, is_whole

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77                        # CLIP's context: 77 positions = BOS + 75 tokens + EOS
CHUNK_TOKENS = MAX_LENGTH - 2          # prompt tokens per 77-token window

# CLIP's pre-tokenisation regex (simple_tokenizer.py; OpenAI applies it with re.IGNORECASE to
# already lower-cased text, so the flag changes nothing).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer:
    """CLIP's BPE tokenizer. ``Tokenizer.default()`` uses the vocabulary shipped in weights/.

    tok("a photo")           -> int64 [1, 77]
    tok(["a", "b"])          -> int64 [2, 77]   (truncation mode, as diffusers)
    tok.chunked(prompts, k)  -> int64 [B, 77 * k] (long prompts: 75-token chunks)
    tok.add_word("my-style", 2) -> [49408, 49409]  (a textual-inversion word; see add_word)
    """

    def __init__(self, vocab, merges, pad_token=EOS):
        """vocab: {token: id}; merges: [(a, b), ...] in priority order (the first merges first)."""
        model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                    unk_token=EOS, fuse_unk=False, dropout=None)
        tok = _HFTokenizer(model)
        tok.normalizer = normalizers.Sequence([
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # keep the regex matches, drop what lies between them (whitespace)
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            # bytes -> printable characters. ByteLevel also re-splits each piece with GPT-2's regex,
            # as in transformers; that changes nothing except for special-token text that was not
            # matched as a special token (e.g. "<|ENDOFTEXT|>"), which then splits like transformers'
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()     # printable characters -> bytes -> text (for decode)
        tok.add_special_tokens([BOS, EOS])      # matched in the raw text, before normalisation
        self._tok = tok
        self.bos_id = vocab[BOS]                # 49406
        self.eos_id = vocab[EOS]                # 49407
        if pad_token not in vocab:
            raise InputError(f"the tokenizer's padding token {pad_token!r} is not in its vocabulary; "
                             f"use {EOS!r} (SD v1.x) or '!' (SD 2.x)")
        self.pad_id = vocab[pad_token]          # SD v1.x pads with <|endoftext|>, SD 2.x with "!" (id 0)
        self.vocab_size = len(vocab)            # the BPE vocabulary; added words' ids come after it
        self.added_words = {}                   # word -> tuple of its new ids, in the order added
        self._added_by_first = {}               # first token of a word -> [(word's tokens, new ids)], longest first

    @classmethod
    def from_files(cls, vocab_json, merges_txt, pad_token=EOS):
        """Build from a vocab.json and a merges.txt (the layout of the hub's CLIP tokenizer folders)."""
        try:
            vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
        except Exception as e:
            raise InputError(f"cannot read the tokenizer files {vocab_json} and {merges_txt} ({e}); "
                             "pass CLIP's vocab.json and merges.txt") from None
        missing = [t for t in (BOS, EOS) if t not in vocab]
        if missing:
            raise InputError(f"{vocab_json} lacks the special tokens {missing}; pass CLIP's vocab.json")
        return cls(vocab, merges, pad_token)

    @classmethod
    def default(cls, pad_token=EOS):
        """The CLIP tokenizer of SD v1.x and 2.x, from the files shipped in weights/ (pad_token:
        the model config's text_encoder.pad_token)."""
        from . import weights
        return cls.from_files(weights.path("vocab.json"), weights.path("merges.txt"), pad_token)

    # --- text -> ids ------------------------------------------------------------------------------

    def encode(self, prompts):
        """str or list of str -> list of token-id lists, without BOS/EOS and without any limit."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            got = type(prompts).__name__ if not isinstance(prompts, (list, tuple)) else \
                f"a {type(prompts).__name__} holding {sorted({type(p).__name__ for p in prompts})}"
            raise InputError(f"a prompt must be a str or a list of str, got {got}")
        if len(prompts) == 0:
            raise InputError("the list of prompts is empty; pass at least one prompt (\"\" for none)")
        for p in prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:                              # a lone surrogate, e.g. "\udcff"
                raise InputError(f"a prompt holds {p[e.start:e.end]!r} at character {e.start}, which is not text "
                                 "(a lone UTF-16 surrogate); check how the prompt was decoded") from None
        ids = [e.ids for e in self._tok.encode_batch(list(prompts), add_special_tokens=False)]
        return [self._put_added_words(t) for t in ids] if self.added_words else ids

    def __call__(self, prompts):
        """str or list of str -> int64 [B, 77]: BOS, up to 75 tokens, EOS, EOS padding.

        Longer prompts are truncated to their first 75 tokens (as diffusers does) with a
        TruncationWarning saying how many tokens were dropped; see chunked() for the alternative."""
        return self._windows(self.encode(prompts), num_chunks=1)

    def chunked(self, prompts, num_chunks=None):
        """Long-prompt mode: str or list of str -> int64 [B, 77 * k].

        Each prompt's tokens are split into chunks of 75; each chunk becomes its own 77-token window
        (BOS, tokens, EOS, padding), as stable-diffusion.cpp does (A1111 also moves the words after a
        comma near the end of a chunk to the next one: npsd/prompts.py); encode_text encodes the
        windows independently and concatenates them. k is the largest number of chunks in the batch
        (at least 1), or num_chunks when given, so that a negative prompt can be padded to the
        positive prompt's k (a missing chunk is BOS, EOS, padding). Tokens beyond num_chunks * 75
        are dropped with a TruncationWarning. ``chunked(p, num_chunks=1)`` equals ``tok(p)``."""
        ids = self.encode(prompts)
        if num_chunks is None:
            num_chunks = max(max(1, -(-len(t) // CHUNK_TOKENS)) for t in ids)     # ceil(n / 75), >= 1
        elif not is_whole(num_chunks) or num_chunks < 1:
            raise InputError(f"num_chunks must be a positive integer or None, got {num_chunks!r}")
        return self._windows(ids, int(num_chunks))

    def _windows(self, ids, num_chunks):
        """Token lists -> int64 [B, 77 * num_chunks] of BOS/EOS-wrapped, padded 75-token chunks."""
        limit = num_chunks * CHUNK_TOKENS
        dropped = [len(t) - limit for t in ids]
        if max(dropped) > 0:
            which = ", ".join(f"prompt {i}: {d}" for i, d in enumerate(dropped) if d > 0)
            warnings.warn(f"prompt too long: CLIP reads {limit} tokens per prompt here "
                          f"({num_chunks} x {CHUNK_TOKENS}), so {max(dropped)} token(s) were dropped "
                          f"({which}); use the chunked long-prompt mode to keep them",
                          TruncationWarning, stacklevel=3)
        out = np.full((len(ids), num_chunks, MAX_LENGTH), self.pad_id, dtype=np.int64)  # [B, k, 77]
        out[:, :, 0] = self.bos_id
        for b, tokens in enumerate(ids):
            tokens = tokens[:limit]
            for c in range(num_chunks):
                chunk = tokens[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
                out[b, c, 1:1 + len(chunk)] = chunk
                out[b, c, 1 + len(chunk)] = self.eos_id
        return out.reshape(len(ids), num_chunks * MAX_LENGTH)                          # [B, 77k]

    # --- added words (textual inversion) ----------------------------------------------------------

    def add_word(self, word, num_ids):
        """Give `word` num_ids new token ids, numbered after the vocabulary and every id added before;
        returns them. From now on encode() replaces each occurrence of the word's own tokens by the new
        ids, as A1111 finds embedding names: by token sequence (case-insensitive, as the tokens are),
        so "my-style" matches "a my-style photo" but not "my-styles"; where two added words could match
        at one place, the one with more tokens wins."""
        tokens = tuple(self._tok.encode(word, add_special_tokens=False).ids)   # the word's own tokens
        if not tokens:
            raise InputError(f"cannot add the word {word!r}: it has no tokens; use letters, digits or symbols")
        matches = self._added_by_first.setdefault(tokens[0], [])
        if any(other == tokens for other, _ in matches):
            raise InputError(f"a word with the tokens of {word!r} is already added; give it another name")
        if not is_whole(num_ids) or num_ids < 1:
            raise InputError(f"num_ids must be a whole number >= 1, got {num_ids!r}")
        first = self.vocab_size + sum(len(ids) for ids in self.added_words.values())
        ids = tuple(range(first, first + int(num_ids)))
        self.added_words[word] = ids
        matches.append((tokens, ids))
        matches.sort(key=lambda m: len(m[0]), reverse=True)                     # longest word first
        return list(ids)

    def _put_added_words(self, ids):
        """One prompt's token ids with every added word's tokens replaced by the word's new ids."""
        out, i = [], 0
        while i < len(ids):
            for tokens, new_ids in self._added_by_first.get(ids[i], ()):
                if tuple(ids[i:i + len(tokens)]) == tokens:
                    out += new_ids
                    i += len(tokens)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out

    # --- ids -> text ------------------------------------------------------------------------------

    def decode(self, ids):
        """One row of token ids -> text (special tokens dropped; an approximation of the prompt:
        lower case, single spaces). An added word's ids decode to the word."""
        word_at = {new_ids[0]: word for word, new_ids in self.added_words.items()}
        parts, run = [], []
        for i in (int(i) for i in ids):
            if i < self.vocab_size:
                run.append(i)
            else:                                       # an added id: the word for its first id, else ""
                parts += [self._decode_vocab(run), word_at.get(i, "")]
                run = []
        parts.append(self._decode_vocab(run))
        return " ".join(p for p in parts if p)

    def _decode_vocab(self, ids):
        words = self._tok.decode(ids, skip_special_tokens=True)
        return words.replace("</w>", " ").strip()
