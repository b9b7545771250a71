import torch
import torch.nn.functional as F

from .. import ops  # noqa: F401  (registers torch.ops.handgrad.scaled_dot_product_attention)
from ..ops._autograd import call


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on
    handgrad.ops.scaled_dot_product_attention.

    Same constructor, parameters, state_dict keys and forward signature as
    torch.nn.MultiheadAttention (it is a subclass overriding forward only).
    The in- and out-projections stay torch's linear layers. Supported: bias,
    batch_first, kdim/vdim, add_bias_kv, add_zero_attn, key_padding_mask and
    attn_mask (bool or float, 2-D or 3-D, with native's meaning: True means
    "do not attend"), is_causal (a hint that needs attn_mask, as in torch),
    dropout in training mode and unbatched inputs.

    need_weights=True (torch's default) returns the attention weights (after
    dropout, averaged over heads unless average_attn_weights=False), as
    native does. That path materializes the L x S weights per head, like
    native's: the attention op itself returns them (its need_weights output,
    recomputed from each row's log-sum-exp), so the output and the returned
    weights share one dropout pattern and gradients flow through both. Use
    need_weights=False for the O(L)-memory path.

    One difference from native: a query row that every mask hides gets a
    zero output (and zero weights), which is what native returns with
    need_weights=False; native's need_weights=True path returns NaN there.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = _mha_forward(self, query, key, value, key_padding_mask, need_weights,
                                    attn_mask, average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights


def _mha_forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                 average_attn_weights, is_causal):
    num_heads = m.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    if embed_dim != m.embed_dim:
        raise RuntimeError("was expecting embedding dimension of %d, but got %d"
                           % (m.embed_dim, embed_dim))
    head_dim = embed_dim // num_heads

    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as in "
                           "torch.nn.MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint: attn_mask is the causal mask
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        is_causal = False

    if m._qkv_same_embed_dim:
        q, k, v = F._in_projection_packed(query, key, value, m.in_proj_weight, m.in_proj_bias)
    else:
        b_q = b_k = b_v = None
        if m.in_proj_bias is not None:
            b_q, b_k, b_v = m.in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, m.q_proj_weight, m.k_proj_weight,
                                   m.v_proj_weight, b_q, b_k, b_v)
    src_len = k.shape[0]

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError("The shape of the 2D attn_mask is %s, but should be %s."
                                   % (tuple(attn_mask.shape), (tgt_len, src_len)))
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError("The shape of the 3D attn_mask is %s, but should be %s."
                                   % (tuple(attn_mask.shape),
                                      (bsz * num_heads, tgt_len, src_len)))
            attn_mask = attn_mask.view(bsz, num_heads, tgt_len, src_len)
        else:
            raise RuntimeError("attn_mask's dimension %d is not supported" % attn_mask.dim())
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise RuntimeError("expecting key_padding_mask shape of %s, but got %s"
                               % ((bsz, src_len), tuple(key_padding_mask.shape)))
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)

    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.expand(1, bsz, embed_dim)])
        v = torch.cat([v, m.bias_v.expand(1, bsz, embed_dim)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

    # (L, N, E) -> (N, H, L, head_dim) views
    q = q.view(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(k.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(v.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    if m.add_zero_attn:
        zeros = k.new_zeros(bsz, num_heads, 1, head_dim)
        k = torch.cat([k, zeros], dim=2)
        v = torch.cat([v, zeros], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

    if key_padding_mask is not None:
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = m.dropout if m.training else 0.0

    # Through call(): the op's formulas also reach the torch.func transforms.
    out, _, _, weights = call("handgrad::scaled_dot_product_attention",
                              q, k, v, attn_mask, float(dropout_p), bool(is_causal), None, False,
                              bool(need_weights))
    if not need_weights:
        weights = None
    else:
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)

    # (N, H, L, head_dim) -> (L * N, E)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, weights
