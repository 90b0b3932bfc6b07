"""Generation parameters in PNG files, in the "parameters" text chunk that A1111 and other tools read.

The text has three parts (A1111's layout, so other tools can read npsd's images and npsd can re-run
theirs):

    a red circle on a blue background                       <- the prompt (may span several lines)
    Negative prompt: blurry                                 <- the negative prompt
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 512x512, Model hash: 0123456789, ...

The last line is a list of `Name: value` fields separated by ", "; a value that contains a comma,
a colon or a newline is written as a JSON string ("..."). `Size` is WIDTHxHEIGHT; `Model hash` is
the first 10 hex digits of the SHA-256 of the model file (A1111's "AutoV2" hash).

    >>> text = format_parameters("a cat", "blurry", {"Steps": 2, "Sampler": "DDIM", "Seed": 7})
    >>> text
    'a cat\\nNegative prompt: blurry\\nSteps: 2, Sampler: DDIM, Seed: 7'
    >>> parse_parameters(text)
    {'prompt': 'a cat', 'negative_prompt': 'blurry', 'fields': {'Steps': '2', 'Sampler': 'DDIM', 'Seed': '7'}}
"""

import json
import re

from PIL import Image, PngImagePlugin

from .errors import InputError

KEY = "parameters"
NEGATIVE = "Negative prompt:"
# one "Name: value" field: a name of word characters, spaces, - and /; a JSON-quoted or plain value
FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value):
    """A field value as written: plain, or a JSON string when it holds ',', ':' or a newline."""
    text = str(value)
    if not any(c in text for c in ',:\n"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_parameters(prompt, negative_prompt, fields):
    """prompt, negative prompt (str) and an ordered {name: value} dict -> the "parameters" text.
    Fields whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    return f"{prompt}\n{NEGATIVE} {negative_prompt}\n{line}"


def _field_line(line):
    """{name: value} when the line is a field line (at least one `Name: value` and nothing else)."""
    found = FIELD.findall(line)
    if not found:
        return None
    rebuilt = ", ".join(f"{k}: {v}" for k, v in found)
    if rebuilt.replace(" ", "") != line.strip().rstrip(",").replace(" ", ""):
        return None
    return {k.strip(): unquote(v) for k, v in found}


def parse_parameters(text):
    """The "parameters" text -> {"prompt": str, "negative_prompt": str, "fields": {name: str}}.

    Field values stay strings (A1111 writes numbers as text too); the caller converts the ones it
    uses. A text without a field line gives fields == {}."""
    if not isinstance(text, str):
        raise InputError(f"PNG parameters must be text, got {type(text).__name__}")
    lines = text.strip("\n").split("\n")
    fields = {}
    if len(lines) > 1 or (lines and not lines[0].startswith(NEGATIVE)):
        parsed = _field_line(lines[-1]) if lines else None
        if parsed is not None and len(parsed) >= 2:
            fields, lines = parsed, lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].lstrip(" ")
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), "fields": fields}


def png_info(text):
    """A PngInfo holding the "parameters" chunk (tEXt when the text is Latin-1, else iTXt as UTF-8)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, text)
    return info


def _exif_user_comment(img):
    """A1111 stores the parameters of JPEG/WebP images in EXIF UserComment: an 8-byte charset
    prefix ("UNICODE\\0": UTF-16, big-endian as written; "ASCII\\0\\0\\0") then the text."""
    raw = img.getexif().get_ifd(0x8769).get(0x9286)            # Exif IFD, UserComment
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        le = body[:1] != b"\x00" and body[1:2] == b"\x00"        # a few writers use little-endian
        return body.decode("utf-16-le" if le else "utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\x00")


def read_parameters(path):
    """The "parameters" text of an image: the PNG chunk npsd writes, or the EXIF UserComment that
    A1111 writes in JPEG/WebP files. A one-line InputError when there is none."""
    try:
        with Image.open(path) as img:
            img.load()
            text = img.info.get(KEY)
            if not isinstance(text, str):
                text = _exif_user_comment(img)
    except FileNotFoundError:
        raise InputError(f"--from-png: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--from-png: cannot read {path} as an image ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--from-png: {path} has no '{KEY}' text chunk or EXIF comment (not made by npsd or "
                         f"A1111, or the metadata was stripped); give the PNG that npsd wrote")
    return text
