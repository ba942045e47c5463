# Yardsticks in the same call as the kernel lab: PyTorch SDPA causal attention (flash / cuDNN / GQA variants)
# fwd and fwd+bwd at Llama 3 8B shapes (H=32, Hkv=8, d=128, bf16, B*T=8192, B=1 beyond T=8192), and the
# published quadratic fp32 LoLCATs formulation (T x T masks and scores), stage-1 style (grads for Wq, Wk, w).
import sys, math, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

torch.backends.cuda.matmul.allow_tf32 = False
dev = 'cuda'
print('torch', torch.__version__, torch.cuda.get_device_name(0))

def timeit(fn, reps=10):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]

H, Hkv, d, f = 32, 8, 128, 64
Ts = [int(x) for x in sys.argv[1:]] or [1024, 4096, 16384, 32768]
for T in Ts:
    B = max(1, 8192 // T)
    q = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ke = k.detach().repeat_interleave(H // Hkv, 1).requires_grad_(True)
    ve = v.detach().repeat_interleave(H // Hkv, 1).requires_grad_(True)
    do = torch.randn_like(q)
    res = {}
    variants = [('gqa-default', lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None),
                ('mha-flash', lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), SDPBackend.FLASH_ATTENTION),
                ('mha-cudnn', lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), SDPBackend.CUDNN_ATTENTION)]
    for name, fn, backend in variants:
        try:
            if backend is None:
                tf = timeit(lambda: fn()); tfb = timeit(lambda: fn().backward(do))
            else:
                with sdpa_kernel(backend):
                    tf = timeit(lambda: fn()); tfb = timeit(lambda: fn().backward(do))
            res[name] = (tf, tfb)
            print(f'sdpa {name:12s} T={T:<6d} B={B} fwd {tf:8.3f} ms fwd+bwd {tfb:8.3f} ms  {tfb * 1e3 / (B * T / 1000):8.2f} us/1Ktok', flush=True)
        except Exception as e:
            print(f'sdpa {name:12s} T={T} failed: {type(e).__name__}: {str(e)[:120]}', flush=True)
    if res:
        best = min(res.items(), key=lambda kv: kv[1][1])
        print(f'sdpa BEST T={T} {best[0]} fwd {best[1][0]:.3f} ms fwd+bwd {best[1][1]:.3f} ms', flush=True)
    del q, k, v, ke, ve, do
    torch.cuda.empty_cache()

# The published formulation (our own code of its formula): fp32, full T x T, autograd.
def lolcats_quadratic(q, k, v, Wq, Wk, wf, window=64):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1).float(); v = v.repeat_interleave(g, 1).float(); q = q.float()
    T = q.shape[2]
    uq = torch.einsum('bhtd,hdf->bhtf', q, Wq); uk = torch.einsum('bhtd,hdf->bhtf', k, Wk)
    fq = torch.cat([torch.softmax(uq, -1), torch.softmax(-uq, -1)], -1).clamp(min=1e-12)
    fk = torch.cat([torch.softmax(uk, -1), torch.softmax(-uk, -1)], -1).clamp(min=1e-12)
    i = torch.arange(T, device=q.device)
    causal = i[:, None] >= i[None, :]
    win = causal & ((i[None, :] // window) >= (i[:, None] // window - 1))
    lin = causal & ~win
    a_sm = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    a_sm = a_sm.masked_fill(~win, torch.finfo(a_sm.dtype).min)
    m = a_sm.amax(-1, keepdim=True)
    a_sm = torch.sigmoid(wf)[None, :, None, None] * torch.exp(a_sm - m) * win
    a_ln = (fq @ fk.transpose(-1, -2)) * lin
    return (a_sm @ v + a_ln @ v) / (a_sm.sum(-1, keepdim=True) + a_ln.sum(-1, keepdim=True))

for T in [t for t in Ts if t <= 4096]:
    B = max(1, 8192 // T)
    q = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, T, d, device=dev, dtype=torch.bfloat16)
    yt = torch.randn(B, H, T, d, device=dev)
    Wq = torch.randn(H, d, f, device=dev, requires_grad=True); Wk = torch.randn(H, d, f, device=dev, requires_grad=True)
    wf = torch.full((H,), -2.0, device=dev, requires_grad=True)
    try:
        torch.cuda.reset_peak_memory_stats()
        tf = timeit(lambda: lolcats_quadratic(q, k, v, Wq, Wk, wf), 5)
        tfb = timeit(lambda: torch.nn.functional.mse_loss(lolcats_quadratic(q, k, v, Wq, Wk, wf), yt).backward(), 5)
        print(f'quadratic-fp32 T={T:<6d} B={B} fwd {tf:8.3f} ms fwd+bwd(stage1) {tfb:8.3f} ms  {tfb * 1e3 / (B * T / 1000):8.2f} us/1Ktok  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB', flush=True)
    except torch.cuda.OutOfMemoryError:
        print(f'quadratic-fp32 T={T} out of memory', flush=True)
    del q, k, v, yt
    torch.cuda.empty_cache()
