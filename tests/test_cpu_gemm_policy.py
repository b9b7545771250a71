"""The CPU matrix-product policy (handgrad.cpu_gemm): own kernel vs BLAS,
forced or measured per problem class.

own and blas are different summation orders, so they agree to rounding only
(compared at float32 tolerance); each one on its own must give bitwise the
same results at 1 and 2 threads. auto may pick differently at another thread
count (the class includes it), so it is compared at tolerance only.
"""

import os
import subprocess
import sys

import pytest
import torch

import handgrad
from handgrad import cpu_gemm

POLICIES = ("own", "blas", "auto")


@pytest.fixture(autouse=True)
def restore_policy_and_threads():
    policy, threads = cpu_gemm.policy(), torch.get_num_threads()
    yield
    cpu_gemm.set_policy(policy)
    torch.set_num_threads(threads)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        # stride 2: the im2col product path; 3x3 stride 1 at 64 channels: Winograd
        "conv_gemm": (r(4, 32, 16, 16), r(64, 32, 3, 3) * 0.1, r(64)),
        "conv_winograd": (r(4, 64, 12, 12), r(64, 64, 3, 3) * 0.05, r(64)),
        "lstm": (r(5, 16, 32), r(16, 64), r(16, 64), r(256, 32) * 0.1, r(256, 64) * 0.1,
                 r(256), r(256)),
        "attention": (r(2, 2, 70, 32), r(2, 2, 70, 32), r(2, 2, 70, 32)),
    }


def _run(name, args):
    """Outputs and input gradients of one op (float32, CPU)."""
    args = [a.clone().requires_grad_() for a in args]
    if name == "conv_gemm":
        out = (handgrad.ops.conv2d(*args, stride=2, padding=1),)
    elif name == "conv_winograd":
        out = (handgrad.ops.conv2d(*args, padding=1),)
    elif name == "lstm":
        y, (h, c) = handgrad.ops.lstm_layer(*args)
        out = (y, h, c)
    else:
        out = (handgrad.ops.scaled_dot_product_attention(*args, is_causal=True),)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
    grads = torch.autograd.grad(loss, args)
    return [o.detach() for o in out] + list(grads)


def _native(name, args):
    args = [a.clone().requires_grad_() for a in args]
    F = torch.nn.functional
    if name == "conv_gemm":
        out = (F.conv2d(*args, stride=2, padding=1),)
    elif name == "conv_winograd":
        out = (F.conv2d(*args, padding=1),)
    elif name == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
        ys, h, c = [], h0, c0
        for t in range(x.shape[0]):
            gates = x[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
            i, f, gg, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        out = (torch.stack(ys), h, c)
    else:
        out = (F.scaled_dot_product_attention(*args, is_causal=True),)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
    grads = torch.autograd.grad(loss, args)
    return [o.detach() for o in out] + list(grads)


OPS = tuple(_inputs())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", OPS)
def test_each_policy_matches_native(name, policy):
    cpu_gemm.set_policy(policy)
    args = _inputs()[name]
    for got, want in zip(_run(name, args), _native(name, args)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", OPS)
def test_own_and_blas_differ_by_rounding_only(name):
    args = _inputs()[name]
    cpu_gemm.set_policy("own")
    own = _run(name, args)
    cpu_gemm.set_policy("blas")
    blas = _run(name, args)
    for a, b in zip(own, blas):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("policy", ("own", "blas"))
@pytest.mark.parametrize("name", OPS)
def test_forced_kernel_is_independent_of_thread_count(name, policy):
    cpu_gemm.set_policy(policy)
    args = _inputs()[name]
    torch.set_num_threads(1)
    one = _run(name, args)
    torch.set_num_threads(2)
    two = _run(name, args)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_auto_records_one_decision_per_class():
    cpu_gemm.set_policy("auto")
    cpu_gemm.clear_decisions()
    assert cpu_gemm.decisions() == [] and cpu_gemm.tuning_seconds() == 0
    for name, args in _inputs().items():
        _run(name, args)
    decisions = handgrad.cpu_gemm_decisions()
    if not cpu_gemm.kernels()["own_gemm_available"]:
        assert decisions == []  # nothing to choose from: BLAS throughout
        return
    assert decisions, "auto measured no class"
    assert {d["site"] for d in decisions} == {"tensor", "packed_b", "tile"}
    for d in decisions:
        faster = "own" if d["own_us"] <= d["blas_us"] else "blas"
        assert d["kernel"] == faster and d["dtype"] == "float32"
        assert d["threads"] >= 1 and min(d["m"], d["n"], d["k"]) >= 1
    assert cpu_gemm.tuning_seconds() > 0
    # A class is measured once: running again adds no decision.
    count = len(decisions)
    for name, args in _inputs(seed=1).items():
        _run(name, args)
    assert len(cpu_gemm.decisions()) == count


def test_forced_policies_measure_nothing():
    cpu_gemm.clear_decisions()
    for policy in ("own", "blas"):
        cpu_gemm.set_policy(policy)
        for name, args in _inputs().items():
            _run(name, args)
    assert cpu_gemm.decisions() == []


def test_set_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="own.*blas.*auto"):
        cpu_gemm.set_policy("fastest")
    cpu_gemm.set_policy("blas")
    assert cpu_gemm.policy() == "blas"


def test_info_names_the_active_cpu_kernels():
    cpu_gemm.set_policy("own")
    facts = handgrad.info()
    assert facts["cpu_gemm_policy"] == "own"
    assert facts["cpu_kernels_isa"]
    assert isinstance(facts["cpu_gemm_decisions"], list)
    assert facts["cpu_gemm_tuning_ms"] >= 0


def _python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          check=True)


def test_environment_forces_the_policy():
    code = ("import torch, handgrad\n"
            "x = torch.randn(4, 32, 16, 16); w = torch.randn(64, 32, 3, 3)\n"
            "handgrad.ops.conv2d(x, w, stride=2)\n"
            "print(handgrad.cpu_gemm.policy(), len(handgrad.cpu_gemm.decisions()))\n")
    assert _python(code, HANDGRAD_CPU_GEMM="blas").stdout.split() == ["blas", "0"]
    assert _python(code, HANDGRAD_CPU_GEMM="own").stdout.split() == ["own", "0"]
    bad = _python(code, HANDGRAD_CPU_GEMM="fastest")
    assert bad.stdout.split()[0] == "auto" and "HANDGRAD_CPU_GEMM=fastest" in bad.stderr


def test_verbose_prints_each_decision():
    code = ("import torch, handgrad\n"
            "x = torch.randn(4, 32, 16, 16); w = torch.randn(64, 32, 3, 3)\n"
            "handgrad.ops.conv2d(x, w, stride=2)\n"
            "print(len(handgrad.cpu_gemm.decisions()))\n")
    out = _python(code, HANDGRAD_CPU_GEMM="auto", HANDGRAD_CPU_GEMM_VERBOSE="1")
    count = int(out.stdout.split()[-1])
    assert out.stderr.count("handgrad cpu gemm:") == count
    if handgrad.cpu_gemm.kernels()["own_gemm_available"]:
        assert count >= 1
