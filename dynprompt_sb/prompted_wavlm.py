"""A Hugging Face WavLM whose every transformer layer takes prompts.

Li, Mak, Lee, Meng, Interspeech 2024, section 2, in the paper's names:

    X_0 = encoder input (CNN -> projection -> positional convolution)
    for i in 1..L:
        P_s^i = the N prompts picked for q(X_{i-1})       (PromptPool)
        Z_i   = Layer_i([P_s1^i; ...; P_sN^i; X_{i-1}])   (N*T' + T frames)
        X_i   = Z_i without its first N*T' frames         (T frames)

The layers are the pretrained ones, called one by one through
``dynprompt_sb.wavlm_layer``, so both of WavLM's encoder kinds work:
Base/Base+ (post-LN, ``WavLMEncoder``) and Large (pre-LN,
``WavLMEncoderStableLayerNorm``). Since Z_i's prompt frames are dropped,
a layer computes outputs for the T utterance frames only, with the N*T'
prompt frames as extra keys and values. The relative position bias is
built once for N*T' + T frames, from layer 1's embedding as in WavLM; the
padding mask is extended with "valid" for the prompt frames.

Authors
 * dynprompt-sb contributors 2026
"""

import json
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoFeatureExtractor, WavLMModel

from dynprompt_sb.audio import MIN_SAMPLES
from dynprompt_sb.prompt_pool import PromptPool
from dynprompt_sb.wavlm_layer import run_wavlm_layer

PROMPT_MODES = ("dynamic", "static", "none")


