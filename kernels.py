"""Fused kernels for VLRM: the LM-head log-prob (and entropy) of the A2C loss, and CLIP similarity/retrieval.

Why a fused LM head?  The policy update scores every caption token under OPT-2.7B:
N = 64 captions x 60 tokens = 3,840 rows, hidden H = 2,560, vocabulary V = 50,272.
Plain PyTorch (matmul -> log_softmax -> gather) materialises the logits:

    logits           N*V*2 B (bf16)      = 386 MB written, read back
    log_softmax      N*V*4 B (fp32)      = 772 MB written (+ the fp32 upcast, as large)
    backward         grad of log_softmax and of the logits, as large again

so one step moves several GB through memory and holds ~2-3 GB at its peak, to produce
N log-probs (15 KB).  The matmul itself is 2*N*V*H = 0.99 TFLOP, ~1.5-2 ms on an H100, while
the memory passes cost about as much again.  The floor is to read W (V*H*2 B = 257 MB) and
the hidden states once and do the matmul: an online log-sum-exp over vocabulary tiles keeps
only (rows x 128) logits in registers, so the extra memory is O(N) and the time is the
matmul's.  Expected gain: ~20x less peak memory, and about the time of the LM-head matmul
(the forward recomputes nothing; the backward recomputes the logits once, see below).

The same trick serves CLIP retrieval: ranking 100,000 captions against 100,000 images at
D = 768 would need a 40 GB similarity matrix; a kernel that counts "items scoring higher than
the match" tile by tile needs O((N + M) * D) memory.

Run:
    python kernels.py --bench [--out bench.json]    # table at the paper's shapes (GPU)
    pytest test_kernels.py                          # Triton interpreter on the CPU

Layout: for each kernel a readable PyTorch reference sits beside it; `backend` picks Triton
for CUDA tensors (or under TRITON_INTERPRET=1) and the reference otherwise.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "torch", "triton")
BACKEND = "auto"
NEG = tl.constexpr(-1e30)  # finite "minus infinity": -inf makes numpy (the interpreter) warn inside tl.where


def set_backend(name: str) -> None:
    """Pick the default backend: 'auto' (Triton on CUDA/interpreter), 'torch' or 'triton'."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    BACKEND = name


def _use_triton(backend, *tensors) -> bool:
    backend = BACKEND if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = all(t.is_cuda for t in tensors)
    if backend == "triton" and not (on_gpu or INTERPRET):
        raise RuntimeError("Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    return backend == "triton" or (backend == "auto" and (on_gpu or INTERPRET))


# --------------------------------------------------------------------------------------------
# 1. Linear -> log-prob of the target token (+ entropy)
# --------------------------------------------------------------------------------------------
# Math, per row i with logits z_i = W h_i (V,), lse_i = log sum_j exp(z_ij), p_ij = exp(z_ij - lse_i):
#     logp_i = z_i[t_i] - lse_i              entropy_i = lse_i - sum_j p_ij z_ij
# Online log-sum-exp (Milakov & Gimelshein 2018): sweep vocabulary tiles keeping a running max
# m, s = sum exp(z - m) and a = sum exp(z - m) (z - m); when m grows to m', rescale both by
# exp(m - m') (and a picks up s (m - m')).  Then lse = m + log s and entropy = log s - a / s,
# with no cancellation between two numbers of size |z| (logits may reach 1e4).

def logprob_eager(hidden, weight, targets):
    """Plain PyTorch, as a training loop would write it: materialises (N, V) logits."""
    logits = hidden @ weight.t()
    return logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


class _ChunkedLogProb(torch.autograd.Function):
    """Readable reference: the same math in fp32, (chunk, V) logits at a time, forward and back."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        w = weight.float()
        logp, ent, lse = [], [], []
        for h, t in zip(hidden.split(chunk), targets.split(chunk)):
            z = h.float() @ w.t()                                   # (chunk, V) fp32
            lse_c = z.logsumexp(-1)
            logp_c = z.log_softmax(-1)
            logp.append(logp_c.gather(1, t[:, None]).squeeze(1))
            ent.append(-(logp_c.exp() * logp_c).sum(-1))
            lse.append(lse_c)
        logp, ent, lse = torch.cat(logp), torch.cat(ent), torch.cat(lse)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)                         # g_ent is None if unused
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        w = weight.float()
        grad_h = torch.empty_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            h = hidden[rows].float()
            logp = h @ w.t() - lse[rows, None]                      # (chunk, V) recomputed
            p = logp.exp()
            dz = -g_logp[rows, None] * p                             # d logp / dz = onehot - p
            dz.scatter_add_(1, targets[rows, None], g_logp[rows, None])
            if g_ent is not None:                                    # d ent / dz = -p (logp + ent)
                dz -= g_ent[rows, None] * p * (logp + ent[rows, None])
            grad_h[rows] = dz @ w
            if grad_w is not None:
                grad_w += dz.t() @ h
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h.to(hidden.dtype), grad_w, None, None


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr = tl.float32):
    """z[rows, cols] = hidden[rows] @ weight[cols]^T as a (BLOCK_N, BLOCK_V) fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :],
                    mask=row_ok[:, None] & (k < H)[None, :], other=0.0)   # (BLOCK_N, BLOCK_H)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :],
                    mask=col_ok[:, None] & (k < H)[None, :], other=0.0)   # (BLOCK_V, BLOCK_H)
        if UPCAST:  # interpreter (bf16 is wrong there) or fp32 inputs; on GPU bf16 feeds tensor cores
            h = h.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc.to(tl.float32)


