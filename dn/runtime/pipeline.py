"""Pipeline-parallel generation across processes (docs/distributed.md): each rank holds a contiguous slice of the
layers (the embedding on the first, the final norm and lm_head on the last, a tied embedding on both) with their KV
cache, and hands its hidden states to the next rank; the last hands the logits back to rank 0, which samples.

The transport is the engine's own: torch.distributed (gloo on CPU, NCCL on CUDA) under torchrun, mx.distributed's
ring under mlx.launch, reached through the backend's `pipeline` module. `dn <verb> --pipeline N` (generate, chat,
eval, serve) without a launcher starts N local ranks through the backend's launcher (dn.runtime.launch).

Wire, per forward: rank i -> i+1 a header int32 [tokens, flags] (0 tokens: stop), then the hidden state
[1, tokens, hidden] at its own dtype; the last rank -> 0 the float32 logits. A rank that waits longer than
--pipeline-timeout for a peer, loses its connection, or is stopped by the launcher exits with one line naming the
peer it waited on."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from dn.core.errors import DnError
from dn.model import store
from dn.runtime import backend as backends
from dn.runtime import loader, memory, residency
from dn.runtime.budget import parse_size
from dn.runtime.launch import STDIN_ENV, launch, launched
from dn.runtime.launch import rank_argv as rank_argv  # the tests' and the docs' name for it here

LAST_ONLY, NEW_CACHE, BF16 = 1, 2, 4  # header flags (BF16: the hidden state's dtype; else float32)
TIMEOUT_S = 60.0


def add_args(p) -> None:
    g = p.add_argument_group("pipeline (docs/distributed.md)")
    g.add_argument("--pipeline", nargs="?", type=int, const=0, default=None, metavar="N",
                   help="run as one rank of a pipeline under torchrun or mlx.launch; N without a launcher: start N "
                        "local ranks through the backend's launcher (torchrun for torch, mlx.launch for MLX)")
    g.add_argument("--pipeline-split", default=None, metavar="A,B,...|auto",
                   help="decoder layers per rank, first to last; auto: by each rank's memory (--pipeline-memory, "
                        "else each host's RAM) (default: the least bytes on the largest rank)")
    g.add_argument("--pipeline-memory", default=None, metavar="SIZE,SIZE,...",
                   help="with --pipeline-split auto: each rank's memory for weights, first to last (default: each "
                        "host's physical memory, gathered around the ring)")
    g.add_argument("--pipeline-timeout", type=float, default=TIMEOUT_S, metavar="S",
                   help="seconds a rank waits for a peer during generation before it exits naming it")


# ---- which layers a rank holds --------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    rank: int
    size: int
    split: tuple[int, ...] | None = None  # layers per rank; None: even (run() passes balance()'s)
    vocab_split: int | None = None  # a tied GGUF lm_head shared: rows [0, this) on the first rank, the rest last

    def span(self, n_layers: int) -> tuple[int, int]:
        """[lo, hi) of the decoder layers this rank holds."""
        counts = self.split or tuple(n_layers // self.size + (r < n_layers % self.size) for r in range(self.size))
        if len(counts) != self.size or sum(counts) != n_layers or min(counts) < 1:
            raise DnError(f"--pipeline-split {','.join(map(str, counts))}: needs {self.size} counts >= 1 summing to "
                          f"the model's {n_layers} layers")
        lo = sum(counts[:self.rank])
        return lo, lo + counts[self.rank]

    first = property(lambda self: self.rank == 0)
    last = property(lambda self: self.rank == self.size - 1)

    def holds_embedding(self, tied: bool) -> bool:  # a tied lm_head is the embedding (unless shared: head_rows)
        return self.first or (self.last and tied and not self.vocab_split)

    def head_rows(self, vocab: int, tied: bool) -> tuple[int, int] | None:
        """[lo, hi) of the lm_head's rows this rank holds: all on the last rank, or a tied one shared (vocab_split)
        between the first rank (the first rows) and the last (the rest); None elsewhere."""
        shared = bool(self.vocab_split) and tied and self.size > 1
        if self.last:
            return (self.vocab_split, vocab) if shared else (0, vocab)
        return (0, self.vocab_split) if shared and self.first else None

    def lookup(self, spec) -> set[str]:
        """A GGUF embedding this rank only looks up (the first rank's, the tied lm_head being on the last): mapped
        from the file where the backend maps (dn.model.store.mapped), as an untied one."""
        if self.first and not self.last and spec.gguf and "model.embed_tokens" in spec.gguf:
            return {"model.embed_tokens.weight"}
        return set()

    def keeps(self, name: str, n_layers: int, tied: bool) -> bool:
        """Whether this rank reads a stored tensor (names as transformers and mlx-lm spell them)."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            lo, hi = self.span(n_layers)
            return lo <= int(m.group(1)) < hi
        if name.startswith("model.embed_tokens."):
            return self.holds_embedding(tied) or (tied and bool(self.vocab_split) and (self.first or self.last))
        return self.last or not name.startswith(("lm_head.", "model.norm."))


def balance(spec, size: int, lookup_free: bool, dtype_bytes: int = 2, memory: list[float] | None = None,
            fit: bool = False, counts: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], int | None]:
    """(layers per rank, vocab_split) so that the largest rank's accounted bytes (dn.model.store), or with memory
    (bytes per rank) its bytes over its memory, are least: the embedding on the first rank (nothing where it is
    mapped: lookup_free), the norm and lm_head (or the tied embedding) on the last. A tied GGUF head whose first
    rank maps its lookups is shared by rows between the first and last rank where that evens them out
    (Stage.vocab_split). fit: a split over memory that fits; counts: the layers given (--pipeline-split)."""
    n, b, given = spec.architecture.num_hidden_layers, dtype_bytes, counts is not None
    memory = memory or [1.0] * size
    layer, first, last, tied = _bytes(spec, size, lookup_free, b)
    if size > n:
        raise DnError(f"--pipeline {size}: more ranks than the model's {n} layers")

    def load(c: tuple[int, ...], rows: int | None = None) -> float:  # the worst rank's bytes over its memory
        edges = np.cumsum((0, *c))
        own = [sum(layer[edges[r]:edges[r + 1]]) for r in range(size)]
        moved = tied * (rows or 0) / spec.architecture.vocab_size  # the head's rows on the first rank
        own[0], own[-1] = own[0] + first + moved, own[-1] + last - moved
        return max(o / m for o, m in zip(own, memory))

    @functools.cache
    def split(r: int, lo: int) -> tuple[float, tuple]:  # the last r ranks over layers lo..: (worst load, counts)
        mem, head = memory[size - r], first if lo == 0 else 0
        if r == 1:
            return (sum(layer[lo:]) + last + head) / mem, (n - lo,)
        return min((max((sum(layer[lo:hi]) + head) / mem, split(r - 1, hi)[0]), (hi - lo, *split(r - 1, hi)[1]))
                   for hi in range(lo + 1, n - r + 2))

    worst, counts = (load(counts), counts) if counts is not None else split(size, 0)
    rows = None
    if tied and lookup_free and size > 1:  # the head's rows may move to the first rank: where 5% less at worst
        pool = [counts] if given or size > 2 else [(c, n - c) for c in range(1, n)]
        w, c, r = min(((load(c, r), c, r) for c in pool
                       for r in [_vocab_split(spec, c, layer, first, last, tied, memory)] if r), default=(worst, 0, 0))
        if w < 0.95 * worst:
            worst, counts, rows = w, c, r
    if fit and worst > 1:
        raise DnError(f"--pipeline-split auto: {(sum(layer) + first + last) / 2**30:.2f} GiB of weights do not fit "
                      f"ranks of {', '.join(f'{m / 2**30:.2f}' for m in memory)} GiB ({worst:.2f}x)")
    return counts, rows


