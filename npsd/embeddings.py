"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): learned vectors that
a new word stands for in CLIP's token-embedding table.

An embedding of n vectors [n, W] becomes n new rows of the text encoder's token-embedding table
(params["text_encoder"]["embeddings"]["token_embedding"]["weight"], [V, W] -> [V + n, W]) and a
word of the tokenizer that maps to those n new ids (Tokenizer.add_word): wherever the word's tokens
appear in a prompt, CLIP reads the learned vectors instead. With n > 1 the word takes n positions of
the 75 a chunk holds.

Files (read without torch; a `.pt`/`.bin` goes through npsd's restricted unpickler, npsd/ckpt.py):
    A1111 `.pt`:               {"string_to_param": {"*": [n, W]}, "name": ..., "step": ..., ...}
    A1111 / kohya `.safetensors`: {"emb_params": [n, W]}
    diffusers `learned_embeds.bin` / `.safetensors`: {token: [W] or [n, W]}
    SDXL `.safetensors` {"clip_l": ..., "clip_g": ...} and vectors of another width (SD 2.x: 1024)
    are refused with the widths named.

The word: `token` when given, else the file's stem (A1111: the name in the prompt is the file name
without its extension), except for diffusers' fixed file name `learned_embeds.*`, whose token is the
one stored in the file. Matching follows A1111: by token sequence, case-insensitively ("EasyNegative"
matches "easynegative" but not "easynegatives"); diffusers instead matches its added token as a
literal substring of the prompt and names multi-vector ids token, token_1, ... (here one word maps to
all n ids, so there is no name_1).
"""

import os
from pathlib import Path

import numpy as np

from . import prompts
from .ckpt import CkptFile, TensorRef
from .errors import InputError
from .safetensors_io import SafetensorsFile, is_safetensors
from .tokenizer import CHUNK_TOKENS

SUFFIXES = (".pt", ".bin", ".safetensors")      # what an embeddings folder is searched for
DIFFUSERS_NAME = "learned_embeds"               # diffusers' file name; its token is inside the file


def read_embedding(path):
    """An embedding file -> (vectors float32 [n, W], the token stored in the file or None)."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"embedding file {path} does not exist")
    vectors, token = (_read_safetensors if is_safetensors(path) else _read_pickled)(path)
    return _vectors(path, vectors), None if token == "emb_params" or not isinstance(token, str) else token


def _read_safetensors(path):
    """{"emb_params": [n, W]} (A1111, kohya) or {token: [n, W] or [W]} (diffusers)."""
    with SafetensorsFile(path) as f:
        names = sorted(f.tensors)
        _refuse_sdxl(path, names, lambda n: f.tensors[n].shape)
        if len(names) != 1:
            raise InputError(f"{path} holds {len(names)} tensors ({', '.join(names[:3])}{', ...' * (len(names) > 3)}); "
                             "an embedding file holds one ('emb_params' or the token)" + _what_instead(names))
        return f.read(names[0], np.float32), names[0]


def _what_instead(names):
    """A hint when an embeddings folder holds a model or a LoRA."""
    from .loading import file_kind                  # here: loading imports the pipeline, which imports this
    return {"checkpoint": "; this is a whole SD checkpoint: give it as the model (--model)",
            "lora": "; this is a LoRA: give it with --lora or put it in --lora-dir"}.get(file_kind(names), "")


def _read_pickled(path):
    """A torch.save file, through the restricted unpickler (it refuses anything but tensors and plain
    data): {"string_to_param": {"*": [n, W]}, "name": ...} (A1111) or {token: tensor} (diffusers)."""
    with CkptFile(path) as ck:
        data = ck.obj                                                    # a dict (CkptFile checks)
        if "string_to_param" in data:                                    # A1111
            params = data["string_to_param"]
            if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), TensorRef):
                raise InputError(f"{path}: 'string_to_param' must hold exactly one tensor (an A1111 embedding); "
                                 f"it holds {len(params) if isinstance(params, dict) else type(params).__name__}")
            ref, token = next(iter(params.values())), data.get("name")
        else:                                                            # diffusers: {token: tensor}
            refs = {k: v for k, v in data.items() if isinstance(v, TensorRef)}
            _refuse_sdxl(path, sorted(refs), lambda n: refs[n].shape)
            if len(refs) != 1 or len(data) != 1:
                raise InputError(f"{path} is not a textual-inversion embedding: it has neither 'string_to_param' "
                                 f"(A1111) nor a single tensor (diffusers); it holds {sorted(map(str, data))[:5]}")
            token, ref = next(iter(refs.items()))
        ck.tensors["\0embedding"] = ref          # CkptFile.read reads a tensor it lists by name
        return ck.read("\0embedding", np.float32), token


