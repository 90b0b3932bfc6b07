"""Fuzzing the checkpoint readers (tests/test_reliability.py): mutated `.safetensors` headers and `.ckpt` pickles.

Property: whatever the bytes, `SafetensorsFile`, `CkptFile` and `npsd.load` either work or raise
npsd.errors.CheckpointError - never another exception type, never a crash, never a hang, and a
mutated pickle never runs anything (a marker file that an inserted `os.system` / `builtins.exec`
call would create must never appear).

Each example is a valid tiny file with one to three mutations:
- safetensors: header JSON edits (dtype, shape, data_offsets replaced by other names, negative /
  huge / non-integer values, offsets moved onto another tensor, past the end, negative; entries and
  fields removed or added; __metadata__ or the whole header replaced by arbitrary JSON), the 8-byte
  header length replaced (0, 1, absurd sizes up to 2**64 - 1), random byte flips, truncation,
  inserted bytes;
- ckpt (torch.save zip): data.pkl with random byte flips, random opcodes inserted at opcode
  boundaries, opcodes removed, a GLOBAL replaced by a disallowed name (os.system, builtins.eval,
  subprocess.Popen, ...: must be refused by name), a live `os.system("touch MARKER")` /
  `builtins.exec(...)` call inserted, zip records removed or cut short, the whole file's bytes flipped
  or truncated;
- npsd.load on a tiny but complete SD-shaped checkpoint (original layout, 968 tensors): header edits
  (shapes, dtypes, renamed / removed / duplicated tensors, npsd_config metadata), and the same file as
  a .ckpt with pickle mutations.

Reproducible: `derandomize=True` (the same examples on every run) and no example database. The
per-example limits: hypothesis' deadline (5 s, generous for a busy 2-core machine; a typical example
takes 1-60 ms) and a hard 20 s SIGALRM limit that turns a hang into a failure instead of a stuck CI.
`pytest -s tests/test_fuzz.py` prints the number of examples per target and how many were refused.
"""

import collections
import contextlib
import datetime
import io
import json
import os
import pickletools
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npsd
from npsd.ckpt import CkptFile
from npsd.errors import CheckpointError
from npsd.safetensors_io import DTYPES, SafetensorsFile

WORK = tempfile.mkdtemp(prefix="npsd-fuzz-")
MARKER = os.path.join(WORK, "pwned")          # an inserted os.system/exec call would create it
COUNTS = collections.Counter()                # (target, outcome) -> examples


