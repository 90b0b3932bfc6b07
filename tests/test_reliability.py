"""Reliability, case by case: bad input, malicious files and faults give a clear one-line error,
nothing is executed, nothing is lost. Each case is tested here or in the file named below; the
CLI cases run `npsd.cli.main([...])` in-process and check the exit code and that stderr is one line
without a traceback (tests/test_fuzz.py fuzzes the readers).

| case                                            | tests                                                         |
| ----------------------------------------------- | ------------------------------------------------------------- |
| missing path                                    | test_loading::test_missing_path_and_not_a_checkpoint, test_cli_checkpoint_errors |
| folder that is not a diffusers layout           | test_folders_that_are_not_diffusers_layouts, test_cli_checkpoint_errors |
| file that is not a checkpoint                   | test_loading::test_missing_path_and_not_a_checkpoint, test_cli_checkpoint_errors |
| truncated .safetensors                          | test_ckpt::test_truncated_and_corrupt_safetensors, test_safetensors_header_cases, CLI |
| header not JSON / overlapping offsets / past the end / disagreeing with shapes / absurd length | test_safetensors_header_cases, test_refused_safetensors_files_are_closed, test_damaged_shapes_do_not_crash_the_architecture_check, test_cli_checkpoint_errors, fuzz |
| .ckpt zip with a missing record                 | test_ckpt_missing_records, test_cli_checkpoint_errors, fuzz   |
| damaged pickles (fuzz findings, fixed examples) | test_fuzz_regressions_in_the_ckpt_reader, test_zip_bombs_are_refused_before_inflating |
| pickle global outside the allow-list (marker)   | test_ckpt::test_malicious_pickle_is_refused_and_never_runs, test_cli_malicious_pickles_never_run, fuzz |
| legacy non-zip torch format                     | test_ckpt::test_truncated_corrupt_and_legacy_files, test_cli_checkpoint_errors |
| SDXL files (named); incomplete SD 2.x files     | test_loading::test_other_architectures_are_named, test_cli_checkpoint_errors |
| missing keys, wrong shapes, unexpected keys     | test_loading::test_missing_mismatched_and_unexpected_keys, test_cli_checkpoint_errors, test_cli_unexpected_keys_warn_in_one_line |
| parameters (size, steps, strength, guidance, sampler, seeds, prompt types) | test_pipelines::test_bad_arguments, test_cli::test_error_cases_are_one_line, test_prompts_that_are_not_strings, test_cli_parameter_errors |
| prompt over 77 tokens (count of dropped tokens) | test_tokenizer::test_truncation_warns_with_the_count, test_cli::test_long_prompts_warn_or_chunk |
| unreadable images (incl. decompression bombs)   | test_unreadable_images, test_huge_images_are_refused, test_cli_image_cases, test_cli::test_error_cases_are_one_line |
| grayscale/RGBA/palette/16-bit (converted)       | test_image_modes_are_converted, test_cli_image_cases          |
| mask of another size (resized, note)            | test_mask_notes, test_cli_image_cases                         |
| all-black / all-white / non-binary mask         | test_mask_notes, test_cli_image_cases                         |
| estimated peak memory > available: refused      | test_memory_estimate_matches_the_measurements, test_request_too_large_is_refused_before_any_work, test_available_memory_is_read_from_proc_meminfo, test_cli_request_too_large |
| NaN / inf in the latents: stop with the step    | test_cli::test_nan_latents_stop_with_the_step, test_inf_latents_stop_with_the_step |
| NaN in a LoRA, or in the text encoder's output  | test_lora::test_errors_are_one_line_and_name_the_problem, test_nan_weights_name_the_text_encoder |
| no partial file (temporary file + rename)       | test_cli::test_interrupted_write_leaves_no_partial_file, test_failed_write_keeps_the_old_file |
| Ctrl-C: no file, exit 130                       | test_cli::test_ctrl_c_in_process_leaves_nothing_and_exits_130, test_cli::test_sigint_in_a_subprocess_exits_130_and_leaves_no_file |
| existing file not overwritten unless asked      | test_cli::test_existing_output_is_refused_before_any_work     |
| determinism (byte-identical PNGs)               | test_cli::test_same_seed_gives_byte_identical_pngs, test_cli::test_subprocess_matches_in_process_bytes, test_stochastic_samplers_are_byte_identical_across_runs |
| fuzzing                                         | tests/test_fuzz.py                                            |
"""

import io
import json
import os
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import npsd
from npsd import cli, resources
from npsd.ckpt import CkptFile
from npsd.errors import CheckpointError, InputError, NpsdError
from npsd.images import mask_to_array, open_image
from npsd.safetensors_io import SafetensorsFile
from tests.helpers import perturb_

PROMPT = "a red circle on a blue background"
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--seed", "1"]   # the tiny model's smallest size


# --- a tiny but complete SD v1.x checkpoint in the original single-file layout -----------------------

def st_file(path, header, data):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)
    return str(path)