def _bytes(spec, size: int, lookup_free: bool, b: int) -> tuple[list[int], int, int, int]:
    """Accounted bytes: per layer, the first rank's own (its embedding, none where mapped), the last's (norm,
    lm_head or the tied embedding), and the tied GGUF embedding's alone (0 otherwise)."""
    layer, first, last, tied = [0] * spec.architecture.num_hidden_layers, 0, 0, 0
    for e in store.entries(spec):
        m = re.match(r"model\.layers\.(\d+)\.", e.name)
        if m:
            layer[int(m.group(1))] += e.nbytes(b)
        elif e.name.startswith("model.embed_tokens."):
            first += 0 if lookup_free and size > 1 else e.nbytes(b)
            tied = e.nbytes(b) * spec.architecture.tie_word_embeddings if spec.gguf else 0
            last += e.nbytes(b) * spec.architecture.tie_word_embeddings
        else:
            last += e.nbytes(b)
    return layer, first, last, tied


def _shared(first: float, last: float, head: float, memory: list[float]) -> tuple[float, tuple[float, float]]:
    """(f, the two loads): the share f of a head's bytes on the first rank that evens it and the last out."""
    m0, m1 = memory[0], memory[-1]
    f = min(max((m0 * (last + head) - m1 * first) / (head * (m0 + m1)), 0.0), 1.0)
    return f, ((first + f * head) / m0, (last + (1 - f) * head) / m1)


