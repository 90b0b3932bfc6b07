"""A1111's prompt syntax (npsd/prompts.py) against A1111's documented behaviour and an independent
weighting computation in torch.

Parser expectations are literal values: the examples in the docstrings of A1111's
modules/prompt_parser.py (parse_prompt_attention, get_learned_conditioning_prompt_schedules), and
further cases worked out by hand from the rules stated there and in modules/sd_hijack_clip.py
(75-token chunks, the comma rule with A1111's default limit of 20 tokens, BREAK).

Weighting: transformers' CLIPTextModel (tiny random config, every parameter perturbed as in
tests/helpers.py) encodes each 77-token chunk; the test applies A1111's "Original" emphasis in torch
(z * multiplier per token, then z * mean(z) / mean(weighted z)) to chunks and multipliers written
out by hand, and compares with npsd's NumPy result. Tolerance RTOL = 3e-6 relative (max abs error /
max |reference|); measured 2.9e-7 (with and without clip skip; 3.7e-7 for a schedule's batch), the
text encoder's own float32 difference (2.9e-7 without any weights). Both sides take the two means
in float64: the mean of z (-0.009 here) is about 85x smaller than the mean |z|, so float32 means
(as A1111 computes them) would add their rounding amplified by that factor (2.2e-6 measured).
A wrong weight (1.1 where A1111 gives 1.21: 8.3e-2) or a missing mean restore (1.5e-3) fails the
same check.
"""

import re
import warnings

import numpy as np
import pytest
import torch

import npsd
from npsd import prompts
from npsd.config import sd15_config
from npsd.errors import InputError
from npsd.prompts import (LoraTag, composable, encode_schedule, encode_weighted, extract_loras, pad_chunks,
                          parse_attention, prompt_schedule, repeat_last, split_and, text_at_step, tokenize_weighted)
from npsd.testing import assert_close
from npsd.tokenizer import Tokenizer
from tests.helpers import perturb_, t2n, to_numpy_params

RTOL = 3e-6


# --- parse_attention: A1111's documented examples -------------------------------------------------

def test_parse_attention_documented_examples():
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


def test_parse_attention_unbalanced_stray_and_weights():
    assert parse_attention("[unbalanced") == [("unbalanced", 1 / 1.1)]
    assert parse_attention("((a)") == [("a", 1.1 * 1.1)]                 # the open one closes at the end
    assert parse_attention("a) b]") == [("a) b]", 1.0)]                  # nothing to close: text
    assert parse_attention("(a:1.5") == [("a:1.5", 1.1)]                 # weight never closed: text, then (..) x1.1
    assert parse_attention("a:1.5)") == [("a:1.5)", 1.0)]
    assert parse_attention("(a: 1.5 ) (b:0.5)(c:0.5)") == [("a", 1.5), (" ", 1.0), ("bc", 0.5)]
    assert parse_attention("[[a]]") == [("a", 1 / 1.1 / 1.1)]
    assert parse_attention("") == [("", 1.0)]
    with pytest.raises(InputError, match="not a number"):
        parse_attention("(a:1.2.3)")                                     # A1111 stops with a ValueError
    e18, e20 = "1" + "0" * 18, "1" + "0" * 20                            # A1111's weights have no exponent
    assert parse_attention(f"((a:{e18}):{e18})") == [("a", 1e36)]             # within float32
    for text in ("(a:" + "9" * 40 + ")", f"((a:{e20}):{e20})", "(a:" + "9" * 400 + ")"):   # 1e40, 1e40, inf
        with pytest.raises(InputError, match="beyond float32's range"):  # else a NaN context, refused later
            parse_attention(text)                                        # without naming the cause


def test_parse_attention_escapes():
    assert parse_attention(r"\(a\) \[b\] \\") == [("(a) [b] \\", 1.0)]
    assert parse_attention(r"(a\)b)") == [("a)b", 1.1)]
    assert parse_attention(r"a\b") == [("ab", 1.0)]                      # a lone backslash is dropped


def test_parse_attention_break():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1), ("b", 1.0)]
    assert parse_attention("aBREAK b") == [("aBREAK b", 1.0)]            # BREAK must be a word of its own
    assert parse_attention("a break b") == [("a break b", 1.0)]          # and upper case
    # inside brackets the marker's weight is multiplied too, so it is no longer a BREAK (A1111 then
    # tokenizes the word "break" with weight -1.1)
    assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


