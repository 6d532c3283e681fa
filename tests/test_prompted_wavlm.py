"""Tests for PromptedWavLM on tiny WavLM folders written offline."""

import warnings

import pytest
import torch
from transformers import WavLMModel

from dynprompt_sb import PromptedWavLM, WeightedLayerSum
from dynprompt_sb.tiny_wavlm import save_tiny_wavlm

POOL = dict(num_prompts=6, prompt_len=2, top_n=2)


@pytest.fixture(scope="module", params=["base", "large"])
def wavlm_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"wavlm_{request.param}")
    return save_tiny_wavlm(folder, style=request.param)


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory):
    return save_tiny_wavlm(tmp_path_factory.mktemp("large"), style="large")


def test_none_mode_equals_hf_hidden_states(wavlm_folder):
    torch.manual_seed(0)
    wavs = torch.randn(2, 8000)
    reference = WavLMModel.from_pretrained(wavlm_folder).eval()
    with torch.no_grad():
        expected = reference(wavs, output_hidden_states=True).hidden_states
        model = PromptedWavLM(wavlm_folder, prompt_mode="none").train()
        hidden = model(wavs)
    assert hidden.shape[0] == len(expected) == model.num_hidden_states
    for mine, theirs in zip(hidden, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_none_mode_equals_hf_with_padding_mask(wavlm_folder):
    torch.manual_seed(0)
    wavs = torch.randn(2, 8000)
    wavs[1, 5000:] = 0
    sample_mask = torch.ones(2, 8000, dtype=torch.long)
    sample_mask[1, 5000:] = 0
    reference = WavLMModel.from_pretrained(wavlm_folder).eval()
    model = PromptedWavLM(wavlm_folder, prompt_mode="none")
    with torch.no_grad():
        expected = reference(
            wavs, attention_mask=sample_mask, output_hidden_states=True
        ).hidden_states
        hidden = model(wavs, torch.tensor([1.0, 5000 / 8000]))
    for mine, theirs in zip(hidden, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_mode", ["dynamic", "static", "none"])
def test_padded_batch_matches_each_utterance_alone(large_folder, prompt_mode):
    # A layer-norm CNN (WavLM Large) is padding-invariant; a group-norm CNN
    # (Base, Base+) normalises over time, padding included, in HF too.
    torch.manual_seed(0)
    model = PromptedWavLM(large_folder, prompt_mode=prompt_mode, **POOL)
    model.eval()
    lengths = [16000, 9000, 4000]
    wavs = torch.zeros(3, 16000)
    alone = []
    with torch.no_grad():
        for b, length in enumerate(lengths):
            wav = torch.randn(1, length)
            wavs[b, :length] = wav
            alone.append(model(wav))
        batch = model(wavs, torch.tensor(lengths) / 16000)
    for b in range(3):
        frames = alone[b].shape[2]
        torch.testing.assert_close(
            batch[:, b, :frames], alone[b][:, 0], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("prompt_mode", ["dynamic", "static"])
def test_prompted_states_equal_hf_layers_on_the_whole_sequence(
    wavlm_folder, prompt_mode
):
    # The encoder computes outputs for the utterance frames only; HF's
    # layers, run on [prompts; X_{i-1}] and cut after each layer, are the
    # reference, for values and prompt gradients.
    torch.manual_seed(0)
    model = PromptedWavLM(wavlm_folder, prompt_mode=prompt_mode, **POOL)
    model.train()
    wavs, wav_lens = torch.randn(2, 8000), torch.tensor([1.0, 0.6])
    states = model(wavs, wav_lens)
    states[1:].pow(2).mean().backward()
    prompts = model.pools[0].prompts if model.pools else model.static_prompts
    my_grad, prompts.grad = prompts.grad, None

    sample_mask = (torch.arange(8000) < wav_lens[:, None] * 8000).long()
    frame_mask = model.wavlm._get_feature_vector_attention_mask(
        states.shape[2], sample_mask
    )
    frame_lens = frame_mask.sum(dim=1) / frame_mask.shape[1]
    num_prompt_frames = POOL["top_n"] * POOL["prompt_len"]
    layer_mask = torch.cat(
        [torch.ones(2, num_prompt_frames, dtype=torch.long), frame_mask], 1
    )
    hidden = states[0].detach()
    position_bias, reference = None, [hidden]
    for i, layer in enumerate(model.wavlm.encoder.layers):
        if prompt_mode == "dynamic":
            layer_prompts, _ = model.pools[0](hidden, frame_lens)
        else:
            layer_prompts = model.static_prompts[i].expand(2, -1, -1)
        output, position_bias = layer(
            torch.cat([layer_prompts, hidden], dim=1),
            attention_mask=layer_mask,
            position_bias=position_bias,
        )
        hidden = output[:, num_prompt_frames:]
        reference.append(hidden)
    reference = torch.stack(reference)
    reference[1:].pow(2).mean().backward()
    torch.testing.assert_close(states, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(my_grad, prompts.grad, atol=1e-6, rtol=1e-4)


def test_dynamic_gradients_and_frozen_backbone(wavlm_folder):
    torch.manual_seed(0)
    model = PromptedWavLM(wavlm_folder, num_prompts=8, prompt_len=2, top_n=2)
    model.train()
    backbone = {k: v.clone() for k, v in model.wavlm.state_dict().items()}
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4
    )
    hidden = model(torch.randn(2, 8000), torch.tensor([1.0, 0.7]))
    hidden[1:].pow(2).mean().backward()
    used = model.prompt_usage().sum(dim=0) > 0
    grad = model.pools[0].prompts.grad
    assert used.any() and not used.all()
    for j in range(8):
        if used[j]:
            assert grad[j].abs().sum() > 0
        else:
            assert torch.count_nonzero(grad[j]) == 0
    optimizer.step()
    for name, value in model.wavlm.state_dict().items():
        assert torch.equal(value, backbone[name]), name
    assert all(not p.requires_grad for p in model.wavlm.parameters())


def test_frozen_backbone_stays_in_eval_mode(large_folder):
    model = PromptedWavLM(large_folder, **POOL)
    model.train()
    assert model.training
    assert not any(m.training for m in model.wavlm.modules())
    finetuned = PromptedWavLM(large_folder, freeze=False, **POOL).train()
    assert finetuned.wavlm.training


def test_frozen_forward_is_deterministic_in_training_mode(large_folder):
    # No dropout or layerdrop may act inside a frozen backbone.
    model = PromptedWavLM(large_folder, **POOL).train()
    wavs = torch.randn(2, 8000)
    torch.testing.assert_close(model(wavs), model(wavs), atol=0, rtol=0)


@pytest.mark.parametrize("pool_per_layer", [False, True])
def test_trainable_parameters_are_the_pool(large_folder, pool_per_layer):
    model = PromptedWavLM(
        large_folder,
        num_prompts=15,
        prompt_len=5,
        top_n=3,
        pool_per_layer=pool_per_layer,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers, dim = model.num_layers, model.output_size
    pools = layers if pool_per_layer else 1
    assert trainable == pools * 15 * 5 * dim


def test_static_mode_trains_n_t_frames_per_layer(large_folder):
    model = PromptedWavLM(large_folder, prompt_mode="static", **POOL)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1
    assert trainable[0].shape == (model.num_layers, 4, model.output_size)
    model(torch.randn(2, 8000)).sum().backward()
    assert trainable[0].grad.abs().sum() > 0


def test_full_finetuning_trains_transformer_not_cnn(large_folder):
    model = PromptedWavLM(large_folder, prompt_mode="none", freeze=False)
    model(torch.randn(2, 8000)).sum().backward()
    assert all(
        p.grad is None for p in model.wavlm.feature_extractor.parameters()
    )
    layer = model.wavlm.encoder.layers[0]
    assert layer.feed_forward.output_dense.weight.grad.abs().sum() > 0
    assert "wavlm.encoder.layers.0.attention.q_proj.weight" in (
        model.state_dict()
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(selection="batch"),
        dict(key="learnable"),
        dict(selection="batch", key="learnable", pool_per_layer=True),
    ],
)
def test_selection_and_key_options_run(large_folder, options):
    torch.manual_seed(0)
    model = PromptedWavLM(large_folder, **POOL, **options).train()
    hidden = model(torch.randn(3, 8000), torch.tensor([1.0, 0.8, 0.5]))
    loss = hidden.pow(2).mean() + model.key_loss()
    loss.backward()
    pool = model.pools[0]
    assert pool.prompts.grad.abs().sum() > 0
    if options.get("key") == "learnable":
        assert model.key_loss() > 0
        assert pool.keys.grad.abs().sum() > 0
    else:
        assert float(model.key_loss()) == 0.0
    if options.get("selection") == "batch":
        assert (model.prompt_usage() % 3 == 0).all()  # same picks per row


def test_prompt_usage_counts_every_pick(large_folder):
    model = PromptedWavLM(large_folder, **POOL)
    model(torch.randn(3, 8000))
    usage = model.prompt_usage()
    assert usage.shape == (model.num_layers, 6)
    assert (usage.sum(dim=1) == 3 * 2).all()
    model.reset_prompt_usage()
    assert model.prompt_usage().sum() == 0


def test_checkpoint_state_holds_only_what_trains(large_folder, tmp_path):
    model = PromptedWavLM(large_folder, **POOL)
    state = model.state_dict()
    assert list(state) == ["pools.0.prompts"]
    torch.save(state, tmp_path / "ckpt.pt")
    other = PromptedWavLM(large_folder, **POOL)
    other.load_state_dict(
        torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True
    )
    assert torch.equal(other.pools[0].prompts, model.pools[0].prompts)
    # Nested in a ModuleDict, as in a Brain's modules.
    nested = torch.nn.ModuleDict({"wavlm": other})
    nested.load_state_dict({"wavlm.pools.0.prompts": state["pools.0.prompts"]})


def test_gradient_checkpointing_gives_the_same_gradients(large_folder):
    torch.manual_seed(0)
    wavs = torch.randn(2, 8000)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = PromptedWavLM(
            large_folder, gradient_checkpointing=checkpointing, **POOL
        ).train()
        model(wavs, torch.tensor([1.0, 0.6])).pow(2).mean().backward()
        grads.append(model.pools[0].prompts.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_prompt_frames_to_backend_keeps_them(large_folder):
    model = PromptedWavLM(
        large_folder, prompt_frames_to_backend=True, **POOL
    ).eval()
    plain = PromptedWavLM(large_folder, **POOL).eval()
    plain.load_state_dict(model.state_dict())
    wavs = torch.randn(2, 8000)
    with torch.no_grad():
        kept, dropped = model(wavs), plain(wavs)
    assert kept.shape[2] == dropped.shape[2] + 4
    torch.testing.assert_close(kept[:, :, 4:], dropped, atol=1e-5, rtol=0)
    lens = model.output_lens(torch.tensor([1.0, 0.5]), kept.shape[2])
    frames = dropped.shape[2]
    assert lens[1] == pytest.approx((4 + 0.5 * frames) / (4 + frames))


def test_weighted_layer_sum_feeds_ecapa(large_folder):
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    model = PromptedWavLM(large_folder, **POOL)
    layer_sum = WeightedLayerSum(model.num_hidden_states)
    ecapa = ECAPA_TDNN(
        model.output_size,
        channels=[16, 16, 16, 16, 48],
        attention_channels=8,
        lin_neurons=12,
    )
    wav_lens = torch.tensor([1.0, 0.7])
    embedding = ecapa(
        layer_sum(model(torch.randn(2, 8000), wav_lens)), wav_lens
    )
    assert embedding.shape == (2, 1, 12)
    assert torch.isfinite(embedding).all()


def test_all_zero_utterance_gives_finite_states(wavlm_folder):
    model = PromptedWavLM(wavlm_folder, **POOL)
    hidden = model(torch.zeros(2, 8000), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(hidden).all()


def test_bad_input_names_the_value(large_folder, tmp_path):
    model = PromptedWavLM(large_folder, **POOL)
    with pytest.raises(ValueError, match="399 samples"):
        model(torch.randn(2, 399))
    with pytest.raises(ValueError, match=r"\(0, 1\].*1\.2"):
        model(torch.randn(2, 8000), torch.tensor([1.0, 1.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\].*0\.0"):
        model(torch.randn(2, 8000), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[2, 8000, 1\]|\(2, 8000, 1\)"):
        model(torch.randn(2, 8000, 1))
    with pytest.raises(ValueError, match="receptive field"):
        model(torch.randn(2, 8000), torch.tensor([1.0, 0.01]))
    with pytest.raises(ValueError, match="top_n=7"):
        PromptedWavLM(large_folder, num_prompts=6, top_n=7)
    with pytest.raises(ValueError, match="prompt_mode='deep'"):
        PromptedWavLM(large_folder, prompt_mode="deep")
    with pytest.raises(FileNotFoundError, match="config.json"):
        PromptedWavLM(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptedWavLM(str(tmp_path / "missing"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "wav2vec2"}')
    with pytest.raises(ValueError, match="'wav2vec2'"):
        PromptedWavLM(str(other))


def test_normalize_wav_follows_the_source_and_matches_hf(tmp_path):
    from transformers import Wav2Vec2FeatureExtractor

    folder = save_tiny_wavlm(tmp_path / "large", style="large")
    assert not PromptedWavLM(folder, prompt_mode="none").normalize_wav
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    model = PromptedWavLM(folder, prompt_mode="none").eval()
    assert model.normalize_wav
    torch.manual_seed(0)
    wavs = 0.05 * torch.randn(2, 8000) + 0.3
    wavs[1, 6000:] = 0
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    inputs = extractor(
        [wavs[0].numpy(), wavs[1, :6000].numpy()],
        sampling_rate=16000,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    reference = WavLMModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(
            inputs.input_values,
            attention_mask=inputs.attention_mask,
            output_hidden_states=True,
        ).hidden_states
        hidden = model(wavs, torch.tensor([1.0, 6000 / 8000]))
    for mine, theirs in zip(hidden, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prompt_mode", ["dynamic", "static"])
def test_layers_do_not_synchronise_the_gpu(tmp_path, prompt_mode):
    # Input checks read back a few values once per batch; nothing in the
    # layer loop may, or each layer would stall the GPU's queue.
    synchronisations = []
    for layers in (2, 6):
        folder = save_tiny_wavlm(tmp_path / str(layers), num_hidden_layers=6)
        model = PromptedWavLM(folder, prompt_mode=prompt_mode, **POOL)
        model = model.cuda().train()
        wavs = torch.randn(2, 8000, device="cuda")
        wav_lens = torch.tensor([1.0, 0.7], device="cuda")
        model.wavlm.encoder.layers = model.wavlm.encoder.layers[:layers]
        model(wavs, wav_lens)  # warm-up: lazy initialisation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(wavs, wav_lens).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        synchronisations.append(
            sum("synchroniz" in str(w.message) for w in caught)
        )
    assert synchronisations[0] == synchronisations[1]