def _vocab_split(spec, counts, layer, first, last, tied, memory) -> int | None:
    """The first rank's rows of a shared tied head, in whole 256s; None under 5% (not worth a second matmul)."""
    n, v = len(layer), spec.architecture.vocab_size
    f, _ = _shared(first + sum(layer[:counts[0]]), last - tied + sum(layer[n - counts[-1]:]), tied, memory)
    rows = min(round(f * v / 256) * 256, v - 256)
    return rows if rows >= 0.05 * v else None


def _said(e: Exception) -> str:
    """A transport's error on one line, without the source position gloo and the ring lead with."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])[:200]


# ---- a rank ---------------------------------------------------------------------------------------------

class Watchdog:
    """One thread: while a rank waits on a peer during generation, a deadline; past it, one line and exit 3.
    SIGTERM (the launcher stopping the ranks after one failed) also gives one line naming the awaited peer."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s, self.peer, self.deadline = rank, timeout_s, None, None
        threading.Thread(target=self._run, daemon=True).start()
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            signal.signal(signal.SIGTERM, self._term)

    def _run(self):
        while True:
            time.sleep(0.2)
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._die(f"rank {self.peer} sent nothing for {self.timeout_s:g} s (dead, hung or unreachable)", 3)

    def _term(self, *_):
        waiting = f" while waiting for rank {self.peer}" if self.peer is not None else ""
        self._die(f"stopped by the launcher{waiting} (another rank failed)", 143)

    def _die(self, why: str, code: int):
        print(f"dn: error: rank {self.rank}: {why}", file=sys.stderr, flush=True)
        os._exit(code)

    @contextlib.contextmanager
    def waiting(self, peer: int, armed: bool = True):
        self.peer, self.deadline = peer, time.monotonic() + self.timeout_s if armed else None
        try:
            yield
        finally:
            self.peer = self.deadline = None


@dataclass
class Link:
    """This rank's end of the pipeline: sends and receives through the backend's transport, timed and counted."""
    be: object
    group: object
    stage: Stage
    watch: Watchdog
    dtype: str
    hidden: int
    vocab: int
    started: bool = False  # the first message may wait for the peers' load: the watchdog is not armed for it
    broken: bool = False  # a peer was lost: nothing more is sent
    counts: dict = field(default_factory=lambda: {"sent_bytes": 0, "sends": 0, "send_s": 0.0, "wait_s": 0.0,
                                                  "forwards": 0, "tokens": 0, "compute_s": 0.0})

    def _guard(self, peer: int, fn, *args):
        t = time.perf_counter()
        try:
            with self.watch.waiting(peer, armed=self.started):
                return fn(*args)
        except RuntimeError as e:  # the transport's: a closed connection, a timeout
            self.broken = True
            raise DnError(f"rank {self.stage.rank}: lost rank {peer} ({_said(e)})") from None
        finally:
            self.counts["wait_s"] += time.perf_counter() - t

    def send(self, x, dst: int) -> None:
        t = time.perf_counter()
        self.counts["sent_bytes"] += self._guard(dst, self.be.pipeline.send, self.group, x, dst)
        self.counts["sends"] += 1
        self.counts["send_s"] += time.perf_counter() - t

    def recv(self, shape: tuple, dtype: str, src: int):
        return self._guard(src, self.be.pipeline.recv, self.group, shape, dtype, src)

    def header(self, src: int) -> tuple[int, int]:
        h = self.be.ops.to_numpy(self.recv((2,), "I32", src))
        return int(h[0]), int(h[1])


