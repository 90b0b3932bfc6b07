"""Reference traces: record a diffusers/transformers model's blocks into an npsd.trace.Trace under
npsd's names, with PyTorch forward hooks (docs/traces.md).

    with hook_trace(unet_ref, "unet", set(ours.names()), theirs):
        unet_ref(latents, t, context)                  # theirs now holds the blocks ours holds

A tool for `npsd parity` and the tests: it calls methods of the torch modules it is given but never
imports torch itself, so `import npsd` and the generations stay free of it.
"""

import contextlib


def _array(x):
    """A block's (first) tensor as NumPy: blocks return tensors, tuples (a down block: output, skips)
    or output objects (.sample); float tensors in float32, integer ones (token ids) as they are."""
    x = x[0] if isinstance(x, (tuple, list)) else getattr(x, "sample", x)
    x = x.detach()
    return (x.float() if x.is_floating_point() else x).cpu().numpy()


@contextlib.contextmanager
def hook_trace(module, prefix, wanted, trace, strip=""):
    """While open, record `module`'s blocks into `trace`: the block at module path PATH under
    prefix.PATH (PATH without a leading `strip`, e.g. transformers' "text_model."; the module itself
    under prefix), its output under that name (a forward hook) and its first tensor input under
    NAME:in (a pre-hook, so the input lands before the block's inner names, in npsd's order).
    Only the names in `wanted` (e.g. the names of npsd's trace; a #2, #3 tag is ignored) are recorded."""
    wanted = {n.split("#")[0] for n in wanted}

    def record_input(name):
        def hook(mod, args, kwargs):
            trace.record(name, _array(next(a for a in (*args, *kwargs.values()) if hasattr(a, "detach"))))
        return hook

    def record_output(name):
        return lambda mod, args, out: trace.record(name, _array(out))

    handles = []
    try:
        for path, mod in module.named_modules():
            path = path[len(strip):] if path.startswith(strip) else path
            name = f"{prefix}.{path}" if path else prefix
            if f"{name}:in" in wanted:
                handles.append(mod.register_forward_pre_hook(record_input(f"{name}:in"), with_kwargs=True))
            if name in wanted:
                handles.append(mod.register_forward_hook(record_output(name)))
        yield trace
    finally:
        for h in handles:
            h.remove()
