"""Named activation traces: every block's input and output, under diffusers' module names.

    trace = Trace()                                    # or Trace(steps=[0, 9]): those sampler steps only
    pipe.txt2img("a cat", num_inference_steps=10, trace=trace)
    trace.save("npsd.safetensors", {"prompt": "a cat"})
    # `npsd compare npsd.safetensors reference.safetensors` then names the first block that differs

Names are the reference implementation's module paths with the component in front:
    text_encoder.embeddings, text_encoder.encoder.layers.3, text_encoder.encoder.layers.3.self_attn,
    unet.conv_in, unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2, unet.mid_block,
    vae.decoder.up_blocks.2, ...
A block's output is recorded under its name, its (first) input under NAME:in. Inside a pipeline
the UNet's names carry the sampler step (0-based, as the pipelines' callbacks count):
step3/unet.down_blocks.1. A name recorded again (the negative prompt's text encoding, a second
UNet call in one step of a two-stage sampler, a second image through the VAE) gets #2, #3, ...

The component functions (clip.encode_text, unet.unet, vae.encode/decode) take trace=None: then
nothing is recorded and nothing is copied. npsd/trace_torch.py records the same names from
diffusers/transformers with forward hooks (`npsd parity`; docs/traces.md compares two such files).
"""

import json
import os
import re

import numpy as np

FORMAT = "npsd-trace/1"


class Trace:
    """An ordered {name: array} of recorded activations (float32 copies, in execution order; integer
    inputs such as token ids are kept as int64).

    steps: None records every sampler step; an iterable of 0-based step indices records those steps'
    UNet calls only (the text encoder and the VAE, outside the steps, are always recorded).
    only: None records every block; a regular expression records only the names (without the step
    prefix) that it matches in full, e.g. r"unet\\.(down|up)_blocks\\.\\d+" (a full-size UNet's every
    block is several GB per step).
    """

    def __init__(self, steps=None, only=None):
        self.steps = None if steps is None else sorted({int(s) for s in steps})
        self.only = None if only is None else re.compile(only)
        self.tensors = {}
        self.step = None                 # the sampler step being run (set by the pipelines), else None

    # --- recording ------------------------------------------------------------------------------

    def recording(self):
        """False during a sampler step that `steps` leaves out."""
        return self.step is None or self.steps is None or self.step in self.steps

    def record(self, name, x):
        if not self.recording() or (self.only is not None and not self.only.fullmatch(name)):
            return
        if self.step is not None:
            name = f"step{self.step}/{name}"
        key, n = name, 2
        while key in self.tensors:                                           # a second call of the same block
            key, n = f"{name}#{n}", n + 1
        x = np.asarray(x)                                                    # token ids stay integers:
        dtype = np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32   # compared exactly
        self.tensors[key] = np.array(x, dtype=dtype)                         # a copy: blocks work in place

    def scope(self, name):
        """A view that records under `name.`; None when nothing is being recorded."""
        return Scope(self, name) if self.recording() else None

    # --- reading --------------------------------------------------------------------------------

    def __getitem__(self, name):
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def __len__(self):
        return len(self.tensors)

    def names(self):
        return list(self.tensors)

    # --- files ----------------------------------------------------------------------------------

    def save(self, path, settings=None):
        """Write one .safetensors file: the tensors, and in its metadata the generation settings
        (JSON under "settings"), the execution order (JSON list under "order") and "format"."""
        from safetensors.numpy import save_file

        from .images import write_atomic
        metadata = {"format": FORMAT, "order": json.dumps(list(self.tensors)),
                    "settings": json.dumps(settings or {}, default=str)}
        if self.steps is not None:
            metadata["steps"] = json.dumps(self.steps)
        if self.only is not None:
            metadata["only"] = self.only.pattern
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        write_atomic(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))   # never a part


class Scope:
    """Records into a Trace under a prefix: scope.record("resnets.0", x) -> "PREFIX.resnets.0";
    record("", x) is the block's own output, record(":in", x) its input."""

    def __init__(self, trace, prefix):
        self.trace, self.prefix = trace, prefix

    def record(self, name, x):
        self.trace.record(self.prefix + ("." + name if name and name[0] != ":" else name), x)

    def scope(self, name):
        return Scope(self.trace, f"{self.prefix}.{name}")


def scope(trace, name):
    """The sub-scope `name` of a Trace or Scope; None when not tracing (trace None)."""
    return None if trace is None else trace.scope(name)


def record(trace, name, x):
    """Record x under `name` in a Trace or Scope; nothing when trace is None."""
    if trace is not None:
        trace.record(name, x)


def load(path):
    """A trace file -> ({name: array} in execution order, settings dict, metadata dict).
    Any .safetensors file works: without npsd's "order" metadata the file's own order is used."""
    from .safetensors_io import SafetensorsFile
    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
        try:
            order = json.loads(meta.get("order", "[]"))
        except json.JSONDecodeError:
            order = []
        order = [n for n in order if n in f.tensors] + [n for n in f.tensors if n not in set(order)]
        tensors = {n: f.read(n) for n in order}
    try:
        settings = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError:
        settings = {}
    return tensors, settings, meta