class Stages:
    """Rank 0's backend for the verb: a Backend whose logits run the pipeline (its own layers here, the rest on the
    other ranks); every other name is the real backend's."""

    def __init__(self, link: Link):
        self.link, self._new = link, True

    def __getattr__(self, name):
        return getattr(self.link.be, name)

    def make_cache(self, model, max_kv_size=None, kv_bits=None):
        self._new = True
        return self.link.be.make_cache(model, max_kv_size=max_kv_size, kv_bits=kv_bits)

    def logits(self, model, tokens: np.ndarray, cache=None, last_only: bool = False) -> np.ndarray:
        link = self.link
        out = _compute(link, model, tokens, cache, last_only, tokens.shape[1])
        if link.stage.last:  # a pipeline of one
            return out
        with _whole(link.started):
            return self._exchange(model, tokens, out, last_only)

    def _exchange(self, model, tokens: np.ndarray, out, last_only: bool) -> np.ndarray:
        link, be = self.link, self.link.be
        flags = LAST_ONLY * last_only | NEW_CACHE * self._new | BF16 * be.ops.is_bfloat16(out)
        self._new = False
        link.send(np.array([tokens.shape[1], flags], np.int32), 1)
        link.send(out, 1)
        t, rows = 1 if last_only else tokens.shape[1], link.stage.head_rows(link.vocab, True)
        if rows is None:
            logits = be.ops.to_numpy(link.recv((1, t, link.vocab), "float32", link.stage.size - 1))
        else:  # a shared head: the last rank's rows, then its normed hidden state for this rank's
            theirs = be.ops.to_numpy(link.recv((1, t, link.vocab - rows[1]), "float32", link.stage.size - 1))
            h = link.recv((1, t, link.hidden), link.dtype, link.stage.size - 1)
            logits = np.concatenate([be.pipeline.head(model, h), theirs], -1)
        link.started = True
        return logits

    def token_nll(self, model, tokens: np.ndarray) -> np.ndarray:
        """As the backends' (dn eval): each row's next-token NLL [B, L-1], from the pipeline's logits, one row at
        a time over a fresh cache."""
        out = []
        for row in np.asarray(tokens):
            # the whole row, as the backends' token_nll: torch's bf16 attention depends on the length
            z = self.logits(model, row[None], self.make_cache(model))[0, :-1].astype(np.float64)
            z -= z.max(-1, keepdims=True)
            out.append(np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), row[1:]])
        return np.stack(out)

    def stop(self) -> None:
        if not self.link.stage.last and not self.link.broken:
            self.link.send(np.array([0, 0], np.int32), 1)


@contextlib.contextmanager
def _whole(hold: bool):
    """Ctrl-C held back over one forward's messages (else the peers' answer is read as the next forward's), then
    delivered. Not while the first forward waits on the peers' load (hold False), nor off the main thread."""
    if not hold or threading.current_thread() is not threading.main_thread():
        yield
        return
    held, before = [], signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: held.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if held:
        raise KeyboardInterrupt


def _compute(link: Link, model, x, cache, last_only: bool, n: int):
    t, c = time.perf_counter(), link.counts
    out = link.be.pipeline.forward(model, link.stage, x, cache, last_only)
    c["compute_s"] += time.perf_counter() - t
    c["forwards"], c["tokens"] = c["forwards"] + 1, c["tokens"] + n
    return out


def follow(link: Link, model, **cache_args) -> None:
    """Ranks after the first: receive, run the own layers, pass on (the last: logits to rank 0), until a stop.
    cache_args: the verb's --max-kv-size and --kv-bits, as rank 0's cache has them."""
    be, st, cache = link.be, link.stage, None
    while True:
        n, flags = link.header(st.rank - 1)
        if n == 0:
            if not st.last:
                link.send(np.array([0, 0], np.int32), st.rank + 1)
            return
        h = link.recv((1, n, link.hidden), "bfloat16" if flags & BF16 else "float32", st.rank - 1)
        link.started = True
        if flags & NEW_CACHE or cache is None:
            cache = be.make_cache(model, **cache_args)
        out = _compute(link, model, h, cache, bool(flags & LAST_ONLY), n)
        if not st.last:
            flags = flags & ~BF16 | BF16 * be.ops.is_bfloat16(out)
            link.send(np.array([n, flags], np.int32), st.rank + 1)
        for part in out if isinstance(out, tuple) else (out,):  # a shared head's: its rows' logits, the hidden
            link.send(part, 0 if st.last else st.rank + 1)