class PromptedWavLM(nn.Module):
    """WavLM with dynamic (or static) prompts prepended at every layer.

    Arguments
    ---------
    source : str
        A Hugging Face hub id (e.g. "microsoft/wavlm-large") or a local
        folder written by ``save_pretrained``.
    save_path : str, optional
        Cache folder for hub downloads.
    prompt_mode : str
        "dynamic" (the paper: per-utterance picks from a pool), "static"
        (N*T' learnable frames per layer, the same for every utterance)
        or "none" (plain WavLM).
    num_prompts : int
        M, prompts in a pool.
    prompt_len : int
        T', frames per prompt.
    top_n : int
        N, prompts given to each utterance at each layer.
    pool_per_layer : bool
        False (the released code): one pool shared by all layers.
        True: a pool of its own for every layer.
    selection : str
        "instance" (the paper) or "batch" (released code); see PromptPool.
    key : str
        "prompt_mean" (the paper) or "learnable" (released code).
    freeze : bool
        True: WavLM's weights never train and the backbone stays in eval
        mode (no dropout, no layerdrop) whatever ``.train()`` says; the
        prompts still get gradients through it. Its weights are left out
        of ``state_dict``, so checkpoints hold only what trains.
        False: full fine-tuning of the transformer.
    freeze_feature_extractor : bool
        Keep the CNN frozen when ``freeze`` is False, as is usual.
    gradient_checkpointing : bool
        Recompute each layer in the backward pass instead of storing its
        activations (training only).
    prompt_frames_to_backend : bool
        False (the paper): the hidden states handed on are X_0..X_L.
        True (released code): they keep the prompt frames, i.e. Z_i, and
        X_0 with layer 1's prompts; see ``output_lens``.
    extend_padding_mask : bool
        True (correct): prompt frames are marked valid in the padding
        mask. False (released code): no padding mask reaches the layers,
        so padded frames are attended to.
    normalize_wav : bool, optional
        Normalise each waveform to zero mean and unit variance over its
        valid samples before the CNN, as WavLM Large was trained (its
        feature extractor sets ``do_normalize``). None (default): follow
        the ``do_normalize`` of the source's preprocessor_config.json,
        False where the source has none.

    Example
    -------
    >>> import tempfile
    >>> from dynprompt_sb.tiny_wavlm import save_tiny_wavlm
    >>> folder = save_tiny_wavlm(tempfile.mkdtemp(), style="large")
    >>> model = PromptedWavLM(folder, num_prompts=6, prompt_len=2, top_n=2)
    >>> hidden = model(torch.randn(2, 16000), torch.tensor([1.0, 0.6]))
    >>> hidden.shape  # [L + 1, batch, frames, D]
    torch.Size([4, 2, 49, 32])
    """

    def __init__(
        self,
        source,
        save_path=None,
        prompt_mode="dynamic",
        num_prompts=15,
        prompt_len=5,
        top_n=3,
        pool_per_layer=False,
        selection="instance",
        key="prompt_mean",
        freeze=True,
        freeze_feature_extractor=True,
        gradient_checkpointing=False,
        prompt_frames_to_backend=False,
        extend_padding_mask=True,
        normalize_wav=None,
    ):
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(
                f"prompt_mode={prompt_mode!r}: expected one of {PROMPT_MODES}."
            )
        self.wavlm = load_wavlm(source, save_path)
        if normalize_wav is None:
            normalize_wav = source_normalizes_wav(source, save_path)
        self.normalize_wav = normalize_wav
        self.prompt_mode = prompt_mode
        self.freeze = freeze
        self.freeze_feature_extractor = freeze or freeze_feature_extractor
        self.gradient_checkpointing = gradient_checkpointing
        self.prompt_frames_to_backend = prompt_frames_to_backend
        self.extend_padding_mask = extend_padding_mask

        config = self.wavlm.config
        self.output_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_hidden_states = self.num_layers + 1
        # WavLM Large (pre-LN) normalises after the last layer instead of
        # before the first; HF's hidden_states hold the raw layer outputs.
        self.pre_layer_norm = config.do_stable_layer_norm

        self.pools = None
        self.static_prompts = None
        self.num_prompt_frames = 0
        if prompt_mode == "dynamic":
            num_pools = self.num_layers if pool_per_layer else 1
            self.pools = nn.ModuleList(
                PromptPool(
                    num_prompts,
                    prompt_len,
                    self.output_size,
                    top_n,
                    selection,
                    key,
                )
                for _ in range(num_pools)
            )
            self.num_prompt_frames = top_n * prompt_len
            # Selection counts [L, M], read with prompt_usage(); not saved.
            self.register_buffer(
                "usage",
                torch.zeros(self.num_layers, num_prompts, dtype=torch.long),
                persistent=False,
            )
        elif prompt_mode == "static":
            if top_n < 1 or prompt_len < 1:
                raise ValueError(
                    f"top_n={top_n} and prompt_len={prompt_len} must be >= 1."
                )
            self.num_prompt_frames = top_n * prompt_len
            self.static_prompts = nn.Parameter(
                torch.empty(
                    self.num_layers, self.num_prompt_frames, self.output_size
                ).uniform_(-1, 1)
            )
        self._key_loss = None

        if freeze:
            self.wavlm.requires_grad_(False)
            self.wavlm.eval()
            self.register_state_dict_post_hook(_drop_frozen_backbone)
            self.register_load_state_dict_post_hook(_allow_missing_backbone)
        elif self.freeze_feature_extractor:
            self.wavlm.feature_extractor.requires_grad_(False)

    def forward(self, wavs, wav_lens=None):
        """Hidden states of every layer, prompt frames removed.

        Arguments
        ---------
        wavs : torch.Tensor
            Waveforms at 16 kHz, [batch, samples].
        wav_lens : torch.Tensor, optional
            Relative lengths in (0, 1], [batch].

        Returns
        -------
        hidden_states : torch.Tensor
            [L + 1, batch, frames, D]: X_0 (the encoder input) and
            X_1..X_L. With ``prompt_frames_to_backend`` every state is
            N*T' frames longer.
        """
        sample_mask = self._check_input(wavs, wav_lens)
        wavlm, encoder = self.wavlm, self.wavlm.encoder
        if self.normalize_wav:
            wavs = normalize_waveforms(wavs, sample_mask)

        with torch.set_grad_enabled(
            torch.is_grad_enabled() and not self.freeze_feature_extractor
        ):
            features = wavlm.feature_extractor(wavs).transpose(1, 2)
        # frame_mask [batch, T]: True on frames computed from real samples.
        frame_mask = None
        if sample_mask is not None:
            frame_mask = wavlm._get_feature_vector_attention_mask(
                features.shape[1], sample_mask
            )

        with torch.set_grad_enabled(
            torch.is_grad_enabled() and not self.freeze
        ):
            hidden, _ = wavlm.feature_projection(features)
            if frame_mask is not None:
                hidden = hidden.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
            hidden = hidden + encoder.pos_conv_embed(hidden)
            if not self.pre_layer_norm:
                hidden = encoder.layer_norm(hidden)
            hidden = encoder.dropout(hidden)  # X_0: [batch, T, D]

        frame_lens = None
        if frame_mask is not None:
            frame_lens = frame_mask.sum(dim=1) / frame_mask.shape[1]
        num_frames = self.num_prompt_frames + hidden.shape[1]  # S
        key_mask = self._key_mask(frame_mask, hidden.shape[0])
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and not self.freeze
        ):
            # [heads, S, S], from layer 1's embedding, shared by all layers
            position_bias = encoder.layers[0].attention.compute_bias(
                num_frames, num_frames
            )
        # Prompt frames are dropped after each layer, so only the utterance
        # frames need queries, unless the back-end gets the prompt frames.
        query_start = self.num_prompt_frames
        if self.prompt_frames_to_backend:
            query_start = 0

        # X_0 is handed on as is, or (released code) as layer 1 sees it.
        states = [] if self.prompt_frames_to_backend else [hidden]
        self._key_loss = hidden.new_zeros(())
        for i, layer in enumerate(encoder.layers):
            prompts = self._layer_prompts(i, hidden, frame_lens)
            layer_input = hidden  # [batch, S, D] once prompted
            if prompts is not None:
                layer_input = torch.cat([prompts, hidden], dim=1)
            if self.prompt_frames_to_backend and i == 0:
                states.append(layer_input)
            if self._skip_layer(i):
                output = layer_input[:, query_start:]
            else:
                output = self._run_layer(
                    layer, layer_input, position_bias, key_mask, query_start
                )
            # output: Z_i from query_start on, [batch, S - query_start, D]
            hidden = output[:, self.num_prompt_frames - query_start :]  # X_i
            states.append(output if self.prompt_frames_to_backend else hidden)
        return torch.stack(states)

    def output_lens(self, wav_lens, num_frames):
        """Relative lengths of the returned hidden states.

        Arguments
        ---------
        wav_lens : torch.Tensor or None
            Relative lengths of the waveforms, [batch].
        num_frames : int
            Frames of the returned states.

        Returns
        -------
        lens : torch.Tensor or None
            ``wav_lens`` itself, unless prompt frames are handed on: they
            lead every sequence and are always valid.
        """
        if wav_lens is None or not self.prompt_frames_to_backend:
            return wav_lens
        utterance_frames = num_frames - self.num_prompt_frames
        return (self.num_prompt_frames + wav_lens * utterance_frames) / (
            num_frames
        )

    def key_loss(self):
        """Summed pull loss of learnable keys over layers, last forward."""
        if self._key_loss is None:
            return torch.zeros(())
        return self._key_loss

    def prompt_usage(self):
        """Selection counts since the last reset, LongTensor [L, M].

        A column that stays at zero in every row is a prompt the pool
        never uses: a collapsed pool shows one or two hot columns.
        """
        if self.prompt_mode != "dynamic":
            raise ValueError(
                f"prompt_usage() needs prompt_mode='dynamic', not "
                f"{self.prompt_mode!r}."
            )
        return self.usage.clone()

    def reset_prompt_usage(self):
        """Sets the selection counts to zero (e.g. at each epoch start)."""
        if self.prompt_mode == "dynamic":
            self.usage.zero_()

    def train(self, mode=True):
        """Sets training mode, keeping a frozen backbone in eval mode."""
        super().train(mode)
        if self.freeze:
            self.wavlm.eval()
        return self

    def _layer_prompts(self, i, hidden, frame_lens):
        """Prompts for layer i + 1, [batch, N*T', D], or None."""
        if self.prompt_mode == "static":
            return self.static_prompts[i].expand(hidden.shape[0], -1, -1)
        if self.prompt_mode != "dynamic":
            return None
        pool = self.pools[i % len(self.pools)]
        # frame_lens come from the checked wav_lens: checking them again
        # in every layer would synchronise a GPU 2L times per batch.
        prompts, indices = pool(hidden, frame_lens, check_lengths=False)
        with torch.no_grad():
            # index_add_, not bincount, which reads its input's maximum
            # back to the host and so synchronises.
            picks = indices.flatten()
            self.usage[i].index_add_(0, picks, torch.ones_like(picks))
        if pool.key == "learnable":
            self._key_loss = self._key_loss + pool.pull_loss(
                hidden, indices, frame_lens
            )
        return prompts.to(hidden.dtype)

    def _key_mask(self, frame_mask, batch):
        """Frames that may be attended to, bool [batch, S], or None."""
        if frame_mask is None or not self.extend_padding_mask:
            return None
        prompt_mask = frame_mask.new_ones(batch, self.num_prompt_frames)
        return torch.cat([prompt_mask, frame_mask], dim=1)

    def _run_layer(
        self, layer, layer_input, position_bias, key_mask, query_start
    ):
        if (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
        ):
            return checkpoint(
                run_wavlm_layer,
                layer,
                layer_input,
                position_bias,
                key_mask,
                query_start,
                use_reentrant=False,
            )
        return run_wavlm_layer(
            layer, layer_input, position_bias, key_mask, query_start
        )

    def _skip_layer(self, i):
        """LayerDrop, as WavLM trains it; only when fine-tuning."""
        layerdrop = self.wavlm.config.layerdrop
        if self.freeze or not self.training or i == 0 or layerdrop <= 0:
            return False
        return bool(torch.rand([]) < layerdrop)

    def _check_input(self, wavs, wav_lens):
        """Validates the batch; returns the sample mask or None."""
        if wavs.dim() != 2:
            raise ValueError(
                f"PromptedWavLM expects wavs of shape [batch, samples], got "
                f"{tuple(wavs.shape)}."
            )
        if wavs.shape[1] < MIN_SAMPLES:
            raise ValueError(
                f"wavs have {wavs.shape[1]} samples, fewer than WavLM's "
                f"receptive field of {MIN_SAMPLES} samples (25 ms at 16 kHz)."
            )
        if wav_lens is None:
            return None
        if wav_lens.shape != (wavs.shape[0],):
            raise ValueError(
                f"wav_lens must have shape [{wavs.shape[0]}], got "
                f"{tuple(wav_lens.shape)}."
            )
        if bool(((wav_lens <= 0) | (wav_lens > 1)).any()):
            raise ValueError(
                f"wav_lens must be relative lengths in (0, 1], got "
                f"{wav_lens.tolist()}."
            )
        num_samples = torch.round(wav_lens * wavs.shape[1]).long()
        if bool((num_samples < MIN_SAMPLES).any()):
            raise ValueError(
                f"Some utterances are shorter than WavLM's receptive field "
                f"of {MIN_SAMPLES} samples: {num_samples.tolist()} samples; "
                "pad them (dynprompt_sb.audio.pad_to_length)."
            )
        if bool((num_samples == wavs.shape[1]).all()):
            return None  # no padding: same as HF without a mask
        positions = torch.arange(wavs.shape[1], device=wavs.device)
        return (positions[None, :] < num_samples[:, None]).long()


