"""The tools a user would run instead of dn, on the same file, text, context and threads: llama.cpp (built from the
source vendored in the PyPI `llama-cpp-python` sdist) and mlx-lm. Each peer gives records in dn bench's shape
(dn.runtime.timing.report), with the peer's command in each.

    build_llama_cpp()                                  # cached in cache_dir()/peers/llama.cpp-<version>/bin
    llama_cpp(gguf, text, ctx=512, threads=1)          # one record per memory mode
    mlx_lm(folder, text, threads=1)                    # one record
    prepare(names, model, folder); run(name, plan, ...)  # dn bench --peers: a skipped peer is one line, one record

A peer's max RSS is the kernel's (wait4's ru_maxrss of the peer's process, reported by a small launcher), one
process per memory mode, so each mode's peak is its own. `python -m dn.bench.peers --json OUT` runs them on the
default model and Gemma 3 270M (nox -s peers).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from dn import cli
from dn.core.errors import DnError
from dn.core.files import atomic_dir, cache_dir
from dn.core.text import text_path
from dn.model import sources
from dn.runtime import timing

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist pinned, so a cached build is found without asking PyPI
LLAMA_TOOLS = ("llama-bench", "llama-perplexity", "llama-completion")
# (config, llama-bench flags): llama.cpp's default (mmap, weights repacked for the CPU's kernels: both copies held),
# the file read into memory and repacked (fastest here), mmap without repack (one copy, in the page cache).
LLAMA_MODES = (("default", []), ("load-none", ["-lm", "none"]), ("mmap-norepack", ["-lm", "mmap", "--repack", "0"]))
# How a record's perplexity was scored (its `ppl_scoring`): llama-perplexity's way, which dn bench also scores dn's
# records by when llama.cpp is a peer, and dn's own (dn.evaluate.windows).
PPL_SCORINGS = {
    "second-half": "llama-perplexity's: the text's tokens (with <bos> first where the model adds one) cut into "
                   "windows of ctx tokens, the first token of each replaced by <bos> where the model adds one; only "
                   "the second half of each window is scored (ctx - 1 - ctx//2 tokens a window)",
    "all": "dn eval's: windows of ctx tokens (<bos> put first where the model adds one), every token after the "
           "first scored",
}


CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF"]
if platform.machine() in ("x86_64", "AMD64"):
    # -march=native turns on ggml's AMX matmul where the CPU has AMX; with repack on (llama.cpp's default) it
    # segfaults at the first decode on this machine's Xeon (build 0c1e570), so the build leaves AMX out.
    CMAKE_FLAGS += ["-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]


def built(out: Path) -> bool:
    """out holds the three tools, built with this CMAKE_FLAGS."""
    try:
        same = json.loads((out / "build.json").read_text()).get("cmake") == CMAKE_FLAGS
    except (OSError, ValueError):
        return False
    return same and all((out / "bin" / t).is_file() for t in LLAMA_TOOLS)


def _missing_tools() -> list[str]:
    missing = [] if shutil.which("cmake") else ["cmake"]
    if not shutil.which(os.environ.get("CC", "cc")) and not any(shutil.which(c) for c in ("gcc", "clang")):
        missing.append("a C compiler (cc, gcc or clang)")
    if not shutil.which(os.environ.get("CXX", "c++")) and not any(shutil.which(c) for c in ("g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    return missing


def llama_cpp_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    return cache_dir() / "peers" / f"llama.cpp-{version}"


def _run(cmd: list, what: str, **kw) -> subprocess.CompletedProcess:
    """cmd, its output kept; a failure becomes one line: what failed and the last line it printed."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        lines = [x for x in (r.stderr + r.stdout).splitlines() if x.strip()]
        raise DnError(f"{what} failed (exit {r.returncode}): {lines[-1].strip() if lines else 'no output'}")
    return r


