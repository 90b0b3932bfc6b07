"""Parameters are plain nested dicts and lists of NumPy arrays that mirror diffusers' names.

A checkpoint name such as ``down_blocks.0.resnets.1.conv1.weight`` becomes
``params["down_blocks"][0]["resnets"][1]["conv1"]["weight"]``: split on dots, and a level whose
keys are all integers becomes a list. docs/parameters.md explains the choice.
"""

import numpy as np


def unflatten(flat):
    """{"a.0.b": array, ...} -> {"a": [{"b": array}], ...}."""
    tree = {}
    for name, value in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _lists(tree)


def _lists(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        # a gap is a module without parameters (the UNet's ff.net.1 is a Dropout): it becomes None,
        # so ff.net.2 stays at index 2
        return [node.get(str(i)) for i in range(max(int(k) for k in node) + 1)]
    return node


def flatten(tree, prefix=""):
    """The inverse of unflatten: nested dicts/lists -> {"a.0.b": array}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if value is None:                                  # a parameterless module (see _lists)
            continue
        if isinstance(value, (dict, list)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def count(tree):
    """Number of scalar parameters in a tree."""
    return sum(int(np.prod(a.shape)) for a in flatten(tree).values())
