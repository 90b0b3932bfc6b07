"""Reading torch .ckpt files without torch: values, views, training state, and refusing malicious pickles."""

import collections
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from npsd.ckpt import CkptFile
from npsd.errors import CheckpointError
from npsd.safetensors_io import SafetensorsFile


def _fake_lightning_class():
    """A class that pickles as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (as in
    real SD .ckpt files, where the callback class is a key of "callbacks"); lightning is not installed."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        sys.modules.setdefault(part, types.ModuleType(part))
    cls = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = cls
    return cls


def small_state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g).half()
    sd = collections.OrderedDict()
    sd["a.weight"] = base                              # fp16
    sd["a.view"] = base[2:, 1::2]                      # shares the storage: offset + strides
    sd["a.t"] = base.t()                               # transposed view of the same storage
    sd["b.weight"] = torch.randn(3, 4, generator=g, dtype=torch.bfloat16)
    sd["c.weight"] = torch.nn.Parameter(torch.randn(5, 2, 3, 3, generator=g))   # fp32 Parameter
    sd["d.position_ids"] = torch.arange(77)[None]      # int64
    sd["e.scalar"] = torch.tensor(0.5)                 # 0-d
    return sd


def write_ckpt(path, sd, **extra):
    cls = _fake_lightning_class()
    obj = {"state_dict": sd, "global_step": 470000, "epoch": 3, "pytorch-lightning_version": "1.4.2",
           "numpy_scalar": np.float64(0.1234), "numpy_int": np.int64(7), "numpy_array": np.arange(4.0),
           "callbacks": {cls: {"best_model_score": None, "monitor": "val/loss"}}, "lightning_obj": cls(),
           "optimizer_states": [], "lr_schedulers": []}
    obj.update(extra)
    torch.save(obj, path)  # protocol 2: bytes are spelled _codecs.encode(..., "latin1")


def test_values_views_and_training_state(tmp_path):
    sd = small_state()
    write_ckpt(tmp_path / "m.ckpt", sd)
    with CkptFile(tmp_path / "m.ckpt") as ck:
        assert set(ck.tensors) == set(sd)
        for k, t in sd.items():
            got = ck.read(k, np.float32 if t.is_floating_point() else None)
            expect = t.detach().float().numpy() if t.is_floating_point() else t.numpy()
            assert got.shape == expect.shape and np.array_equal(got, expect), k
        assert ck.read("a.weight").dtype == np.float16  # no dtype asked: as stored
        obj = ck.obj
        assert obj["global_step"] == 470000 and obj["numpy_scalar"] == np.float64(0.1234)
        assert obj["numpy_int"] == 7 and np.array_equal(obj["numpy_array"], np.arange(4.0))


def test_top_level_state_dict_and_folder_name(tmp_path):
    sd = small_state()
    torch.save(sd, tmp_path / "plain.pt")  # no "state_dict" wrapper; zip top folder "plain"
    with CkptFile(tmp_path / "plain.pt") as ck:
        assert ck.top == "plain/" and set(ck.tensors) == set(sd)
        assert np.array_equal(ck.read("a.t"), sd["a.t"].numpy())


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    calls = {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (eval, (f"open({str(marker)!r}, 'w').write('x')",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
    }

    class Evil:
        def __reduce__(self):
            return calls[payload]

    write_ckpt(tmp_path / "evil.ckpt", small_state(), evil=Evil())
    refused = payload.split(".")[1]
    with pytest.raises(CheckpointError, match=rf"refusing to unpickle .*{refused}"):
        CkptFile(tmp_path / "evil.ckpt")
    import npsd
    with pytest.raises(CheckpointError, match=refused):
        npsd.load(tmp_path / "evil.ckpt")
    assert not marker.exists()
    # the payload is live: torch's full unpickler does run it (so the check above can fail)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    if payload == "subprocess.Popen":
        import time
        for _ in range(50):
            if marker.exists():
                break
            time.sleep(0.1)
    assert marker.exists()


def test_allowed_names_used_wrongly_are_refused(tmp_path):
    import codecs

    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    write_ckpt(tmp_path / "r.ckpt", small_state(), x=Rot13())
    with pytest.raises(CheckpointError, match="latin-1"):
        CkptFile(tmp_path / "r.ckpt")
    write_ckpt(tmp_path / "o.ckpt", small_state(), x=np.array([object()], dtype=object)[:0])
    with pytest.raises(CheckpointError, match="dtype"):
        CkptFile(tmp_path / "o.ckpt")


def test_truncated_corrupt_and_legacy_files(tmp_path):
    good = tmp_path / "good.ckpt"
    write_ckpt(good, small_state())
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        CkptFile(tmp_path / "trunc.ckpt")
    # flip bytes inside the first storage record: zip's CRC check catches it when the tensor is read
    with CkptFile(good) as ck:
        info = ck.zip.getinfo(ck.top + "data/0")
    local = data[info.header_offset: info.header_offset + 30]  # the local header: its own extra field (padding)
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    bad = bytearray(data)
    bad[start + 4: start + 12] = bytes(8 * [0xFF])
    (tmp_path / "bad.ckpt").write_bytes(bytes(bad))
    with CkptFile(tmp_path / "bad.ckpt") as ck, pytest.raises(CheckpointError, match="corrupt"):
        ck.read("a.weight")
    # a damaged pickle
    import zipfile
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "pkl.ckpt", "w") as zout:
        for item in zin.infolist():
            raw = zin.read(item)
            zout.writestr(item, raw[: len(raw) // 2] if item.filename.endswith("data.pkl") else raw)
    with pytest.raises(CheckpointError, match="pickle is corrupt"):
        CkptFile(tmp_path / "pkl.ckpt")
    torch.save(small_state(), tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .*_use_new_zipfile_serialization=True"):
        CkptFile(tmp_path / "legacy.ckpt")


def test_truncated_and_corrupt_safetensors(tmp_path):
    from safetensors.numpy import save_file
    save_file({"a": np.ones((64, 64), np.float16), "b": np.zeros(3, np.float32)}, str(tmp_path / "g.safetensors"))
    data = (tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "t.safetensors")
    (tmp_path / "h.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(tmp_path / "h.safetensors")
    import npsd
    with pytest.raises(CheckpointError, match="truncated"):
        npsd.load(tmp_path / "t.safetensors")


def test_reading_a_ckpt_never_imports_torch(tmp_path):
    write_ckpt(tmp_path / "m.ckpt", small_state())
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from npsd.ckpt import CkptFile
        with CkptFile({str(tmp_path / "m.ckpt")!r}) as ck:
            print(sorted(ck.tensors), ck.read("b.weight").dtype)
        assert not any(m.startswith(("torch", "pytorch_lightning")) and sys.modules[m] is not None for m in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "float32" in out.stdout


def _zip_with_pickle(path, data):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")


def test_handmade_pickles_cannot_reach_or_modify_anything(tmp_path):
    """Protocol-4 STACK_GLOBAL naming os.system, and BUILD on an allowed name (which would set
    attributes on npsd's own function): both refused."""
    import pickle
    marker = tmp_path / "pwned"
    # \x80\x04 PROTO 4; \x8c SHORT_BINUNICODE; \x93 STACK_GLOBAL; R REDUCE; . STOP
    cmd = f"touch {marker}".encode()
    evil = (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")
    _zip_with_pickle(tmp_path / "a.ckpt", evil)
    with pytest.raises(CheckpointError, match="os.system"):
        CkptFile(tmp_path / "a.ckpt")
    assert not marker.exists()
    build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}U\x01xK\x01sb."  # GLOBAL, {x: 1}, BUILD
    _zip_with_pickle(tmp_path / "b.ckpt", build)
    with pytest.raises(CheckpointError, match="set state on a function"):
        CkptFile(tmp_path / "b.ckpt")
    from npsd import ckpt
    assert not hasattr(ckpt._rebuild_tensor_v2, "x")
    pickle.loads(evil)  # the handmade payload is live under the standard unpickler
    assert marker.exists()
