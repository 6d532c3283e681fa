"""Small WavLM checkpoints for offline tests, the demo and benchmarks.

No hub is reachable in tests or on a fresh machine, so the project writes
its own WavLM folders with ``save_pretrained`` and loads them through the
same ``from_pretrained`` path as ``microsoft/wavlm-large``. The CNN keeps
WavLM's real kernels and strides (a 400-sample receptive field and a hop
of 320 samples, 50 frames per second), so frame counts match the real
models; only the widths and depths shrink.

Authors
 * dynprompt-sb contributors 2026
"""

from transformers import WavLMConfig, WavLMModel

# WavLM's CNN: 7 layers, 400-sample receptive field, 320-sample hop.
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

# Sizes of the released checkpoints, for benchmarks with random weights.
RELEASED_SIZES = {
    "base-plus": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        conv_dim=(512,) * 7,
        do_stable_layer_norm=False,
        feat_extract_norm="group",
    ),
    "large": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        conv_dim=(512,) * 7,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    ),
}


def wavlm_config(style="large", **overrides):
    """Returns a WavLMConfig of a given size and encoder kind.

    Arguments
    ---------
    style : str
        "base" (post-LN encoder, group-norm CNN, as WavLM Base/Base+),
        "large" (pre-LN "stable layer norm" encoder, layer-norm CNN, as
        WavLM Large), or a released size, "base-plus" or "large-full",
        with its true widths and depths.
    **overrides
        Any WavLMConfig field, applied last.

    Returns
    -------
    config : transformers.WavLMConfig

    Example
    -------
    >>> wavlm_config("base").do_stable_layer_norm
    False
    >>> wavlm_config("large-full").hidden_size
    1024
    """
    if style in ("base-plus", "large-full"):
        fields = dict(
            RELEASED_SIZES["large" if style == "large-full" else "base-plus"]
        )
    elif style in ("base", "large"):
        stable = style == "large"
        fields = dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
            do_stable_layer_norm=stable,
            feat_extract_norm="layer" if stable else "group",
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            num_buckets=32,
            max_bucket_distance=100,
        )
    else:
        raise ValueError(
            f"Unknown WavLM style {style!r}: expected 'base', 'large', "
            "'base-plus' or 'large-full'."
        )
    fields.update(conv_kernel=CONV_KERNEL, conv_stride=CONV_STRIDE)
    fields.update(overrides)
    return WavLMConfig(**fields)


def save_tiny_wavlm(folder, style="large", seed=0, **overrides):
    """Writes a randomly initialised WavLM to a local folder.

    Arguments
    ---------
    folder : str or path
        Where ``save_pretrained`` writes config.json and the weights.
    style : str
        See ``wavlm_config``.
    seed : int
        Seed for the random weights, so the folder is reproducible.
    **overrides
        Any WavLMConfig field.

    Returns
    -------
    folder : str
        The folder, ready for ``WavLMModel.from_pretrained``.

    Example
    -------
    >>> import tempfile
    >>> path = save_tiny_wavlm(tempfile.mkdtemp(), style="base")
    >>> WavLMModel.from_pretrained(path).config.num_hidden_layers
    3
    """
    import torch

    # Seed locally so that writing a model does not disturb the caller's
    # random stream.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WavLMModel(wavlm_config(style, **overrides))
    model.save_pretrained(str(folder))
    return str(folder)