def fuzz_settings(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=datetime.timedelta(seconds=5),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no reader can swallow it."""


@contextlib.contextmanager
def time_limit(seconds=20):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def only_checkpoint_errors(target, fn, path):
    """Run fn(path); success and CheckpointError are fine, anything else fails the example."""
    with time_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(path)
            COUNTS[target, "accepted"] += 1
        except CheckpointError as e:
            assert "\n" not in str(e), f"error message is not one line: {e!r}"
            COUNTS[target, "refused"] += 1
        except BaseException:                       # keep the offending file for a regression test
            kept = os.path.join(tempfile.gettempdir(), "npsd-fuzz-failure-" + os.path.basename(path))
            shutil.copy(path, kept)
            print(f"\nfuzz: the failing file is kept as {kept}", file=sys.stderr)
            raise
    assert not os.path.exists(MARKER), "a mutated file ran code"


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(COUNTS.values())
    lines = [f"  {t}: {COUNTS[t, 'accepted'] + COUNTS[t, 'refused']} examples, {COUNTS[t, 'refused']} refused"
             for t in sorted({t for t, _ in COUNTS})]
    print(f"\nfuzz examples: {total}\n" + "\n".join(lines), file=sys.stderr)
    shutil.rmtree(WORK, ignore_errors=True)


def write(name, data):
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# --- safetensors ----------------------------------------------------------------------------------

def st_bytes(header, data):
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def small_safetensors():
    """({name: entry}, data bytes): a handful of small tensors of several dtypes, one empty."""
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((4, 4)).astype(np.float16),
              "b.bias": rng.standard_normal(3).astype(np.float32),
              "c.bf16": rng.integers(0, 2**16, (2, 3)).astype(np.uint16),
              "d.ids": np.arange(5, dtype=np.int64)[None],
              "e.scalar": np.array(0.5, np.float32),
              "f.empty": np.zeros((0, 4), np.float16),
              "g.mask": np.array([True, False, True])}
    codes = {"float16": "F16", "float32": "F32", "uint16": "BF16", "int64": "I64", "bool": "BOOL"}
    header, data = {}, b""
    for k, a in arrays.items():
        header[k] = {"dtype": codes[str(a.dtype)], "shape": list(a.shape), "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    header["__metadata__"] = {"format": "pt"}
    return header, data


ST_HEADER, ST_DATA = small_safetensors()
ST_NAMES = [k for k in ST_HEADER if k != "__metadata__"]


def read_safetensors(path):
    with SafetensorsFile(path) as f:
        for name in f.tensors:
            f.read(name, np.float32)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
sizes = st.sampled_from([-2**63, -1, 0, 1, 2, 3, 7, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**64 + 5]) | st.integers(-4, 40)
offsets = st.sampled_from([-1, 0, 1, 8, len(ST_DATA) - 1, len(ST_DATA), len(ST_DATA) + 1, 2**63, 2**64]) | st.integers(-8, 120)
dtypes = st.sampled_from(list(DTYPES) + ["F8_E4M3", "U16", "U64", "C64", "f16", "", "OBJ"])

header_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(ST_NAMES), st.just("dtype"), dtypes | json_values),
    st.tuples(st.just("set"), st.sampled_from(ST_NAMES), st.just("shape"), st.lists(sizes, max_size=4) | json_values),
    st.tuples(st.just("set"), st.sampled_from(ST_NAMES), st.just("data_offsets"),
              st.lists(offsets, min_size=2, max_size=2) | st.lists(offsets, max_size=3) | json_values),
    st.tuples(st.just("del"), st.sampled_from(ST_NAMES), st.sampled_from(["dtype", "shape", "data_offsets", None])),
    st.tuples(st.just("overlap"), st.sampled_from(ST_NAMES), st.sampled_from(ST_NAMES), st.integers(-4, 4)),
    st.tuples(st.just("entry"), st.text(max_size=6), json_values),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("whole"), json_values),
)


def apply_header_edit(header, edit):
    kind = edit[0]
    if not isinstance(header, dict):
        return header
    if kind == "set":
        _, name, field, value = edit
        if isinstance(header.get(name), dict):
            header[name][field] = value
    elif kind == "del":
        _, name, field = edit
        if field is None:
            header.pop(name, None)
        elif isinstance(header.get(name), dict):
            header[name].pop(field, None)
    elif kind == "overlap":                       # tensor a's bytes moved onto b's (+ shift)
        _, a, b, shift = edit
        try:
            size = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
            begin = header[b]["data_offsets"][0] + shift
            header[a]["data_offsets"] = [begin, begin + size]
        except (KeyError, TypeError, IndexError):    # an earlier edit broke one of them: nothing to move
            pass
    elif kind == "entry":
        header[edit[1]] = edit[2]
    elif kind == "metadata":
        header["__metadata__"] = edit[1]
    elif kind == "whole":
        return edit[1]
    return header


@fuzz_settings(1200)
@given(st.lists(header_edits, min_size=1, max_size=3))
def test_safetensors_header_edits(edits):
    header = json.loads(json.dumps(ST_HEADER))
    for e in edits:
        header = apply_header_edit(header, e)
    path = write("h.safetensors", st_bytes(header, ST_DATA))
    only_checkpoint_errors("safetensors header edits", read_safetensors, path)


VALID_ST = st_bytes(ST_HEADER, ST_DATA)

byte_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID_ST) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID_ST) - 1)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID_ST)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 2, 9, len(VALID_ST) - 8, len(VALID_ST) - 7, 10**8 + 1,
                                                  2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)),
)


def apply_byte_edit(data, edit):
    kind = edit[0]
    if kind == "flip":
        _, pos, x = edit
        if pos < len(data):
            data = data[:pos] + bytes([data[pos] ^ x]) + data[pos + 1:]
    elif kind == "cut":
        data = data[:edit[1]]
    elif kind == "insert":
        data = data[:edit[1]] + edit[2] + data[edit[1]:]
    elif kind == "length":
        data = edit[1].to_bytes(8, "little") + data[8:]
    return data


@fuzz_settings(800)
@given(st.lists(byte_edits, min_size=1, max_size=3))
def test_safetensors_byte_mutations(edits):
    data = VALID_ST
    for e in edits:
        data = apply_byte_edit(data, e)
    path = write("b.safetensors", data)
    only_checkpoint_errors("safetensors byte mutations", read_safetensors, path)
    only_checkpoint_errors("safetensors byte mutations (open_weights)", open_and_close, path)


def open_and_close(path):
    """npsd.loading.open_weights: the format sniffing in front of both readers."""
    npsd.loading.open_weights(path).close()


# --- ckpt ------------------------------------------------------------------------------------------

def small_ckpt():
    """A torch.save zip of a handful of tensors with real training state (numpy scalars, a
    pytorch_lightning callback, protocol-2 bytes): -> {record name: bytes} in zip order."""
    from tests.test_ckpt import small_state, write_ckpt
    path = os.path.join(WORK, "base.ckpt")
    write_ckpt(path, small_state())
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def zip_bytes(records):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:           # stored, like torch.save
        for name, data in records.items():
            z.writestr(name, data)
    return buf.getvalue()


def read_ckpt(path):
    with CkptFile(path) as ck:
        for name in ck.tensors:
            ck.read(name, np.float32)


def opcode_positions(data):
    """[(position, opcode name, argument)] of a pickle, then the end position."""
    ops = [(pos, op.name, arg) for op, arg, pos in pickletools.genops(data)]
    return ops


@pytest.fixture(scope="module")
def ck_records():
    return Quiet(small_ckpt())


def pkl_name(records):
    return next(n for n in records if n.endswith("/data.pkl"))


DISALLOWED = [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"),
              ("posix", "system"), ("builtins", "getattr"), ("builtins", "__import__"), ("torch", "load"),
              ("numpy", "load"), ("pickle", "loads"), ("__builtin__", "open"), ("torch._utils", "_rebuild_qtensor"),
              ("collections", "defaultdict"), ("numpy.testing", "assert_equal"), ("shutil", "rmtree")]


def evil_call(kind):
    """A complete protocol-2 call that would create MARKER, to be inserted at an opcode boundary."""
    def text(s):
        b = s.encode()
        return b"X" + len(b).to_bytes(4, "little") + b             # BINUNICODE
    if kind == "os.system":
        call = b"cos\nsystem\n" + text(f"touch {MARKER}")
    elif kind == "posix.system":
        call = b"cposix\nsystem\n" + text(f"touch {MARKER}")
    else:
        call = b"cbuiltins\nexec\n" + text(f"open({MARKER!r}, 'w').close()")
    return call + b"\x85R0"                                          # TUPLE1, REDUCE, POP


pickle_edits = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("insert_op"), st.floats(0, 1, exclude_max=True),
              st.sampled_from([o.code.encode("latin-1") for o in pickletools.opcodes]), st.binary(max_size=9)),
    st.tuples(st.just("remove_op"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("evil"), st.floats(0, 1, exclude_max=True), st.sampled_from(["os.system", "posix.system", "exec"])),
)


def apply_pickle_edit(data, edit):
    ops = opcode_positions(data) if edit[0] in ("insert_op", "remove_op", "evil") else None
    kind = edit[0]
    if kind == "flip":
        _, where, x = edit
        pos = int(where * len(data))
        return data[:pos] + bytes([data[pos] ^ x]) + data[pos + 1:]
    i = int(edit[1] * len(ops))
    pos = ops[i][0]
    if kind == "insert_op":
        return data[:pos] + edit[2] + edit[3] + data[pos:]
    if kind == "remove_op":
        end = ops[i + 1][0] if i + 1 < len(ops) else len(data)
        return data[:pos] + data[end:]
    return data[:pos] + evil_call(edit[2]) + data[pos:]


def mutate_pickle(records, edits):
    """Apply the edits to the pickle record of a torch zip's {record: bytes}, in place."""
    name = pkl_name(records)
    data = records[name]
    for e in edits:
        try:
            data = apply_pickle_edit(data, e)
        except (ValueError, IndexError):        # pickletools cannot walk an already-broken pickle: flip instead
            data = apply_pickle_edit(data, ("flip", 0.5, 0x55))
    records[name] = data


@fuzz_settings(1500)
@given(edits=st.lists(pickle_edits, min_size=1, max_size=3))
def test_ckpt_pickle_mutations(ck_records, edits):
    records = dict(ck_records)
    mutate_pickle(records, edits)
    path = write("p.ckpt", zip_bytes(records))
    only_checkpoint_errors("ckpt pickle mutations", read_ckpt, path)


@fuzz_settings(300)
@given(where=st.floats(0, 1, exclude_max=True), name=st.sampled_from(DISALLOWED))
def test_ckpt_disallowed_global_is_refused_by_name(ck_records, where, name):
    """Any GLOBAL of the pickle replaced by a name outside the allow-list: refused, naming it."""
    records = dict(ck_records)
    pkl = pkl_name(records)
    data = records[pkl]
    ops = opcode_positions(data)
    globals_ = [(pos, k) for k, (pos, op, arg) in enumerate(ops) if op == "GLOBAL"]
    pos, k = globals_[int(where * len(globals_))]
    end = ops[k + 1][0]
    records[pkl] = data[:pos] + b"c" + f"{name[0]}\n{name[1]}\n".encode() + data[end:]
    path = write("g.ckpt", zip_bytes(records))
    with time_limit(), pytest.raises(CheckpointError, match=rf"refusing to unpickle .*`{name[0]}\.{name[1]}`"):
        read_ckpt(path)
    COUNTS["ckpt disallowed GLOBAL", "refused"] += 1
    assert not os.path.exists(MARKER)


zip_edits = st.one_of(
    st.tuples(st.just("remove"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("cut_record"), st.floats(0, 1, exclude_max=True), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("cut_file"), st.floats(0, 1, exclude_max=True)),
)


@fuzz_settings(800)
@given(edits=st.lists(zip_edits, min_size=1, max_size=3))
def test_ckpt_zip_mutations(ck_records, edits):
    records = dict(ck_records)
    data = None
    for e in edits:
        names = list(records)
        if e[0] == "remove" and data is None and len(names) > 1:
            del records[names[int(e[1] * len(names))]]
        elif e[0] == "cut_record" and data is None:
            n = names[int(e[1] * len(names))]
            records[n] = records[n][: int(e[2] * len(records[n]))]
        else:
            data = zip_bytes(records) if data is None else data
            if not data:
                continue
            pos = int(e[1] * len(data))
            data = data[:pos] + bytes([data[pos] ^ e[2]]) + data[pos + 1:] if e[0] == "flip" else data[:pos]
    path = write("z.ckpt", zip_bytes(records) if data is None else data)
    only_checkpoint_errors("ckpt zip mutations", read_ckpt, path)


# --- npsd.load on a tiny complete checkpoint ---------------------------------------------------------

FULL = {}


@pytest.fixture(scope="module")
def full():
    """Built once, outside the timed examples (torch + diffusers imports take seconds)."""
    return Quiet(full_checkpoint())


class Quiet(dict):
    """A dict whose repr is short: hypothesis prints fixture values with a falsifying example."""

    def __repr__(self):
        return f"<{len(self)} entries>"


def full_checkpoint():
    """The tiny original-layout SD checkpoint of tests/test_loading.py (fp16, 968 tensors, 9 MB):
    (header, data bytes) of its .safetensors form and the records of its .ckpt form."""
    if not FULL:
        import torch
        from tests.test_loading import tiny_models, tiny_original_state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = tiny_original_state(*tiny_models())
        sd = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
        codes = {"float16": "F16", "int64": "I64", "int32": "I32"}
        header, chunks, off = {}, [], 0
        for k, a in sd.items():
            header[k] = {"dtype": codes[str(a.dtype)], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
            chunks.append(a.tobytes())
            off += a.nbytes
        FULL["header"], FULL["data"] = header, b"".join(chunks)
        path = os.path.join(WORK, "full.ckpt")
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 1}, path)
        with zipfile.ZipFile(path) as z:
            FULL["records"] = {i.filename: z.read(i) for i in z.infolist()}
        os.unlink(path)
        npsd.load(write("full-valid.safetensors", st_bytes(header, FULL["data"])))   # the base file loads
    return FULL


def full_edits():
    names = st.integers(0, 967)
    return st.one_of(
        st.tuples(st.just("shape"), names, st.lists(st.integers(0, 70), max_size=4) | st.lists(sizes, max_size=3)),
        st.tuples(st.just("dtype"), names, dtypes),
        st.tuples(st.just("remove"), names),
        st.tuples(st.just("rename"), names, st.sampled_from(["model.diffusion_model.x.", "first_stage_model.",
                                                               "cond_stage_model.transformer.", "model_ema.", "",
                                                               "conditioner.embedders.0.", "cond_stage_model.model."])),
        st.tuples(st.just("duplicate"), names, names),
        st.tuples(st.just("metadata"), json_values.map(json.dumps) | st.text(max_size=20)),
    )


def apply_full_edit(header, edit):
    names = [k for k in header if k != "__metadata__"]
    kind = edit[0]
    if kind == "metadata":
        header["__metadata__"] = {"npsd_config": edit[1]}
        return
    name = names[edit[1] % len(names)]
    if kind == "shape":
        header[name]["shape"] = edit[2]
        n = int(np.prod(edit[2], dtype=object)) if edit[2] else 1
        b = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [b, b + n * 2]                    # consistent with fp16 when small
    elif kind == "dtype":
        header[name]["dtype"] = edit[2]
    elif kind == "remove":
        del header[name]
    elif kind == "rename":
        header[edit[2] + name.split(".", 1)[-1]] = header.pop(name)
    elif kind == "duplicate":
        other = names[edit[2] % len(names)]
        header[name] = dict(header[other])


def load(path):
    npsd.load(path)


@fuzz_settings(250)
@given(edits=st.lists(full_edits(), min_size=1, max_size=3))
def test_load_full_checkpoint_header_edits(full, edits):
    header = json.loads(json.dumps(full["header"]))
    for e in edits:
        apply_full_edit(header, e)
    path = write("full.safetensors", st_bytes(header, full["data"]))
    only_checkpoint_errors("npsd.load safetensors edits", load, path)


@fuzz_settings(150)
@given(edits=st.lists(pickle_edits, min_size=1, max_size=2))
def test_load_full_checkpoint_pickle_mutations(full, edits):
    records = dict(full["records"])
    mutate_pickle(records, edits)
    path = write("full.ckpt", zip_bytes(records))
    only_checkpoint_errors("npsd.load ckpt pickle mutations", load, path)


# --- LoRA and textual-inversion files: the same readers, the same fuzzing --------------------------
# A mutated LoRA may load (a flipped bit in a weight) or be refused with one line (CheckpointError for
# a broken file, InputError for a file that reads but does not fit the model); it never raises anything
# else, never runs code, and a refused LoRA leaves the model's weights exactly as they were.

@pytest.fixture(scope="module")
def builtin_pipe():
    return npsd.load()


def lora_bytes(pipe):
    """A kohya LoRA for the built-in model on one UNet projection and one text-encoder projection."""
    from safetensors.numpy import save
    from npsd.params import flatten
    rng = np.random.default_rng(0)
    q = flatten(pipe.params["unet"])["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    k = flatten(pipe.params["text_encoder"])["encoder.layers.0.self_attn.k_proj.weight"]
    tensors = {}
    for name, (out_f, in_f) in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", q.shape),
                                ("lora_te_text_model_encoder_layers_0_self_attn_k_proj", k.shape)):
        tensors[name + ".lora_down.weight"] = rng.standard_normal((2, in_f)).astype(np.float16)
        tensors[name + ".lora_up.weight"] = rng.standard_normal((out_f, 2)).astype(np.float16)
        tensors[name + ".alpha"] = np.array(1.0, np.float16)
    return save(tensors)


def refused_cleanly(target, fn, path, state=None):
    """fn(path) works, or raises a one-line CheckpointError/InputError; `state()` is unchanged after a refusal."""
    from npsd.errors import InputError
    before = state() if state else None
    with time_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(path)
            COUNTS[target, "accepted"] += 1
        except (CheckpointError, InputError) as e:
            assert "\n" not in str(e), f"error message is not one line: {e!r}"
            COUNTS[target, "refused"] += 1
            if state:
                after = state()
                assert before.keys() == after.keys() and all(before[k] is after[k] for k in before), \
                    "a refused LoRA changed the model's weights"
    assert not os.path.exists(MARKER), "a mutated file ran code"


def weight_arrays(pipe):
    from npsd.params import flatten
    return {(c, k): v for c in ("unet", "text_encoder") for k, v in flatten(pipe.params[c]).items()}


@fuzz_settings(300)
@given(edits=st.lists(byte_edits, min_size=1, max_size=3))
def test_lora_byte_mutations(builtin_pipe, edits):
    data = lora_bytes(builtin_pipe)
    for e in edits:
        data = apply_byte_edit(data, e)
    path = write("lora.safetensors", data)

    def load_and_unload(p):
        builtin_pipe.load_lora(p, 0.7, name="fuzz")
        builtin_pipe.unload_lora("fuzz")
    refused_cleanly("LoRA byte mutations", load_and_unload, path, lambda: weight_arrays(builtin_pipe))


@fuzz_settings(300)
@given(edits=st.lists(pickle_edits, min_size=1, max_size=3))
def test_embedding_pt_pickle_mutations(edits):
    """An A1111 .pt embedding (string_to_param) whose pickle is mutated: read or refused, never run."""
    import torch
    from npsd.embeddings import read_embedding
    base = os.path.join(WORK, "emb-base.pt")
    if not os.path.exists(base):
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.arange(16.0).reshape(2, 8) / 7}, "name": "x",
                    "step": 10}, base)
    with zipfile.ZipFile(base) as z:
        records = {n: z.read(n) for n in z.namelist()}
    mutate_pickle(records, edits)
    refused_cleanly("embedding .pt pickle mutations", read_embedding, write("emb.pt", zip_bytes(records)))