def st_parts(sd):
    """{name: array} -> (header, data) of a .safetensors file."""
    codes = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}
    header, chunks, off = {}, [], 0
    for k, a in sd.items():
        header[k] = {"dtype": codes[str(a.dtype)], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        chunks.append(np.ascontiguousarray(a).tobytes())
        off += a.nbytes
    return header, b"".join(chunks)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tests/test_loading.py's tiny 4-level UNet/VAE in the original layout, with a CLIP of the real
    vocabulary (49408) so the CLI can generate 64x64 images with it; fp16 .safetensors and a .ckpt."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.test_loading import TINY_CLIP, tiny_models, tiny_original_state
    unet, vae, _ = tiny_models()
    torch.manual_seed(4)
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": 49408})).eval(), seed=4)
    sd = tiny_original_state(unet, vae, clip)
    sd = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
    folder = tmp_path_factory.mktemp("tiny")
    header, data = st_parts(sd)
    path = st_file(folder / "tiny.safetensors", header, data)
    ckpt = folder / "tiny.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 7}, ckpt)
    return {"sd": sd, "header": header, "data": data, "safetensors": path, "ckpt": str(ckpt), "folder": folder}


def run(args, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_error(args, capsys, code=2, phrase=""):
    """The CLI refuses with exactly one line on stderr (no traceback), nothing on stdout."""
    rc, out, err = run(args, capsys)
    assert (rc, out) == (code, ""), (args, rc, err)
    assert err.count("\n") == 1 and err.startswith("npsd: error: ") and "Traceback" not in err, (args, err)
    assert phrase in err, (args, phrase, err)
    return err


def image(path, mode="RGB", size=64, bits16=False):
    rng = np.random.default_rng(1)
    a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(a).convert(mode)
    if bits16:
        img = Image.fromarray((rng.random((size, size)) * 65535).astype(np.uint16))   # mode I;16
    img.save(path)
    return str(path)


def mask(path, value=None, size=64, soft=False):
    m = np.zeros((size, size), np.uint8)
    m[size // 4: size // 2, size // 4: 3 * size // 4] = 255
    if value is not None:
        m[:] = value
    if soft:
        m[:, : size // 2] = 128
    Image.fromarray(m, "L").save(path)
    return str(path)


# --- checkpoints ---------------------------------------------------------------------------------------

def test_folders_that_are_not_diffusers_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no unet/ folder; a diffusers SD v1.x folder has unet/, vae/, text_encoder/"):
        npsd.load(tmp_path / "empty")
    photos = tmp_path / "photos"
    photos.mkdir()
    image(photos / "cat.png")
    with pytest.raises(CheckpointError, match="has no unet/ folder"):
        npsd.load(photos)
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    (half / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet.config\.json is not valid JSON"):
        npsd.load(half)
    (half / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        npsd.load(half)
    (half / "unet" / "config.json").write_text('{"addition_embed_type": "text_time"}')  # SDXL's UNet
    with pytest.raises(CheckpointError, match=r"this looks like SDXL \(unet/config.json has addition_embed_type\)"):
        npsd.load(half)


def test_safetensors_header_cases(tiny, tmp_path):
    """Every header defect in the table above, on the real tiny checkpoint's header, through npsd.load."""
    h, data = tiny["header"], tiny["data"]
    names = list(h)
    a, b = names[0], names[1]

    def edited(changes):
        new = json.loads(json.dumps(h))
        new.update(changes)
        return new

    cases = {
        "overlap": (edited({b: {**h[b], "data_offsets": [h[a]["data_offsets"][0] + 2, h[a]["data_offsets"][0] + 2 + h[b]["data_offsets"][1] - h[b]["data_offsets"][0]]}}),
                    "overlap in the file"),
        "past the end": (edited({a: {**h[a], "data_offsets": [len(data) - 2, len(data) - 2 + h[a]["data_offsets"][1]]}}),
                         "is truncated: tensor"),
        "shape disagrees": (edited({a: {**h[a], "shape": [3, 4, 3, 3]}}), "does not fit its shape"),
        "negative offset": (edited({a: {**h[a], "data_offsets": [-8, h[a]["data_offsets"][1] - 8]}}), "does not fit its shape"),
        "negative sizes": (edited({a: {**h[a], "shape": [-32, -4, 3, 3]}}), "malformed shape or offsets"),
        "bool size": (edited({a: {**h[a], "shape": [True, 4, 3, 3]}}), "malformed shape or offsets"),
        "empty but absurd": (edited({"z.empty": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}),
                             "has an absurd shape"),                       # found by tests/test_fuzz.py
        "unknown dtype": (edited({a: {**h[a], "dtype": "F8_E4M3"}}), "F8_E4M3"),
        "not an object": ([1, 2, 3], "not a valid .safetensors file (bad header)"),   # open_weights sniffs '{'
        "not an object either": ({"a": 1, "b": []}, "malformed header entry for 'a'"),
        "metadata not strings": (edited({"__metadata__": {"npsd_config": {"nested": 1}}}), "__metadata__ is not a map of strings"),
        "name with a newline": (edited({"x\ny": {"dtype": "F16"}}), "'x\\ny'"),
    }
    for what, (header, phrase) in cases.items():
        p = st_file(tmp_path / "x.safetensors", header, data)
        with pytest.raises(CheckpointError, match=re.escape(phrase)) as e:
            npsd.load(p)
        assert "\n" not in str(e.value), what
    with pytest.raises(CheckpointError, match="the .safetensors header is not a JSON object"):
        SafetensorsFile(st_file(tmp_path / "list.safetensors", [1, 2, 3], data))
    raw = open(tiny["safetensors"], "rb").read()
    for n in (0, 1, 10**8 + 1, 2**63, 2**64 - 1, len(raw)):           # absurd header lengths
        p = tmp_path / "len.safetensors"
        p.write_bytes(n.to_bytes(8, "little") + raw[8:])
        with pytest.raises(CheckpointError, match="bad header length|not a checkpoint|not valid JSON"):
            SafetensorsFile(p)
        with pytest.raises(CheckpointError):
            npsd.load(p)
    p = tmp_path / "json.safetensors"
    p.write_bytes(raw[:8] + b"[" * (len(json.dumps(h))) + raw[8 + len(json.dumps(h)):])   # deep nesting
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(p)


def test_refused_safetensors_files_are_closed(tmp_path):
    p = st_file(tmp_path / "x.safetensors", {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 9]}}, b"\0" * 4)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CheckpointError):
            SafetensorsFile(p)
    assert len(os.listdir("/proc/self/fd")) == before


def test_ckpt_missing_records(tiny, tmp_path):
    with zipfile.ZipFile(tiny["ckpt"]) as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    top = next(n for n in records if n.endswith("/data.pkl"))[: -len("data.pkl")]

    def without(name):
        p = tmp_path / f"without-{name.replace('/', '_')}.ckpt"
        with zipfile.ZipFile(p, "w") as z:
            for n, data in records.items():
                if n != name:
                    z.writestr(n, data)
        return p

    storage = sorted(n for n in records if n.startswith(top + "data/"))[3]
    with pytest.raises(CheckpointError, match=rf"storage record {storage} is missing; the file is corrupt"):
        npsd.load(without(storage))
    with pytest.raises(CheckpointError, match=r"a zip file but not a torch checkpoint \(no <folder>/data.pkl\)"):
        npsd.load(without(top + "data.pkl"))
    npsd.load(without(top + "byteorder"))                 # optional: older files have none
    p = tmp_path / "cut.ckpt"                               # a record cut short inside a valid zip
    with zipfile.ZipFile(p, "w") as z:
        for n, data in records.items():
            z.writestr(n, data[: len(data) // 2] if n == storage else data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        npsd.load(p)


def pickled_zip(path, pickle_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
    return path


def test_fuzz_regressions_in_the_ckpt_reader(tmp_path):
    """What tests/test_fuzz.py found or what the fixes guard against, as fixed examples."""
    # LONG_BINPUT with a huge memo index: CPython's C unpickler grows its memo array to the index
    # (1175087203 -> 18 GB of zeros: a hang, then MemoryError). Found by the fuzzer.
    p = pickled_zip(tmp_path / "memo.ckpt", b"\x80\x02}r" + (1175087203).to_bytes(4, "little") + b".")
    with pytest.raises(CheckpointError, match="memo index 1175087203 in a pickle of 9 bytes"):
        CkptFile(p)
    # BYTEARRAY8 claiming 2**40 bytes: the C unpickler allocates the claimed size before reading
    p = pickled_zip(tmp_path / "ba.ckpt", b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"xx.")
    with pytest.raises(CheckpointError, match="pickle is corrupt"):
        CkptFile(p)
    # a tensor whose stride 0 repeats one element 10**12 times (np.array would allocate terabytes)
    # _rebuild_tensor_v2(persistent ("storage", FloatStorage, "0", "cpu", 4), offset 0, size, stride)
    rebuild = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
               b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00%s%stR.")
    big = b"(\x8a\x06\x00\x10\xa5\xd4\xe8\x00K\x01t"                 # size (10**12, 1)
    zero = b"(K\x00K\x00t"                                           # stride (0, 0)
    with zipfile.ZipFile(tmp_path / "rep.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}X\x01\x00\x00\x00w" + rebuild[2:-1].replace(b"%s%s", big + zero) + b"s.")
        z.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with CkptFile(tmp_path / "rep.ckpt") as ck:
        assert ck.tensors["w"].shape == (10**12, 1)
        with pytest.raises(CheckpointError, match="more elements than its storage"):
            ck.read("w")
    # a negative storage size, and a state dict whose keys are not strings
    neg = rebuild.replace(b"K\x04tQ", b"J\xff\xff\xff\xfftQ") % (b"(K\x02t", b"(K\x01t")
    with pytest.raises(CheckpointError, match="negative size"):
        CkptFile(pickled_zip(tmp_path / "neg.ckpt", b"\x80\x02}K\x01" + neg[2:-1] + b"s."))
    ok = rebuild % (b"(K\x02t", b"(K\x01t")
    with pytest.raises(CheckpointError, match="names that are not strings"):
        CkptFile(pickled_zip(tmp_path / "key.ckpt", b"\x80\x02}K\x01" + ok[2:-1] + b"s."))
    # deeply nested containers (RecursionError while unwrapping) are a corrupt pickle, not a crash
    deep = b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."
    with pytest.raises(CheckpointError, match="pickle is corrupt"):
        CkptFile(pickled_zip(tmp_path / "deep.ckpt", deep))


def test_damaged_shapes_do_not_crash_the_architecture_check(tiny, tmp_path):
    """Fuzz finding: an anchor tensor with a damaged shape made npsd.load raise IndexError."""
    h = json.loads(json.dumps(tiny["header"]))
    first = next(iter(h))                              # model.diffusion_model.input_blocks.0.0.weight
    begin = h[first]["data_offsets"][0]
    h[first] = {**h[first], "shape": [], "data_offsets": [begin, begin + 2]}        # one fp16 scalar
    with pytest.raises(CheckpointError, match="shapes npsd cannot interpret"):
        npsd.load(st_file(tmp_path / "x.safetensors", h, tiny["data"]))
    h = json.loads(json.dumps(tiny["header"]))
    h["__metadata__"] = {"npsd_config": "null"}
    with pytest.raises(CheckpointError, match="npsd_config is not a JSON object"):
        npsd.load(st_file(tmp_path / "y.safetensors", h, tiny["data"]))


def test_zip_bombs_are_refused_before_inflating(tmp_path):
    """A deflated data.pkl declaring 64 MB in a 64 kB file: refused from the zip directory, nothing inflated."""
    p = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w") as f:
            for _ in range(64):
                f.write(bytes(2**20))
    assert os.path.getsize(p) < 2**17
    with pytest.raises(CheckpointError, match="would expand to 67108864 bytes"):
        npsd.load(p)


def _sd2_sdxl_files(tmp_path):
    from tests.test_loading import write_safetensors
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    write_safetensors(sdxl, {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float16)})
    sd2 = tmp_path / "v2-1_768-ema-pruned.safetensors"
    write_safetensors(sd2, {"cond_stage_model.model.ln_final.weight": np.ones(8, np.float16)})
    return sdxl, sd2


def test_cli_checkpoint_errors(tiny, tmp_path, capsys):
    """Every checkpoint case through the CLI: exit 2, one line, no output file."""
    raw = open(tiny["safetensors"], "rb").read()
    h, data = tiny["header"], tiny["data"]
    names = list(h)
    files = {}

    def put(name, content):
        p = tmp_path / "in" / name
        p.parent.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            st_file(p, *content)
        files[name] = p
        return p

    put("notes.ckpt", b"these are my notes, not weights\n")
    put("truncated.safetensors", raw[: len(raw) * 2 // 3])
    put("notjson.safetensors", raw[:9] + b"<html>" + raw[15:])
    a, b = names[5], names[6]
    put("overlap.safetensors", ({**h, b: {**h[b], "data_offsets": [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1] - h[b]["data_offsets"][0]]}}, data))
    put("pastend.safetensors", ({**h, a: {**h[a], "data_offsets": [len(data), len(data) + h[a]["data_offsets"][1] - h[a]["data_offsets"][0]]}}, data))
    put("shape.safetensors", ({**h, a: {**h[a], "shape": h[a]["shape"] + [2]}}, data))
    put("absurd.safetensors", (2**62).to_bytes(8, "little") + raw[8:])
    # torch.save numbers storages in order of appearance: this one holds the first VAE tensor
    vae_key = next(i for i, k in enumerate(tiny["sd"]) if k.startswith("first_stage_model."))
    with zipfile.ZipFile(tiny["ckpt"]) as zin, zipfile.ZipFile(put("norecord.ckpt", b""), "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith(f"/data/{vae_key}"):
                zout.writestr(item, zin.read(item))
    legacy = put("legacy.ckpt", b"")
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    sdxl, sd2 = _sd2_sdxl_files(tmp_path / "in")
    missing = {k: v for k, v in tiny["sd"].items() if not k.startswith("first_stage_model.decoder.up.0.")}
    put("missing.safetensors", st_parts(missing))
    wrong = dict(tiny["sd"])
    wrong["first_stage_model.decoder.up.1.block.0.conv1.weight"] = np.zeros((32, 48, 3, 3), np.float16)
    put("wrongshape.safetensors", st_parts(wrong))
    (tmp_path / "in" / "folder").mkdir()
    cases = [
        (tmp_path / "nope.safetensors", "does not exist"),
        (tmp_path / "in" / "folder", "has no unet/ folder"),
        (files["notes.ckpt"], "is not a checkpoint npsd can read"),
        (files["truncated.safetensors"], "is truncated"),
        (files["notjson.safetensors"], "header is not valid JSON"),
        (files["overlap.safetensors"], "overlap in the file"),
        (files["pastend.safetensors"], "is truncated: tensor"),
        (files["shape.safetensors"], "does not fit its shape"),
        (files["absurd.safetensors"], "is not a valid .safetensors file"),
        (files["norecord.ckpt"], f"data/{vae_key} is missing; the file is corrupt"),
        (legacy, "legacy (pre-1.6, non-zip) torch format"),
        (sdxl, "looks like SDXL"),
        (sd2, "lacks the unet and vae weights"),           # SD 2.x loads; a text encoder alone does not
        (files["missing.safetensors"], "the vae weights lack"),
        (files["wrongshape.safetensors"], "shape mismatch in the vae weights"),
    ]
    out = tmp_path / "out.png"
    for model, phrase in cases:
        cli_error(["txt2img", PROMPT, "--model", model, "-o", out, "--quiet"] + SMALL, capsys, 2, phrase)
        cli_error(["txt2img", PROMPT, "--model", tiny["safetensors"], "--vae", model, "-o", out, "--quiet"] + SMALL,
                  capsys, 2, "")
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_cli_unexpected_keys_warn_in_one_line(tiny, tmp_path, capsys):
    extra = {**tiny["sd"], "model.diffusion_model.lora_up.weight": np.zeros(3, np.float16)}
    p = st_file(tmp_path / "extra.safetensors", *st_parts(extra))
    rc, out, err = run(["txt2img", PROMPT, "--model", p, "-o", tmp_path / "a.png", "--quiet"] + SMALL, capsys)
    assert rc == 0 and err.count("\n") == 1, err
    assert err.startswith("npsd: warning: ") and "ignoring 1 unexpected tensors: unet: lora_up.weight" in err


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "posix.system"])
def test_cli_malicious_pickles_never_run(tiny, tmp_path, capsys, payload):
    """A checkpoint whose pickle calls a disallowed global: refused by name, the marker never appears,
    and torch's own unpickler shows that the payload is live."""
    import builtins
    import posix
    import subprocess
    marker = tmp_path / "pwned"
    calls = {"os.system": (os.system, (f"touch {marker}",)), "posix.system": (posix.system, (f"touch {marker}",)),
             "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
             "builtins.exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
             "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],))}

    class Evil:
        def __reduce__(self):
            return calls[payload]

    # how a protocol-2 pickle (torch.save) spells them: a function's __module__, and Python 2 names
    named = {"os.system": "posix.system", "builtins.eval": "__builtin__.eval", "builtins.exec": "__builtin__.exec",
             "subprocess.Popen": "commands.Popen"}.get(payload, payload)
    evil = tmp_path / "evil.ckpt"
    sd = {k: torch.from_numpy(v) for k, v in list(tiny["sd"].items())[:3]}
    torch.save({"state_dict": sd, "callback": Evil()}, evil)
    for args in (["--model", evil], ["--model", tiny["safetensors"], "--vae", evil]):
        err = cli_error(["txt2img", PROMPT, *args, "-o", tmp_path / "o.png", "--quiet"] + SMALL, capsys, 2,
                        f"refusing to unpickle {evil}: it names `{named}`")
        assert "nothing from the file was run" in err
    assert not marker.exists() and not (tmp_path / "o.png").exists()
    torch.load(evil, weights_only=False)                   # the payload is live (so the check can fail)
    for _ in range(50):
        if marker.exists():
            break
        __import__("time").sleep(0.1)
    assert marker.exists()


# --- parameters --------------------------------------------------------------------------------------

def test_prompts_that_are_not_strings(tiny):
    pipe = npsd.load(tiny["safetensors"])
    kw = dict(height=64, width=64, num_inference_steps=1)
    for prompt in (None, 3, [], ["a", 2], b"bytes", {"a": 1}):
        with pytest.raises(InputError, match="prompt must be a string or a non-empty list of strings"):
            pipe.txt2img(prompt, **kw)
    with pytest.raises(InputError, match="negative_prompt must be a string"):
        pipe.txt2img(PROMPT, negative_prompt=5, **kw)
    with pytest.raises(InputError, match="2 negative prompts for 3 prompts"):
        pipe.txt2img(["a", "b", "c"], negative_prompt=["x", "y"], **kw)
    for n in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="num_images must be a whole number >= 1"):
            pipe.txt2img(PROMPT, num_images=n, **kw)
    with pytest.raises(InputError, match="unknown sampler 'k_lms'; use one of ddpm, ddim, euler, euler_a, heun, dpmpp_2m"):
        pipe.txt2img(PROMPT, sampler="k_lms", **kw)
    with pytest.raises(InputError, match="unknown sampler 'plms': npsd's name for it is 'pndm'; npsd's names are ddpm"):
        pipe.txt2img(PROMPT, sampler="plms", **kw)
    with pytest.raises(InputError, match="npsd's name for it is 'dpmpp_2m' with schedule_type='karras'"):
        pipe.txt2img(PROMPT, sampler="DPM++ 2M Karras", **kw)
    for h in (8, 56, 63, 0, -64, 64.0, "64"):
        with pytest.raises(InputError, match="height must be a multiple of 8 and at least 64"):
            pipe.txt2img(PROMPT, **{**kw, "height": h})
    for g in (-0.5, float("inf"), float("-inf"), float("nan"), "7"):
        with pytest.raises(InputError, match="guidance_scale must be a finite number >= 0"):
            pipe.txt2img(PROMPT, **kw, guidance_scale=g)
    for seed in (-1, 2**64, 1.5, "1"):
        with pytest.raises(InputError, match=r"seed must be a whole number in \[0, 2\*\*64\)"):
            pipe.txt2img(PROMPT, **kw, seed=seed)
    for eta in (1.5, -0.1, float("nan"), "1"):                            # refused before any work
        with pytest.raises(InputError, match=r"eta must be a number in \[0, 1\]"):
            pipe.txt2img(PROMPT, **kw, sampler="ddim", eta=eta)
    for phi in (1.5, -0.1, float("nan"), "0.7", True):                    # eq. 16 blends two predictions
        with pytest.raises(InputError, match=r"guidance_rescale must be a number in \[0, 1\]"):
            pipe.txt2img(PROMPT, **kw, guidance_rescale=phi)
    picture, everywhere = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), bool)
    flags = [("use_karras_sigmas", "no", "use_karras_sigmas must be True or False"),     # truthy strings were
             ("progress", "yes", "progress must be True or False"),                     # taken as True
             ("callback", 5, "callback must be a function"),
             ("attention_maps", 1, "attention_maps must be an npsd.attention_maps.AttentionMaps or None")]
    for name, value, phrase in flags:
        for call in (lambda **a: pipe.txt2img(PROMPT, **a), lambda **a: pipe.img2img(PROMPT, picture, **a),
                     lambda **a: pipe.inpaint(PROMPT, picture, everywhere, **a)):
            with pytest.raises(InputError, match=phrase):
                call(**kw, sampler="euler", **{name: value})
    for blur in (-1, 2.5, "3", True):
        with pytest.raises(InputError, match="mask_blur must be a whole number of pixels >= 0"):
            pipe.inpaint(PROMPT, picture, everywhere, **kw, mask_blur=blur)
    shape = (1, pipe.latent_channels, kw["height"] // pipe.vae_factor, kw["width"] // pipe.vae_factor)
    with pytest.raises(InputError, match="latents must be finite numbers"):              # named, not "context"
        pipe.txt2img(PROMPT, **kw, latents=np.full(shape, np.nan, np.float32))
    from npsd.attention_maps import AttentionMaps
    with pytest.raises(InputError, match="steps must be a list of 0-based step indices"):
        AttentionMaps(steps=5)
    for prompt in ("a \udcff b", ["ok", "\ud800"]):                     # lone surrogates: tokenizers' TypeError
        with pytest.raises(InputError, match="which is not text \\(a lone UTF-16 surrogate\\)"):
            pipe.txt2img(prompt, **kw)


def test_cli_parameter_errors(tiny, tmp_path, capsys):
    base = ["--model", tiny["safetensors"], "-o", tmp_path / "o.png", "--quiet"]
    img = image(tmp_path / "in.png")
    cases = [
        (["txt2img", PROMPT, "--height", 8, "--width", 64] + base, "height must be a multiple of 8 and at least 64, got 8"),
        (["txt2img", PROMPT, "--height", 60, "--width", 64] + base, "height must be a multiple of 8"),
        (["txt2img", PROMPT, "--width", 0] + base, "--width: must be >= 1"),
        (["txt2img", PROMPT, "--steps", -3] + base, "--steps: must be >= 1"),
        (["txt2img", PROMPT, "--steps", "two"] + base, "expected a whole number"),
        (["txt2img", PROMPT, "--guidance-scale", -1] + base, "--guidance-scale: must be a finite number >= 0.0"),
        (["txt2img", PROMPT, "--guidance-scale", "inf"] + base, "finite"),
        (["txt2img", PROMPT, "--sampler", "k_lms"] + base, "euler_a"),                   # the valid names listed
        (["txt2img", PROMPT, "--sampler", "DPM++ 2M Karras"] + base, "npsd's name for it is 'dpmpp_2m' with --schedule-type karras"),
        (["txt2img", PROMPT, "--seed", 2**64 + 2**40] + base, "[0, 2**64)"),
        (["txt2img", PROMPT, "--seed", "abc"] + base, "expected a whole number"),
        (["txt2img", PROMPT, "--clip-skip", 99] + base, "--clip-skip 99 skips more than this model's 2 text encoder "
                                                        "layers; give 0 to 2"),    # was the API's clip_skip=
        (["txt2img", PROMPT, "--eta", 2] + base, "--eta: must be a finite number in [0.0, 1.0], got 2"),
        (["img2img", PROMPT, "--image", img, "--strength", "nan"] + base, "(0.0, 1.0]"),
        (["img2img", PROMPT, "--image", img, "--strength", -0.2] + base, "(0.0, 1.0]"),
    ]
    for args, phrase in cases:
        cli_error(args, capsys, 2, phrase)
    assert os.listdir(tmp_path) == ["in.png"]
    from npsd.pngmeta import png_info
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=png_info(
        f"{PROMPT}\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, Clip skip: 12"))
    cli_error(["txt2img", "--from-png", tmp_path / "a1111.png"] + base, capsys, 2,
              "--from-png: the PNG's Clip skip 12 skips more than this model's 2 text encoder layers; give --clip-skip 0 to 2")


# --- images ------------------------------------------------------------------------------------------

def test_unreadable_images(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    good = image(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes(open(good, "rb").read()[:200])
    (tmp_path / "dir.png").mkdir()
    for name, phrase in [("text.png", "cannot read image"), ("cut.png", "cannot read image"),
                         ("missing.png", "image file not found"), ("dir.png", "cannot read image")]:
        with pytest.raises(InputError, match=phrase) as e:
            open_image(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="cannot read mask"):
        open_image(tmp_path / "text.png", "mask")


def test_photos_are_read_upright_by_their_exif_orientation(tmp_path):
    """A JPEG whose EXIF Orientation tag says how to turn its stored rows (a phone's photo) is read as
    viewers show it, for each of the eight orientations: the same pixels as diffusers' load_image
    (which applies PIL's exif_transpose). Read as stored, orientations 5-8 swapped height and width
    and img2img redrew the photo on its side. The server's base64 images likewise; an EXIF block that
    Pillow cannot parse leaves the pixels as stored."""
    import base64
    from diffusers.utils import load_image
    from npsd.serve.a1111 import decode_image
    a = np.zeros((40, 64, 3), np.uint8)
    a[:10, :, 0] = 255                                            # red top rows, green left columns
    a[:, :8, 1] = 255
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"photo-{orientation}.jpg"
        Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
        ours, theirs = open_image(path), load_image(str(path))
        assert ours.size == theirs.size == ((64, 40) if orientation < 5 else (40, 64)), orientation
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), orientation
        sent = decode_image(base64.b64encode(path.read_bytes()).decode(), "init_images[0]")
        assert np.array_equal(np.asarray(sent), np.asarray(theirs)), orientation
    jpeg = (tmp_path / "photo-6.jpg").read_bytes()
    start = jpeg.index(b"Exif\0\0") + 6                         # the TIFF header after "Exif\0\0"
    broken = jpeg[:start] + b"XX" + jpeg[start + 2:]               # not "II" or "MM": unreadable
    (tmp_path / "broken.jpg").write_bytes(broken)
    assert open_image(tmp_path / "broken.jpg").size == (64, 40)


def test_an_animation_gives_its_first_frame_and_leaves_no_file_open(tmp_path):
    """An animated GIF or PNG as --image: its first frame, as diffusers' load_image reads it; a
    multi-frame file stays open after Pillow's load() (for the next frames), which printed
    "warning: unclosed file" on the command line."""
    import gc
    import warnings
    from diffusers.utils import load_image
    frames = [Image.new("RGB", (24, 16), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    for name in ("anim.gif", "anim.png"):
        path = tmp_path / name
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = open_image(path)
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)                 # load_image leaves the file open
            theirs = load_image(str(path))
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name
        assert ours.getpixel((0, 0)) == (200, 30, 30), name


def test_pixel_arrays_and_what_is_not_an_image(tiny):
    """img2img and inpaint take pixel arrays as diffusers' pipelines do: output_type="np"'s floats in
    [0, 1] (one image [1, H, W, 3]) give the same image as the PIL image of their uint8 rounding, and a
    bool mask the same as its black-and-white PIL image. Anything else is a one-line InputError (None
    used to end in an AttributeError)."""
    pipe = npsd.load(tiny["safetensors"])
    kw = dict(num_inference_steps=2, seed=4, output_type="np")
    picture = pipe.txt2img(PROMPT, height=64, width=64, **kw)                  # [1, 64, 64, 3] in [0, 1]
    as_pil = Image.fromarray(np.round(picture[0] * 255).astype(np.uint8))
    assert np.array_equal(pipe.img2img(PROMPT, picture, **kw), pipe.img2img(PROMPT, as_pil, **kw))
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:48] = True
    assert np.array_equal(pipe.inpaint(PROMPT, picture, mask, **kw),
                          pipe.inpaint(PROMPT, as_pil, Image.fromarray(mask.astype(np.uint8) * 255), **kw))
    for bad, phrase in [(None, "image must be a file path, a PIL image or a pixel array"),
                        (3, "got int"),
                        (picture * 2, r"image array must be uint8, or floats in \[0, 1\], got float32 values from 0"),
                        (np.full((8, 8, 3), np.nan, np.float32), "floats in"),
                        (np.zeros((8, 8, 3), np.int64), "got int64"),
                        (np.zeros((2, 8, 8, 3), np.uint8), r"must be \[H, W\] or \[H, W, 3\]"),
                        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)")]:
        with pytest.raises(InputError, match=phrase) as e:
            pipe.img2img(PROMPT, bad, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="mask must be a file path"):
        pipe.inpaint(PROMPT, picture, None, **kw)
    dot = Image.new("RGB", (1, 1), (200, 0, 0))                                # its size rounds down to 0
    with pytest.raises(InputError, match=r"the input image is 1x1 pixels, too small for its own size \(height 0\)"):
        pipe.img2img(PROMPT, dot, **kw)
    with pytest.raises(InputError, match=r"1x1 pixels, too small for its own size \(width 0\); give height and width"):
        pipe.img2img(PROMPT, dot, height=64, **kw)
    assert pipe.img2img(PROMPT, dot, height=64, width=64, **kw).shape == (1, 64, 64, 3)      # resized


def png_header_only(path, width, height):
    """A PNG that claims width x height pixels (IHDR) with no pixel data: what a decompression bomb starts with."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return str(path)


def test_huge_images_are_refused(tmp_path, capsys):
    """A file claiming 30000 x 30000 pixels (PIL's DecompressionBombError) is an input error, not a crash."""
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match="cannot read image .*pixels"):
        open_image(bomb)
    rc = cli.main(["img2img", PROMPT, "--image", bomb, "-o", str(tmp_path / "o.png"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot read image" in err and "Traceback" not in err


def test_image_modes_are_converted(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))                    # fully transparent -> white
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = open_image(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((5, 5)) == (255, 255, 255)
    gray = open_image(Image.new("L", (8, 8), 77))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (77, 77, 77)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert open_image(pal).getpixel((2, 2)) == (200, 100, 50)
    p16 = tmp_path / "16.png"
    Image.fromarray(np.array([[0, 32768], [65535, 16384]], np.uint16)).save(p16)
    assert Image.open(p16).mode.startswith("I")
    a = np.asarray(open_image(p16))
    assert a.shape == (2, 2, 3) and a[1, 0, 0] == 255 and a[0, 0, 0] == 0 and 120 <= a[0, 1, 0] <= 130
    dark = Image.fromarray(np.array([[0, 16384], [4096, 8192]], np.uint16))  # 65535 is white, not the largest value
    for img in (dark, dark.convert("I")):                                  # mode I: 16-bit PNGs in older Pillows
        assert np.asarray(open_image(img))[..., 0].tolist() == [[0, 64], [16, 32]], img.mode
    cmyk = open_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))
    assert cmyk.mode == "RGB"


def test_mask_notes():
    """Masks of another size are resized with a note; all-black, all-white and soft masks get one too."""
    import warnings as w
    from npsd.images import fit_size
    with w.catch_warnings(record=True) as got:
        w.simplefilter("always")
        fit_size(Image.new("L", (32, 48)), 64, 64, "mask")
        mask_to_array(Image.new("L", (8, 8), 0))
        mask_to_array(Image.new("L", (8, 8), 255))
        soft = mask_to_array(Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))))
    msgs = [str(m.message) for m in got]
    assert msgs == ["mask of size 32x48 resized to 64x64", "the mask is all black: nothing will be repainted",
                    "the mask is all white: the whole image will be repainted",
                    "the mask is not binary: pixels >= 0.5 are repainted, the rest kept"]
    assert set(np.unique(soft)) == {0.0, 1.0}


def test_cli_image_cases(tiny, tmp_path, capsys):
    base = ["--model", tiny["safetensors"], "--quiet", "--steps", 1, "--seed", 1, "--strength", 1]
    rgb = image(tmp_path / "rgb.png")
    inputs = {"gray": image(tmp_path / "gray.png", "L"), "rgba": image(tmp_path / "rgba.png", "RGBA"),
              "palette": image(tmp_path / "pal.png", "P"), "16bit": image(tmp_path / "16.png", bits16=True)}
    for name, path in inputs.items():
        rc, out, err = run(["img2img", PROMPT, "--image", path, "-o", tmp_path / f"o-{name}.png"] + base, capsys)
        assert rc == 0 and err == "", (name, err)
        assert Image.open(tmp_path / f"o-{name}.png").size == (64, 64)
    (tmp_path / "broken.png").write_bytes(open(rgb, "rb").read()[:100])
    cli_error(["img2img", PROMPT, "--image", tmp_path / "broken.png", "-o", tmp_path / "x.png"] + base, capsys, 2,
              "cannot read image")
    cli_error(["inpaint", PROMPT, "--image", rgb, "--mask", tmp_path / "broken.png", "-o", tmp_path / "x.png"] + base,
              capsys, 2, "cannot read mask")
    notes = {"small": (mask(tmp_path / "m-small.png", size=32), "mask of size 32x32 resized to 64x64"),
             "black": (mask(tmp_path / "m-black.png", value=0), "the mask is all black"),
             "white": (mask(tmp_path / "m-white.png", value=255), "the mask is all white"),
             "soft": (mask(tmp_path / "m-soft.png", soft=True), "the mask is not binary")}
    for name, (m, phrase) in notes.items():
        rc, out, err = run(["inpaint", PROMPT, "--image", rgb, "--mask", m, "-o", tmp_path / f"i-{name}.png"] + base,
                           capsys)
        lines = err.splitlines()
        assert rc == 0 and lines and all(l.startswith("npsd: warning: ") for l in lines) and phrase in lines[0], (name, err)
    assert not (tmp_path / "x.png").exists()


# --- resources -----------------------------------------------------------------------------------------

def test_memory_estimate_matches_the_measurements():
    """The formula against the numbers measured in docs/unet.md and docs/vae.md (SD v1.5 shapes,
    CHUNK_BYTES 128 MiB): within 10 %, and not below the measurement (it is a refusal threshold)."""
    chunk = 128 * 2**20
    unet = resources.unet_bytes(2, 320, 64, 64, chunk) / resources.GB
    assert 0.683 <= unet <= 1.1 * 0.683, unet                               # measured: 0.683 GB
    sd_vae = {"decoder": {"up_blocks": [{"resnets": [{"conv2": {"weight": np.empty((c, 1, 1, 1))}}],
                                         **({"upsamplers": [{}]} if up else {})}
                                        for c, up in ((512, 1), (512, 1), (256, 1), (128, 0))]}}
    c_up = resources.largest_decoder_channels(sd_vae, 8)
    assert c_up == 256                                                      # 256 channels at 512x512
    vae = resources.vae_decode_bytes(1, c_up, 512, 512, chunk) / 2**20
    assert 1268 <= vae <= 1.1 * 1268, vae                                   # measured: 1268 MiB (plain path)


def test_request_too_large_is_refused_before_any_work(tiny, monkeypatch):
    pipe = npsd.load(tiny["safetensors"])
    need = resources.estimate(pipe, 4, 64, 64, guided=True)
    assert need["unet"] > 0 and need["vae"] > 0
    monkeypatch.setattr(resources, "available_bytes", lambda: 1 * 2**20)     # 1 MiB "available"

    def no_work(*a, **k):
        raise AssertionError("work started before the memory check")

    for method in ("encode_text", "unet", "vae_encode", "vae_decode"):
        monkeypatch.setattr(npsd.Pipeline, method, no_work)
    img = Image.new("RGB", (64, 64))
    calls = [lambda: pipe.txt2img([PROMPT, PROMPT], num_images=2, height=64, width=64),
             lambda: pipe.img2img(PROMPT, img), lambda: pipe.inpaint(PROMPT, img, Image.new("L", (64, 64), 255))]
    for call in calls:
        with pytest.raises(NpsdError, match=r"needs about \d+\.\d GB of memory .* but only 0\.0 GB are available; "
                                            r"use a smaller size or fewer images") as e:
            call()
        assert "\n" not in str(e.value)
    assert "(4 images of 64x64)" in str(pytest.raises(NpsdError, calls[0]).value)
    monkeypatch.setattr(resources, "available_bytes", lambda: None)           # unknown: no check
    with pytest.raises(AssertionError, match="work started"):
        calls[0]()


def test_a_trace_of_every_block_counts_in_the_memory_check(monkeypatch):
    """A generation recording a Trace of every block keeps all of it: the estimate adds
    resources.trace_bytes, which is not below what the built-in model's trace of two steps at 128x128
    holds and at most 2.5x it (its constants are SD v1.5's, whose blocks record more per channel:
    measured 1.97x here), and refuses such a request in one line that names the trace; a trace of
    some steps counts those, one of some blocks (only=) is not counted."""
    from npsd.trace import Trace
    pipe = npsd.load()
    trace = Trace()
    pipe.txt2img(PROMPT, num_inference_steps=2, height=128, width=128, output_type="np", trace=trace)
    recorded = sum(t.nbytes for name, t in trace.tensors.items() if name.split("/")[-1].startswith(("unet", "vae")))
    estimated = resources.trace_bytes(pipe, 128, 128, 2 * 2)                # 2 steps of a guided batch of 2
    assert recorded <= estimated <= 2.5 * recorded, (estimated, recorded)
    plain = resources.estimate(pipe, 1, 64, 64, guided=True)["total"]       # the default size, 64x64
    every_step, one_step = (resources.trace_bytes(pipe, 64, 64, 2 * n) for n in (20, 1))
    assert one_step < every_step / 2
    monkeypatch.setattr(resources, "available_bytes", lambda: plain + every_step // 2)

    def no_work(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(npsd.Pipeline, "encode_text", no_work)
    with pytest.raises(NpsdError, match=r"needs about \d+\.\d GB of memory .*, the trace \d+\.\d GB\) but only "
                                        r".* trace fewer steps or blocks .*or use a smaller size") as e:
        pipe.txt2img(PROMPT, num_inference_steps=20, trace=Trace())
    assert "\n" not in str(e.value)
    with pytest.raises(AssertionError, match="work started"):                 # one step's trace fits
        pipe.txt2img(PROMPT, num_inference_steps=20, trace=Trace(steps=[19]))
    with pytest.raises(AssertionError, match="work started"):                 # a few blocks: not counted
        pipe.txt2img(PROMPT, num_inference_steps=20, trace=Trace(only=r"unet\.mid_block"))


def test_available_memory_is_read_from_proc_meminfo(monkeypatch):
    n = resources.available_bytes()
    if os.path.exists("/proc/meminfo"):
        assert isinstance(n, int) and 0 < n < 2**50
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/meminfo":
            return io.StringIO("MemTotal:       1000 kB\nMemAvailable:     512 kB\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert resources.available_bytes() == 512 * 1024

    def no_file(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr("builtins.open", no_file)
    assert resources.available_bytes() is None


def test_cli_request_too_large(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda: 2**20)
    out = tmp_path / "a.png"
    err = cli_error(["txt2img", PROMPT, "--model", tiny["safetensors"], "-o", out, "--quiet", "--num-images", 3]
                    + SMALL, capsys, 1, "(3 images of 64x64) needs about")
    assert "use a smaller size or fewer images" in err
    assert os.listdir(tmp_path) == []


def test_inf_latents_stop_with_the_step(tiny, tmp_path, capsys, monkeypatch):
    real, calls = npsd.Pipeline.unet, {"n": 0}

    def overflow(self, x, t, c):
        calls["n"] += 1
        eps = real(self, x, t, c)
        return eps * np.float32(np.inf) if calls["n"] == 2 else eps          # the second step overflows

    monkeypatch.setattr(npsd.Pipeline, "unet", overflow)
    out = tmp_path / "a.png"
    cli_error(["txt2img", PROMPT, "--model", tiny["safetensors"], "-o", out, "--quiet", "--sampler", "euler"]
              + SMALL[:4] + ["--steps", 3, "--seed", 1], capsys, 1, "NaN or infinite at step 2 of 3")
    assert os.listdir(tmp_path) == []


def test_nan_weights_name_the_text_encoder(tiny):
    """A NaN in the text encoder's weights stops the generation at the text encoder's output, naming
    it, where the UNet used to refuse its "context" input."""
    pipe = npsd.load(tiny["safetensors"])
    pipe.params["text_encoder"]["encoder"]["layers"][-1]["mlp"]["fc1"]["weight"][0, 0] = np.nan
    for guidance in (1.0, 7.5):                                            # one prompt, or both in one batch
        with pytest.raises(npsd.errors.NpsdError, match="the text encoder's output is NaN or infinite"):
            pipe.txt2img(PROMPT, num_inference_steps=2, guidance_scale=guidance, height=64, width=64)


# --- output --------------------------------------------------------------------------------------------

def test_failed_write_keeps_the_old_file(tiny, tmp_path, capsys, monkeypatch):
    """A write that fails half-way (disk full) leaves the previous file untouched and no temporary file."""
    out = tmp_path / "a.png"
    out.write_bytes(b"the previous image")

    def disk_full(self, fp, *a, **k):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    cli_error(["txt2img", PROMPT, "--model", tiny["safetensors"], "-o", out, "--quiet", "--overwrite"] + SMALL,
              capsys, 1, "No space left on device")
    assert out.read_bytes() == b"the previous image" and os.listdir(tmp_path) == ["a.png"]


# --- determinism ---------------------------------------------------------------------------------------

def test_stochastic_samplers_are_byte_identical_across_runs(tiny, tmp_path, capsys):
    """The same seed and parameters give byte-identical PNGs (txt2img with ancestral noise, img2img,
    inpaint); another seed gives another image. Across processes: test_cli::test_subprocess_matches_in_process_bytes."""
    img, m = image(tmp_path / "in.png"), mask(tmp_path / "m.png")
    runs = [["txt2img", PROMPT, "--sampler", "euler_a"], ["img2img", PROMPT, "--image", img, "--sampler", "ddpm"],
            ["inpaint", PROMPT, "--image", img, "--mask", m, "--sampler", "ddim", "--eta", 1]]
    for k, args in enumerate(runs):
        outs = []
        for r, seed in enumerate((5, 5, 6)):
            o = tmp_path / f"{k}-{r}.png"
            rc, _, err = run(args + ["--model", tiny["safetensors"], "-o", o, "--quiet", "--height", 64, "--width", 64,
                                     "--steps", 2, "--seed", seed], capsys)
            assert rc == 0, err
            outs.append(o.read_bytes())
        assert outs[0] == outs[1] and outs[0] != outs[2], args
