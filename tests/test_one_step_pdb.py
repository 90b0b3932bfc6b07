"""docs/one_step.md's pdb sessions, run as the page writes them.

Each ```console block of the page is one session: its `$ ` line (with `\\` continuation lines) is the
command, each `(Pdb) X` line a command typed at the prompt, the other lines what pdb prints. The
command runs in a fresh folder (npsd from this repository, on the built-in model); the test types
the commands one prompt at a time and checks that each line the page shows after a command appears,
in the same order, in what was printed before the next prompt (`...` on the page stands for any
text: folders, line numbers, array values; a Python version may add lines of its own, as 3.13's
pdb does on restart). Then: pdb reported no error (a `***` line), nothing printed a traceback or an
"internal error", and quitting ended the program with exit status 0.

The numbers the page prints are also derived here without running the model: the latent shape
from the image size and the VAE factor, the timesteps from leading spacing, alpha-bar from the
scaled-linear betas. And every breakpoint of the page's table names a function whose parameters
and local variables are the names the table lists.
"""

import ast
import codecs
import importlib
import inspect
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "one_step.md"
PROMPT = "(Pdb) "
SECONDS = 60                       # per session; each takes about 2 s of CPU on the built-in model


def sessions(text):
    """[(line, command, [(typed or None, line, [printed lines])])] for each ```console block."""
    found = []
    for m in re.finditer(r"```console\n(.*?)```", text, re.S):
        first = text.count("\n", 0, m.start(1)) + 1
        lines = m.group(1).rstrip("\n").split("\n")
        assert lines[0].startswith("$ "), f"{PAGE.name}:{first}: a console block starts with `$ command`"
        command, k = lines[0][2:], 1
        while command.endswith("\\"):
            command, k = command[:-1] + " " + lines[k].strip(), k + 1
        steps = [(None, first, [])]
        for j, line in enumerate(lines[k:], start=first + k):
            if line.startswith(PROMPT):
                steps.append((line[len(PROMPT):], j, []))
            else:
                steps[-1][2].append(line)
        found.append((first, command, steps))
    return found


SESSIONS = sessions(PAGE.read_text())


def argv_and_env(command):
    """`VAR=value python -m pdb ...` -> (argv with this Python, environment)."""
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if k != "NPSD_FAST"}     # the page says which path runs
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[:3] == ["python", "-m", "pdb"], f"not a pdb session: {command}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"                       # the program's output in order with pdb's
    return [sys.executable] + words[1:], env


