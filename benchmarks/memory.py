"""Peak memory of a whole npsd generation with SD v1.5-sized weights (README.md's memory table).

    python -m benchmarks.memory                      # 512x512, 2 DDIM steps with guidance
    python -m benchmarks.memory --size 1024 --steps 2
    python -m benchmarks.memory --weights-dtype float16   # weights kept in float16 (npsd.load's weights_dtype)
    python -m benchmarks.memory --weights-dtype float16 --lora-rank 64 --sampler lcm --guidance 1
                                                     # with a LoRA of the LCM-LoRA's layers merged

A random checkpoint with the real SD v1.5 tensor names and shapes (fp16, the shared key manifest)
is written once to --cache; a fresh process without torch loads it with npsd.load (float32 in
memory, or float16 with --weights-dtype float16), records its resident size, generates, and reports
its own peak (VmHWM). With --lora-rank, a random LoRA of that rank on the layers the LCM-LoRA targets
(benchmarks/bench.py) is written beside the checkpoint and merged after loading as the command
line's --lora merges it (keep_base=False; with --keep-base, load_lora's default, which keeps the
original arrays of the layers it changes: docs/lora.md). Printed: the weights, the size after
loading (and after merging), the peak, overhead = peak - size after loading, and peak / weights.
The number of steps does not change the peak (every step does the same work), so two steps measure
what twenty would.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(path, size, steps, sampler, weights_dtype="float32", guidance=7.5, lora_rank=0, keep_base=False):
    import numpy as np
    import npsd
    from npsd.params import flatten
    t0 = time.time()
    pipe = npsd.load(path, weights_dtype=weights_dtype)
    weights = sum(a.nbytes for a in flatten(pipe.params).values())
    loaded = merged = status("VmRSS")
    t1 = time.time()
    if lora_rank:
        pipe.load_lora(lcm_like_lora(pipe, lora_rank, path + f".lora{lora_rank}.safetensors"), keep_base=keep_base)
        merged = status("VmRSS")
    t2 = time.time()
    image = pipe.txt2img("a photograph of an astronaut riding a horse", negative_prompt="blurry", height=size,
                         width=size, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, seed=0,
                         output_type="np")
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()
    print(json.dumps({"weights": weights, "loaded": loaded, "merged": merged, "peak": status("VmHWM"),
                      "load_s": t1 - t0, "merge_s": t2 - t1, "generate_s": time.time() - t2,
                      "torch_imported": "torch" in sys.modules}))


def lcm_like_lora(pipe, rank, path):
    """benchmarks/bench.py's random LoRA of this rank on the LCM-LoRA's layers of pipe's UNet, written
    once to path -> path."""
    from safetensors.numpy import save_file
    from benchmarks.bench import lcm_lora_file
    if not os.path.exists(path):
        save_file(lcm_lora_file(pipe.params, rank), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def checkpoint(cache):
    """The random SD v1.5 checkpoint (original layout, fp16), written once."""
    path = os.path.join(cache, "sd15-random-fp16.safetensors")
    if not os.path.exists(path):
        sys.path.insert(0, ROOT)
        from tests.test_loading import manifest, random_state, write_safetensors
        os.makedirs(cache, exist_ok=True)
        write_safetensors(path + ".tmp", random_state(manifest("sd15_original_manifest.json")))
        os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--guidance", type=float, default=7.5, help="guidance scale (<= 1: no unconditional pass)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="merge a random LoRA of this rank on the LCM-LoRA's layers")
    ap.add_argument("--keep-base", action="store_true",
                    help="merge it keeping the original arrays (load_lora's default; the command line's "
                         "--lora does not)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "npsd-bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.size, args.steps, args.sampler, args.weights_dtype, args.guidance, args.lora_rank,
              args.keep_base)
        return 0
    path = checkpoint(args.cache)
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", path, "--size", str(args.size),
           "--steps", str(args.steps), "--sampler", args.sampler, "--weights-dtype", args.weights_dtype,
           "--guidance", str(args.guidance), "--lora-rank", str(args.lora_rank)] + ["--keep-base"] * args.keep_base
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return 1
    r = json.loads(p.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    guidance = f"with guidance {args.guidance:g}" if args.guidance > 1 else "without guidance"
    print(f"txt2img {args.size}x{args.size}, {args.steps} {args.sampler} steps {guidance}, SD v1.5-sized "
          f"random weights ({args.weights_dtype} in memory: {r['weights'] / gib:.2f} GiB)")
    if args.lora_rank:
        print(f"  LoRA of rank {args.lora_rank} on the LCM-LoRA's layers, keep_base={args.keep_base}: after "
              f"loading {r['loaded'] / gib:.2f} GiB, after merging it {r['merged'] / gib:.2f} GiB "
              f"(+{(r['merged'] - r['loaded']) / gib:.2f}) in {r['merge_s']:.1f} s")
    print(f"  after loading {r['loaded'] / gib:.2f} GiB, peak {r['peak'] / gib:.2f} GiB, overhead "
          f"{(r['peak'] - r['loaded']) / gib:.2f} GiB, peak / weights {r['peak'] / r['weights']:.3f}; "
          f"load {r['load_s']:.0f} s, generation {r['generate_s']:.0f} s; torch imported: {r['torch_imported']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
