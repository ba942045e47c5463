"""dev/flash_attention_sdpa.py: the PyTorch yardstick for dev/flash_attention.cu.

Times torch.nn.functional.scaled_dot_product_attention (causal, bf16) at the shapes the kernel lab uses
(32 query heads, 8 kv heads, d = 128 and 64, B * T = 8192), for each backend that runs, forward and
forward + backward. Inputs are made in our (B, T, H, d) layout and transposed to SDPA's (B, H, T, d)
view, as a model would pass them. TFLOP/s counts causal FLOPs: forward 2 * 2 * B * H * T^2 * d / 2,
backward 2.5 times that (5 matmuls against 2). Needs torch (GPU machine only; never in CI).
    python3 dev/flash_attention_sdpa.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    H, Hkv = 32, 8
    # (name, backend, GQA mode): enable_gqa lets the kernel share kv heads; repeat_kv materialises them
    # the way Hugging Face's attention does.
    runs = [("default", None, "enable_gqa"), ("default", None, "repeat_kv"),
            ("flash", SDPBackend.FLASH_ATTENTION, "enable_gqa"), ("cudnn", SDPBackend.CUDNN_ATTENTION, "enable_gqa")]
    for d in (128, 64):
        for T in (1024, 4096, 16384):
            B = max(1, 8192 // T)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
            k = torch.randn(B, T, Hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
            v = torch.randn(B, T, Hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
            fwd_flops = 2 * 2 * B * H * T * T * d / 2
            for name, backend, gqa in runs:
                if gqa == "repeat_kv":
                    kk, vv = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
                    kw = {}
                else:
                    kk, vv, kw = k, v, {"enable_gqa": True}
                qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, kk, vv))
                dout = torch.randn_like(qg)

                def fwd():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **kw)

                def fwd_bwd():
                    y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, **kw)
                    y.backward(dout)

                try:
                    if backend is None:
                        f_ms, fb_ms = time_ms(fwd), time_ms(fwd_bwd)
                    else:
                        with sdpa_kernel(backend):
                            f_ms, fb_ms = time_ms(fwd), time_ms(fwd_bwd)
                except Exception as e:  # a backend that refuses this shape or GQA mode
                    print(f"  d={d:3d} T={T:5d} B={B} sdpa {name:9s} {gqa:10s} not available ({type(e).__name__})")
                    continue
                print(f"  d={d:3d} T={T:5d} B={B} sdpa {name:9s} {gqa:10s} fwd {f_ms:7.3f} ms {fwd_flops / f_ms * 1e-9:6.1f} TFLOP/s"
                      f" | fwd+bwd {fb_ms:7.3f} ms {3.5 * fwd_flops / fb_ms * 1e-9:6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
