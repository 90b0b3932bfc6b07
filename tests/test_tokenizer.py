"""npsd's CLIP tokenizer against two references: transformers' CLIPTokenizer (what diffusers' SD
pipelines use, built offline from the SHIPPED vocab.json/merges.txt) and OpenAI's own
simple_tokenizer.py (from the clip-anytorch wheel: transformers 5.x's tokenizer is itself built on
`tokenizers`, so it is not an independent reference).

Token ids are integers: every comparison is exact equality of whole arrays.

Where OpenAI and transformers disagree, npsd follows transformers. The cases (OPENAI_DIFFERS below,
docs/clip.md "Where OpenAI's tokenizer differs") all come from OpenAI's text cleanup, which
transformers does not do: ftfy.fix_text (curly quotes -> straight, ligatures and Latin digraphs ->
letters, full-width forms -> ASCII, mojibake repair) and html.unescape applied twice; and OpenAI
matches an upper-case "<|STARTOFTEXT|>" as the special token (its regex runs on lower-cased text).
"""

import hashlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from npsd import weights
from npsd.errors import InputError, TruncationWarning
from npsd.tokenizer import Tokenizer

WEIGHTS = Path(weights.__file__).parent
BOS, EOS = 49406, 49407

LONG_SD_PROMPT = (
    "masterpiece, best quality, ultra-detailed, 8k, a breathtaking fantasy landscape with floating islands, "
    "waterfalls cascading into the clouds, ancient ruins covered in glowing moss, a lone knight in ornate silver "
    "armour riding a white horse across a crystal bridge, golden hour lighting, volumetric fog, dramatic sky, "
    "intricate details, sharp focus, trending on artstation, by greg rutkowski and alphonse mucha, cinematic "
    "composition, depth of field, bokeh, vivid colours, highly detailed background, epic scale")

# The broad prompt set: every entry must give the same ids as transformers and as OpenAI.
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a portable radio",
    "A Photograph Of An ASTRONAUT Riding A HORSE",                       # capitals
    "Hello, world!!! ... ?!? (parentheses) [brackets] {braces} #tag @user 50% $5 a/b a-b a_b a+b=c ~`^|\\",
    "1024x768, 3.14159, 2nd place, 1,000,000 people, year 2023",         # digits split one by one
    "café naïve résumé Ångström crème brûlée déjà vu Ä ö ü ñ ç ø",     # accents (precomposed)
    "cafe\u0301 with a combining accent (NFC composes it)",
    "東京の夜景 一只可爱的猫 서울의 밤 Москва ночью",                     # CJK, Hangul, Cyrillic
    "🐱 a cat 👩‍🚀 astronaut 🇯🇵 flag ❤️ heart",                           # emoji, ZWJ sequence, flags
    "a  \t\n  b   c \r\n d",                                              # whitespace runs
    "  leading and trailing spaces  ",
    "",                                                                   # the empty string
    "   \t\n ",                                                           # only whitespace
    "it's don't they're we've i'm you'll he'd",                           # apostrophes: 's 't 're 've 'm 'll 'd
    "IT'S DON'T THEY'RE",
    "rock'n'roll o'clock 'quoted' ''double''",
    "a\u00a0no-break space and an\u3000ideographic space",
    "İstanbul ß Straße ÆØÅ",                                              # lower-casing special cases
    "½ ² ① ٣ digits of other scripts",
    "<|startoftext|>special<|endoftext|> tokens in the text",
    "x" * 300,                                                            # one 300-letter word
    "a very long prompt " * 30,                                           # 120 tokens: truncated
    LONG_SD_PROMPT,
]

# Prompts where OpenAI's tokenizer differs from transformers (and npsd), with the reason.
OPENAI_DIFFERS = [
    ("fish &amp; chips &lt;3 &#39;quoted&#39;", "html.unescape: HTML entities are decoded"),
    ("it’s a “quoted” word", "ftfy: curly quotes become straight ones"),
    ("ﬁne ﬂower", "ftfy: ligatures are split into letters"),
    ("ǅemal ǈubljana", "ftfy: Latin digraph characters are split into letters"),
    ("ＦＵＬＬ　ｗｉｄｔｈ", "ftfy: full-width forms become ASCII"),
    ("cafÃ© mojibake", "ftfy: mojibake (UTF-8 read as Latin-1) is repaired"),
    ("ΣΊΣΥΦΟΣ ΟΔΟΣ", "Python's str.lower() makes a word-final capital sigma a final sigma (ς); "
                     "the tokenizers library lower-cases character by character (σ)"),
]


