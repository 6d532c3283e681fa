"""run_wavlm_layer against Hugging Face's WavLM layers on the whole input."""

import pytest
import torch
from transformers import WavLMModel

from dynprompt_sb.tiny_wavlm import wavlm_config
from dynprompt_sb.wavlm_layer import run_wavlm_layer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=["base", "large"])
def encoder(request):
    torch.manual_seed(0)
    config = wavlm_config(style=request.param)
    return WavLMModel(config).encoder


def hf_layer_output(layer, sequence, bias, key_mask):
    """HF's layer on the whole sequence, [batch, S, D]."""
    repeated = bias.repeat(sequence.shape[0], 1, 1)  # [batch * heads, S, S]
    mask = None if key_mask is None else key_mask.long()
    output, _ = layer(sequence, attention_mask=mask, position_bias=repeated)
    return output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_start", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("index", [0, 1])
def test_outputs_and_gradients_equal_hf(
    encoder, query_start, padded, index, device
):
    # On CUDA, scaled_dot_product_attention takes a fused kernel with a
    # float mask that needs a gradient: the case a prompted layer is in.
    encoder.eval().to(device)
    layer = encoder.layers[index]
    torch.manual_seed(1)
    sequence = torch.randn(3, 4 + 20, encoder.config.hidden_size)
    sequence = sequence.to(device).requires_grad_(True)
    key_mask = None
    if padded:
        key_mask = torch.ones(3, 24, dtype=torch.bool, device=device)
        key_mask[1, 15:] = False
        key_mask[2, 9:] = False
    first = encoder.layers[0].attention

    bias = first.compute_bias(24, 24)
    theirs = hf_layer_output(layer, sequence, bias, key_mask)[:, query_start:]
    upstream = torch.randn_like(theirs)
    their_grads = torch.autograd.grad(
        (theirs * upstream).sum(), [sequence, *layer.parameters()]
    )
    bias = first.compute_bias(24, 24)  # a graph of its own
    mine = run_wavlm_layer(layer, sequence, bias, key_mask, query_start)
    my_grads = torch.autograd.grad(
        (mine * upstream).sum(), [sequence, *layer.parameters()]
    )
    tolerance = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance)
    names = ["input"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, my_grads, their_grads, strict=True):
        torch.testing.assert_close(
            a, b, atol=tolerance, rtol=10 * tolerance, msg=name
        )
    encoder.cpu()


def test_padded_keys_do_not_matter(encoder):
    encoder.eval().cpu()
    layer = encoder.layers[1]
    sequence = torch.randn(1, 24, encoder.config.hidden_size)
    key_mask = torch.ones(1, 24, dtype=torch.bool)
    key_mask[0, 18:] = False
    bias = encoder.layers[0].attention.compute_bias(24, 24)
    changed = sequence.clone()
    changed[0, 18:] = 100.0
    with torch.no_grad():
        a = run_wavlm_layer(layer, sequence, bias, key_mask, 4)[:, :14]
        b = run_wavlm_layer(layer, changed, bias, key_mask, 4)[:, :14]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_attention_dropout_acts_only_in_training(encoder):
    layer = encoder.layers[1]
    layer.attention.dropout = 0.5
    sequence = torch.randn(2, 24, encoder.config.hidden_size)
    bias = encoder.layers[0].attention.compute_bias(24, 24)
    try:
        with torch.no_grad():
            layer.eval()
            a = run_wavlm_layer(layer, sequence, bias, None, 4)
            b = run_wavlm_layer(layer, sequence, bias, None, 4)
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            layer.train()
            c = run_wavlm_layer(layer, sequence, bias, None, 4)
        assert not torch.allclose(a, c)
    finally:
        layer.attention.dropout = encoder.config.attention_dropout
        layer.eval()
