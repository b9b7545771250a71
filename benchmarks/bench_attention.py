"""handgrad.ops.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention.

    python benchmarks/bench_attention.py [--threads 2] [--device cuda] [--reps 10]

Targets (CPU, float32, forward+backward): at least as fast as native at
(8,4,256,64), (2,8,2048,64) causal and not, and (32,4,65,32) (a small vision
transformer: 64 patches + class token). After the timing table, a memory
table reports the peak memory of one forward+backward at L = 1024, 2048,
4096 (batch 1, 8 heads, head size 64), without a mask and with a boolean
key-padding mask (which sends native to its L x S math path): handgrad's
peak grows linearly in L. Skipped when --cases is given.

On a GPU (--device cuda) the cases add bfloat16 forward+backward at
(4,16,2048,64), (4,16,2048,128) and (2,16,8192,128), causal and not: the
tensor-core kernels against native's flash attention (target 0.6x).
"""

import sys

import torch
import torch.nn.functional as F

import harness
import handgrad


def make_cases(device):
    def case(shape, causal=False, target=None, mask=False, dtype=torch.float32):
        B, H, L, E = shape

        def make_inputs():
            qkv = [torch.randn(shape, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3)]
            m = None
            if mask:  # key padding: the last eighth of the keys is masked out
                m = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
                m[..., L - L // 8:] = False
            return qkv + [m]

        name = "%s%s%s%s" % (tuple(shape), " causal" if causal else "",
                             " key-padding mask" if mask else "",
                             "" if dtype == torch.float32 else " " + str(dtype)[6:])
        flops = 4 * B * H * L * L * E * (0.5 if causal else 1.0)
        return harness.Case(
            name=name, make_inputs=make_inputs, target=target,
            flops={"forward": flops, "backward": 2.5 * flops, "fwdbwd": 3.5 * flops},
            handgrad=lambda q, k, v, m: handgrad.ops.scaled_dot_product_attention(
                q, k, v, attn_mask=m, is_causal=causal),
            native=lambda q, k, v, m: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, is_causal=causal))

    cases = [
        case((8, 4, 256, 64), target=1.0),
        case((2, 8, 2048, 64), target=1.0),
        case((2, 8, 2048, 64), causal=True, target=1.0),
        case((32, 4, 65, 32), target=1.0),
        case((8, 4, 256, 64), mask=True),
        case((1, 2, 1024, 64)),
    ]
    if device.type == "cuda":
        # The tensor-core kernels (attention_tensor_core.cuh) against native's
        # flash attention; issue 14's target: fwd+bwd >= 0.6x native.
        for shape in ((4, 16, 2048, 64), (4, 16, 2048, 128), (2, 16, 8192, 128)):
            for causal in (False, True):
                cases.append(case(shape, causal=causal, target=0.6, dtype=torch.bfloat16))
    return cases


def memory_table(device):
    """Peak memory of one forward+backward, handgrad and native, growing L."""
    print("\n## scaled_dot_product_attention peak memory, forward+backward "
          "(batch 1, 8 heads, E 64, float32, %s)\n" % device)
    print("| L | mask | native MB | handgrad MB | handgrad / native |")
    print("|---|---|---|---|---|")
    for L in (1024, 2048, 4096):
        for mask in (False, True):
            q, k, v = (torch.randn(1, 8, L, 64, device=device).requires_grad_() for _ in range(3))
            m = None
            if mask:
                m = torch.ones(1, 1, 1, L, dtype=torch.bool, device=device)
                m[..., L - L // 8:] = False
            peaks = []
            for fn in (F.scaled_dot_product_attention, handgrad.ops.scaled_dot_product_attention):
                runner = harness._Runner(lambda q, k, v: fn(q, k, v, attn_mask=m), [q, k, v],
                                         device)
                peaks.append(runner.peak_memory() / 2**20)
                del runner
            print("| %d | %s | %.1f | %.1f | %.3f |" % (L, "key padding" if mask else "none",
                                                       peaks[0], peaks[1], peaks[1] / peaks[0]),
                  flush=True)


if __name__ == "__main__":
    status = harness.main("attention", make_cases)
    if "--cases" not in sys.argv:
        args = harness.argument_parser("").parse_args()
        device, _ = harness.configure(args)
        memory_table(device)
    sys.exit(status)