# --- prompt editing and alternation ---------------------------------------------------------------

def test_schedule_documented_examples():
    def g(p):
        return [list(x) for x in prompt_schedule(p, 10)]
    assert g("test") == [[10, "test"]]
    assert g("a [b:3]") == [[3, "a "], [10, "a b"]]
    assert g("a [b: 3]") == [[3, "a "], [10, "a b"]]
    assert g("a [[[b]]:2]") == [[2, "a "], [10, "a [[b]]"]]
    assert g("[(a:2):3]") == [[3, ""], [10, "(a:2)"]]
    assert g("a [b : c : 1] d") == [[1, "a b  d"], [10, "a  c  d"]]
    assert g("a[b:[c:d:2]:1]e") == [[1, "abe"], [2, "ace"], [10, "ade"]]
    assert g("a [unbalanced") == [[10, "a [unbalanced"]]
    assert g("a [b:.5] c") == [[5, "a  c"], [10, "a b c"]]
    assert g("((a][:b:c [d:3]") == [[3, "((a][:b:c "], [10, "((a][:b:c d"]]
    assert g("[a|(b:1.1)]") == [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]
    assert g("[fe|]male") == [[s, "female" if s % 2 else "male"] for s in range(1, 11)]
    assert g("[fe|||]male") == [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]
    # The docstring also lists "a [{b|d{:.5] c" -> [[5, 'a  c'], [10, 'a {b|d{ c']], marked "not
    # handling this right now"; it predates alternation: since then plain text excludes "|", the
    # prompt does not parse, and A1111 uses it as it is.
    assert g("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]


def test_schedule_when_rules():
    assert prompt_schedule("[a:b:0.29]", 100) == [(28, "a"), (100, "b")]          # int(0.29 * 100) = int(28.999...)
    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]                        # a decimal point: a fraction
    assert prompt_schedule("[a:b:1.0]", 10, old_timelines=True) == [(1, "a"), (10, "b")]   # old: >= 1 is a step
    assert prompt_schedule("[a:b:0.5]", 10, old_timelines=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:-1]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:20]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:1e1]", 20) == [(10, "a"), (20, "b")]             # no decimal point: step 10
    assert prompt_schedule("[a::3] x", 10) == [(3, "a x"), (10, " x")]
    assert prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]
    assert prompt_schedule("([a:b:2]:1.2)", 4) == [(2, "(a:1.2)"), (4, "(b:1.2)")]
    assert prompt_schedule("", 3) == [(3, "")]
    with pytest.raises(InputError, match="steps"):
        prompt_schedule("a", 0)


def test_schedule_unparseable_prompts_are_used_as_they_are():
    for p in ["a | b [c:d:5]", "a [c:d:5] \\", "[a|b", "a (b|c) [d:e:2]"]:
        assert prompt_schedule(p, 10) == [(10, p)], p


def test_text_at_step_counts_like_a1111():
    schedule = prompt_schedule("a [b:3]", 10)
    assert [text_at_step(schedule, i) for i in range(10)] == ["a "] * 4 + ["a b"] * 6   # steps 0-3, then 4-9
    alt = prompt_schedule("[x|y]", 4)
    assert [text_at_step(alt, i) for i in range(4)] == ["x", "x", "y", "x"]


# --- <lora:...> -----------------------------------------------------------------------------------

# --- split_and: A1111's composable prompts ----------------------------------------------------------