# --- references ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def hf():
    return _hf()


def hf_ids(hf, prompts):
    """What diffusers' StableDiffusionPipeline.encode_prompt feeds the text encoder."""
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


@pytest.fixture(scope="module")
def openai():
    return _openai()


def openai_window(tokens):
    """OpenAI's token list -> SD's 77 ids: BOS, the first 75 tokens, EOS, EOS padding."""
    row = [BOS] + tokens[:75] + [EOS]
    return row + [EOS] * (77 - len(row))


# --- the ids ---------------------------------------------------------------------------------------

def test_reference_readme_ids(tok, hf, openai):
    """The two expected id lists of ../shared/reference/README.md."""
    expected = {
        "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
        "a portable radio": [49406, 320, 11949, 2638, 49407],
    }
    for prompt, ids in expected.items():
        row = tok(prompt)[0]
        assert row.tolist() == ids + [EOS] * (77 - len(ids)), prompt
        assert hf_ids(hf, [prompt])[0].tolist() == row.tolist()
        assert [BOS] + openai.encode(prompt) + [EOS] == ids


@pytest.mark.filterwarnings("ignore::npsd.errors.TruncationWarning")
def test_matches_transformers(tok, hf):
    ids = tok(PROMPTS)                                         # may warn about the long prompts
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, hf_ids(hf, PROMPTS))
    # and without any length limit
    for prompt, tokens in zip(PROMPTS, tok.encode(PROMPTS)):
        assert tokens == hf(prompt, add_special_tokens=False).input_ids, prompt


@pytest.mark.filterwarnings("ignore::npsd.errors.TruncationWarning")
def test_matches_openai(tok, openai):
    for prompt, tokens in zip(PROMPTS, tok.encode(PROMPTS)):
        assert tokens == openai.encode(prompt), prompt
        assert tok(prompt)[0].tolist() == openai_window(openai.encode(prompt)), prompt


@pytest.mark.parametrize("prompt, reason", OPENAI_DIFFERS)
def test_openai_differences_follow_transformers(tok, hf, openai, prompt, reason):
    """npsd equals transformers; OpenAI differs only because of its cleanup step: OpenAI's ids equal
    npsd's ids of the text after OpenAI's cleanup (ftfy.fix_text, html.unescape twice, whitespace,
    Python's str.lower)."""
    ours = tok.encode(prompt)[0]
    assert ours == hf(prompt, add_special_tokens=False).input_ids
    assert openai.encode(prompt) != ours, f"no longer a difference: {reason}"
    module = _CACHE["openai_module"]
    cleaned = module.whitespace_clean(module.basic_clean(prompt)).lower()
    assert openai.encode(prompt) == tok.encode(cleaned)[0], reason


def test_special_token_text(tok, hf, openai):
    """A literal <|startoftext|>/<|endoftext|> in the text. transformers and npsd match it as the
    special token before anything else, wherever it stands, in lower case only. OpenAI finds it with
    its regex after lower-casing: it also matches upper case, but misses it right after punctuation,
    where the symbol run [^\\s\\p{L}\\p{N}]+ swallows the "<|"."""
    for text in ("x<|endoftext|>y", "a <|startoftext|> b"):              # all three agree
        assert tok.encode(text)[0] == hf(text, add_special_tokens=False).input_ids == openai.encode(text)
    assert tok.encode("x<|endoftext|>y")[0] == [343, EOS, 344]
    upper = "<|STARTOFTEXT|>"
    assert openai.encode(upper) == [BOS]
    assert tok.encode(upper)[0] == hf(upper, add_special_tokens=False).input_ids
    assert BOS not in tok.encode(upper)[0]
    after_comma = "a,<|endoftext|>"
    assert tok.encode(after_comma)[0] == hf(after_comma, add_special_tokens=False).input_ids == [320, 267, EOS]
    assert EOS not in openai.encode(after_comma)


# Random text: pieces from many character classes, with whitespace and apostrophes often. A seeded
# generator (not hypothesis) so that 500 strings compare in one batch call, fast and reproducible.
PIECES = (list("abcxyzABCXYZ0123456789 '\t\n.,!?-_()[]:;/\"#@*+=<>|~")
          + ["éàüñçø", "東京猫", "🐱🚀", "'s", "'t", "'re", "'LL", "   ", "Ã©", "&amp;", "’", "ﬁ", "Ａ", "<|endoftext|>"])
