"""cross_entropy autograd beyond first-order reverse mode, by hand.

First-order reverse mode is the C++ Autograd kernel
(csrc/ops/cross_entropy_autograd.cpp). Here:

* the forward op's formulas, applied by handgrad.ops.cross_entropy (through
  _autograd.call) under the torch.func transforms and while a forward-mode
  AD level is open (register_autograd(dispatcher=False));
* the Autograd kernels of the two backward ops, cross_entropy_backward and
  cross_entropy_target_backward: their gradients (double backward) and
  tangents (forward-over-reverse).

Every row (one (n, d1..dK) position; the classes lie along dim 1, dim 0 for
a (C,) input) has, with p = softmax(x) = exp(x - lse):
    loss_row = sum_c W_c (lse - x_c),      A = sum_c W_c
where W is the effective target weight (see _target_weights):
    index target t:  W_c = (1-e) w_t [c == t] + e/C w_c   (0 on ignored rows)
    probabilities y: W_c = w_c ((1-e) y_c + e/C)
and the reduction multiplies each row by r = 1 ('none', 'sum') or 1/D
('mean'; D = sum of w_t over the kept rows, or the row count for
probabilities). The first derivatives (what the backward ops compute, with
s = r * the upstream gradient of the row's loss):
    cross_entropy_backward:        G_x = s (A p - W)
    cross_entropy_target_backward: G_y = s (1-e) w (lse - x)
Their derivatives, with the softmax Jacobian dp = p * (dx - <p, dx>) (a
symmetric matrix, so its transpose is itself):
    dG_x = ds (A p - W) + s A dp + s (dA p - dW),   dW = (1-e) w dy, dA = sum dW
    dG_y = ds (1-e) w (lse - x) + s (1-e) w (<p, dx> - dx)

lse, an input of the backward ops, is the forward's log-sum-exp of the
input, a function of it: these formulas differentiate through it (the
<p, dx> terms) and give lse itself no gradient and read no tangent for it
(the forward marks it non-differentiable). The weight is not
differentiable, as in native cross_entropy.

This is plain tensor algebra on input-sized tensors (p, W); the first-order
pieces that are linear in the upstream gradient call the backward ops
themselves.
"""

import torch

from ._autograd import OPS, register_autograd

_WEIGHT_REASON = ("handgrad::cross_entropy is not differentiable with respect to argument "
                  "'weight'")


def _class_dim(input):
    return 0 if input.dim() == 1 else 1


def _per_class(values, input):
    """A (C,) tensor shaped to broadcast along the input's class dim."""
    return values.view(-1, *([1] * (input.dim() - _class_dim(input) - 1)))


def _per_row(values, input):
    """A row-shaped tensor (or a scalar) shaped to broadcast over the classes."""
    return values.unsqueeze(_class_dim(input)) if values.dim() else values


def _is_prob_target(input, target):
    return target.is_floating_point() and target.shape == input.shape


def _probabilities(input, lse):
    return torch.exp(input.to(lse.dtype) - _per_row(lse, input)).to(input.dtype)


def _class_weights(input, weight):
    """The class weights (ones without weight), shaped along the class dim."""
    classes = input.shape[_class_dim(input)]
    w = (torch.ones(classes, dtype=input.dtype, device=input.device) if weight is None
         else weight.to(input.dtype))
    return _per_class(w, input)


def _target_weights(input, target, weight, ignore_index, smoothing):
    """W (the input's shape) with loss_row = sum_c W_c (lse - x_c), and the
    rows' weights w_t (index targets; None for probabilities)."""
    classes = input.shape[_class_dim(input)]
    if _is_prob_target(input, target):
        return _class_weights(input, weight) * ((1 - smoothing) * target.to(input.dtype)
                                                + smoothing / classes), None
    w = (torch.ones(classes, dtype=input.dtype, device=input.device) if weight is None
         else weight.to(input.dtype))
    kept = target != ignore_index
    safe = torch.where(kept, target, 0).long()
    w_t = w[safe] * kept
    one_hot = torch.nn.functional.one_hot(safe, classes).movedim(-1, _class_dim(input))
    W = (1 - smoothing) * one_hot.to(input.dtype) * _per_row(w_t, input)
    if smoothing:
        W = W + smoothing / classes * _class_weights(input, weight) * _per_row(
            kept.to(input.dtype), input)
    return W, w_t


