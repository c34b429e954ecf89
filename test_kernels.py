"""Tests for kernels.py: Triton kernels (the interpreter on a CPU) and the torch references.

Accuracy idiom: compute the truth in fp64, PyTorch eager in the same low dtype, and require
    error(kernel) <= error(eager) + small atol
so half-precision inputs are judged against what PyTorch itself achieves with them.
Run: pytest -q test_kernels.py   (conftest.py sets TRITON_INTERPRET=1 when there is no GPU)
"""
import numpy as np
import pytest
import torch

import kernels as K  # conftest.py has switched on TRITON_INTERPRET when there is no GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # x max|truth|
BACKENDS = ["triton", "torch"]


def make_lm(N, H, V, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(N, H, generator=g)).to(DEV, dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(DEV, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEV)
    return hidden, weight, targets


def lm_outputs(hidden, weight, targets, g, ge, *, fn, weight_grad):
    """(logp, entropy, grad_hidden, grad_weight) of sum(g*logp + ge*ent) under `fn`."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight_grad)
    logp, ent = fn(h, w, targets)
    (g.to(logp) * logp + ge.to(ent) * ent).sum().backward()
    return logp.detach().double(), ent.detach().double(), h.grad.double(), \
        None if w.grad is None else w.grad.double()


def torch_math(h, w, t):
    """PyTorch eager in the inputs' dtype (fp64 inputs give the truth)."""
    logits = (h @ w.t()).float() if h.dtype != torch.float64 else h @ w.t()
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(1, t[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


def assert_no_worse(got, eager, truth, dtype, what, rel=None):
    err_k = (got - truth).abs().max().item()
    err_t = (eager - truth).abs().max().item()
    tol = err_t + (ATOL[dtype] if rel is None else rel) * max(truth.abs().max().item(), 1.0)
    assert err_k <= tol, f"{what}: kernel error {err_k:.3g} > torch error {err_t:.3g} + atol"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprob_entropy_and_grads_vs_fp64(dtype, backend, monkeypatch):
    # irregular sizes: N, H, V are no block multiples; N = 70 leaves masked rows in the block
    hidden, weight, targets = make_lm(70, 100, 1823, dtype)
    monkeypatch.setattr(K, "DZ_ELEMS", 70 * 512)       # GPU: backward in 4 vocabulary chunks, as
                                                       # the interpreter's fixed chunk of 512 does
    g, ge = torch.randn(70, device=DEV), torch.randn(70, device=DEV)

    def fused(h, w, t):
        return K.fused_logprob(h, w, t, with_entropy=True, backend=backend)
    got = lm_outputs(hidden, weight, targets, g, ge, fn=fused, weight_grad=True)
    eager = lm_outputs(hidden, weight, targets, g, ge, fn=torch_math, weight_grad=True)
    truth = lm_outputs(hidden.double(), weight.double(), targets, g, ge, fn=torch_math, weight_grad=True)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, eager, truth):
        assert a.shape == c.shape and torch.isfinite(a).all(), name
        assert_no_worse(a, b, c, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_two_row_blocks(backend):
    # N = 150 spans two row blocks; the LM head is frozen, as in the paper: no weight grad
    hidden, weight, targets = make_lm(150, 45, 517, torch.float32, seed=1)
    g = torch.randn(150, device=DEV)
    h = hidden.clone().requires_grad_()
    logp = K.fused_logprob(h, weight, targets, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == (150,)
    (g * logp).sum().backward()
    truth = lm_outputs(hidden.double(), weight.double(), targets, g, 0 * g, fn=torch_math,
                       weight_grad=False)
    assert weight.grad is None
    torch.testing.assert_close(logp.detach().double(), truth[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), truth[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_vocabulary_splits_merge(splits, monkeypatch):
    # a GPU splits the vocabulary over ~8 programs per SM; the interpreter picks at most 2, so the
    # merge of 3 or 8 partial (max, sum, entropy) results, some over empty splits, is forced here
    monkeypatch.setattr(K, "_vocab_splits", lambda hidden, V: splits)
    hidden, weight, targets = make_lm(20, 32, 517, torch.float32, seed=6)
    logp, ent = K.fused_logprob(hidden, weight, targets, with_entropy=True, backend="triton")
    tl, te = torch_math(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(logp.double(), tl, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), te, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    # hidden scaled so that logits reach ~1e4: the online log-sum-exp must not overflow
    hidden, weight, targets = make_lm(37, 64, 777, dtype, scale=2000.0, seed=2)
    zmax = (hidden.double() @ weight.double().t()).abs().max().item()
    assert zmax > 5e3
    # Conditioning: an fp32 logit of size 1e4 is only known to ~1e-3, so p = exp(z - lse) and
    # every gradient carry relative errors of order |z| * eps whatever the implementation;
    # the allowance scales with that instead of with eps alone.
    rel = max(ATOL[dtype], 8 * zmax * torch.finfo(torch.float32).eps)
    g, ge = torch.randn(37, device=DEV), torch.randn(37, device=DEV)

    def fused(h, w, t):
        return K.fused_logprob(h, w, t, with_entropy=True, backend="triton")
    got = lm_outputs(hidden, weight, targets, g, ge, fn=fused, weight_grad=True)
    eager = lm_outputs(hidden, weight, targets, g, ge, fn=torch_math, weight_grad=True)
    truth = lm_outputs(hidden.double(), weight.double(), targets, g, ge, fn=torch_math, weight_grad=True)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, eager, truth):
        assert torch.isfinite(a).all(), name
        assert_no_worse(a, b, c, dtype, name, rel=rel)


def test_full_vocabulary_forward():
    # the real OPT vocabulary, tiny N and H: many vocab tiles and two vocabulary splits
    hidden, weight, targets = make_lm(20, 32, 50272, torch.float32, seed=3)
    logp, ent = K.fused_logprob(hidden, weight, targets, with_entropy=True, backend="triton")
    tl, te = torch_math(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(logp.double(), tl, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), te, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_advantage_weighted_loss(backend):
    # vlrm's actor loss: per-row upstream gradients -A_i / n reach the kernel's backward, and
    # rows with A_i = 0 (masked) must get exactly zero gradient
    hidden, weight, targets = make_lm(53, 45, 517, torch.float32, seed=4)
    adv = torch.randn(53, device=DEV)
    mask = (torch.rand(53, device=DEV) > 0.3).float()
    mask[:5] = 0
    h = hidden.clone().requires_grad_()
    loss = -(mask * adv * K.fused_logprob(h, weight, targets, backend=backend)).sum() / mask.sum()
    loss.backward()
    hd = hidden.double().requires_grad_()
    loss64 = -(mask.double() * adv.double() * torch_math(hd, weight.double(), targets)[0]).sum() / mask.sum()
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=0, atol=1e-6)
    assert (h.grad[mask == 0] == 0).all() and (h.grad[mask == 1] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    hidden, weight, targets = make_lm(0, 16, 100, torch.float32)
    h = hidden.clone().requires_grad_()
    logp, ent = K.fused_logprob(h, weight, targets, with_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0,) and h.grad.shape == (0, 16)
    ranks = K.retrieval_ranks(torch.zeros(0, 8, device=DEV), torch.randn(5, 8, device=DEV), backend=backend)
    assert ranks.shape == (0,) and ranks.dtype == torch.int64


def test_shape_errors():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="one shape"):
        K.pair_similarity(x, x[:3])
    with pytest.raises(ValueError, match="gallery of 4 items"):
        K.retrieval_ranks(x, x, torch.tensor([0, 1, 2, 4], device=DEV))
    with pytest.raises(ValueError, match="queries \\(N, D\\)"):
        K.retrieval_ranks(x, x[:, :5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_similarity(dtype):
    g = torch.Generator().manual_seed(5)                # CPU generator: draw on the CPU, then move
    x = (3 * torch.randn(37, 781, generator=g)).to(dtype)
    y = (x.float() + torch.randn(37, 781, generator=g)).to(dtype)
    x, y = x.to(DEV), y.to(DEV)
    x[4], y[3] = 0, 0                             # zero embeddings: similarity 0, not NaN
    got = K.pair_similarity(x, y, backend="triton").double()
    normalize = torch.nn.functional.normalize   # (cosine_similarity overflows in fp16, and
    eager = (normalize(x, dim=-1) * normalize(y, dim=-1)).sum(-1).double()  # fp16 gives NaN at 0)
    truth = K.pair_similarity_torch(x.double(), y.double()).double()
    assert got.shape == (37,) and got[3] == 0 and got[4] == 0
    keep = (torch.arange(37) != 3) & (torch.arange(37) != 4)
    assert_no_worse(got[keep], eager[keep], truth[keep], dtype, "cosine")
    torch.testing.assert_close(K.pair_similarity(x, y, backend="torch").double(), got, rtol=0, atol=1e-5)


def int_gallery(N, M, D, seed):
    """Integer vectors: every dot product is exact in fp32, and all gallery rows are signed
    permutations of one base vector (equal norms), so the true ranks -- ties included -- are
    exact integer comparisons."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (D,), generator=g)
    perms = torch.stack([base[torch.randperm(D, generator=g)] for _ in range(M)])
    gallery = perms * torch.randint(0, 2, (M, D), generator=g).mul(2).sub(1)
    queries = torch.randint(-3, 4, (N, D), generator=g)
    return queries, gallery


def brute_force_ranks(queries, gallery, targets):
    dots = queries.long() @ gallery.long().t()                     # exact, (N, M)
    return (dots > dots.gather(1, targets[:, None])).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_retrieval_ranks_exact_with_ties(dtype, backend):
    N, M, D = 150, 203, 45                                          # no block multiples
    queries, gallery = int_gallery(N, M, D, seed=6)
    targets = torch.randint(0, M, (N,), generator=torch.Generator().manual_seed(7))
    targets[:2] = torch.tensor([10, 20])
    # exact duplicates of some matches, and a 4x copy (same direction, norm x4: same cosine)
    gallery[200], gallery[201], gallery[202] = gallery[targets[0]], gallery[targets[1]], gallery[targets[1]]
    want = brute_force_ranks(queries, gallery, targets)            # ties do not count
    scaled = gallery.clone().double()
    scaled[::3] *= 4                                               # norms must not matter
    got = K.retrieval_ranks(queries.to(DEV, dtype), scaled.to(DEV, dtype), targets.to(DEV),
                            backend=backend).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    # the data really has ties with the match, and a duplicate of the match did not count
    dots = queries @ gallery.t()
    assert ((dots == dots.gather(1, targets[:, None])).sum(1) > 1).sum() > 10
    without_copies = brute_force_ranks(queries[1:2], gallery[:201], targets[1:2])
    assert got[1] == without_copies[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retrieval_float_data_with_duplicated_matches(dtype, backend):
    # float vectors: a bit-identical copy of the match must tie with it exactly, wherever the
    # copy sits in the gallery (the match's score must come from the same arithmetic)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(150, 64, generator=g).to(dtype)
    targets = torch.randint(0, 150, (100,), generator=g)
    queries = (base[targets].float() + 3.0 * torch.randn(100, 64, generator=g)).to(dtype)
    gallery = torch.cat([base, base[targets[:20]]])                # M = 170, 20 duplicates
    got = K.retrieval_ranks(queries.to(DEV), gallery.to(DEV), targets.to(DEV), backend=backend).cpu()
    s64 = queries.double() @ torch.nn.functional.normalize(gallery.double(), dim=-1).t()
    match = s64.gather(1, targets[:, None])
    same = (gallery[None, :, :] == base[targets][:, None, :]).all(-1)   # (N, M): copies of the match
    want = ((s64 > match) & ~same).sum(1)                          # copies are ties: not counted
    gap = (s64 - match).abs().masked_fill(same, 1.0).min(1).values
    clear = gap > 1e-5                                              # no near-tie to argue about
    assert clear.sum() > 90 and (want > 0).sum() > 20
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_copy_of_match_in_last_column(backend):
    # a few queries against an odd-sized gallery: the CPU matmul rounds its edge columns another
    # way, so a bit-identical copy of the match in the last row once outscored the match itself
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(7, 768, generator=g), torch.randn(333, 768, generator=g)
    gallery[-1] = gallery[0]
    targets = torch.zeros(7, dtype=torch.int64)                    # every query's match is row 0
    got = K.retrieval_ranks(queries.to(DEV), gallery.to(DEV), targets.to(DEV), backend=backend).cpu()
    s64 = queries.double() @ torch.nn.functional.normalize(gallery.double(), dim=-1).t()
    want = (s64[:, :-1] > s64[:, :1]).sum(1)                       # the copy ties: not counted
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_default_targets_and_float_data(backend):
    # paired data (query i matches item i), float vectors: the best match is itself
    g = torch.Generator().manual_seed(8)
    gallery = torch.randn(130, 64, generator=g)
    queries = (gallery * torch.rand(130, 1, generator=g) * 10).to(DEV)  # same directions
    got = K.retrieval_ranks(queries, gallery.to(DEV), backend=backend).cpu()
    assert torch.equal(got, torch.zeros(130, dtype=torch.int64))
    got = K.retrieval_ranks(-queries, gallery.to(DEV), backend=backend).cpu()  # worst match
    assert torch.equal(got, torch.full((130,), 129, dtype=torch.int64))


def test_recall_at_k():
    r = K.recall_at_k(torch.tensor([0, 0, 3, 7, 20]), ks=(1, 5, 10))
    assert r["R@1"] == pytest.approx(0.4) and r["R@5"] == pytest.approx(0.6)
    assert r["R@10"] == pytest.approx(0.8)
    assert r["median_rank"] == 4 and r["mean_rank"] == pytest.approx(7.0)


def test_median_rank_is_the_peers_formula():
    # CLIP-Caption-Reward: floor(numpy.median(ranks)) + 1. An even count whose two middle ranks are 1 and 4
    # gives floor(2.5) + 1 = 3, where the lower middle (torch's median) would give 2
    for ranks in ([0, 1, 4, 9], [0, 0, 3, 7, 20], [5, 2], [3]):
        expected = np.floor(np.median(ranks)) + 1
        assert K.recall_at_k(torch.tensor(ranks))["median_rank"] == expected
    assert K.recall_at_k(torch.tensor([0, 1, 4, 9]))["median_rank"] == 3


def test_backend_switch(monkeypatch):
    x = torch.randn(3, 4, device=DEV)
    with pytest.raises(ValueError, match="auto.*torch.*triton"):
        K.set_backend("cuda")
    with pytest.raises(ValueError):
        K.pair_similarity(x, x, backend="numpy")
    old = K.BACKEND
    try:
        K.set_backend("torch")
        assert K.BACKEND == "torch" and not K._use_triton(None, x)
        K.set_backend("auto")
        assert K._use_triton(None, x) == (x.is_cuda or K.INTERPRET)
        assert K._use_triton("triton", x) and not K._use_triton("torch", x)
    finally:
        K.set_backend(old)
    if not x.is_cuda:  # a plain CPU run, without the interpreter: auto is PyTorch, triton an error
        monkeypatch.setattr(K, "INTERPRET", False)
        assert not K._use_triton("auto", x)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            K._use_triton("triton", x)
