"""AUTOMATIC1111's prompt syntax: emphasis, BREAK, prompt editing, alternation and <lora:...> tags.

Each function reproduces what the Stable Diffusion web UI (A1111) does with a prompt, with its
default settings ("Emphasis mode: Original", "Prompt word wrap length limit" 20, new prompt-editing
timelines); the web UI's source is modules/prompt_parser.py, modules/sd_hijack_clip.py,
modules/sd_emphasis.py and modules/extra_networks.py. In the order A1111 applies them:

1. extract_loras("a cat <lora:ink:0.6>")  -> ("a cat ", [LoraTag("ink", 0.6, 0.6)])
   every <type:arg:...> tag leaves the text; lora (alias lyco) tags are returned.
   split_and("a cat AND a dog :1.2") -> [("a cat", 1.0), (" a dog", 1.2)]
   composable prompts: each part is a prompt of its own, weighted in the guidance
   (npsd.guidance.composable_cfg); every step below applies to each part.
2. prompt_schedule("a [cat:dog:0.5]", 10) -> [(5, "a cat"), (10, "a dog")]
   prompt editing [from:to:when], [to:when], [from::when] and alternation [a|b|c]: the plain prompt
   of each stretch of steps; text_at_step(schedule, i) picks sampling step i's (A1111's counting).
3. parse_attention("a (cat:1.3) [dog]") -> [("a ", 1.0), ("cat", 1.3), (" ", 1.0), ("dog", 0.909...)]
   emphasis: (x) * 1.1, [x] / 1.1, (x:w) * w, nested brackets multiply; \\( \\) \\[ \\] \\\\ are literal;
   BREAK gives a piece ("BREAK", -1).
4. tokenize_weighted(tokenizer, text) -> ids [k, 77], multipliers [k, 77]
   each piece tokenized on its own, packed into 75-token chunks (a chunk that would overflow moves
   its words after the last comma of its final 20 tokens to the next chunk; BREAK starts a new chunk;
   a textual-inversion word is never split), each chunk wrapped as BOS, tokens, EOS padding.
5. encode_weighted(pipe, texts) -> context [B, 77k, D]
   every chunk through CLIP on its own; z * multiplier per token, then the whole chunk batch scaled
   so that its mean is the unweighted mean again ("Original" emphasis):
       z' = z * m;   z'' = z' * mean(z) / mean(z')          (means over the batch's chunk, all values)
   encode_schedule(pipe, text, steps) encodes one prompt's schedule as A1111 does (all its texts in
   one batch, so the mean is taken over them together).

A prompt without brackets, BREAK or tags gives the same token ids and contexts as the plain chunked
path (Tokenizer.chunked + encode_text) whenever it fits in one chunk; longer ones differ only where
the comma rule moves words (comma_backtrack=0 turns it off).
"""

import re
import warnings
from typing import NamedTuple

import numpy as np

from .errors import InputError, is_whole
from .tokenizer import CHUNK_TOKENS, MAX_LENGTH

ROUND = 1.1                     # (x): weight * 1.1
SQUARE = 1 / 1.1                # [x]: weight / 1.1
BREAK_WEIGHT = -1               # parse_attention's marker for BREAK (a piece ("BREAK", -1))
COMMA_BACKTRACK = 20            # A1111's default "Prompt word wrap length limit", in tokens
EMPHASIS = ("original", "no_norm", "ignore", "none")   # A1111's emphasis modes (lower case)
EMPHASIS_LABELS = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}   # A1111's names
PROMPT_SYNTAXES = ("plain", "a1111")                   # the pipelines' prompt_syntax values


def prompt_syntax_used(text, steps):
    """True when a prompt (after extract_loras) uses A1111's syntax: emphasis, escapes, BREAK,
    prompt editing or alternation. Pipelines give such prompts to encode_schedule and the others to
    the plain tokenizer path, so that a plain prompt gives the same numbers in either syntax."""
    pieces = parse_attention(text)
    return pieces not in ([], [(text, 1.0)]) or len(prompt_schedule(text, steps)) > 1 or composable(text)


# --- 1. <lora:NAME:STRENGTH> and other extra-network tags -----------------------------------------

class LoraTag(NamedTuple):
    """<lora:NAME>, <lora:NAME:TE>, <lora:NAME:TE:UNET>, <lora:NAME:te=..:unet=..>: the strengths
    for the text encoder and the UNet (unet defaults to the text encoder's, which defaults to 1)."""
    name: str
    strength: float             # text encoder
    unet_strength: float


EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")     # <type:arg1:arg2...>, as A1111's extra networks
LORA_TYPES = ("lora", "lyco")                       # "lyco" is A1111's alias for lora