class Pdb:
    """A pdb process typed into one prompt at a time."""

    def __init__(self, argv, env, cwd):
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.chunks, self.text = queue.Queue(), ""
        self.deadline = time.monotonic() + SECONDS
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.chunks.put(decode(chunk))
        self.chunks.put(None)

    def until_prompt(self):
        """What was printed up to the next prompt, and whether a prompt came (False: the process ended)."""
        while PROMPT not in self.text:
            try:
                chunk = self.chunks.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no pdb prompt within {SECONDS} s; printed so far:\n{self.text}") from None
            if chunk is None:
                printed, self.text = self.text, ""
                return printed, False
            self.text += chunk
        printed, self.text = self.text.split(PROMPT, 1)
        return printed, True

    def type(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()


def pattern(line):
    """A page line as a regular expression: `...` matches any text."""
    return re.compile(".*".join(re.escape(part) for part in line.rstrip().split("...")))


def check_printed(expected, printed, where):
    got = [line.rstrip() for line in printed.replace("\r", "").split("\n") if line.strip()]
    i = 0
    for line in expected:
        if not line.strip():
            continue
        p = pattern(line)
        while i < len(got) and not p.fullmatch(got[i]):
            i += 1
        assert i < len(got), f"{where}: the page shows {line!r} but pdb printed:\n{printed}"
        i += 1


@pytest.mark.parametrize("session", SESSIONS, ids=lambda s: f"line{s[0]}")
def test_session_runs_as_written(session, tmp_path):
    first, command, steps = session
    argv, env = argv_and_env(command)
    pdb = Pdb(argv, env, tmp_path)
    transcript, alive = [], True
    try:
        for typed, line, expected in steps:
            if typed is not None:
                assert alive, f"{PAGE.name}:{line}: pdb had ended before `{typed}`"
                pdb.type(typed)
            printed, alive = pdb.until_prompt()
            transcript.append(printed)
            check_printed(expected, printed, f"{PAGE.name}:{line}")
        assert not alive, f"{PAGE.name}:{first}: pdb still waits for a command after the page's last one"
        pdb.proc.stdin.close()
        code = pdb.proc.wait(timeout=SECONDS)
    finally:
        if pdb.proc.poll() is None:
            pdb.proc.kill()
    text = "".join(transcript)
    errors = [line for line in text.split("\n") if line.startswith("***")]
    assert not errors, f"{PAGE.name}:{first}: pdb reported errors: {errors}"
    assert "Traceback" not in text and "internal error" not in text, text
    assert code == 0, f"{PAGE.name}:{first}: exit status {code}\n{text}"
    output = argv[argv.index("-o") + 1]
    if f"\n{output}\n" in f"\n{text}":                  # the run finished: its image is there
        assert (tmp_path / output).stat().st_size > 0


def test_page_sessions_cover_the_walk_through():
    """The page has the three sessions its text describes: the loop and one DDIM step on the plain
    path, the layers on the plain path, and the fast path for comparison."""
    assert len(SESSIONS) == 3
    commands = [command for _, command, _ in SESSIONS]
    assert all("--quiet" in c and "--overwrite" in c and "-c \"import npsd\"" in c for c in commands)
    assert [c.startswith("NPSD_FAST=0 ") for c in commands] == [True, True, False]
    for needed in ("b npsd.schedulers.sample", "b npsd.guidance.cfg", "b npsd.schedulers.ddim_step"):
        assert needed in commands[0]
    assert "b npsd.nn.group_norm" in commands[1] and "b npsd.nn.attention" in commands[1]


def printed_after(typed):
    """The first line the page shows after typing `typed`, as a Python value."""
    for _, _, steps in SESSIONS:
        for t, _, lines in steps:
            if t == typed:
                return ast.literal_eval(lines[0])
    raise AssertionError(f"the page never types {typed!r}")


def test_page_numbers_follow_from_the_model_settings():
    """Shapes, timesteps and alpha-bar in the transcripts, derived from the built-in model's settings."""
    import npsd
    pipe = npsd.load()
    steps = int(re.search(r"--steps (\d+)", SESSIONS[0][1]).group(1))
    size = pipe.config["defaults"]["height"] // pipe.vae_factor                # 64 / 4 = 16
    latent = (1, pipe.latent_channels, size, size)
    sched = pipe.config["scheduler"]
    # leading spacing with steps_offset 1 (diffusers' DDIMScheduler): k * (N // n) + 1, from the top
    ts = [k * (sched["num_train_timesteps"] // steps) + sched["steps_offset"] for k in reversed(range(steps))]
    betas = np.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"]) ** 2
    abar = np.cumprod(1 - betas)                                                 # scaled-linear, as SD v1.x

    assert printed_after("p x.shape, schedule.sampler, schedule.timesteps.tolist()") == (latent, "ddim", ts)
    assert printed_after("p x_t.shape, t, t_prev, eta") == (latent, ts[0], ts[1], 0.0)
    assert printed_after("p round(ab_t, 4), round(ab_prev, 4), x0_pred.shape, x_prev.shape") == (
        round(abar[ts[0]], 4), round(abar[ts[1]], 4), latent, latent)
    w = pipe.config["defaults"]["guidance_scale"]
    assert printed_after("p eps_uncond.shape, eps_cond.shape, scale") == (latent, latent, w)
    # cross-attention: every latent position asks the 77 tokens, in the UNet's heads
    q, k, v, heads = printed_after("p q.shape, k.shape, v.shape, num_heads")
    assert (q[:2], k[:2], heads) == ((2, size * size), (2, 77), pipe.config["unet"]["num_heads"])
    d = q[2] // heads
    assert printed_after("p qh.shape, kh.shape, vh.shape, float(scale), s.shape") == (
        (2, heads, size * size, d), (2, heads, d, 77), (2, heads, 77, d), 1 / d ** 0.5, (2, heads, size * size, 77))
    # the first GroupNorm: conv_in's channels in 32 groups, each group all its channels' positions
    channels = pipe.params["unet"]["conv_in"]["weight"].shape[0]
    groups = pipe.config["unet"]["norm_groups"]
    assert printed_after("p g.shape, mean.shape") == ((2, groups, channels // groups * size * size), (2, groups, 1))


def table_rows(text):
    """[(breakpoint, names at the stop, what to type next, names then)] of the page's breakpoint table."""
    table = text.split("### Where to stop", 1)[1].split("\n\n")[1]
    rows = []
    for row in table.split("\n")[2:]:
        spot, names, after = [cell.strip() for cell in row.strip("|").split("|")]
        how, _, later = after.rpartition(":")
        rows.append((spot.strip("`"), re.findall(r"`(\w+)`", names), how, re.findall(r"`(\w+)`", later)))
    return rows


def local_names(code):
    """The local variable names of a code object and of the functions defined inside it."""
    names = set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= local_names(const)
    return names


def test_breakpoint_table_names_exist():
    rows = table_rows(PAGE.read_text())
    assert len(rows) >= 7
    for spot, names, how, later in rows:
        module_name, _, attr = spot.split(",")[0].partition(".")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
        params = set(inspect.signature(obj).parameters)
        assert set(names) <= params, f"{spot}: {sorted(set(names) - params)} are not its parameters"
        # names seen after `up` live in a caller in the same module; the others in the function itself
        where = local_names(obj.__code__) if "up" not in re.findall(r"\w+", how) else \
            set().union(*(local_names(f.__code__) for f in vars(inspect.getmodule(obj)).values()
                          if inspect.isfunction(f)))
        assert set(later) <= where, f"{spot}: {sorted(set(later) - where)} are not its local variables"