def build_llama_cpp(version: str = LLAMA_CPP_PYTHON, jobs: int = 2, sdist: str | Path | None = None,
                    log=print) -> Path:
    """llama-bench, llama-perplexity and llama-completion from llama-cpp-python's sdist -> their bin folder, built
    once per CMAKE_FLAGS: statically linked (the folder can move), native CPU flags, no curl or ssl. The work
    folder beside it survives a failed or interrupted build (cmake resumes there) and goes once the binaries are
    renamed into place."""
    out = llama_cpp_dir(version)
    if built(out):
        return out / "bin"
    if missing := _missing_tools():
        raise DnError(f"building llama.cpp needs {' and '.join(missing)}: not found on PATH")
    work = out.with_name(f".{out.name}.build")
    work.mkdir(parents=True, exist_ok=True)
    src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"), None)
    if src is None:
        if sdist is None:
            log(f"downloading the llama-cpp-python {version} sdist")
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  "-d", str(work), f"llama-cpp-python=={version}"], "pip download llama-cpp-python")
            sdist = next(work.glob(f"llama_cpp_python-{version}.tar.gz"))
        with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=work) as tmp:
            tar.extractall(tmp, filter="data")
            src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
            os.replace(src.parents[2], work / src.parents[2].name)  # whole, or not there
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    build = work / "build"
    log(f"building {', '.join(LLAMA_TOOLS)} with cmake, -j{jobs} (a few minutes; in {work})")
    _run(["cmake", "-S", str(src.parent), "-B", str(build), *CMAKE_FLAGS], "cmake configure (llama.cpp)")
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *LLAMA_TOOLS],
         "cmake build (llama.cpp)")
    made = [build / "bin" / t for t in LLAMA_TOOLS]  # llama.cpp puts every executable in build/bin
    if not all(b.is_file() for b in made):
        raise DnError(f"cmake build (llama.cpp) made no {' or '.join(b.name for b in made if not b.is_file())}")
    shutil.rmtree(out, ignore_errors=True)  # a build with other flags
    with atomic_dir(out) as done:
        (done / "bin").mkdir()
        for b in made:
            shutil.copy2(b, done / "bin" / b.name)
        (done / "build.json").write_text(json.dumps({"llama-cpp-python": version, "cmake": CMAKE_FLAGS}) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return out / "bin"


# A child's ru_maxrss starts at its parent's RSS (Linux keeps the old address space's high-water mark across exec),
# so dn's own process, numpy and all, must not be the one that forks the peer: a small launcher forks it instead,
# and reports its child's max RSS. GNU time where it exists (about 1 MiB), else python -S (about 7 MiB): the figure is
# max(launcher, child), exact for anything larger than the launcher.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


@functools.cache
def _gnu_time() -> bool:
    try:
        r = subprocess.run(["/usr/bin/time", "--version"], capture_output=True, text=True)
        return "GNU" in r.stdout + r.stderr
    except OSError:
        return False


def max_rss(cmd: list, env: dict | None = None, timeout: float | None = None) -> tuple[int, str, str, float]:
    """Run cmd -> (its max RSS in bytes, stdout, stderr, seconds). A non-zero exit is a DnError."""
    with tempfile.TemporaryDirectory(prefix="dn-rss-") as tmp:
        report = Path(tmp) / "maxrss"
        wrap = (["/usr/bin/time", "-f", "%M", "-o", str(report), "--"] if _gnu_time()
                else [sys.executable, "-S", "-c", _LAUNCHER, str(report)])
        t = time.perf_counter()
        proc = subprocess.Popen(wrap + [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)  # its own group: a timeout ends cmd too
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DnError(f"{Path(cmd[0]).name} ran past {timeout:.0f} s") from None
        secs = time.perf_counter() - t
        stdout, stderr = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        if proc.returncode:
            lines = [x for x in stderr.splitlines() if x.strip()]
            raise DnError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                          f"{lines[-1].strip() if lines else 'no output'}")
        # GNU time: KiB, on the last line (a line before it says when the command failed)
        value = int(report.read_text().split()[-1])
    return value * 1024 if wrap[0] == "/usr/bin/time" else value, stdout, stderr, secs


def parse_bench(stdout: str) -> dict:
    """llama-bench -o json -> {"decode": test, "prefill": test, "build": ...}; each test's samples in tokens/s."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError:
        raise DnError("llama-bench printed no JSON (is it built with -o json support?)") from None
    out = {"build": {k: tests[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type",
                                                   "model_size", "model_n_params")} if tests else {}}
    for t in tests:
        kind = "decode" if t["n_gen"] and not t["n_prompt"] else "prefill" if t["n_prompt"] and not t["n_gen"] else None
        if kind:
            out[kind] = {"tokens": t["n_gen"] or t["n_prompt"], "samples_ts": [float(x) for x in t["samples_ts"]]}
    return out


def speed(test: dict, kind: str) -> dict:
    """tokens/s over llama-bench's repetitions, in dn bench's fields (kind "decode" or "prefill"): the median, and
    p50 and p99 over repetitions of the mean time a token took in each (not over single tokens: llama-bench times a
    repetition as a whole)."""
    ts = np.asarray(test["samples_ts"], dtype=float)
    p50, p99 = np.percentile(1e3 / ts, [50, 99])
    pre, ms = ("", "latency_ms") if kind == "decode" else ("prefill_", "prefill_ms")
    return {f"{pre}tokens_per_s": float(np.median(ts)), f"{ms}_p50": float(p50), f"{ms}_p99": float(p99),
            f"{kind}_reps": len(ts), f"{kind}_tokens": test["tokens"]}


def parse_perplexity(stderr: str) -> dict:
    """llama-perplexity's log -> {"ppl", "ppl_stderr", "ppl_windows"}."""
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", stderr)
    if not m:
        lines = [x for x in stderr.splitlines() if x.strip()]
        raise DnError(f"llama-perplexity gave no estimate: {lines[-1].strip() if lines else 'no output'}")
    n = re.search(r"calculating perplexity over (\d+) chunks", stderr)
    return {"ppl": float(m[1]), "ppl_stderr": float(m[2]), "ppl_windows": int(n[1]) if n else None}


def llama_cpp(gguf_path, text_path, ctx: int = 512, threads: int = 1, decode_tokens: int = 32,
              prefill_tokens: int = 128, reps: int = 5, modes=LLAMA_MODES, ppl_chunks: int | None = None,
              skip: tuple = (), bin_dir: Path | None = None, timeout: float = 1800) -> list[dict]:
    """One record per memory mode: decode and prefill tokens/s (llama-bench, batch 1, reps repetitions) and the
    process's max RSS; perplexity (llama-perplexity at --ctx ctx, default mode) on every record unless "ppl" in
    skip. ppl_chunks: score only the first windows (None: the whole text)."""
    gguf_path, text_path = Path(gguf_path), Path(text_path)
    for p in (gguf_path, text_path):
        if not p.is_file():
            raise DnError(f"{p}: no such file")
    bin_dir = bin_dir or build_llama_cpp()
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    base, _, _, _ = max_rss([str(bin_dir / "llama-bench"), "--help"], env)
    common = {"backend": "llama.cpp", "model": str(gguf_path), "model_bytes": gguf_path.stat().st_size,
              "device": "cpu", "batch": 1, "threads": threads, "ctx": ctx, "framework_baseline_bytes": base,
              "framework_baseline_kind": "max RSS of llama-bench --help (the binary, no model)"}
    ppl = {"ppl": None, "ppl_scoring": None, "eval_tokens": 0}
    if "ppl" not in skip:
        cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf_path), "-f", str(text_path), "-c", str(ctx),
               "-b", str(ctx), "-t", str(threads)] + (["--chunks", str(ppl_chunks)] if ppl_chunks else [])
        try:  # a text too short for two windows fails here: the speed and memory records still count
            peak, _, err, secs = max_rss(cmd, env, timeout)
            ppl = parse_perplexity(err) | {"ppl_scoring": "second-half", "ppl_text": str(text_path),
                                           "ppl_command": cmd, "ppl_seconds": secs, "ppl_process_peak_bytes": peak}
            ppl["eval_tokens"] = ppl["ppl_windows"] and ppl["ppl_windows"] * (ctx - 1 - ctx // 2)
        except DnError as e:
            ppl["ppl_error"] = str(e)
    records = []
    for name, flags in modes:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf_path), "-t", str(threads), "-p", str(prefill_tokens),
               "-n", str(decode_tokens), "-r", str(reps), "-o", "json", *flags]
        peak, out, _, secs = max_rss(cmd, env, timeout)
        res = parse_bench(out)
        rec = common | {"config": name, "dtype": gguf_type(res["build"]), "process_peak_bytes": peak,
                        "process_peak_kind": "max RSS of llama-bench (load, prefill and decode)",
                        "bench_seconds": secs, "command": cmd}
        rec |= speed(res["decode"], "decode") | speed(res["prefill"], "prefill") | ppl | {"llama_cpp": res["build"]}
        records.append(rec)
    top = best(records)
    for r in records:
        r["best_memory_mode"] = r is top
    return records