def a1111_multicond(prompt):
    """A1111's get_multicond_prompt_list (modules/prompt_parser.py) for one prompt, as it is written
    there: split at AND, each part's weight read by A1111's pattern -> [(text, weight)]."""
    re_and = re.compile(r"\bAND\b")
    re_weight = re.compile(r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
    out = []
    for subprompt in re_and.split(prompt):
        match = re_weight.search(subprompt)
        text, weight = match.groups() if match is not None else (subprompt, 1.0)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


def test_split_and_examples():
    assert split_and("a cat AND a dog :1.2") == [("a cat", 1.0), (" a dog", 1.2)]
    assert split_and("a cat:0.5 AND a dog: -.25\n") == [("a cat", 0.5), (" a dog", -0.25)]
    assert split_and("a cat AND") == [("a cat", 1.0), ("", 1.0)]
    assert split_and("sand, ANDROID, and") == [("sand, ANDROID, and", 1.0)]     # AND only as a word
    assert split_and("a (cat:1.3)") == [("a (cat:1.3)", 1.0)]                   # emphasis, not a weight
    assert split_and("a cat:1e3") == [("a cat:1e3", 1.0)]                       # no exponent
    assert split_and("a\ncat:2") == [("a\ncat:2", 1.0)]                      # a line break inside: kept whole
    assert split_and("\n a cat:2") == [("\n a cat", 2.0)]                     # ... but not a leading one
    assert [composable(t) for t in ("a cat", "a cat  ", "a cat:1", "a cat:2", "a AND b", "a\ncat ")] == \
        [False, False, True, True, True, False]


def test_split_and_equals_a1111_on_random_prompts():
    """3000 prompts of pieces that meet A1111's pattern at its edges (spaces and line breaks around
    colons, signs, points, AND inside and beside words): every part's text and weight as A1111's."""
    rng = np.random.default_rng(0)
    pieces = ["a", "cat", " ", "  ", "\n", "\t", ":", "1", "0", "5", ".", "-", "+", "AND", " AND ", "ANDy",
              "(", ")", "[", "]", "e"]
    for _ in range(3000):
        prompt = "".join(rng.choice(pieces, size=rng.integers(0, 14)))
        assert split_and(prompt) == a1111_multicond(prompt), repr(prompt)


def test_repeat_last():
    c = np.arange(2 * 77 * 3, dtype=np.float32).reshape(2, 77, 3)
    out = repeat_last(c, 154)
    assert out.shape == (2, 154, 3)
    np.testing.assert_array_equal(out[:, :77], c)
    np.testing.assert_array_equal(out[:, 77:], np.repeat(c[:, -1:], 77, axis=1))


def test_extract_loras():
    text, loras = extract_loras("a cat <lora:ink:0.6>, <lora:pen> <lyco:x:0.5:0.2> <lora:y:te=0.3:unet=0.7> <lora>")
    assert text == "a cat ,    <lora>"
    assert loras == [LoraTag("ink", 0.6, 0.6), LoraTag("pen", 1.0, 1.0), LoraTag("x", 0.5, 0.2), LoraTag("y", 0.3, 0.7)]
    with pytest.warns(UserWarning, match="hypernet"):
        assert extract_loras("a <hypernet:h:1> b") == ("a  b", [])
    with warnings.catch_warnings():   # AND stays in the text, for split_and
        warnings.simplefilter("error")
        assert extract_loras("a cat AND a dog :1.2") == ("a cat AND a dog :1.2", [])
        assert extract_loras("sand, ANDROID, and, And") == ("sand, ANDROID, and, And", [])
    with pytest.raises(InputError, match="not a number"):
        extract_loras("<lora:ink:strong>")
    with pytest.raises(InputError, match="names no LoRA"):
        extract_loras("<lora::0.5>")
    for tag in ("<lora:ink\n:strong>", "<lora:\n>", "<lora:ink:1\n.5>"):   # the message stays one line
        with pytest.raises(InputError) as caught:
            extract_loras(f"a\n{tag}\nb")
        assert "\n" not in str(caught.value) and repr(tag) in str(caught.value)


# --- chunks ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def ids_of(tok, *words):
    return [tok.encode(w)[0][0] for w in words]


def chunk(tok, tokens):
    """BOS, tokens, EOS padding: one 77-token window."""
    return [tok.bos_id] + tokens + [tok.eos_id] * (77 - 1 - len(tokens))


def test_comma_rule(tok):
    A, C, B = ids_of(tok, "a", ",", "b")
    ids, m = tokenize_weighted(tok, "a " * 70 + ", " + "b " * 10)       # the comma 5 tokens from the end
    assert ids.tolist() == [chunk(tok, [A] * 70 + [C]), chunk(tok, [B] * 10)]
    assert (m == 1).all()
    ids, _ = tokenize_weighted(tok, "a " * 54 + ", " + "b " * 30)       # 21 from the end: no move
    assert ids.tolist() == [chunk(tok, [A] * 54 + [C] + [B] * 20), chunk(tok, [B] * 10)]
    ids, _ = tokenize_weighted(tok, "a " * 70 + ", " + "b " * 10, comma_backtrack=0)
    assert ids.tolist() == [chunk(tok, [A] * 70 + [C] + [B] * 4), chunk(tok, [B] * 6)]
    ids, _ = tokenize_weighted(tok, "a " * 75 + ", b")                  # token 76 is the comma itself
    assert ids.tolist() == [chunk(tok, [A] * 75), chunk(tok, [C, B])]
    ids, _ = tokenize_weighted(tok, "a " * 75)                          # exactly 75 tokens: one chunk
    assert ids.tolist() == [chunk(tok, [A] * 75)]


def test_break_and_multipliers(tok):
    A, B, BRK = ids_of(tok, "a", "b", "break")
    assert tokenize_weighted(tok, "a BREAK b")[0].tolist() == [chunk(tok, [A]), chunk(tok, [B])]
    assert tokenize_weighted(tok, "BREAK a")[0].tolist() == [chunk(tok, []), chunk(tok, [A])]
    assert tokenize_weighted(tok, "a BREAK")[0].tolist() == [chunk(tok, [A])]
    assert tokenize_weighted(tok, "")[0].tolist() == [chunk(tok, [])]
    ids, m = tokenize_weighted(tok, "(a BREAK b)")
    assert ids.tolist() == [chunk(tok, [A, BRK, B])]
    assert m[0, :5].tolist() == np.float32([1, 1.1, -1.1, 1.1, 1]).tolist()
    ids, m = tokenize_weighted(tok, "a (b:1.5) [a]")
    assert ids.tolist() == [chunk(tok, [A, B, A])]
    assert m.tolist() == [np.float32([1, 1, 1.5, 1 / 1.1] + [1] * 73).tolist()]
    text = "a (b:1.5) [a] BREAK"
    ids, m = tokenize_weighted(tok, text, emphasis="none")              # A1111's "None": no parsing at all
    assert ids.tolist() == [chunk(tok, tok.encode(text)[0])] and (m == 1).all()


# --- weighting against transformers -------------------------------------------------------------

TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def models():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from npsd.weights import path as weights_path
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(**TINY)).eval(), seed=3)
    sd = text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    config = sd15_config()
    config["text_encoder"]["num_heads"] = 4
    pipe = npsd.Pipeline({"text_encoder": to_numpy_params(sd, prefix, drop=("position_ids",))}, config)
    hf_tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    return {"torch": text, "pipe": pipe, "hf_tok": hf_tok}