# nothing that ftfy, html.unescape or Python's final-sigma rule would change, and special tokens only
# after a space (test_special_token_text shows why)
SAFE_PIECES = list("abcXYZ0189 '\t\n.,!?-_()[]:;/\"#@*+=<>|~") + ["éàüñç", "東京猫", "🐱🚀", "'s", "'Re", " <|endoftext|>"]


def random_texts(pieces, n=500, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=rng.integers(0, 40))) for _ in range(n)]


@pytest.mark.filterwarnings("ignore::npsd.errors.TruncationWarning")
def test_random_text_matches_transformers(tok, hf):
    texts = random_texts(PIECES)
    np.testing.assert_array_equal(tok(texts), hf_ids(hf, texts))


def test_random_text_matches_openai(tok, openai):
    texts = random_texts(SAFE_PIECES, seed=1)
    for text, tokens in zip(texts, tok.encode(texts)):
        assert tokens == openai.encode(text), repr(text)


_CACHE = {}


def _tok():
    return _CACHE.setdefault("tok", Tokenizer.default())


def _hf():
    """transformers' CLIPTokenizer from the shipped files, offline: a local folder, as diffusers loads it."""
    if "hf" not in _CACHE:
        import tempfile
        from transformers import CLIPTokenizer
        folder = Path(tempfile.mkdtemp(prefix="npsd_clip_tok_"))
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(WEIGHTS / name, folder / name)
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        _CACHE["hf"] = CLIPTokenizer.from_pretrained(str(folder))
        shutil.rmtree(folder)
    return _CACHE["hf"]


def _openai():
    if "openai" not in _CACHE:
        _CACHE["openai"] = _load_openai()
    return _CACHE["openai"]