def extract_loras(text):
    """Remove every <type:args> tag from the prompt, as A1111 does before anything else;
    -> (text without the tags, [LoraTag]) in prompt order. Tags of other types (<hypernet:...>)
    are removed with a warning: npsd has no such networks."""
    loras, others = [], []

    def take(m):
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in LORA_TYPES:
            others.append(m.group(0))
        else:
            loras.append(_lora_tag(m.group(0), args))
        return ""

    text = EXTRA_NETWORK.sub(take, _check_text(text))
    if others:
        warnings.warn(f"npsd has no extra networks of these types; removed from the prompt: {', '.join(others)}",
                      stacklevel=2)
    return text, loras


# --- 1b. AND: composable prompts -------------------------------------------------------------------

AND = re.compile(r"\bAND\b")           # A1111's separator of composable prompts (modules/prompt_parser.py)
# a part's weight: a number after a colon at its very end, spaces around it allowed ("a dog :1.2",
# "a dog:-.5"; no exponent); "." does not cross a line break, so a part with a line break after its
# leading spaces keeps its whole text and weight 1, as A1111's pattern does
PART_WEIGHT = re.compile(r"^(\s*.*?)\s*(?::\s*([+-]?(?:\d+\.?\d*|\.\d+)))?\s*$")


def split_and(text):
    """A prompt (after extract_loras) -> its parts [(text, weight)], as A1111 reads every prompt
    (modules/prompt_parser.py, get_multicond_prompt_list): split at the word AND, each part's
    trailing ":number" its weight (default 1) and its trailing spaces dropped. A negative prompt is
    not split. "a cat AND a dog :1.2" -> [("a cat", 1.0), (" a dog", 1.2)]."""
    parts = []
    for part in AND.split(text):
        m = PART_WEIGHT.search(part)
        if m is None:
            parts.append((part, 1.0))
        else:
            parts.append((m.group(1), 1.0 if m.group(2) is None else float(m.group(2))))
    return parts


def composable(text):
    """True when split_and changes the prompt beyond its trailing spaces: AND, or a weight."""
    parts = split_and(text)
    return len(parts) > 1 or parts[0][1] != 1.0 or parts[0][0].rstrip() != text.rstrip()


def repeat_last(context, tokens):
    """[B, L, D] -> [B, tokens, D], its last token's vector repeated: how A1111 brings the parts of
    composable prompts with different numbers of 77-token chunks to one length
    (reconstruct_multicond_batch); pad_chunks then pads them against the negative prompts."""
    return np.concatenate([context, np.repeat(context[:, -1:], tokens - context.shape[1], axis=1)], axis=1)


def _lora_tag(tag, args):
    named = dict(a.split("=", 1) for a in args if a.count("=") == 1)   # te=0.5, unet=1 (A1111: one "=")
    positional = [a for a in args if a.count("=") != 1]
    if not positional or not positional[0].strip():
        raise InputError(f"{tag!r} names no LoRA; write <lora:NAME> or <lora:NAME:STRENGTH>")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise InputError(f"{tag!r} has a strength that is not a number; write e.g. {f'<lora:{positional[0]}:0.8>'!r}") from None
    if not (np.isfinite(te) and np.isfinite(unet)):
        raise InputError(f"{tag!r} has a strength that is not finite")
    return LoraTag(positional[0], te, unet)


# --- 2. prompt editing and alternation ------------------------------------------------------------
#
# The grammar A1111 parses (with the Earley parser of the `lark` package):
#     top level:  (element | a stray one of "[ ] ( ) :")*
#     element:    plain text | whitespace | "(" elements ")" | "(" elements ":" elements ")"
#                 | "[" elements "]"                                              (emphasis: kept as text)
#                 | "[" [elements ":"] elements ":" [space] NUMBER [space] "]"    (prompt editing)
#                 | "[" elements ("|" [elements])+ "]"                            (alternation)
#     plain:      characters other than \ [ ] ( ) : |, or "\" + any character but a newline
# Inside brackets every bracket must be part of an element; a stray bracket is allowed only at the
# top level. Where both readings parse, the bracket group wins, as in A1111's documented examples.
# (lark's choice between such readings is not a simple rule: for a group directly followed by
# unmatched brackets or colons, as in "[a:b:2]))", A1111 sometimes reads the group as plain text.
# npsd keeps the group; prompts whose brackets all match are not affected.) A prompt that does not
# parse at all ("|" or a lone "\" at the top level) is used as it is.

PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")
SPACE = re.compile(r"\s*")