def normalize_waveforms(wavs, sample_mask=None, eps=1e-7):
    """Zero mean, unit variance per waveform over its valid samples.

    The statistics and ``eps`` are those of transformers'
    Wav2Vec2FeatureExtractor, so a model sees what it was trained on;
    padded samples stay zero.

    Arguments
    ---------
    wavs : torch.Tensor
        [batch, samples].
    sample_mask : torch.Tensor, optional
        [batch, samples], 1 on valid samples.
    eps : float
        Added to the variance.

    Returns
    -------
    normalized : torch.Tensor
        [batch, samples].

    Example
    -------
    >>> out = normalize_waveforms(torch.tensor([[1.0, 3.0, 0.0]]),
    ...                           torch.tensor([[1, 1, 0]]))
    >>> [round(v, 4) for v in out[0].tolist()]
    [-1.0, 1.0, 0.0]
    """
    if sample_mask is None:
        mean = wavs.mean(dim=1, keepdim=True)
        var = wavs.var(dim=1, unbiased=False, keepdim=True)
        return (wavs - mean) / torch.sqrt(var + eps)
    mask = sample_mask.to(wavs.dtype)
    count = mask.sum(dim=1, keepdim=True)
    mean = (wavs * mask).sum(dim=1, keepdim=True) / count
    var = ((wavs - mean) ** 2 * mask).sum(dim=1, keepdim=True) / count
    normalized = (wavs - mean) / torch.sqrt(var + eps)
    return normalized.masked_fill(sample_mask == 0, 0.0)


