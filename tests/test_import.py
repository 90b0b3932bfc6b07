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
