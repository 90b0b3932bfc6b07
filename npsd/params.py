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
        idx = sorted(int(k) for k in node)
        if idx != list(range(len(idx))):
            raise ValueError(f"parameter indices are not contiguous: {idx}")
        return [node[str(i)] for i in idx]
    return node


def flatten(tree, prefix=""):
    """The inverse of unflatten: nested dicts/lists -> {"a.0.b": array}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def count(tree):
    """Number of scalar parameters in a tree."""
    return sum(int(np.prod(a.shape)) for a in flatten(tree).values())