def reference(models, batch_chunks, clip_skip=0, emphasis="original"):
    """A1111's weighting in torch. batch_chunks: per text, a list of chunks, each a list of
    (text piece, weight) written out by hand. -> [B, 77k, D]."""
    tok, model = models["hf_tok"], models["torch"]
    k = max(len(c) for c in batch_chunks)
    out = []
    for c in range(k):
        rows, mults = [], []
        for chunks in batch_chunks:
            pieces = chunks[c] if c < len(chunks) else []
            ids, m = [tok.bos_token_id], [1.0]
            for piece, weight in pieces:
                piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                ids, m = ids + piece_ids, m + [weight] * len(piece_ids)
            pad = 77 - len(ids)
            rows.append(ids + [tok.eos_token_id] * pad)
            mults.append(m + [1.0] * pad)
        with torch.no_grad():
            result = model(torch.tensor(rows), output_hidden_states=True)
            z = result.last_hidden_state if clip_skip == 0 else \
                getattr(model, "text_model", model).final_layer_norm(result.hidden_states[-(clip_skip + 1)])
        mult = torch.tensor(mults)                                        # [B, 77]
        original_mean = z.double().mean()                                 # means in float64: see the top
        z = z * mult[..., None]
        if emphasis == "original":
            z = z * (original_mean / z.double().mean()).float()
        out.append(z)
    return t2n(torch.cat(out, dim=1))


