"""`import npsd` must never import torch (it is for tests, benchmarks and tools only)."""

import subprocess
import sys

BLOCK_TORCH = (
    "import sys; sys.modules['torch'] = None\n"      # any `import torch` now raises ImportError
    "import npsd, npsd.nn, npsd.pipeline\n"
    "import pkgutil, importlib\n"
    "for m in pkgutil.iter_modules(npsd.__path__):\n"
    "    if m.name not in ('cli', 'parity_cli'):\n"       # the CLI's parity command needs the test extra
    "        importlib.import_module('npsd.' + m.name)\n"
    "print('ok')\n"
)


def test_import_npsd_without_torch():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_import_npsd_does_not_load_torch():
    code = "import sys, npsd; print('torch' in sys.modules, 'diffusers' in sys.modules, 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False False False", r.stdout + r.stderr


def test_a_generation_on_the_fast_path_does_not_import_scipy():
    """SciPy (the plain GELU's erf) takes about 0.2 s to import, half of `import npsd` when it was
    imported at the top of npsd/nn.py; the command line and the fast path do without it."""
    code = ("import sys, npsd, npsd.cli\n"
            "npsd.load().txt2img('a red circle', num_inference_steps=2, seed=0)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy')[:3])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