class _Edit:
    """[before:after:when] -> before while step <= when, after from then on (before None: nothing)."""

    def __init__(self, before, after, number):
        self.before, self.after, self.number, self.when = before, after, number, None


class _Alternate:
    """[a|b|c] -> option (step - 1) mod n at step `step`."""

    def __init__(self, options):
        self.options = options


def prompt_schedule(text, steps, old_timelines=False):
    """One prompt -> [(end_step, plain prompt)]: A1111's get_learned_conditioning_prompt_schedules.

    Each text holds for the steps up to and including end_step (see text_at_step). The last
    end_step is `steps`. In [from:to:when], a `when` written with a decimal point is a fraction of
    the steps (int(when * steps)), otherwise a step number; old_timelines=True is A1111's older rule
    (when < 1: a fraction, else a step number). Alternation gives one entry per step."""
    if not is_whole(steps) or steps < 1:
        raise InputError(f"steps must be a whole number >= 1, got {steps!r}")
    steps = int(steps)
    tree = _parse_schedule(_check_text(text))
    if tree is None:                                   # A1111: unparseable -> the prompt as it is
        return [(steps, text)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            v = float(node.number)
            if old_timelines:
                v = v * steps if v < 1 else v
            elif "." in node.number:
                v = v * steps
            node.when = min(steps, int(v))
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(end, "".join(_render(tree, end))) for end in sorted(ends)]


def text_at_step(schedule, step):
    """[(end_step, value)] -> the value for sampling step `step` (0, 1, ... counting the model calls
    of one generation, as A1111's CFG denoiser counts them): that of the first entry whose
    end_step >= step. So [(3, a), (10, b)] gives a at steps 0-3 and b at 4-9; with alternation,
    steps 0 and 1 both get the first option (A1111's counting). Works on prompt_schedule's texts and
    on encode_schedule's contexts alike."""
    for entry in schedule:
        if step <= entry[0]:
            return entry[1]
    return schedule[-1][1]


def _parse_schedule(s):
    """Text -> list of str / _Edit / _Alternate, or None where A1111's grammar does not parse it."""
    items, i = [], 0
    while True:
        elements, i = _elements(s, i)
        items += elements
        if i == len(s):
            return items
        if s[i] not in "[]():":                         # "|" or a lone "\" at the top level
            return None
        items.append(s[i])                              # a stray bracket or colon: plain text
        i += 1


def _elements(s, i):
    """As many elements as parse from position i -> (items, position after them)."""
    items = []
    while i < len(s):
        if s[i] in "([":
            group = _group(s, i)
            if group is None:
                break
            found, i = group
            items += found
            continue
        m = PLAIN.match(s, i)
        if m is None:
            break
        items.append(m.group(0))
        i = m.end()
    return items, i


def _group(s, i):
    """A bracket group starting at s[i] -> (items, position after it) or None."""
    first, j = _elements(s, i + 1)
    end = s[j] if j < len(s) else ""
    if s[i] == "(":
        if end == ")":
            return ["("] + first + [")"], j + 1
        if end == ":":
            second, k = _elements(s, j + 1)
            if k < len(s) and s[k] == ")":
                return ["("] + first + [":"] + second + [")"], k + 1
        return None
    if end == "]":
        return ["["] + first + ["]"], j + 1
    if end == "|":
        options = [first]
        while j < len(s) and s[j] == "|":
            option, j = _elements(s, j + 1)
            options.append(option)
        return ([_Alternate(options)], j + 1) if j < len(s) and s[j] == "]" else None
    if end == ":":
        edit = _edit_end(s, j + 1)                      # [to:when]
        if edit is not None:
            return [_Edit(None, first, edit[0])], edit[1]
        second, k = _elements(s, j + 1)                 # [from:to:when]
        if k < len(s) and s[k] == ":":
            edit = _edit_end(s, k + 1)
            if edit is not None:
                return [_Edit(first, second, edit[0])], edit[1]
    return None


def _edit_end(s, i):
    """'[space] NUMBER [space] ]' at position i -> (the number's text, position after "]") or None."""
    i = SPACE.match(s, i).end()
    m = NUMBER.match(s, i)
    if m is None:
        return None
    j = SPACE.match(s, m.end()).end()
    return (m.group(0), j + 1) if j < len(s) and s[j] == "]" else None


def _walk(items):
    for item in items:
        if isinstance(item, _Edit):
            yield item
            yield from _walk(item.before or [])
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)


def _render(items, step):
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, _Edit):
            yield from _render((item.before or []) if step <= item.when else item.after, step)
        else:
            yield from _render(item.options[(step - 1) % len(item.options)], step)


