"""One pretrained WavLM transformer layer, with queries for some frames only.

The paper drops the prompt frames after every layer, so their outputs are
never used: they serve only as keys and values for the utterance frames.
Hugging Face's layers compute an output for every frame they are given;
here a layer takes the whole sequence [prompts; utterance] for its keys and
values, but queries, attention output, feed-forward and layer norms run on
the utterance frames alone. For N*T' prompt frames this saves their share
of the query and output projections and of the feed-forward network (about
5/6 of a frame's cost), and gives exactly the utterance outputs of HF's
layer on the whole sequence.

The layer's own modules (projections, gated relative position bias, layer
norms, feed-forward) are called as they are, so pretrained weights, dropout
and both encoder kinds (post-LN ``WavLMEncoderLayer``, pre-LN
``WavLMEncoderLayerStableLayerNorm``) behave as in transformers. Attention
runs through ``torch.nn.functional.scaled_dot_product_attention``, which
picks a fused kernel where one exists instead of HF's eager path that also
returns the attention weights.

Authors
 * dynprompt-sb contributors 2026
"""

import torch
import torch.nn.functional as F
from transformers.models.wavlm.modeling_wavlm import (
    WavLMEncoderLayerStableLayerNorm,
)


def run_wavlm_layer(
    layer, layer_input, position_bias, key_mask=None, query_start=0
):
    """Runs a WavLM layer, giving outputs for frames from query_start on.

    Arguments
    ---------
    layer : transformers WavLMEncoderLayer or WavLMEncoderLayerStableLayerNorm
        A pretrained layer.
    layer_input : torch.Tensor
        [batch, S, D], the whole sequence the layer attends over, e.g.
        N*T' prompt frames followed by T utterance frames.
    position_bias : torch.Tensor
        [heads, S, S], WavLM's relative position bias before gating, from
        the first layer's ``attention.compute_bias(S, S)``.
    key_mask : torch.Tensor, optional
        [batch, S], bool, True on frames that may be attended to; padded
        frames never enter a key.
    query_start : int
        First frame whose output is wanted: 0 for every frame, N*T' for the
        utterance frames only.

    Returns
    -------
    output : torch.Tensor
        [batch, S - query_start, D]: what HF's layer gives for those frames
        on the whole sequence.

    Example
    -------
    >>> from transformers import WavLMConfig, WavLMModel
    >>> config = WavLMConfig(hidden_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, intermediate_size=64)
    >>> layer = WavLMModel(config).encoder.layers[0]
    >>> sequence = torch.randn(2, 10, 32)  # 4 prompt frames, 6 frames
    >>> bias = layer.attention.compute_bias(10, 10)  # [heads, S, S]
    >>> run_wavlm_layer(layer, sequence, bias, query_start=4).shape
    torch.Size([2, 6, 32])
    """
    pre_layer_norm = isinstance(layer, WavLMEncoderLayerStableLayerNorm)
    residual = layer_input[:, query_start:]
    attention_input = layer_input
    if pre_layer_norm:
        attention_input = layer.layer_norm(layer_input)
    attended = _gated_self_attention(
        layer.attention, attention_input, position_bias, key_mask, query_start
    )
    hidden = residual + layer.dropout(attended)
    if pre_layer_norm:
        return hidden + layer.feed_forward(layer.final_layer_norm(hidden))
    hidden = layer.layer_norm(hidden)
    return layer.final_layer_norm(hidden + layer.feed_forward(hidden))


def _gated_self_attention(
    attention, hidden, position_bias, key_mask, query_start
):
    """WavLM's attention with gated relative position bias.

    hidden [batch, S, D] gives keys and values; its frames from
    query_start on give the queries. Returns [batch, S - query_start, D].
    """
    batch, num_keys, dim = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query_input = hidden[:, query_start:]
    num_queries = query_input.shape[1]

    def split_heads(x):  # [batch, frames, D] -> [batch, heads, frames, hd]
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    query = split_heads(attention.q_proj(query_input))
    key = split_heads(attention.k_proj(hidden))
    value = split_heads(attention.v_proj(hidden))

    # Each query frame scales its row of the relative position bias by a
    # gate computed from its own input (WavLM's gated relative position).
    gate_logits = attention.gru_rel_pos_linear(split_heads(query_input))
    gate_logits = gate_logits.view(batch, heads, num_queries, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(gate_logits).chunk(2, dim=-1)
    gate = gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0
    # bias: [batch, heads, num_queries, S]
    bias = gate * position_bias[:, query_start:]
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))

    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=bias.to(query.dtype),
        dropout_p=attention.dropout if attention.training else 0.0,
    )
    output = output.transpose(1, 2).reshape(batch, num_queries, dim)
    return attention.out_proj(output)
