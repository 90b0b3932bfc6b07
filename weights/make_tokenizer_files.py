"""Regenerate the CLIP tokenizer files shipped in weights/ from OpenAI's BPE file.

Source: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, Copyright (c) 2021 OpenAI; the licence text
is weights/LICENSE-openai-clip). It ships byte-identical in the PyPI wheels of ``clip-anytorch``,
``open-clip-torch`` and ``openai-clip``; this script reads it from the installed ``clip`` package,
from such a wheel, or from the .gz itself, and refuses any file whose sha256 is not OpenAI's.

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/w
    python weights/make_tokenizer_files.py --source /tmp/w/clip_anytorch-2.6.0-py3-none-any.whl
    python weights/make_tokenizer_files.py            # from an installed clip-anytorch

What the files hold (the same as OpenAI's simple_tokenizer.py builds in memory):
- merges.txt: a "#version: 0.2" line, then lines 1 .. 48894 of the decompressed file (line 0 is
  the file's own version line), one merge "a b" per line;
- vocab.json: the 256 byte-level characters (GPT-2/CLIP's bytes_to_unicode order), the same 256
  with "</w>" appended, every merge joined ("a b" -> "ab"), then "<|startoftext|>" = 49406 and
  "<|endoftext|>" = 49407: 49,408 entries, written one per line.
weights/SHA256SUMS.txt records the sha256 of the results (`cd weights && sha256sum -c SHA256SUMS.txt`);
the source's own checksum is SOURCE_SHA256 below.
"""

import argparse
import gzip
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

SOURCE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOURCE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOURCE_SIZE = 1_356_917
NUM_MERGES = 49152 - 256 - 2          # = 48894; simple_tokenizer.py: merges[1:49152-256-2+1]
HERE = Path(__file__).resolve().parent
OUTPUTS = ("vocab.json", "merges.txt")


def bytes_to_unicode():
    """CLIP's (and GPT-2's) byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 bytes to chr(256 + n) in byte order, so BPE never sees whitespace or
    control characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def find_installed_source():
    """The .gz inside an installed clip-anytorch / openai-clip (package `clip`) or open-clip-torch
    (package `open_clip`), found without importing the package (no torch/torchvision import)."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / SOURCE_NAME
            if candidate.is_file():
                return candidate
    return None


def read_source(path):
    """The compressed bytes of OpenAI's BPE file from a .gz or a wheel (.whl/.zip), checked."""
    path = Path(path)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/" + SOURCE_NAME) or n == SOURCE_NAME]
            if not names:
                raise SystemExit(f"{path} holds no {SOURCE_NAME}; use a clip-anytorch or open-clip-torch wheel")
            data = z.read(names[0])
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256 or len(data) != SOURCE_SIZE:
        raise SystemExit(f"{path}: sha256 {digest} ({len(data)} bytes) is not OpenAI's {SOURCE_NAME} "
                         f"({SOURCE_SHA256}, {SOURCE_SIZE} bytes)")
    return data


def build(gz_bytes):
    """Compressed BPE file -> {"vocab.json": bytes, "merges.txt": bytes}."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    assert all(len(m) == 2 for m in merges), "every merge line holds two symbols"
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "the vocabulary has 49,408 distinct entries"
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    vocab_json = json.dumps(vocab, ensure_ascii=False, indent=0) + "\n"
    return {"vocab.json": vocab_json.encode("utf-8"), "merges.txt": merges_txt.encode("utf-8")}


def sha256sums(files):
    """The text of weights/SHA256SUMS.txt (`sha256sum -c` format) for the built files."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help=f"{SOURCE_NAME}, or a clip-anytorch/open-clip-torch wheel "
                                         "(default: the installed clip/open_clip package)")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: weights/)")
    args = parser.parse_args(argv)
    source = args.source or find_installed_source()
    if source is None:
        raise SystemExit(f"no {SOURCE_NAME} found: pip install --no-deps clip-anytorch==2.6.0, "
                         "or pass --source with a wheel or the .gz")
    files = build(read_source(source))
    out = Path(args.out)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "SHA256SUMS.txt").write_text(sha256sums(files), encoding="utf-8")
    print(f"wrote {', '.join(sorted(files))} and SHA256SUMS.txt to {out} from {source}")


if __name__ == "__main__":
    sys.exit(main())