def stats_line(link: Link, run, n_layers: int, tied: bool, wall_s: float) -> str:
    st, c = link.stage, link.counts
    lo, hi = st.span(n_layers)
    parts = [f"layers {lo}-{hi - 1} of {n_layers}"]
    if st.first:  # the last rank's tied embedding is its lm_head, said below
        mapped = st.size > 1 and link.be.pipeline.maps_lookups() and st.lookup(run.spec)
        parts.append("embedding" + (" (mapped from the file: rows read per token)" if mapped else
                                    " (tied: the last rank holds it too, as its lm_head)" if tied and st.size > 1
                                    else ""))
    rows = st.head_rows(link.vocab, tied)
    if st.vocab_split and rows and tied:
        parts.append(("norm + " if st.last else "") + f"lm_head rows {rows[0]}-{rows[1] - 1} of {link.vocab} (the "
                     f"tied embedding's, shared by the first and last rank)")
    elif st.last:
        parts.append("norm + lm_head" + (" (the tied embedding)" if tied else ""))
    m = run.memory
    per = lambda s: f"{1e3 * s / max(c['forwards'], 1):.2f} ms"
    return (f"rank {st.rank}: {' + '.join(parts)}; resident {m['measured_resident_bytes'] / 2**20:.1f} MiB measured "
            f"({m['measured_kind']}), load peak {m['load_peak_bytes'] / 2**20:.1f} MiB, peak now "
            f"{memory.peak_bytes(link.be) / 2**20:.0f} MiB; {c['forwards']} forwards, {c['tokens']} tokens, "
            f"{c['forwards'] / max(wall_s, 1e-9):.1f} forwards/s; compute {per(c['compute_s'])}, sent "
            f"{c['sent_bytes'] / max(c['sends'], 1):.0f} B/message in {per(c['send_s'])}, waited {per(c['wait_s'])} "
            f"per forward{_residency(run.residency)}")


def _residency(rt) -> str:  # a rank's own budget, plan and reads
    if rt is None:
        return ""
    s, mib = rt.stats(), lambda n: f"{n / 2**20:.1f} MiB"
    return (f"; residency budget {mib(rt.plan.budget)}, planned {mib(rt.plan.resident)}, read "
            f"{mib(s['fetched_bytes_per_token'])} per token, hit rate {100 * s['hit_rate']:.0f}%")


def gather(link: Link, value: float) -> list[float]:
    """Each rank's value on every rank: once around the ring to collect, once to hand out (neighbours only)."""
    r, n = link.stage.rank, link.stage.size
    if n == 1:
        return [value]
    be, shape = link.be, (n,)
    if r == 0:
        link.send(np.eye(1, n, 0, np.float32)[0] * value, 1)
        whole = be.ops.to_numpy(link.recv(shape, "float32", n - 1))
        link.send(whole, 1)
    else:
        got = be.ops.to_numpy(link.recv(shape, "float32", r - 1)).copy()
        got[r] = value
        link.send(got, (r + 1) % n)
        whole = be.ops.to_numpy(link.recv(shape, "float32", r - 1))
        if r < n - 1:
            link.send(whole, r + 1)
    return [float(x) for x in whole]


def split_for(args, link: Link, be, spec) -> tuple[tuple[int, ...], int | None]:
    """(layers per rank, vocab_split) (balance): --pipeline-split: given counts; auto: in proportion to the ranks'
    memory (stated, else each host's RAM, gathered); by default the least bytes on the largest rank."""
    size = link.stage.size
    lookup_free = be.pipeline.maps_lookups() and bool(Stage(0, size).lookup(spec))
    dtype = loader.compute_dtype(be, spec) if args.dtype == "auto" else args.dtype
    b = 4 if dtype == "float32" else 2
    if args.pipeline_split is None:
        return balance(spec, size, lookup_free, b)
    if args.pipeline_split != "auto":
        if not re.fullmatch(r"\d+(,\d+)*", args.pipeline_split):
            raise DnError(f"--pipeline-split {args.pipeline_split}: expected layer counts such as 15,15, or auto")
        counts = tuple(map(int, args.pipeline_split.split(",")))
        Stage(0, size, counts).span(spec.architecture.num_hidden_layers)  # a bad split is one line
        return balance(spec, size, lookup_free, b, counts=counts)
    if args.pipeline_memory:
        memory = [float(parse_size(x, "--pipeline-memory")) for x in args.pipeline_memory.split(",")]
        if len(memory) != size:
            raise DnError(f"--pipeline-memory {args.pipeline_memory}: {size} sizes, one per rank")
    else:  # GiB on the wire: float32 holds them exactly enough
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = [m * 2**30 for m in gather(link, ram)]
    return balance(spec, size, lookup_free, b, memory, fit=True)