def source_normalizes_wav(source, save_path=None):
    """Whether a WavLM source expects normalised waveforms.

    Reads ``do_normalize`` from the source's preprocessor_config.json
    (True for microsoft/wavlm-large, False for the Base models); a source
    without one (e.g. a folder holding only the model) gives False.
    """
    source = str(source)
    if os.path.isdir(source):
        path = os.path.join(source, "preprocessor_config.json")
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as config_file:
            return bool(json.load(config_file).get("do_normalize", False))
    try:
        extractor = AutoFeatureExtractor.from_pretrained(
            source, cache_dir=save_path
        )
    except OSError:
        return False
    return bool(getattr(extractor, "do_normalize", False))


def load_wavlm(source, save_path=None):
    """Loads a pretrained WavLMModel from a hub id or a local folder.

    Arguments
    ---------
    source : str
        Hub id or a folder written by ``save_pretrained``.
    save_path : str, optional
        Cache folder for hub downloads.

    Returns
    -------
    model : transformers.WavLMModel
    """
    source = str(source)
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"WavLM source folder {source!r} has no config.json: expected "
                "a folder written by save_pretrained or a hub id."
            )
        with open(config_path, encoding="utf-8") as config_file:
            model_type = json.load(config_file).get("model_type")
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        # Not a hub id ("owner/name"): a local folder that is not there.
        raise FileNotFoundError(f"WavLM source folder {source!r} not found.")
    else:
        model_type = AutoConfig.from_pretrained(
            source, cache_dir=save_path
        ).model_type
    if model_type != "wavlm":
        raise ValueError(
            f"WavLM source {source!r} holds a model of type {model_type!r}, "
            "not 'wavlm'."
        )
    return WavLMModel.from_pretrained(source, cache_dir=save_path)


def _drop_frozen_backbone(module, state_dict, prefix, local_metadata):
    # The frozen weights come from `source`; saving them again in every
    # checkpoint would cost 1.2 GB each for WavLM Large.
    for name in [k for k in state_dict if k.startswith(prefix + "wavlm.")]:
        del state_dict[name]


def _allow_missing_backbone(module, incompatible_keys):
    # Missing keys carry the caller's prefix, which this module cannot
    # see: match them by their backbone suffix.
    backbone = {"wavlm." + name for name in module.wavlm.state_dict()}

    def is_backbone(key):
        parts = key.split(".")
        return any(
            ".".join(parts[start:]) in backbone for start in range(len(parts))
        )

    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_backbone(key)]
