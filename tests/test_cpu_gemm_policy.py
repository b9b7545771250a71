"""The CPU matrix-product policy (handgrad.cpu_gemm): own kernel vs BLAS,
forced or measured per problem class.

own and blas are different summation orders, so they agree to rounding only
(compared at float32 tolerance); each one on its own must give bitwise the
same results at 1 and 2 threads, and so must auto: a class keeps the kernel
it was first measured with at any later thread count.
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


@pytest.mark.parametrize("policy", ("own", "blas", "auto"))
@pytest.mark.parametrize("name", OPS)
def test_kernel_choice_is_independent_of_thread_count(name, policy):
    cpu_gemm.set_policy(policy)
    args = _inputs()[name]
    torch.set_num_threads(1)
    one = _run(name, args)
    torch.set_num_threads(2)
    two = _run(name, args)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.fixture
def no_decision_file():
    """Decisions measured in this process, not read from the session's file."""
    path = cpu_gemm.decision_file()
    cpu_gemm.set_decision_file(None)
    yield
    cpu_gemm.set_decision_file(path)


def test_auto_records_one_decision_per_class(no_decision_file):
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
        assert d["kernel"] == faster and d["dtype"] == "float32" and not d["stored"]
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


# ---- the decision file: the same choices in every process ------------------------------------

_CONV = ("import torch, handgrad, json\n"
         "torch.set_num_threads(%d)\n"
         "x = torch.randn(8, 32, 16, 16); w = torch.randn(64, 32, 3, 3)\n"
         "handgrad.ops.conv2d(x, w, stride=2)\n"
         "print(json.dumps([handgrad.cpu_gemm.decisions(), handgrad.cpu_gemm.tuning_seconds(),\n"
         "                  handgrad.cpu_gemm.decision_file()]))\n")


def _decide(path, threads=1, **env):
    import json
    out = _python(_CONV % threads, HANDGRAD_CPU_GEMM="auto", HANDGRAD_CPU_GEMM_CACHE=str(path),
                  **env)
    decisions, tuning, file = json.loads(out.stdout.strip().splitlines()[-1])
    return decisions, tuning, file, out.stderr


needs_own_kernel = pytest.mark.skipif(not cpu_gemm.kernels()["own_gemm_available"],
                                      reason="without the own kernel there is nothing to decide")


@needs_own_kernel
def test_decision_file_gives_every_later_process_the_same_choices(tmp_path):
    path = tmp_path / "sub" / "decisions.txt"  # the folder is made too
    first, tuning, file, _ = _decide(path)
    assert file == str(path) and first and tuning > 0
    assert not any(d["stored"] for d in first)
    lines = path.read_text().splitlines()
    assert len(lines) == len(first)
    second, tuning, _, _ = _decide(path)
    assert tuning == 0 and all(d["stored"] for d in second)
    assert [d["kernel"] for d in second] == [d["kernel"] for d in first]
    assert path.read_text().splitlines() == lines  # nothing measured, nothing added
    # Another thread count is another key: measured, and appended.
    third, tuning, _, _ = _decide(path, threads=2)
    assert tuning > 0 and not any(d["stored"] for d in third)
    assert len(path.read_text().splitlines()) == len(lines) + len(third)


@needs_own_kernel
def test_decision_file_is_authoritative_for_its_machine_only(tmp_path):
    path = tmp_path / "decisions.txt"
    first, _, _, _ = _decide(path)
    fields = path.read_text().splitlines()[0].split()
    flipped = "blas" if fields[4] == "own" else "own"
    other_machine = fields[:1] + ["0" * 16] + fields[2:4] + [flipped] + fields[5:]
    path.write_text("garbage that is not a decision\n"
                    "v1 %s %s\n" % (fields[1], fields[2])  # truncated line
                    + " ".join(other_machine) + "\n")
    measured, tuning, _, _ = _decide(path)
    assert tuning > 0 and not measured[0]["stored"]  # nothing usable: measured again
    # This machine's line decides, even against the timing: it is what was stored.
    path.write_text(" ".join(fields[:4] + [flipped] + fields[5:]) + "\n")
    stored, tuning, _, _ = _decide(path)
    assert stored[0]["stored"] and stored[0]["kernel"] == flipped


def test_decision_file_off_keeps_decisions_in_the_process(tmp_path):
    for off in ("off", "0", ""):
        decisions, _, file, _ = _decide(off, HOME=str(tmp_path))
        assert file is None
        assert not any(d["stored"] for d in decisions)
    assert not (tmp_path / ".cache").exists()


def test_unusable_decision_file_warns_once_and_still_decides(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    decisions, _, _, stderr = _decide(blocker / "decisions.txt")  # its folder is a file
    if cpu_gemm.kernels()["own_gemm_available"]:
        assert decisions and not any(d["stored"] for d in decisions)
        assert stderr.count("cannot open or lock the CPU GEMM decision file") == 1
        assert "HANDGRAD_CPU_GEMM_CACHE" in stderr


def test_default_decision_file_is_in_the_users_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HANDGRAD_CPU_GEMM_CACHE"}
    code = "import handgrad; print(handgrad.cpu_gemm.decision_file())"

    def default_file(xdg):
        run_env = dict(env, HOME=str(tmp_path), XDG_CACHE_HOME=xdg)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=run_env, check=True).stdout.split()[-1]

    assert default_file("") == str(tmp_path / ".cache" / "handgrad" / "cpu_gemm_decisions.txt")
    assert default_file(str(tmp_path / "xdg")) == str(
        tmp_path / "xdg" / "handgrad" / "cpu_gemm_decisions.txt")