# --- 3. emphasis ----------------------------------------------------------------------------------

ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]              # \( \) \[ \] \\ : the character itself
    | \\                        # any other backslash: dropped
    | [(\[]                     # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # ":1.3)": closes a round bracket with an explicit weight
    | [)\]]                     # a closing bracket
    | [^\\()\[\]:]+             # text
    | :                         # a colon that is not part of a weight
""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text):
    """Prompt -> [(text, weight)]: A1111's parse_prompt_attention.

    (x) multiplies x's weight by 1.1, [x] divides it by 1.1, (x:w) multiplies it by w; nesting
    multiplies. A bracket left open runs to the end of the prompt; a closing bracket with nothing to
    close is text. BREAK (a word of its own, upper case) gives a piece ("BREAK", -1). Neighbouring
    pieces of equal weight are merged; an empty prompt gives [("", 1.0)]."""
    res = []                                             # [[text, weight]], weights updated in place
    round_open, square_open = [], []                     # where each open bracket's range starts

    def multiply(start, factor):
        for piece in res[start:]:
            piece[1] *= factor

    for m in ATTENTION_TOKEN.finditer(_check_text(text)):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise InputError(f"the emphasis weight in {token!r} is not a number; write e.g. (word:1.2)") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for k, part in enumerate(BREAK.split(token)):
                if k > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])
    for start in round_open:                             # unclosed brackets run to the end
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    for piece, w in res:
        if not abs(w) < float(np.finfo(np.float32).max):                 # the multipliers are float32
            raise InputError(f"the emphasis weights on {piece[:40]!r} multiply to {w:g}, beyond float32's range; "
                             "write weights such as (word:1.2)")
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for piece in res[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# --- 4. chunks of 75 tokens with per-token multipliers --------------------------------------------

def tokenize_weighted(tokenizer, text, comma_backtrack=COMMA_BACKTRACK, emphasis="original"):
    """One plain prompt (after prompt_schedule) -> (ids int64 [k, 77], multipliers float32 [k, 77]).

    A1111's tokenize_line: the pieces of parse_attention are tokenized one by one and packed into
    chunks of 75 tokens. When a chunk is full and the next token is not a comma, the tokens after
    the chunk's last comma move to the next chunk if there are at most `comma_backtrack` of them
    counting the comma's position from the end (0: never). BREAK closes the chunk (even an empty
    one). A textual-inversion word (Tokenizer.add_word) is never split across chunks. Each chunk is
    BOS, its tokens, EOS padding to 77; BOS, EOS and padding have multiplier 1. emphasis "none" does
    not parse brackets or BREAK at all (A1111's "None")."""
    pieces = [(text, 1.0)] if check_emphasis(emphasis) == "none" else parse_attention(text)
    tokens_of = tokenizer.encode([t for t, _ in pieces])
    word_len = {ids[0]: len(ids) for ids in tokenizer.added_words.values()}
    comma = tokenizer.encode(",")[0][0]
    chunks = []                                          # [(tokens, multipliers)] of finished chunks
    tokens, mults, last_comma = [], [], -1

    def close_chunk():
        nonlocal tokens, mults, last_comma
        pad = CHUNK_TOKENS - len(tokens)
        chunks.append(([tokenizer.bos_id] + tokens + [tokenizer.pad_id] * pad + [tokenizer.eos_id],
                       [1.0] + mults + [1.0] * pad + [1.0]))
        tokens, mults, last_comma = [], [], -1

    for ids, (piece, weight) in zip(tokens_of, pieces):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        pos = 0
        while pos < len(ids):
            if ids[pos] == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                keep = last_comma + 1                    # the comma stays, the rest moves on
                moved = tokens[keep:], mults[keep:]
                tokens, mults = tokens[:keep], mults[:keep]
                close_chunk()
                tokens, mults = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_TOKENS:
                close_chunk()
            n = word_len.get(ids[pos], 1)                 # an added word's ids stay together
            if n > 1 and len(tokens) + n > CHUNK_TOKENS:
                close_chunk()
            tokens += ids[pos:pos + n]
            mults += [weight] * n
            pos += n
    if tokens or not chunks:
        close_chunk()
    ids = np.array([c[0] for c in chunks], dtype=np.int64)                 # [k, 77]
    mults = np.array([c[1] for c in chunks], dtype=np.float32)             # [k, 77]
    return ids, mults


# --- 5. weighted contexts -------------------------------------------------------------------------

def encode_weighted(pipe, texts, clip_skip=None, comma_backtrack=COMMA_BACKTRACK, emphasis="original"):
    """Plain prompts (str or list) -> float32 context [B, 77k, D], weighted as A1111 does.

    pipe: anything with .tokenizer and .encode_text(ids, clip_skip) (an npsd.Pipeline). The texts
    are one batch as A1111 encodes it: k is the largest chunk count, shorter texts get empty
    chunks (BOS, EOS padding). Per chunk index c, with z [B, 77, D] the CLIP output and m [B, 77]
    the multipliers ("original" emphasis):
        z' = z * m[..., None];   z'' = z' * (mean(z) / mean(z'))      means over all of [B, 77, D]
    "no_norm" stops at z', "ignore" and "none" return z."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("encode_weighted needs at least one prompt (\"\" for none)")
    tok = pipe.tokenizer
    chunked = [tokenize_weighted(tok, t, comma_backtrack, emphasis) for t in texts]
    k = max(ids.shape[0] for ids, _ in chunked)
    empty = np.array([tok.bos_id] + [tok.pad_id] * CHUNK_TOKENS + [tok.eos_id], dtype=np.int64)   # [77]
    ids = np.stack([np.concatenate([i] + [empty[None]] * (k - len(i))) for i, _ in chunked])      # [B, k, 77]
    mults = np.stack([np.concatenate([m] + [np.ones((k - len(m), MAX_LENGTH), np.float32)]) for _, m in chunked])
    z = _encode_rows(pipe, ids.reshape(len(texts), k * MAX_LENGTH), clip_skip)    # [B, 77k, D], windows apart
    out = [apply_emphasis(z[:, c * MAX_LENGTH:(c + 1) * MAX_LENGTH], mults[:, c], emphasis) for c in range(k)]
    return np.concatenate(out, axis=1)                                    # [B, 77k, D]


def apply_emphasis(z, multipliers, emphasis="original"):
    """z [B, 77, D] CLIP output of one chunk index, multipliers [B, 77] -> weighted z (A1111's
    sd_emphasis). "original": multiply, then restore the mean over the whole batch of chunks."""
    emphasis = check_emphasis(emphasis)
    if emphasis in ("ignore", "none"):
        return z
    weighted = z * multipliers[..., None].astype(z.dtype)                 # [B, 77, D]
    if emphasis == "no_norm":
        return weighted
    ratio = z.mean(dtype=np.float64) / weighted.mean(dtype=np.float64)   # original mean / new mean
    return weighted * np.float32(ratio)


def _encode_rows(pipe, ids, clip_skip):
    """ids [B, 77k] -> [B, 77k, D], encoding each distinct row once (a schedule repeats its texts)."""
    rows, inverse = np.unique(ids, axis=0, return_inverse=True)
    if len(rows) == len(ids):
        return pipe.encode_text(ids, clip_skip)
    return pipe.encode_text(rows, clip_skip)[inverse.reshape(-1)]


def encode_schedule(pipe, text, steps, clip_skip=None, comma_backtrack=COMMA_BACKTRACK, emphasis="original",
                    old_timelines=False):
    """One prompt (after extract_loras) -> [(end_step, context [1, 77k, D])], as A1111's
    get_learned_conditioning: the schedule's texts (one per entry, repeats included) are encoded as
    one batch, so they share k and the emphasis mean. Use text_at_step(result, i) at step i."""
    schedule = prompt_schedule(text, steps, old_timelines)
    contexts = encode_weighted(pipe, [t for _, t in schedule], clip_skip, comma_backtrack, emphasis)
    return [(end, contexts[i:i + 1]) for i, (end, _) in enumerate(schedule)]


def pad_chunks(contexts, empty):
    """Contexts [B_i, 77 k_i, D] -> the same, each padded to the largest k by appending `empty`
    [1, 77, D] (the encoded empty prompt, encode_weighted(pipe, "")) as many times as needed, so that
    a prompt and its negative prompt can share one UNet batch. This is A1111's "Pad prompt/negative
    prompt" setting; by default A1111 instead runs the UNet on the two separately when their
    lengths differ."""
    k = max(c.shape[1] for c in contexts) // MAX_LENGTH
    return [np.concatenate([c] + [np.repeat(empty, c.shape[0], axis=0)] * (k - c.shape[1] // MAX_LENGTH), axis=1)
            for c in contexts]


# --- checks ---------------------------------------------------------------------------------------

def _check_text(text):
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a str, got {type(text).__name__}")
    return text


def check_emphasis(emphasis):
    if emphasis not in EMPHASIS:
        raise InputError(f"emphasis must be one of {', '.join(EMPHASIS)}, got {emphasis!r}")
    return emphasis