def _row_scale(grad_loss, input, w_t, reduction):
    """s: the upstream gradient times the reduction's factor, per row (or scalar)."""
    if reduction != "mean":
        return grad_loss
    rows = w_t.sum() if w_t is not None else input.numel() // input.shape[_class_dim(input)]
    return grad_loss / rows


def _reduce_rows(values, input, reduction):
    """sum over the classes ('none': one value per row) or over everything."""
    return values.sum(_class_dim(input)) if reduction == "none" else values.sum()


def _softmax_jvp(p, t_x, input):
    """dp = p * (dx - <p, dx>); also its own transpose (the Jacobian is symmetric)."""
    return p * (t_x - (p * t_x).sum(_class_dim(input), keepdim=True))


def _sum(*terms):
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


# ---- cross_entropy (the forward op; its Autograd kernel is C++) -----------------------------

def _setup_context(ctx, inputs, output):
    # (No check of weight.requires_grad here: setup_context runs with grad
    # mode off, so such a check could never fire -- mutation testing found it
    # dead. The backward formulas raise when a weight gradient is asked for.)
    input, target, weight, ignore_index, reduction, label_smoothing = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, target, weight, lse)
    ctx.options = (ignore_index, reduction, label_smoothing)


def _backward(ctx, grad_loss, _grad_lse):
    if ctx.needs_input_grad[2]:  # under torch.func.grad, which setup_context cannot see
        raise RuntimeError(_WEIGHT_REASON + ".")
    input, target, weight, lse = ctx.saved_tensors
    ignore_index, reduction, smoothing = ctx.options
    grad_input = grad_target = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_input = OPS.cross_entropy_backward(grad_loss, input, target, weight, ignore_index,
                                                reduction, smoothing, lse)
    if grad_loss is not None and ctx.needs_input_grad[1]:
        grad_target = OPS.cross_entropy_target_backward(grad_loss, input, target, weight,
                                                        reduction, smoothing, lse)
    return grad_input, grad_target, None, None, None, None


# d loss = sum <dloss/dx, dx> + <dloss/dy, dy>: the backward ops at an upstream
# gradient of one, times the tangents, summed per row ('none') or overall.
def _jvp(ctx, inputs, t_input, t_target, t_weight, *_):
    if t_weight is not None:
        raise NotImplementedError(_WEIGHT_REASON + " (forward-mode AD)")
    input, target, weight, ignore_index, reduction, smoothing = inputs
    loss, lse = ctx.outputs
    ones = torch.ones_like(loss)
    terms = []
    if t_input is not None:
        slope = OPS.cross_entropy_backward(ones, input, target, weight, ignore_index, reduction,
                                           smoothing, lse)
        terms.append(_reduce_rows(slope * t_input, input, reduction))
    if t_target is not None:
        slope = OPS.cross_entropy_target_backward(ones, input, target, weight, reduction,
                                                  smoothing, lse)
        terms.append(_reduce_rows(slope * t_target, input, reduction))
    return _sum(*terms), None


register_autograd("handgrad::cross_entropy", _backward, _setup_context, _jvp, dispatcher=False)


# ---- cross_entropy_backward: G_x = s (A p - W) ----------------------------------------------

def _backward_setup_context(ctx, inputs, output):
    grad_loss, input, target, weight, ignore_index, reduction, smoothing, lse = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_loss, input, target, weight, lse)
    ctx.options = (ignore_index, reduction, smoothing)


# With U the gradient reaching G_x:
#   d grad_loss = r * sum_c U (A p - W)       (per row for 'none')
#   d input     = s A * (the softmax Jacobian applied to U)
#   d target    = s (1-e) w (<U, p> - U)     (probabilities)
def _backward_backward(ctx, grad):
    needs = ctx.needs_input_grad
    if needs[3]:
        raise RuntimeError(_WEIGHT_REASON + ".")
    if grad is None:
        return (None,) * 8
    grad_loss, input, target, weight, lse = ctx.saved_tensors
    ignore_index, reduction, smoothing = ctx.options
    p = _probabilities(input, lse)
    W, w_t = _target_weights(input, target, weight, ignore_index, smoothing)
    A = W.sum(_class_dim(input), keepdim=True)
    s = _per_row(_row_scale(grad_loss, input, w_t, reduction), input)
    d_grad_loss = d_input = d_target = None
    if needs[0]:
        ones = torch.ones_like(grad_loss)
        d_grad_loss = _reduce_rows(grad * _per_row(_row_scale(ones, input, w_t, reduction), input)
                                   * (A * p - W), input, reduction)
    if needs[1]:
        d_input = _softmax_jvp(p, s * A * grad, input)
    if needs[2] and _is_prob_target(input, target):
        d_target = s * (1 - smoothing) * _class_weights(input, weight) * (
            (grad * p).sum(_class_dim(input), keepdim=True) - grad)
    return d_grad_loss, d_input, d_target, None, None, None, None, None