def add_embedding(pipe, name, vectors, source=None):
    """Make the word `name` stand for `vectors` [n, W] in `pipe` (an npsd.Pipeline): n rows appended to
    the text encoder's token-embedding table, n new tokenizer ids. Returns the ids. Adding the same
    name with the same vectors again does nothing. source: the file, for error messages."""
    table_owner = _token_embedding(pipe.params)
    table = table_owner["weight"]                                              # [V, W]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != table.shape[1]:
        raise InputError(f"the embedding {source or repr(name)} has vectors {list(vectors.shape)} "
                         f"({vectors.shape[-1]} wide) but this text encoder's token embeddings are {table.shape[1]} "
                         "wide; use an embedding trained for this model (SD v1.x: 768, SD 2.x: 1024)")
    if vectors.shape[0] > CHUNK_TOKENS:
        raise InputError(f"the embedding {source or repr(name)} has {vectors.shape[0]} vectors; a prompt chunk "
                         f"holds at most {CHUNK_TOKENS}")
    tok = pipe.tokenizer
    if name in tok.added_words:
        ids = list(tok.added_words[name])
        if len(ids) == len(vectors) and np.array_equal(table[ids], vectors.astype(table.dtype)):
            return ids
        raise InputError(f"an embedding named {name!r} is already loaded with other vectors; give this one another token")
    next_id = tok.vocab_size + sum(len(i) for i in tok.added_words.values())
    if next_id != table.shape[0]:
        raise InputError(f"the tokenizer's next id is {next_id} but the text encoder's token-embedding table has "
                         f"{table.shape[0]} rows; the tokenizer and text encoder do not belong together")
    ids = tok.add_word(name, len(vectors))
    table_owner["weight"] = np.concatenate([table, vectors.astype(table.dtype)])   # [V + n, W]
    return ids


def load_embedding(pipe, path, token=None):
    """Read an embedding file and add it to `pipe` -> (the word to write in prompts, its ids).
    The word: `token`, else the file's stem (A1111), or for `learned_embeds.*` the token in the file."""
    vectors, stored = read_embedding(path)
    stem = Path(path).stem
    name = token or (stored if stem == DIFFUSERS_NAME and stored else stem)
    return name, add_embedding(pipe, name, vectors, source=str(path))


def embedding_files(folder):
    """An embeddings folder (searched recursively, as A1111 does) -> {name: [paths]} of its
    .pt/.bin/.safetensors files, the name being the file's stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"embeddings folder {folder} does not exist or is not a folder")
    root, found = folder.resolve(), {}
    for path in sorted(folder.rglob("*")):          # a link out of the folder does not count
        if path.suffix.lower() in SUFFIXES and path.is_file() and path.stat().st_size > 0 \
                and path.resolve().is_relative_to(root):
            found.setdefault(path.stem, []).append(path)
    return found


def load_used_embeddings(pipe, folder, texts):
    """Load the embeddings of `folder` whose names occur in any of `texts` (prompts and negative
    prompts, A1111 syntax allowed) -> the names loaded now. A name occurs where its tokens appear in
    a piece of the prompt (prompts.parse_attention), which is where A1111 looks for it; embeddings
    already loaded are skipped, unused files are never read."""
    tok = pipe.tokenizer
    occurs = _occurs_in(tok, texts)
    loaded = []
    for name, paths in embedding_files(folder).items():
        if name in tok.added_words or not occurs(name):
            continue
        if len(paths) > 1:
            raise InputError(f"{len(paths)} embedding files are named {name!r} ({', '.join(map(str, paths))}); "
                             "keep one, or rename one")
        load_embedding(pipe, paths[0], token=name)
        loaded.append(name)
    return loaded


def used_embeddings(pipe, texts):
    """The names of the embeddings already added to `pipe` that occur in any of `texts` (matched as
    load_used_embeddings matches them), in the order they were added."""
    occurs = _occurs_in(pipe.tokenizer, texts)
    return [name for name in pipe.tokenizer.added_words if occurs(name)]


# --- helpers --------------------------------------------------------------------------------------

def _occurs_in(tok, texts):
    """-> occurs(name): whether the tokens of `name` appear in a piece of one of `texts`."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    pieces = [piece for text in texts for piece, _ in prompts.parse_attention(text)]
    piece_ids = [tuple(ids) for ids in tok.encode(pieces)] if pieces else []

    def occurs(name):
        word = tuple(tok.encode(name)[0])
        return bool(word) and any(_contains(ids, word) for ids in piece_ids)
    return occurs


def _vectors(path, v):
    """[W] or [n, W] -> float32 [n, W], with a clear error for anything else."""
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise InputError(f"{path}: an embedding is [vectors, width], got shape {list(v.shape)}")
    if not np.isfinite(v).all():
        raise InputError(f"{path}: the embedding has non-finite values; the file is corrupt")
    return v


def _refuse_sdxl(path, names, shape_of):
    if "clip_l" in names and "clip_g" in names:
        raise InputError(f"{path} is an SDXL embedding (clip_l {list(shape_of('clip_l'))}, clip_g "
                         f"{list(shape_of('clip_g'))}: {shape_of('clip_l')[-1]} + {shape_of('clip_g')[-1]} wide); "
                         "it needs an SDXL model, not SD v1.x")


def _token_embedding(params):
    """The dict that holds the text encoder's token-embedding table ("weight" [V, W])."""
    text = params.get("text_encoder") if isinstance(params, dict) else None
    if isinstance(text, dict) and "text_model" in text and "embeddings" not in text:
        text = text["text_model"]                  # transformers 4.x names
    try:
        return text["embeddings"]["token_embedding"]
    except (KeyError, TypeError):
        raise InputError("the pipeline has no text encoder token-embedding table "
                         "(params['text_encoder']['embeddings']['token_embedding']['weight'])") from None


def _contains(seq, sub):
    n = len(sub)
    return any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))