def gguf_type(build: dict) -> str | None:
    """llama-bench's model_type ("llama 135M Q4_1 - ...") -> the file's quantization ("Q4_1")."""
    m = re.search(r"\b(I?Q\d\w*|BF16|F16|F32)\b", build.get("model_type") or "")
    return m[1] if m else None


def best(records: list[dict]) -> dict:
    """The record with the smallest max RSS; within 2% of it (noise), the faster."""
    low = min(r["process_peak_bytes"] for r in records)
    return max((r for r in records if r["process_peak_bytes"] <= 1.02 * low), key=lambda r: r["tokens_per_s"])


# mlx-lm in its own process: the text's first tokens as the prompt (stream_generate: prefill and decode, each token's
# arrival timed), then perplexity scored as llama-perplexity does (second half of each ctx window, <bos> first).
_MLX_SCRIPT = """
import json, resource, sys, time
import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load, stream_generate
folder, text, prompt_tokens, decode_tokens, ctx, windows = sys.argv[1:]
prompt_tokens, decode_tokens, ctx, windows = map(int, (prompt_tokens, decode_tokens, ctx, windows))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model, tok = load(folder)
ids = tok.encode(open(text, encoding="utf-8").read())
plain = tok.encode("a", add_special_tokens=False)
full = tok.encode("a")
bos = full[0] if len(full) == len(plain) + 1 else None
last, stamps = None, []
for r in stream_generate(model, tok, ids[:prompt_tokens], max_tokens=decode_tokens):
    last = r
    stamps.append(time.perf_counter())
steps = np.diff(stamps) * 1e3
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nll, count = 0.0, 0
for i in range(min(windows, len(ids) // ctx)):
    w = list(ids[i * ctx:(i + 1) * ctx])
    if bos is not None:
        w[0] = bos
    x = mx.array(w)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    lost = nn.losses.cross_entropy(logits, x[:, 1:], reduction="none")[0, ctx // 2:]
    nll, count = nll + float(lost.sum()), count + lost.size
print(json.dumps({"baseline_maxrss": base, "generating_maxrss": peak, "prompt_tps": last.prompt_tps,
                  "generation_tps": last.generation_tps, "ms_p50": float(np.percentile(steps, 50)),
                  "ms_p99": float(np.percentile(steps, 99)), "decode_reps": len(steps),
                  "peak_memory_gb": last.peak_memory, "nll": nll / count if count else None, "count": count}))
"""