def run(args, argv: list[str], verb: str, body, prompt: str | None = None, stdin: str | None = None,
        shown: tuple = ()) -> int:
    """A verb under --pipeline: launch local ranks (no launcher yet), or be one rank. body(run) is the verb's work
    on rank 0, over a loaded model whose backend runs the pipeline (Stages); the other ranks follow until it ends,
    however it ends. prompt: the text `--prompt -` read from stdin, handed to the local ranks as text; stdin: piped
    input, rank 0's stdin (dn.runtime.launch.launch); shown: the verb's stderr lines the local launcher shows."""
    name = launched()
    if name is None:
        be = args.backend if args.backend != "auto" else backends.auto()
        if prompt is not None:
            argv = [prompt if a == "-" and i and argv[i - 1] in ("-p", "--prompt") else a for i, a in enumerate(argv)]
        return launch(be, args.pipeline or 2, verb, argv, stdin, shown)
    if args.backend not in ("auto", name):
        raise DnError(f"--backend {args.backend} under the {name} launcher")
    be = backends.get(name)
    try:
        group = be.pipeline.connect(args.pipeline_timeout)
    except RuntimeError as e:  # an unreachable or bad host: the transport's error, on one line
        who = os.environ.get("RANK", os.environ.get("MLX_RANK", "?"))
        raise DnError(f"rank {who}: cannot join the pipeline: {_said(e)}") from None
    rank, size = be.pipeline.rank(group), be.pipeline.size(group)
    if args.pipeline and args.pipeline != size:
        raise DnError(f"rank {rank}: --pipeline {args.pipeline} but the launcher started {size} ranks")
    budgets = (getattr(args, "max_resident", None) or "").split(",")
    _, spec = loader.folder(args.model, be, args.dense, bool(budgets[0]))  # the folder the load will read
    cfg = spec.architecture
    n_layers, tied = cfg.num_hidden_layers, bool(cfg.tie_word_embeddings)
    watch = Watchdog(rank, args.pipeline_timeout)
    link = Link(be, group, Stage(rank, size), watch, args.dtype, cfg.hidden_size, cfg.vocab_size)
    link.stage = Stage(rank, size, *split_for(args, link, be, spec))
    link.stage.span(n_layers)  # a bad split is one line before anything is read
    if len(budgets) > 1:  # one per rank, first to last (mlx.launch runs one command line on every host)
        if len(budgets) != size:
            raise DnError(f"rank {rank}: --max-resident {args.max_resident}: {size} budgets, one per rank")
        args.max_resident = budgets[rank]
    try:
        loaded = loader.load(args.model, name, args.dtype, dense=args.dense, stage=link.stage,
                             **residency.load_args(args))
    except DnError as e:  # a rank's own budget or files: say which rank
        raise DnError(f"rank {rank}: {e}") from None
    args.dtype = link.dtype = loaded.dtype
    stage = link.stage
    t = time.perf_counter()
    try:
        if stage.first:
            if os.environ.get(STDIN_ENV):
                sys.stdin = open(os.environ[STDIN_ENV], encoding="utf-8")  # noqa: SIM115 (the process's stdin)
            stages = Stages(link)
            try:
                body(replace(loaded, backend=stages))
            finally:  # a refusal on rank 0 (a DnError) ends the others cleanly: its line is the run's one line
                stages.stop()
        else:
            follow(link, loaded.model, max_kv_size=getattr(args, "max_kv_size", None),
                   kv_bits=getattr(args, "kv_bits", None))
        wall = time.perf_counter() - t
        sys.stderr.write(stats_line(link, loaded, n_layers, tied, wall) + "\n")  # one write: ranks share a pipe
        sys.stderr.flush()
        be.pipeline.close(group)
    finally:
        watch.deadline = None
    return 0
