"""handgrad.ops.cross_entropy against torch.nn.functional.cross_entropy."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import handgrad
from helpers import assert_matches_native, in_layout, runs_cuda_kernels

H = handgrad.ops.cross_entropy

# Input shapes: unbatched (C), (N, C) with C below, at and above the vector
# widths, K-dim (N, C, d1, ..., dK) with tails of the 8-lane blocks, empty batch.
SHAPES = [(5,), (4, 7), (6, 37), (3, 64), (3, 5, 4), (2, 5, 3, 4), (3, 11, 9), (0, 5), (2, 1)]
REDUCTIONS = ["none", "mean", "sum"]


def classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def make_target(shape, kind, device, dtype, ignore_index=-100):
    if kind == "prob":
        return torch.rand(shape, dtype=dtype, device=device).softmax(0 if len(shape) == 1 else 1)
    rows = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, classes(shape), rows, device=device)
    if ignore_index != -100 and t.numel() > 1:
        t.view(-1)[::3] = ignore_index
    return t


def tolerances(dtype):
    # float32: lse comes from a polynomial exp (2 ulp) and the reduced loss
    # adds rows in another order than native, so allow 1e-5 relative.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


def ce(fn, weight, ignore_index, reduction, smoothing):
    return lambda x, t: fn(x, t, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=smoothing)


GRID = list(itertools.product(SHAPES, ["index", "prob"], [False, True], REDUCTIONS, [0.0, 0.25]))


@pytest.mark.parametrize("shape,kind,weighted,reduction,smoothing", GRID, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_native(device, shape, kind, weighted, reduction, smoothing, dtype):
    x = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    ignore_index = 1 if kind == "index" and classes(shape) > 1 else -100
    t = make_target(shape, kind, device, dtype, ignore_index)
    w = torch.rand(classes(shape), dtype=dtype, device=device) if weighted else None
    assert_matches_native(ce(H, w, ignore_index, reduction, smoothing),
                          ce(F.cross_entropy, w, ignore_index, reduction, smoothing), [x, t],
                          **tolerances(dtype))


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape,perm", [((5, 6), (1, 0)), ((3, 4, 5, 2), (0, 2, 1, 3)),
                                        ((4, 3, 6), (2, 1, 0))], ids=str)
def test_noncontiguous_input_and_target(device, kind, shape, perm):
    x = torch.randn(shape, device=device).permute(perm).requires_grad_()
    t = make_target(x.shape, kind, device, x.dtype)
    t = in_layout(t, "noncontiguous") if t.dim() else t
    x_strided = in_layout(x.detach(), "noncontiguous").requires_grad_()
    for inp in (x, x_strided):
        assert not inp.is_contiguous()
        assert_matches_native(ce(H, None, -100, "mean", 0.1),
                              ce(F.cross_entropy, None, -100, "mean", 0.1),
                              [inp, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 3, 3)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_all_ignored_batch_matches_native(device, shape, weighted, smoothing):
    x = torch.randn(shape, device=device, requires_grad=True)
    t = torch.full((shape[0], *shape[2:]), -100, device=device)
    w = torch.rand(shape[1], device=device) if weighted else None
    for reduction in REDUCTIONS:
        (loss,), _ = assert_matches_native(ce(H, w, -100, reduction, smoothing),
                                           ce(F.cross_entropy, w, -100, reduction, smoothing),
                                           [x, t])
        if reduction == "mean":
            assert torch.isnan(loss)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_extreme_logits(device, kind, dtype, smoothing):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 300, generator=gen, dtype=dtype) * 1e4).to(device)
    x[0] = 1e4  # a row of equal huge logits
    x[1] = -1e4
    x[2, 7] = 1e4  # one logit far above the others
    x[2, :7] = -1e4
    t = make_target(x.shape, kind, device, dtype)
    for reduction in REDUCTIONS:
        assert_matches_native(ce(H, None, -100, reduction, smoothing),
                              ce(F.cross_entropy, None, -100, reduction, smoothing),
                              [x.requires_grad_(), t], rtol=1e-5, atol=1e-4)


def test_probabilities_of_another_dtype_promote_like_native(device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    p = torch.rand(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    (loss,), _ = assert_matches_native(ce(H, None, -100, "mean", 0.1),
                                       ce(F.cross_entropy, None, -100, "mean", 0.1), [x, p])
    assert loss.dtype == torch.float64


def test_byte_targets_are_class_indices(device):
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, 4, 2], dtype=torch.uint8, device=device)
    torch.testing.assert_close(H(x, t), F.cross_entropy(x, t))


def test_nan_and_infinity_propagate_like_native(device):
    x = torch.randn(4, 6, device=device)
    x[0, 2] = float("nan")
    x[1, :] = float("-inf")
    x[2, 3] = float("inf")
    x[3, 1] = float("-inf")
    t = torch.tensor([1, 2, 0, 0], device=device)
    torch.testing.assert_close(H(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none"),
                               equal_nan=True)


def test_large_class_count(device):
    x = torch.randn(3, 5000, device=device, requires_grad=True) * 3
    t = torch.randint(0, 5000, (3,), device=device)
    assert_matches_native(ce(H, None, -100, "mean", 0.0),
                          ce(F.cross_entropy, None, -100, "mean", 0.0),
                          [x, t], rtol=1e-5, atol=1e-6)


GRADCHECK = list(itertools.product([(3, 5), (2, 4, 3)], ["index", "prob"], [False, True],
                                   REDUCTIONS, [0.0, 0.3]))


def test_float32_per_position_losses_are_accurate(device):
    # Positions with several classes are computed 8 at a time in vector lanes
    # (max, sum of exponentials, vector log); compare each loss with a float64
    # reference to float32 accuracy, for class counts whose sums of
    # exponentials span 1 .. 4096 (equal logits: the loss is exactly log C).
    torch.manual_seed(3)
    for C in (2, 3, 21, 100, 4096):
        shape = (3, C, 11, 5)
        for x in (torch.randn(shape, device=device) * 4, torch.zeros(shape, device=device)):
            t = torch.randint(0, C, (3, 11, 5), device=device)
            t[0, 0, :3] = -100  # ignored positions give 0
            mine = handgrad.ops.cross_entropy(x, t, reduction="none")
            ref = F.cross_entropy(x.double(), t, reduction="none")
            torch.testing.assert_close(mine.double(), ref, rtol=3e-6, atol=1e-6)


@pytest.mark.parametrize("shape,kind,weighted,reduction,smoothing", GRADCHECK, ids=str)
def test_gradcheck(device, shape, kind, weighted, reduction, smoothing):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    t = make_target(shape, kind, device, torch.float64, ignore_index=2 if kind == "index" else -100)
    w = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.1 if weighted else None
    ignore_index = 2 if kind == "index" else -100
    inputs = (x, t.requires_grad_()) if kind == "prob" else (x, t)
    assert torch.autograd.gradcheck(ce(H, w, ignore_index, reduction, smoothing), inputs)


def test_double_backward_matches_native(device):
    # (More double-backward and forward-mode cases: tests/test_autograd_transforms.py.)
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 3, 1], device=device)
    grads = []
    for fn in (H, F.cross_entropy):
        (g,) = torch.autograd.grad(fn(x, t, label_smoothing=0.1), x, create_graph=True)
        grads.append(torch.autograd.grad(g.pow(2).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_lse_is_the_only_extra_saved_tensor(device):
    saved = []
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    t = torch.randint(0, 3, (4, 5), device=device)
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss, lse = torch.ops.handgrad.cross_entropy(x, t, None, -100, "mean", 0.0)
    inputs = (x.data_ptr(), t.data_ptr())
    extra = [s for s in saved if s.data_ptr() not in inputs]
    assert len(extra) == 1 and extra[0].shape == (4, 5) and extra[0].dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(x.detach(), dim=1))
    assert not lse.requires_grad


def test_reduced_loss_does_not_depend_on_thread_count():
    x = torch.randn(300, 999)
    t = torch.randint(0, 999, (300,))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = H(x, t, reduction="sum")
        torch.set_num_threads(2)
        two = H(x, t, reduction="sum")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_no_graph_without_grad(device):
    x = torch.randn(4, 5, device=device)
    assert not H(x, torch.tensor([0, 1, 2, 3], device=device)).requires_grad


def test_legacy_reduction_arguments(device):
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    with pytest.warns(UserWarning, match="deprecated"):
        torch.testing.assert_close(H(x, t, size_average=False),
                                   F.cross_entropy(x, t, reduction="sum"))
    with pytest.warns(UserWarning, match="deprecated"):
        torch.testing.assert_close(H(x, t, reduce=False), F.cross_entropy(x, t, reduction="none"))


def _opcheck_cases(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    xk = torch.randn(2, 5, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, 1, -100], device=device)
    tk = torch.randint(0, 5, (2, 3, 2), device=device)
    p = torch.rand(4, 6, device=device).softmax(1)
    return [
        (x, t, None, -100, "mean", 0.0),
        (x, t, torch.rand(6, device=device), -100, "none", 0.1),
        (xk, tk, None, 3, "sum", 0.0),
        (x, p.requires_grad_(), None, -100, "mean", 0.2),
        (torch.randn(5, device=device, requires_grad=True), torch.tensor(2, device=device), None,
         -100, "none", 0.0),
    ]


def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.handgrad.cross_entropy.default, args)
        loss, lse = torch.ops.handgrad.cross_entropy(*args)
        x, t, w, ignore_index, reduction, smoothing = args
        grad = torch.randn_like(loss)
        torch.library.opcheck(torch.ops.handgrad.cross_entropy_backward.default,
                              (grad, x.detach(), t.detach(), w, ignore_index, reduction, smoothing,
                               lse))
        if t.is_floating_point():
            torch.library.opcheck(torch.ops.handgrad.cross_entropy_target_backward.default,
                                  (grad, x.detach(), t.detach(), w, reduction, smoothing, lse))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()

    def step(x, t, w):
        return H(x, t, weight=w, ignore_index=0, label_smoothing=0.1) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for shape in [(6, 10), (9, 10)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        t = torch.randint(0, 10, shape[:1], device=device)
        w = torch.rand(10, device=device)
        loss = compiled(x, t, w)
        (grad,) = torch.autograd.grad(loss, x)
        ref = step(x, t, w)
        (ref_grad,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(grad, ref_grad)


def test_module_is_a_drop_in(device):
    w = torch.rand(5, device=device)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    mine = handgrad.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum",
                                        label_smoothing=0.1)
    assert isinstance(mine, torch.nn.CrossEntropyLoss)
    assert repr(mine) == repr(ref)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 5, 3, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4, 3), device=device)
    assert_matches_native(mine, ref, [x, t], rtol=1e-5, atol=1e-5)
    patched = handgrad.patch(torch.nn.CrossEntropyLoss())
    assert type(patched) is handgrad.nn.CrossEntropyLoss
    compiled = torch.compile(mine, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), ref(x, t), rtol=1e-5, atol=1e-5)


def _x(shape=(4, 5), dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD_INPUTS = [
    ("target out of range", lambda: H(_x(), torch.tensor([0, 1, 12, 2])), IndexError,
     "Target 12 is out of bounds"),
    ("negative target", lambda: H(_x(), torch.tensor([0, -5, 1, 2])), IndexError,
     "Target -5 is out of bounds"),
    ("K-dim target out of range", lambda: H(_x((2, 5, 9)), torch.full((2, 9), 5)), IndexError,
     "Target 5 is out of bounds"),
    ("int32 target", lambda: H(_x(), torch.tensor([0, 1, 2, 3], dtype=torch.int32)), RuntimeError,
     "expected target dtype to be Long"),
    ("float index target", lambda: H(_x(), torch.tensor([0.0, 1, 2, 3])), RuntimeError,
     "expected target dtype to be Long"),
    ("integer probabilities", lambda: H(_x(), torch.zeros(4, 5, dtype=torch.long)), RuntimeError,
     "Expected floating point type for target with class probabilities"),
    ("batch size mismatch", lambda: H(_x(), torch.tensor([0, 1, 2])), ValueError,
     r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
    ("K-dim target shape", lambda: H(_x((2, 3, 4)), torch.zeros(2, 5, dtype=torch.long)),
     RuntimeError, r"Expected target size \[2, 4\], got \[2, 5\]"),
    ("label_smoothing above 1", lambda: H(_x(), torch.tensor([0, 1, 2, 3]), label_smoothing=1.5),
     RuntimeError, "label_smoothing must be between 0.0 and 1.0"),
    ("label_smoothing below 0", lambda: H(_x(), torch.rand(4, 5), label_smoothing=-0.1),
     RuntimeError, "label_smoothing must be between 0.0 and 1.0"),
    ("weight of wrong size", lambda: H(_x(), torch.tensor([0, 1, 2, 3]), weight=torch.ones(4)),
     RuntimeError, "weight tensor should be defined either for all 5 classes"),
    ("weight of wrong dtype",
     lambda: H(_x(), torch.tensor([0, 1, 2, 3]), weight=torch.ones(5, dtype=torch.float64)),
     RuntimeError, "expected weight to have the input's dtype"),
    ("weight requires grad",
     lambda: H(_x().requires_grad_(), torch.tensor([0, 1, 2, 3]),
               weight=torch.ones(5, requires_grad=True)),
     RuntimeError, "not differentiable with respect to argument 'weight'"),
    ("bad reduction", lambda: H(_x(), torch.tensor([0, 1, 2, 3]), reduction="avg"), ValueError,
     "avg is not a valid value for reduction"),
    ("integer input", lambda: H(torch.zeros(4, 5, dtype=torch.long), torch.tensor([0, 1, 2, 3])),
     TypeError, "float32, float64, float16 or bfloat16"),
    ("0-D input", lambda: H(torch.tensor(1.0), torch.tensor(0)), RuntimeError,
     "at least 1 dimension"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_backward_op_rejects_inconsistent_arguments():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    lse = torch.logsumexp(x, 1)
    back = torch.ops.handgrad.cross_entropy_backward
    with pytest.raises(RuntimeError, match="expected lse of shape"):
        back(torch.tensor(1.0), x, t, None, -100, "mean", 0.0, lse[:3])
    with pytest.raises(TypeError, match="expected lse to be Float"):
        back(torch.tensor(1.0), x, t, None, -100, "mean", 0.0, lse.double())
    with pytest.raises(RuntimeError, match="expected grad_loss of shape"):
        back(torch.ones(3), x, t, None, -100, "none", 0.0, lse)
    with pytest.raises(RuntimeError, match="0-D grad_loss"):
        back(torch.ones(4), x, t, None, -100, "sum", 0.0, lse)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        back(torch.tensor(1.0), x, torch.tensor([0, 9, 1, 2]), None, -100, "sum", 0.0, lse)
    with pytest.raises(RuntimeError, match="only probability targets"):
        torch.ops.handgrad.cross_entropy_target_backward(torch.tensor(1.0), x, t, None, "mean",
                                                         0.0, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(device, dtype):
    x = torch.randn(6, 50, 3, device=device, dtype=dtype)
    t = torch.randint(0, 50, (6, 3), device=device)
    if not runs_cuda_kernels(device):
        # The CPU kernels are float32 / float64 only, and say so.
        with pytest.raises(RuntimeError, match="not implemented for"):
            H(x, t)
        return
    x.requires_grad_()
    # float32 accumulation, results rounded to the input's dtype.
    assert_matches_native(ce(H, None, -100, "mean", 0.1),
                          ce(F.cross_entropy, None, -100, "mean", 0.1),
                          [x, t], rtol=2e-2, atol=2e-3)