def mlx_lm_ready(folder) -> str | None:
    """None when mlx-lm can run folder, else the one line that says why not."""
    if importlib.util.find_spec("mlx_lm") is None:
        return "mlx-lm is not installed (pip install mlx-lm)"
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return f"{folder} is not an mlx-lm folder (no readable config.json)"
    if config.get("gguf_quantization") or config.get("codec"):
        return f"{folder} holds dn's own weight format, which mlx-lm does not read"
    if not list(Path(folder).glob("*.safetensors")):
        return f"{folder} has no safetensors weights"
    return None


def mlx_lm(folder, text_path, threads: int = 1, prompt_tokens: int = 64, decode_tokens: int = 16, ctx: int = 512,
           ppl_windows: int = 0, weights: str | None = None, timeout: float = 1800) -> list[dict]:
    """mlx-lm on an mlx-lm folder in a fresh process: stream_generate's decode tokens/s (1000 / the median gap between
    tokens; p50 and p99 over them), its prefill tokens/s over the text's first prompt_tokens, the process's max RSS
    through decoding (that before perplexity, and the whole run's), and perplexity over the first ppl_windows windows
    scored as llama-perplexity does. The framework baseline is the max RSS after importing mlx and mlx_lm."""
    folder = Path(folder)
    if why := mlx_lm_ready(folder):
        raise DnError(why)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", _MLX_SCRIPT, str(folder), str(text_path), str(prompt_tokens), str(decode_tokens),
           str(ctx), str(ppl_windows)]
    whole, out, _, secs = max_rss(cmd, env, timeout)
    r = json.loads(out.strip().splitlines()[-1])
    kib = 1 if sys.platform == "darwin" else 1024
    return [{"backend": "mlx-lm", "model": str(folder), "mlx_lm_folder": str(folder), "mlx_lm_weights": weights,
             "config": "default", "dtype": _folder_dtype(folder), "device": "cpu", "batch": 1, "threads": threads,
             "ctx": ctx, "tokens_per_s": 1e3 / r["ms_p50"], "latency_ms_p50": r["ms_p50"],
             "latency_ms_p99": r["ms_p99"], "decode_reps": r["decode_reps"], "generation_tps": r["generation_tps"],
             "prefill_tokens_per_s": r["prompt_tps"], "prefill_tokens": prompt_tokens,
             "process_peak_bytes": r["generating_maxrss"] * kib,
             "process_peak_kind": "max RSS of the mlx-lm process through load, prefill and decode",
             "process_max_rss_bytes": whole, "framework_baseline_bytes": r["baseline_maxrss"] * kib,
             "framework_baseline_kind": "max RSS after importing mlx and mlx_lm",
             "mlx_peak_memory_bytes": int(r["peak_memory_gb"] * 1e9),
             "ppl": None if r["nll"] is None else math.exp(r["nll"]), "nll": r["nll"], "eval_tokens": r["count"],
             "ppl_scoring": "second-half" if r["count"] else None, "bench_seconds": secs, "command": cmd}]