@triton.jit
def _logprob_fwd_kernel(
    h_ptr,        # (N, H) hidden states, row stride stride_hn
    w_ptr,        # (V, H) LM head weight, row stride stride_wv
    t_ptr,        # (N,) int64 target token ids
    m_ptr,        # (S, N) fp32 out: running max of the logits in this program's vocab split
    s_ptr,        # (S, N) fp32 out: sum exp(z - m) over the split
    a_ptr,        # (S, N) fp32 out: sum exp(z - m) * (z - m) over the split (for the entropy)
    zt_ptr,       # (S, N) fp32 out: target logit if it lies in this split, else 0
    N, V, H,      # sizes
    stride_hn, stride_wv,  # row strides of hidden and weight (columns are contiguous)
    N_BUCKET,     # next power of 2 >= N: unused here, only part of the autotuner's key
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (pid_n, pid_s): rows [pid_n*BLOCK_N, +BLOCK_N) x vocabulary split pid_s of the S =
    # num_programs(1) splits.  Splitting the vocabulary gives the GPU enough programs (N/64 = 60
    # row blocks alone fill half an H100).  The launcher picks S, the autotuner BLOCK_V, so the
    # split's columns are worked out here, in whole BLOCK_V tiles.  Trailing splits may be empty:
    # they store m = NEG, s = a = zt = 0, which the merge weighs by exp(NEG - m) = 0.
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    v_split = tl.cdiv(tl.cdiv(V, BLOCK_V), tl.num_programs(1)) * BLOCK_V
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), NEG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_end = tl.minimum(pid_s * v_split + v_split, V)
    for v0 in range(pid_s * v_split, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        z = tl.where(col_ok[None, :], z, NEG)                    # padding columns: exp -> 0
        m_new = tl.maximum(m, tl.max(z, 1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        a = scale * (a + s * (m - m_new)) + tl.sum(e * (z - m_new[:, None]), 1)
        s = scale * s + tl.sum(e, 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(a_ptr + out, a, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr,        # (N, H) hidden states, row stride stride_hn
    w_ptr,        # (V, H) LM head weight, row stride stride_wv
    t_ptr,        # (N,) int64 target token ids
    lse_ptr,      # (N,) fp32 log-sum-exp saved by the forward
    ent_ptr,      # (N,) fp32 entropy saved by the forward
    g_ptr,        # (N,) fp32 upstream gradient of logp
    ge_ptr,       # (N,) fp32 upstream gradient of the entropy (read only if HAS_ENT)
    dz_ptr,       # (N, VC) out: gradient of the logits for vocabulary columns [v_lo, v_lo + VC)
    N, V, H, v_lo, VC,     # sizes; this launch covers columns [v_lo, min(v_lo + VC, V))
    stride_hn, stride_wv, stride_dn,  # row strides of hidden, weight and dz
    N_BUCKET,     # next power of 2 >= N: unused here, only part of the autotuner's key
    HAS_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_lo + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < tl.minimum(v_lo + VC, V)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)      # recomputed, fp32
    logp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(logp)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)[:, None]
    dz = g * (tl.where(cols[None, :] == tgt, 1.0, 0.0) - p)
    if HAS_ENT:
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)[:, None]
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
        dz -= ge * p * (logp + ent)
    tl.store(dz_ptr + rows[:, None] * stride_dn + (cols - v_lo)[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Tile sizes.  On a GPU they are the autotuner's pick, timed once per (N bucket, V, H, dtypes) on
# the first call, from candidates that suit Hopper: wgmma multiplies 64-row slices per warp group,
# so BLOCK_N is 64 or 128, and 3-4 stages of (BLOCK_N + BLOCK_V) x BLOCK_H bf16 tiles fit its
# 228 KB of shared memory.  The (BLOCK_N, BLOCK_V) fp32 logits tile lives in registers:
# 128 x 256 is 128 registers a thread with 8 warps (as in Triton's matmul tutorial) and would
# spill with 4, so it is offered with 8 only.  A candidate that does not fit (fp32 inputs need
# twice the shared memory) fails to compile and the autotuner skips it.
def _lm_tile(block_n, block_v, block_h, num_warps, num_stages):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h),
                         num_warps=num_warps, num_stages=num_stages)


LM_CONFIGS = [
    _lm_tile(64, 128, 64, 8, 3),      # the hand-picked config before autotuning; small problems
    _lm_tile(64, 128, 64, 4, 4),
    _lm_tile(64, 256, 64, 8, 3),
    _lm_tile(128, 128, 64, 8, 3),
    _lm_tile(128, 128, 64, 8, 4),
    _lm_tile(128, 128, 32, 8, 4),
    _lm_tile(128, 256, 64, 8, 3),
]


def _first_if_small(configs, named_args, **kwargs):
    """A problem of microseconds is not worth compiling and timing every candidate: the first."""
    work = named_args["N_BUCKET"] * named_args.get("VC", named_args["V"]) * named_args["H"]
    return configs if work >= 1 << 30 else configs[:1]


def _autotuned(kernel, key):
    """`kernel` under the autotuner on a GPU; as it is under the interpreter, which has none.
    Safe to re-run while tuning: both LM-head kernels only store their outputs, never add to
    them.  N varies from call to call in training, so the key holds a power-of-2 bucket of N."""
    if INTERPRET:
        return kernel
    return triton.autotune(LM_CONFIGS, key=key, prune_configs_by={"early_config_prune": _first_if_small})(kernel)


_logprob_fwd = _autotuned(_logprob_fwd_kernel, key=["N_BUCKET", "V", "H"])
_logprob_bwd = _autotuned(_logprob_bwd_kernel, key=["N_BUCKET", "VC", "H"])


def _lm_meta(hidden):
    """Compile-time arguments.  The interpreter's cost is programs x loop trips, so it gets a fixed
    config of few, big programs; on a GPU the tiles are left to the autotuner."""
    fp32 = hidden.dtype == torch.float32
    meta = dict(UPCAST=INTERPRET or fp32, PRECISION="ieee" if fp32 else "tf32")
    if INTERPRET:
        meta.update(BLOCK_N=min(128, triton.next_power_of_2(max(hidden.shape[0], 16))),
                    BLOCK_V=256, BLOCK_H=128, num_warps=4)
    return meta


def _vocab_splits(hidden, V):
    """Vocabulary splits S of the forward, fixed before the autotuner picks the tiles.  On a GPU:
    ~8 programs per SM even with the largest tiles (128 rows x 256 columns), so the last wave is
    a small part of the run; the (S, N) partial results stay small (36 x 3840 at the paper's
    shape on 132 SMs).  Under the interpreter: about 2 programs of its fixed config."""
    if INTERPRET:
        meta = _lm_meta(hidden)
        block_n, block_v, programs = meta["BLOCK_N"], meta["BLOCK_V"], 2
    else:
        block_n, block_v = 128, 256
        programs = 8 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    return min(triton.cdiv(programs, triton.cdiv(hidden.shape[0], block_n)), triton.cdiv(V, block_v))


def _triton_logprob_fwd(hidden, weight, targets):
    """-> logp, entropy, lse, each (N,) fp32; no (N, V) tensor is ever allocated."""
    N, H = hidden.shape
    V = weight.shape[0]
    splits = _vocab_splits(hidden, V)
    m, s, a, zt = (torch.empty(splits, N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    _logprob_fwd[lambda META: (triton.cdiv(N, META["BLOCK_N"]), splits)](
        hidden, weight, targets, m, s, a, zt, N, V, H, hidden.stride(0), weight.stride(0),
        triton.next_power_of_2(N), **_lm_meta(hidden))
    # merge the splits exactly as the loop merges tiles (O(S*N) work).  An empty split has
    # m = NEG: scale = exp(NEG - m_all) = 0 and s = a = 0, so it adds exact zeros, no NaN.
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)
    s_all = (scale * s).sum(0)
    a_all = (scale * (a + s * (m - m_all))).sum(0)
    lse = m_all + s_all.log()
    return zt.sum(0) - lse, s_all.log() - a_all / s_all, lse


DZ_ELEMS = 1 << 25  # the backward's dz buffer: at most ~32 M elements (64 MB in bf16)


def _dz_chunk(N, V):
    """Vocabulary columns per backward step: as few steps as the dz budget allows (each step's
    launch ends in a partly idle wave, and cuBLAS is faster on a longer K), in equal chunks
    rounded to 256 (the widest BLOCK_V).  Under the interpreter: 512, to exercise several."""
    if INTERPRET:
        return min(512, V)
    steps = triton.cdiv(N * V, DZ_ELEMS)
    return min(V, triton.cdiv(triton.cdiv(V, steps), 256) * 256)


def _addmm_fp32_(acc, a, b):
    """acc += a @ b, with acc fp32 and a, b maybe half. On a GPU cuBLAS adds into acc in its epilogue
    (out_dtype); elsewhere (the interpreter's CPU tensors) the product is upcast and added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def _triton_logprob_bwd(hidden, weight, targets, lse, ent, g, g_ent, need_grad_w):
    """Gradients of sum(g * logp + g_ent * ent) for hidden (and weight).

    d logp_i / d z_ij = 1[j = t_i] - p_ij      d ent_i / d z_ij = -p_ij (log p_ij + ent_i)
    dz_ij = g_i (1[j = t_i] - p_ij) - g_ent_i p_ij (log p_ij + ent_i)
    grad_hidden = dz @ W  (N, H)          grad_W = dz^T @ hidden  (V, H)

    The kernel recomputes the logits from the saved lse and writes dz for one vocabulary chunk
    (N x 8448: 65 MB in bf16 at the paper's shape, vs 386 MB for all logits); cuBLAS then does
    the two big matmuls at full speed, adding into an fp32 grad_hidden.  Accumulating
    grad_hidden inside the kernel instead would need a (BLOCK_N, H) fp32 accumulator per program
    (640 KB at H = 2560: no registers hold that) or V / BLOCK_V read-modify-writes of
    grad_hidden through L2.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = _dz_chunk(N, V)
    dz = torch.empty(N, chunk, device=hidden.device, dtype=weight.dtype)
    grad_h = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
    grad_w = torch.empty_like(weight) if need_grad_w else None
    def grid(META):                                              # tiles come from the autotuner
        return triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(chunk, META["BLOCK_V"])

    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        _logprob_bwd[grid](
            hidden, weight, targets, lse, ent, g, g if g_ent is None else g_ent, dz, N, V, H,
            v_lo, chunk, hidden.stride(0), weight.stride(0), dz.stride(0), triton.next_power_of_2(N),
            HAS_ENT=g_ent is not None, **_lm_meta(hidden))
        dz_c = dz[:, : v_hi - v_lo]
        _addmm_fp32_(grad_h, dz_c, weight[v_lo:v_hi])
        if need_grad_w:
            torch.mm(dz_c.t(), hidden, out=grad_w[v_lo:v_hi])
    return grad_h.to(hidden.dtype), grad_w


def lm_head_tuning(hidden, weight):
    """What the LM-head kernels run with at this size, for the record: the autotuner's latest pick
    (None before the first call), the forward's vocabulary splits, the backward's chunk."""
    def pick(kernel):
        cfg = getattr(kernel, "best_config", None)
        return None if cfg is None else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(fwd="interpreter" if INTERPRET else pick(_logprob_fwd),
                bwd="interpreter" if INTERPRET else pick(_logprob_bwd),
                vocab_splits=_vocab_splits(hidden, weight.shape[0]),
                dz_chunk=_dz_chunk(hidden.shape[0], weight.shape[0]))


class _TritonLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logp, ent, lse = _triton_logprob_fwd(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.set_materialize_grads(False)                         # g_ent is None if unused
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        grad_h, grad_w = _triton_logprob_bwd(hidden, weight, targets, lse, ent, g_logp.float().contiguous(),
                                             None if g_ent is None else g_ent.float().contiguous(),
                                             ctx.needs_input_grad[1])
        return grad_h, grad_w, None


def fused_logprob(hidden, weight, targets, *, with_entropy=False, backend=None, chunk=1024):
    """log p(targets | hidden) under the LM head `weight`, without materialising (N, V) logits.

    hidden (N, H) float, weight (V, H), targets (N,) int64 -> logp (N,) fp32 [, entropy (N,) fp32].
    Differentiable wrt hidden, and wrt weight when it requires grad.  `chunk`: rows per step of
    the torch reference.  Targets must lie in [0, V): the reference raises otherwise, the Triton
    path does not check (a check would stall the GPU on every call).
    """
    targets = targets.long().contiguous()
    if _use_triton(backend, hidden, weight, targets) and hidden.shape[0] > 0:  # N = 0: nothing to launch
        hidden = hidden.to(weight.dtype).contiguous()  # one dtype for tl.dot
        logp, ent = _TritonLogProb.apply(hidden, weight.contiguous(), targets)
    else:
        logp, ent = _ChunkedLogProb.apply(hidden, weight, targets, chunk)
    return (logp, ent) if with_entropy else logp


# --------------------------------------------------------------------------------------------
# 2. CLIP: per-pair cosine similarity, and retrieval ranks without the N x M matrix
# --------------------------------------------------------------------------------------------

def pair_similarity_torch(image_emb, text_emb):
    return (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)


@triton.jit
def _pair_similarity_kernel(
    x_ptr,        # (B, D) image embeddings, row stride stride_x
    y_ptr,        # (B, D) text embeddings, row stride stride_y
    out_ptr,      # (B,) fp32 out: cosine similarity of row b of x with row b of y
    B, D, stride_x, stride_y,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One pass over both rows: x.y, |x|^2, |y|^2 together -- normalising first would read twice.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    xy = tl.zeros((BLOCK_B,), tl.float32)
    xx = tl.zeros((BLOCK_B,), tl.float32)
    yy = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = (rows < B)[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_y + d[None, :], mask=ok, other=0.0).to(tl.float32)
        xy += tl.sum(x * y, 1)
        xx += tl.sum(x * x, 1)
        yy += tl.sum(y * y, 1)
    eps = 1e-12                                                   # as F.normalize: x / max(|x|, eps)
    cos = xy / (tl.maximum(tl.sqrt(xx), eps) * tl.maximum(tl.sqrt(yy), eps))
    tl.store(out_ptr + rows, cos, mask=rows < B)


def pair_similarity(image_emb, text_emb, *, backend=None):
    """(B, D), (B, D) -> (B,) fp32 cosine similarity of each image with its own caption."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"pair_similarity needs two (B, D) tensors of one shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if not _use_triton(backend, image_emb, text_emb):
        return pair_similarity_torch(image_emb, text_emb)
    x, y = image_emb.contiguous(), text_emb.contiguous()
    B, D = x.shape
    out = torch.empty(B, device=x.device, dtype=torch.float32)
    BLOCK_B = 64 if INTERPRET else 16
    _pair_similarity_kernel[(triton.cdiv(B, BLOCK_B),)](
        x, y, out, B, D, x.stride(0), y.stride(0), BLOCK_B=BLOCK_B,
        BLOCK_D=min(1024, triton.next_power_of_2(D)))
    return out


def _inv_norm(x):
    return 1.0 / torch.linalg.vector_norm(x.float(), dim=-1).clamp(min=1e-12)


# Ranking needs only the gallery norms: a query's own norm scales its whole row of scores and
# cannot reorder it.  So score_j = (q . g_j) / |g_j|, and rank = #{j : score_j > score_match}.
# Ties: a gallery row bit-identical to the match (or a power-of-two multiple of it) gets a
# bit-identical score and is not counted, because the match's score is read from the very same
# computation as everyone else's -- never recomputed another way (a matmul's rounding depends
# on the shapes).  This needs each tile element computed the same way wherever it sits: true
# of tensor-core MMA, false of numpy's matmul and of PyTorch's CPU matmul (its edge columns
# round differently), so the interpreter and the reference accumulate in fp64 and round the
# scores to fp32 (position effects at 1e-16 vanish in the rounding).

def retrieval_ranks_torch(queries, gallery, targets, budget=1 << 24):
    """Reference: scores of a block of queries against the whole gallery, <= `budget` floats."""
    g = gallery.double()
    g_inv = _inv_norm(gallery)
    step = max(1, budget // g.shape[0])
    ranks = [torch.zeros(0, dtype=torch.int64, device=queries.device)]  # N = 0: no ranks
    for i in range(0, queries.shape[0], step):
        scores = (queries[i:i + step].double() @ g.t()).float() * g_inv    # (step, M)
        match = scores.gather(1, targets[i:i + step, None])
        ranks.append((scores > match).sum(1))
    return torch.cat(ranks)


@triton.jit
def _score_tile(q_ptr, g_ptr, ginv_ptr, rows, row_ok, m0, M, D, stride_q, stride_g,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK, BLOCK) fp32 scores of the query rows against gallery rows [m0, m0 + BLOCK)."""
    cols = m0 + tl.arange(0, BLOCK)
    col_ok = cols < M
    s = _logits_tile(q_ptr, g_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_g,
                     BLOCK, BLOCK, BLOCK_D, UPCAST, PRECISION, ACC)
    return s * tl.load(ginv_ptr + cols, mask=col_ok, other=0.0)[None, :], cols, col_ok


@triton.jit
def _retrieval_rank_kernel(
    q_ptr,        # (N, D) queries, row stride stride_q (need not be normalised)
    g_ptr,        # (M, D) gallery, row stride stride_g
    ginv_ptr,     # (M,) fp32 1 / |gallery row|
    t_ptr,        # (N,) int64 index of each query's match in the gallery
    rank_ptr,     # (N,) int64 out: number of gallery items scoring strictly higher than the match
    N, M, D, stride_q, stride_g,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr,  # fp32; fp64 in the interpreter, whose numpy matmul rounds by position
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    # Pass 1: the match scores, from the gallery tiles that hold this block's matches (one
    # tile when query i matches item i, as in paired image-caption sets).
    lo = tl.min(tl.where(row_ok, tgt, M)) // BLOCK * BLOCK
    hi = tl.max(tl.where(row_ok, tgt, 0)) + 1
    match = tl.zeros((BLOCK,), tl.float32)
    for m0 in range(lo, hi, BLOCK):
        s, cols, col_ok = _score_tile(q_ptr, g_ptr, ginv_ptr, rows, row_ok, m0, M, D, stride_q,
                                      stride_g, BLOCK, BLOCK_D, UPCAST, PRECISION, ACC)
        match += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)
    # Pass 2: count the gallery items that beat the match, one (BLOCK, BLOCK) tile at a time.
    count = tl.zeros((BLOCK,), tl.int64)
    for m0 in range(0, M, BLOCK):
        s, cols, col_ok = _score_tile(q_ptr, g_ptr, ginv_ptr, rows, row_ok, m0, M, D, stride_q,
                                      stride_g, BLOCK, BLOCK_D, UPCAST, PRECISION, ACC)
        count += tl.sum(((s > match[:, None]) & col_ok[None, :]).to(tl.int64), 1)
    tl.store(rank_ptr + rows, count, mask=row_ok)


def retrieval_ranks(queries, gallery, targets=None, *, backend=None):
    """(N, D) queries, (M, D) gallery, targets (N,) int64 (default arange(N)) -> (N,) int64 rank:
    the number of gallery items with strictly higher cosine similarity than the match (0 is an
    R@1 hit; ties count in the query's favour).  Memory O((N + M) * D): no N x M matrix."""
    if targets is None:
        targets = torch.arange(queries.shape[0], device=queries.device)
    targets = targets.long().contiguous()
    if queries.shape[1:] != gallery.shape[1:] or targets.shape != queries.shape[:1]:
        raise ValueError(f"retrieval_ranks needs queries (N, D), gallery (M, D) and targets (N,), got "
                         f"{tuple(queries.shape)}, {tuple(gallery.shape)} and {tuple(targets.shape)}")
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < gallery.shape[0]:
        raise ValueError(f"retrieval_ranks: targets index a gallery of {gallery.shape[0]} items, got "
                         f"{int(targets.min())}..{int(targets.max())}")
    if not _use_triton(backend, queries, gallery, targets) or not len(targets):  # N = 0: nothing to launch
        return retrieval_ranks_torch(queries, gallery, targets)
    if queries.dtype != gallery.dtype:
        queries, gallery = queries.float(), gallery.float()
    q, g = queries.contiguous(), gallery.contiguous()
    N, D = q.shape
    ranks = torch.empty(N, device=q.device, dtype=torch.int64)
    fp32 = q.dtype == torch.float32
    BLOCK = 64 if INTERPRET else 128
    _retrieval_rank_kernel[(triton.cdiv(N, BLOCK),)](
        q, g, _inv_norm(g), targets, ranks, N, g.shape[0], D, q.stride(0), g.stride(0),
        BLOCK=BLOCK, BLOCK_D=128 if INTERPRET else 64, UPCAST=INTERPRET or fp32,
        PRECISION="ieee" if fp32 else "tf32", ACC=tl.float64 if INTERPRET else tl.float32,
        num_warps=8 if not INTERPRET else 4)
    return ranks


def recall_at_k(ranks, ks=(1, 5, 10)) -> dict:
    """R@K as a fraction (rank < K; the paper reports R@1 = 0.90), plus the median and mean 1-based rank.
    The median rank is CLIP-Caption-Reward's (tools/eval_clip_retrieval.py), floor(numpy.median(ranks)) + 1
    over 0-based ranks: an even count averages its two middle ranks, then rounds down."""
    ranks = ranks.double()
    out = {f"R@{k}": (ranks < k).double().mean().item() for k in ks}
    middle = ranks.sort().values[[(len(ranks) - 1) // 2, len(ranks) // 2]]  # the same rank twice for an odd count
    out["median_rank"] = math.floor(middle.mean().item()) + 1
    out["mean_rank"] = ranks.mean().item() + 1
    return out


# --------------------------------------------------------------------------------------------
# 3. Benchmark: python kernels.py --bench [--out FILE]
# --------------------------------------------------------------------------------------------

def _measure(fn, device, reps):
    """-> (median ms, peak memory above the starting point in MB, or None on the CPU)."""
    cuda = device.type == "cuda"
    fn()                              # warm-up: Triton compiles and autotunes here, not in the timing
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return sorted(times)[len(times) // 2], peak


def _ceilings(device, dtype, reps):
    """Measured roofs: a plain square matmul (TFLOP/s) and a device-to-device copy (GB/s)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms, _ = _measure(lambda: a @ b, device, reps)
    x = torch.empty(2**28 if device.type == "cuda" else 2**25, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms_copy, _ = _measure(lambda: y.copy_(x), device, reps)
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "memcpy_gbs": 2 * x.numel() / ms_copy / 1e6}


def bench(out=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = 10 if gpu else 3
    N, H, V = (3840, 2560, 50272) if gpu else (256, 512, 8192)
    sizes = (5000, 100000) if gpu else (1000, 4000)
    D = 768
    name = torch.cuda.get_device_name() if gpu else "CPU (%d threads)" % torch.get_num_threads()
    ceil = _ceilings(device, dtype, reps)
    rows = []

    def add(label, shape, fn, work, unit):
        ms, peak = _measure(fn, device, reps)
        rate = work / ms / 1e9 if unit == "TFLOP/s" else work / ms / 1e6
        roof = ceil["matmul_tflops"] if unit == "TFLOP/s" else ceil["memcpy_gbs"]
        rows.append(dict(name=label, shape=shape, ms=ms, peak_mb=peak, rate=rate, unit=unit,
                         pct_of_ceiling=100 * rate / roof))

    # LM head, the paper's setting: hidden states trainable upstream, LM head frozen.
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
    targets = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    shape = f"N={N} H={H} V={V} {str(dtype)[6:]}"

    def step(logprob):
        def run():
            hidden.grad = None
            (logprob() * g).sum().backward()
        return run
    flops = 2 * N * V * H
    add("LM-head matmul alone (fwd)", shape, lambda: hidden.detach() @ weight.t(), flops, "TFLOP/s")
    add("eager fwd+bwd", shape, step(lambda: logprob_eager(hidden, weight, targets)), 2 * flops, "TFLOP/s")
    add("chunked torch fwd+bwd", shape,
        step(lambda: fused_logprob(hidden, weight, targets, backend="torch")), 2 * flops, "TFLOP/s")
    tuning = None
    if gpu:
        add("triton fwd+bwd", shape,
            step(lambda: fused_logprob(hidden, weight, targets, backend="triton")), 2 * flops, "TFLOP/s")
        tuning = lm_head_tuning(hidden, weight)                # the configs the figures were timed with
    del hidden, weight

    for n in sizes:
        q = torch.randn(n, D, device=device, dtype=dtype)
        gal = q + 0.5 * torch.randn(n, D, device=device, dtype=dtype)
        shape = f"N=M={n} D={D} {str(dtype)[6:]}"
        work = 2 * n * n * D
        if n * n * 4 <= (8 << 30 if gpu else 1 << 28):          # the full matrix must fit
            def eager():
                s = F.normalize(q.float(), dim=-1) @ F.normalize(gal.float(), dim=-1).t()
                return (s > s.diagonal()[:, None]).sum(1)
            add("retrieval eager (N x M matrix)", shape, eager, work, "TFLOP/s")
        add("retrieval chunked torch", shape, lambda: retrieval_ranks(q, gal, backend="torch"), work, "TFLOP/s")
        if gpu:
            add("retrieval triton", shape, lambda: retrieval_ranks(q, gal, backend="triton"), work, "TFLOP/s")
    b = torch.randn(4096 if gpu else 512, D, device=device, dtype=dtype)
    add("pair similarity torch", f"B={b.shape[0]} D={D}", lambda: pair_similarity(b, b, backend="torch"),
        2 * b.numel() * b.element_size(), "GB/s")
    if gpu:
        add("pair similarity triton", f"B={b.shape[0]} D={D}", lambda: pair_similarity(b, b, backend="triton"),
            2 * b.numel() * b.element_size(), "GB/s")

    print(f"device: {name}   ceiling: matmul {ceil['matmul_tflops']:.3g} TFLOP/s ({str(dtype)[6:]}), "
          f"memcpy {ceil['memcpy_gbs']:.0f} GB/s")
    print(f"{'path':<32}{'shape':<30}{'ms':>10}{'peak MB':>10}{'rate':>16}{'% ceil':>8}")
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{r['name']:<32}{r['shape']:<30}{r['ms']:>10.2f}{peak:>10}"
              f"{r['rate']:>8.3g} {r['unit']:<7}{r['pct_of_ceiling']:>8.0f}")
    if tuning:
        print(f"LM-head kernels: {json.dumps(tuning)}")
    if not gpu:
        print("CPU run: reduced shapes, PyTorch paths only; the Triton figures need a CUDA GPU.")
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                           dtype=str(dtype), ceiling=ceil, rows=rows, lm_head_tuning=tuning), f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="print the benchmark table")
    parser.add_argument("--out", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    if args.bench:
        bench(args.out)
    else:
        parser.print_help()