def _backward_jvp(ctx, inputs, t_grad_loss, t_input, t_target, t_weight, *_):
    if t_weight is not None:
        raise NotImplementedError(_WEIGHT_REASON + " (forward-mode AD)")
    grad_loss, input, target, weight, ignore_index, reduction, smoothing, lse = inputs
    terms = []
    if t_grad_loss is not None:
        terms.append(OPS.cross_entropy_backward(t_grad_loss, input, target, weight, ignore_index,
                                                reduction, smoothing, lse))
    if t_input is not None or t_target is not None:
        p = _probabilities(input, lse)
        W, w_t = _target_weights(input, target, weight, ignore_index, smoothing)
        s = _per_row(_row_scale(grad_loss, input, w_t, reduction), input)
        if t_input is not None:
            A = W.sum(_class_dim(input), keepdim=True)
            terms.append(s * A * _softmax_jvp(p, t_input, input))
        if t_target is not None:
            t_W, _ = _target_weights(input, t_target, weight, ignore_index, 0.0)
            t_W = (1 - smoothing) * t_W
            terms.append(s * (t_W.sum(_class_dim(input), keepdim=True) * p - t_W))
    return _sum(*terms)


register_autograd("handgrad::cross_entropy_backward", _backward_backward,
                  _backward_setup_context, _backward_jvp)


# ---- cross_entropy_target_backward: G_y = s (1-e) w (lse - x) -------------------------------

def _target_backward_setup_context(ctx, inputs, output):
    grad_loss, input, target, weight, reduction, smoothing, lse = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_loss, input, weight, lse)
    ctx.options = (reduction, smoothing)


def _target_row_scale(grad_loss, input, reduction):
    return _per_row(_row_scale(grad_loss, input, None, reduction), input)


# With U the gradient reaching G_y:
#   d grad_loss = r * sum_c U (1-e) w (lse - x)
#   d input     = s (1-e) (p <w, U> - w U)      (the transpose of <p, dx> - dx)
def _target_backward_backward(ctx, grad):
    needs = ctx.needs_input_grad
    if needs[3]:
        raise RuntimeError(_WEIGHT_REASON + ".")
    if grad is None:
        return (None,) * 7
    grad_loss, input, weight, lse = ctx.saved_tensors
    reduction, smoothing = ctx.options
    grad = grad.to(input.dtype)
    w = _class_weights(input, weight)
    d_grad_loss = d_input = None
    if needs[0]:
        r = _target_row_scale(torch.ones_like(grad_loss), input, reduction)
        gap = _per_row(lse.to(input.dtype), input) - input
        d_grad_loss = _reduce_rows(grad * r * (1 - smoothing) * w * gap, input, reduction)
    if needs[1]:
        s = _target_row_scale(grad_loss, input, reduction)
        p = _probabilities(input, lse)
        wu = w * grad
        d_input = s * (1 - smoothing) * (p * wu.sum(_class_dim(input), keepdim=True) - wu)
    return d_grad_loss, d_input, None, None, None, None, None


def _target_backward_jvp(ctx, inputs, t_grad_loss, t_input, t_target, t_weight, *_):
    if t_weight is not None:
        raise NotImplementedError(_WEIGHT_REASON + " (forward-mode AD)")
    grad_loss, input, target, weight, reduction, smoothing, lse = inputs
    terms = []
    if t_grad_loss is not None:
        terms.append(OPS.cross_entropy_target_backward(t_grad_loss, input, target, weight,
                                                       reduction, smoothing, lse))
    if t_input is not None:
        p = _probabilities(input, lse)
        s = _target_row_scale(grad_loss, input, reduction)
        t_gap = (p * t_input).sum(_class_dim(input), keepdim=True) - t_input
        terms.append((s * (1 - smoothing) * _class_weights(input, weight) * t_gap)
                     .to(target.dtype))
    return _sum(*terms)


register_autograd("handgrad::cross_entropy_target_backward", _target_backward_backward,
                  _target_backward_setup_context, _target_backward_jvp)