def _folder_dtype(folder: Path) -> str | None:
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization")
    return f"q{q['bits']}g{q['group_size']}" if q else config.get("torch_dtype") or config.get("dtype")


def gguf_path(model: str | None) -> Path:
    """A model as dn bench names it (None or "default", a short name, a parts name, a path) -> its GGUF file."""
    if model in (None, "default"):
        return sources.default_gguf()
    if model in sources.SHORT_NAMES and not Path(model).exists():
        return sources.short_name_gguf(model)
    if model in sources.PARTS and not Path(model).exists():
        return sources.parts_gguf(model)
    path = Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise DnError(f"{model}: llama.cpp needs a .gguf file or a GGUF short name")
    return path


PEERS = ("llama.cpp", "mlx-lm")


def prepare(names: list[str], model: str | None, mlx_folder: Path, log=print) -> dict[str, dict]:
    """Before any work, what each peer runs on ({"gguf", "bin_dir"}; {"folder"}), or {"skipped": the one line that
    says why not}: no GGUF for llama.cpp, no compiler to build it, no mlx-lm or no folder it reads."""
    out = {}
    if "llama.cpp" in names:
        try:
            gguf = gguf_path(model)
            out["llama.cpp"] = {"gguf": gguf, "bin_dir": build_llama_cpp(log=log)}
        except DnError as e:
            out["llama.cpp"] = {"skipped": str(e)}
    if "mlx-lm" in names:
        why = mlx_lm_ready(mlx_folder)
        out["mlx-lm"] = {"skipped": f"no mlx-lm folder of the same weights: {why}"} if why else {"folder": mlx_folder}
    return out