PROMPT = "a (red:1.3) circle, [blue] background BREAK ((green)) square"
PIECES = [[("a ", 1.0), ("red", 1.3), (" circle, ", 1.0), ("blue", 1 / 1.1), (" background", 1.0)],
          [("green", 1.1 * 1.1), (" square", 1.0)]]


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_weighting_matches_a1111_formula(models, clip_skip):
    got = encode_weighted(models["pipe"], PROMPT, clip_skip=clip_skip)      # [1, 154, 32]
    c = assert_close(got, reference(models, [PIECES], clip_skip), RTOL, "weighted context")
    print(c)


def test_weighting_check_is_sensitive(models):
    got = encode_weighted(models["pipe"], PROMPT)
    wrong_weight = [PIECES[0], [("green", 1.1), (" square", 1.0)]]              # 1.1 instead of 1.21
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(got, reference(models, [wrong_weight]), RTOL)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):         # no mean restore
        assert_close(got, reference(models, [PIECES], emphasis="no_norm"), RTOL)
    # and npsd's own "no_norm" is that formula
    assert_close(encode_weighted(models["pipe"], PROMPT, emphasis="no_norm"),
                 reference(models, [PIECES], emphasis="no_norm"), RTOL)


def test_schedule_texts_share_one_batch_mean(models):
    """A1111 encodes a prompt's schedule texts as one batch, so the mean restore runs over them together."""
    steps = 4
    result = encode_schedule(models["pipe"], "a [(red:1.3):blue:2] circle", steps)
    assert [end for end, _ in result] == [2, 4]
    got = np.concatenate([c for _, c in result])                            # [2, 77, 32]
    want = reference(models, [[[("a ", 1.0), ("red", 1.3), (" circle", 1.0)]], [[("a blue circle", 1.0)]]])
    print(assert_close(got, want, RTOL, "schedule contexts"))
    alone = encode_weighted(models["pipe"], "a (red:1.3) circle")            # its own batch: another mean
    with pytest.raises(AssertionError, match="exceeds the tolerance"):     # differs by 1.5e-3
        assert_close(alone, got[:1], RTOL)
    assert text_at_step(result, 2) is result[0][1] and text_at_step(result, 3) is result[1][1]


def test_plain_prompt_gives_npsd_plain_numbers(models):
    pipe = models["pipe"]
    for p in ["a red circle on a blue background", "", "a, b, c"]:
        ids, m = tokenize_weighted(pipe.tokenizer, p)
        assert np.array_equal(ids.reshape(1, -1), pipe.tokenizer.chunked([p])) and (m == 1).all()
        assert np.array_equal(encode_weighted(pipe, p), pipe.encode_text(pipe.tokenize(p)))


def test_long_prompt_chunks(models):
    """A1111's chunking differs from npsd's plain chunk mode only by the comma rule."""
    pipe = models["pipe"]
    p = "a photo of a cat, " * 13 + "a dog"                 # 80 tokens; the comma nearest token 75 is token 72
    plain = pipe.encode_text(pipe.tokenizer.chunked([p]))
    assert np.array_equal(encode_weighted(pipe, p, comma_backtrack=0), plain)
    ids, _ = tokenize_weighted(pipe.tokenizer, p)
    assert ids[0, 72] == ids_of(pipe.tokenizer, ",")[0] and (ids[0, 73:] == pipe.tokenizer.eos_id).all()
    assert not np.array_equal(encode_weighted(pipe, p), plain)


def test_pad_chunks(models):
    pipe = models["pipe"]
    cond, uncond = encode_weighted(pipe, "a BREAK b BREAK c"), encode_weighted(pipe, "blurry")
    empty = encode_weighted(pipe, "")
    cond2, uncond2 = pad_chunks([cond, uncond], empty)
    assert cond2 is not cond and np.array_equal(cond2, cond)
    assert uncond2.shape == cond.shape
    assert np.array_equal(uncond2[:, :77], uncond) and np.array_equal(uncond2[:, 154:], empty[0:1])
    # the padding is what npsd's plain chunk mode gives the shorter prompt (up to float32 rounding:
    # there the three windows are encoded as one batch)
    assert_close(uncond2, pipe.encode_text(pipe.tokenizer.chunked(["blurry"], num_chunks=3)), 1e-6)


def test_bad_input():
    with pytest.raises(InputError, match="str"):
        parse_attention(["a"])
    with pytest.raises(InputError, match="emphasis"):
        prompts.apply_emphasis(np.zeros((1, 77, 2), np.float32), np.ones((1, 77), np.float32), "loud")
