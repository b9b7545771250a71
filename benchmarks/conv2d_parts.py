# conv2d per part (forward, grad_input, grad_weight) against native, float32
# CPU, for the benchmark's large-channel layers (0-2) and the models' other
# layers (3-: LeNet, MNIST CNN, VAE / GAN): native and handgrad calls
# interleaved, alternating which of the two runs first, on the same tensors
# (none requires grad: each part is timed alone, so neither side records an
# autograd graph); ratio native/handgrad per pair, median (and ratio of the
# minima, steadier on a shared machine).
#   PYTHONPATH=python python benchmarks/conv2d_parts.py THREADS [CASES [PAIRS]]
# CASES: comma-separated indices into `shapes` (default 0,1,2), PAIRS default 21.
import sys, time, torch, handgrad
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["0", "1", "2"]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 21
ops = torch.ops.handgrad
shapes = [((128,64,16,16),128,3,1), ((128,256,4,4),512,3,1), ((128,40,12,12),80,5,0),
          ((128,3,32,32),6,5,0), ((128,6,14,14),16,5,0), ((128,1,28,28),40,5,0),
          ((128,1,28,28),16,3,1), ((128,16,14,14),32,3,1), ((128,32,14,14),16,3,1),
          ((128,16,28,28),1,3,1), ((128,1,28,28),32,3,1), ((128,32,14,14),64,3,1),
          ((128,64,14,14),32,3,1), ((128,32,28,28),1,3,1)]


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def pair(native, mine, n=N):
    native(); mine()
    rs, tn, tm = [], [], []
    for i in range(n):
        if i % 2 == 0:  # alternate the order, so neither side always runs on a warm cache
            a = timed(native); b = timed(mine)
        else:
            b = timed(mine); a = timed(native)
        rs.append(a / b); tn.append(a); tm.append(b)
    for l in (rs, tn, tm): l.sort()
    return tn[n//2], tm[n//2], rs[n//2], tn[0] / tm[0]


for si in which:
    xs, co, k, p = shapes[int(si)]
    x = torch.randn(xs); w = torch.randn(co, xs[1], k, k)*0.1; b = torch.randn(co)
    assert not (x.requires_grad or w.requires_grad or b.requires_grad)
    y = torch.nn.functional.conv2d(x, w, b, 1, p); go = torch.randn_like(y)
    st, pd, dl = [1,1], [p,p,p,p], [1,1]
    res = {}
    res['fwd'] = pair(lambda: torch.nn.functional.conv2d(x, w, b, 1, p), lambda: ops.conv2d(x, w, b, st, pd, dl, 1))
    res['dx'] = pair(lambda: torch.ops.aten.convolution_backward(go, x, w, [co], [1,1], [p,p], [1,1], False, [0,0], 1, [True, False, False]),
                 lambda: ops.conv2d_grad_input(go, w, list(xs), st, pd, dl, 1))
    res['dw'] = pair(lambda: torch.ops.aten.convolution_backward(go, x, w, [co], [1,1], [p,p], [1,1], False, [0,0], 1, [False, True, False]),
                 lambda: ops.conv2d_grad_weight(go, x, list(w.shape), st, pd, dl, 1))
    tot = sum(v[0] for v in res.values()) / sum(v[1] for v in res.values())
    print(xs, co, k, "  ".join("%s %.1f/%.1f=%.2fx (min %.2fx)" % (kk, a*1e3, b_*1e3, r, rm) for kk,(a,b_,r,rm) in res.items()), " sum %.2fx" % tot, flush=True)