def run(name: str, plan: dict, text, ctx: int, threads: int, decode_tokens: int, prefill_tokens: int, reps: int,
        max_tokens: int, skip: tuple = (), mlx_weights: str | None = None) -> list[dict]:
    """One peer's records in dn bench's shape, on the plan prepare() made; a skipped peer is one record saying why."""
    if "skipped" in plan:
        return [{"backend": name, "config": "skipped", "batch": 1, "skipped": plan["skipped"]}]
    windows = max(1, max_tokens // ctx)
    if name == "llama.cpp":
        return llama_cpp(plan["gguf"], text, ctx, threads, decode_tokens, prefill_tokens, reps, ppl_chunks=windows,
                         skip=skip, bin_dir=plan["bin_dir"])
    return mlx_lm(plan["folder"], text, threads, prefill_tokens, decode_tokens + 1, ctx,
                  0 if "ppl" in skip else windows, mlx_weights)


def _main(argv) -> int:
    p = cli.ArgumentParser(prog="python -m dn.bench.peers", description="llama.cpp (and mlx-lm) on the same files, "
                                                                         "text, context and threads as dn bench.")
    p.add_argument("--models", default="default,gemma3-270m", help="GGUFs: default, short names or paths")
    p.add_argument("--text", default=None, help="evaluation text (default: $DN_EVAL_TEXT)")
    p.add_argument("--ctx", type=cli.positive_int, default=512, help="perplexity window")
    p.add_argument("--max-tokens", type=cli.positive_int, default=4096,
                   help="perplexity over the first max-tokens/ctx windows (as dn bench's --max-tokens)")
    p.add_argument("--threads", type=cli.positive_int, default=1)
    p.add_argument("--decode-tokens", type=cli.positive_int, default=32)
    p.add_argument("--prefill-tokens", type=cli.positive_int, default=128)
    p.add_argument("--reps", type=cli.positive_int, default=5, help="llama-bench repetitions per test")
    p.add_argument("--skip-ppl", default="", help="models whose perplexity is not run, comma-separated")
    p.add_argument("--mlx-lm", default=None, help="also mlx-lm on this mlx-lm folder (MLX on a CPU is slow)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    text = text_path(args.text, "DN_EVAL_TEXT")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    files = {m: gguf_path(m) for m in models}  # every bad name before any work
    skip_ppl = {m.strip() for m in args.skip_ppl.split(",") if m.strip()}
    bin_dir = build_llama_cpp(log=lambda m: print(m, file=sys.stderr))
    command = [sys.executable, "-m", "dn.bench.peers", *argv]
    extra = {"text": str(text), "threads": args.threads, "loadavg_start": os.getloadavg()}
    records = []
    for m, f in files.items():
        print(f"llama.cpp on {f.name}", file=sys.stderr)
        recs = llama_cpp(f, text, args.ctx, args.threads, args.decode_tokens, args.prefill_tokens, args.reps,
                         ppl_chunks=max(1, args.max_tokens // args.ctx), skip=("ppl",) if m in skip_ppl else (),
                         bin_dir=bin_dir)
        records += [r | {"model_name": m} for r in recs]
        timing.write(timing.report(records, command, **extra, complete=False), args.json)
    if args.mlx_lm:
        records += mlx_lm(args.mlx_lm, text, args.threads, args.prefill_tokens, args.decode_tokens + 1, args.ctx,
                          max(1, args.max_tokens // args.ctx), "given by --mlx-lm")
    timing.write(timing.report(records, command, **extra, loadavg_end=os.getloadavg(), complete=True), args.json)
    for r in records:
        print(f"{r['model_name'] if 'model_name' in r else r['model']:<20} {r['backend']:<9} {r['config']:<14} "
              f"{r['tokens_per_s']:7.1f} tok/s  prefill {r['prefill_tokens_per_s']:7.1f}  "
              f"max RSS {r['process_peak_bytes'] / 2**20:7.1f} MiB  ppl {r['ppl'] or float('nan'):.4f}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