def _load_openai():
    """OpenAI's simple_tokenizer.py, loaded as a single file so that `clip/__init__.py` (which imports
    torchvision) never runs. Installed by `pip install --no-deps clip-anytorch==2.6.0` (.ci/run)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's tokenizer is not installed: pip install --no-deps clip-anytorch==2.6.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    _CACHE["openai_module"] = module
    return module.SimpleTokenizer()


# --- truncation and chunks -------------------------------------------------------------------------

def test_truncation_warns_with_the_count(tok, hf):
    prompt = "a " * 100                                        # "a" is one token: 100 tokens
    with pytest.warns(TruncationWarning, match=r"25 token\(s\) were dropped"):
        ids = tok(prompt)
    assert ids[0].tolist() == [BOS] + [320] * 75 + [EOS]
    np.testing.assert_array_equal(ids, hf_ids(hf, [prompt]))
    with pytest.warns(TruncationWarning, match=r"prompt 1: 5\b"):
        tok(["short", "a " * 80])


def test_no_warning_at_75_tokens(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok("a " * 75)
    assert ids[0, 76] == EOS and ids[0, 75] == 320


def test_chunked_shapes_and_markers(tok, openai):
    prompts = ["a " * 160, "short prompt", ""]                # 160 tokens -> 3 chunks of 75
    ids = tok.chunked(prompts)
    assert ids.dtype == np.int64 and ids.shape == (3, 3 * 77)
    windows = ids.reshape(3, 3, 77)
    assert (windows[:, :, 0] == BOS).all()                    # every window starts with BOS
    assert windows[0, 0].tolist() == [BOS] + [320] * 75 + [EOS]
    assert windows[0, 2].tolist() == [BOS] + [320] * 10 + [EOS] * 66
    empty = [BOS] + [EOS] * 76                                # a missing chunk: BOS, EOS, padding
    assert windows[1, 0].tolist() == tok("short prompt")[0].tolist()
    assert windows[1, 1].tolist() == windows[1, 2].tolist() == empty
    assert windows[2].tolist() == [empty] * 3
    # the chunks' contents, put together, are the whole untruncated token list (OpenAI's too)
    inner = [t for t in windows[0, :, 1:].ravel().tolist() if t != EOS]
    assert inner == openai.encode(prompts[0])


def test_chunked_realistic_long_prompt(tok, openai):
    tokens = openai.encode(LONG_SD_PROMPT)
    k = -(-len(tokens) // 75)
    assert k >= 2, "the long prompt should need more than one chunk"
    ids = tok.chunked(LONG_SD_PROMPT).reshape(k, 77)
    for c in range(k):
        part = tokens[75 * c:75 * (c + 1)]
        assert ids[c].tolist() == [BOS] + part + [EOS] * (77 - 1 - len(part))


def test_chunked_num_chunks(tok):
    neg = tok.chunked("blurry", num_chunks=3)                 # negative prompt padded to the positive's k
    assert neg.shape == (1, 231)
    assert neg[0, 77:].tolist() == ([BOS] + [EOS] * 76) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (tok.chunked("a b c", num_chunks=1) == tok("a b c")).all()
    with pytest.warns(TruncationWarning, match=r"10 token\(s\) were dropped"):
        short = tok.chunked("a " * 160, num_chunks=2)         # 160 tokens, room for 150
    assert short.shape == (1, 154) and short[0, 153] == EOS
    with pytest.raises(InputError, match="num_chunks"):
        tok.chunked("a", num_chunks=0)


def test_bad_input(tok):
    for bad in (3, None, b"bytes", ["ok", 5], [["nested"]], np.array(["a"])):
        with pytest.raises(InputError, match="must be a str or a list of str"):
            tok(bad)
    with pytest.raises(InputError, match="empty"):
        tok([])
    with pytest.raises(InputError, match="cannot read"):
        Tokenizer.from_files("/nonexistent/vocab.json", "/nonexistent/merges.txt")


def test_wrong_vocabulary_is_caught(hf):
    """The comparison can fail: a tokenizer missing the last 8,894 merges gives different ids."""
    from tokenizers.models import BPE
    vocab, merges = BPE.read_file(str(WEIGHTS / "vocab.json"), str(WEIGHTS / "merges.txt"))
    wrong = Tokenizer(vocab, merges[:40000])
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(wrong(PROMPTS[:10]), hf_ids(hf, PROMPTS[:10]))


def test_decode(tok):
    assert tok.decode(tok("A Photograph, of 3 cats!")[0]) == "a photograph , of 3 cats !"


# --- the shipped files -----------------------------------------------------------------------------

def test_shipped_files_match_recorded_checksums():
    recorded = {}
    for line in (WEIGHTS / "SHA256SUMS.txt").read_text().splitlines():
        digest, name = line.split()
        recorded[name] = digest
    assert set(recorded) == {"vocab.json", "merges.txt"}
    for name, digest in recorded.items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    assert "Copyright (c) 2021 OpenAI" in (WEIGHTS / "LICENSE-openai-clip").read_text()
    vocab = json.loads((WEIGHTS / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


def test_regeneration_reproduces_shipped_files():
    """weights/make_tokenizer_files.py rebuilds vocab.json and merges.txt byte for byte from OpenAI's
    bpe_simple_vocab_16e6.txt.gz (in the installed clip-anytorch; a missing source fails under CI)."""
    from npsd.weights import make_tokenizer_files as mk
    source = mk.find_installed_source()
    if source is None:
        pytest.skip("no bpe_simple_vocab_16e6.txt.gz: pip install --no-deps clip-anytorch==2.6.0")
    files = mk.build(mk.read_source(source))
    for name, data in files.items():
        assert data == (WEIGHTS / name).read_bytes(), f"{name} differs from the regenerated file"
    assert mk.sha256sums(files) == (WEIGHTS / "SHA256SUMS.txt").read_text()


def test_regeneration_script_cli(tmp_path):
    """The script as run from the command line writes the three files; a wrong source is refused."""
    from npsd.weights import make_tokenizer_files as mk
    source = mk.find_installed_source()
    if source is None:
        pytest.skip("no bpe_simple_vocab_16e6.txt.gz: pip install --no-deps clip-anytorch==2.6.0")
    mk.main(["--source", str(source), "--out", str(tmp_path)])
    for name in ("vocab.json", "merges.txt", "SHA256SUMS.txt"):
        assert (tmp_path / name).read_bytes() == (WEIGHTS / name).read_bytes(), name
    fake = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    fake.write_bytes(b"not OpenAI's file")
    with pytest.raises(SystemExit, match="is not OpenAI's"):
        mk.main(["--source", str(fake), "--out", str(tmp_path)])
