# conv2d per part (forward, grad_input, grad_weight) against native, float32
# CPU, for the benchmark's large-channel layers (0-2) and the models' other
# layers (3-: LeNet, MNIST CNN, VAE / GAN): native and handgrad calls interleaved,
# ratio native/handgrad per pair, median (and ratio of the minima, steadier
# on a shared machine).
#   PYTHONPATH=python python benchmarks/conv2d_parts.py THREADS [CASES [PAIRS]]
# CASES: comma-separated indices into `shapes` (default all), PAIRS default 21.
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
def pair(fa, fb, n=N):
    fa(); fb(); rs=[]; ta=[]; tb=[]
    for _ in range(n):
        t=time.perf_counter(); fa(); a=time.perf_counter()-t
        t=time.perf_counter(); fb(); b=time.perf_counter()-t
        rs.append(a/b); ta.append(a); tb.append(b)
    for l in (rs, ta, tb): l.sort()
    return ta[n//2], tb[n//2], rs[n//2], ta[0] / tb[0]
for si in which:
    xs, co, k, p = shapes[int(si)]
    x = torch.randn(xs); w = torch.randn(co, xs[1], k, k)*0.1; b = torch.randn(co)
    xr, wr, br = [t.clone().requires_grad_() for t in (x, w, b)]
    y = torch.nn.functional.conv2d(x, w, b, 1, p); go = torch.randn_like(y)
    st, pd, dl = [1,1], [p,p,p,p], [1,1]
    res = {}
    res['fwd'] = pair(lambda: torch.nn.functional.conv2d(xr, wr, br, 1, p), lambda: ops.conv2d(x, w, b, st, pd, dl, 1))
    res['dx'] = pair(lambda: torch.ops.aten.convolution_backward(go, x, w, [co], [1,1], [p,p], [1,1], False, [0,0], 1, [True, False, False]),
                 lambda: ops.conv2d_grad_input(go, w, list(xs), st, pd, dl, 1))
    res['dw'] = pair(lambda: torch.ops.aten.convolution_backward(go, x, w, [co], [1,1], [p,p], [1,1], False, [0,0], 1, [False, True, False]),
                 lambda: ops.conv2d_grad_weight(go, x, list(w.shape), st, pd, dl, 1))
    tot = sum(v[0] for v in res.values()) / sum(v[1] for v in res.values())
    print(xs, co, k, "  ".join("%s %.1f/%.1f=%.2fx (min %.2fx)" % (kk, a*1e3, b_*1e3, r, rm) for kk,(a,b_,r,rm) in res.items()), " sum %.2fx" % tot, flush=True)
