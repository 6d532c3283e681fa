"""A ready-to-use speaker verification model, SpeechBrain style.

``DynPromptSpeakerRecognition`` is SpeechBrain's ``SpeakerRecognition``
for a prompted WavLM: ``from_hparams`` loads a model folder written by
``dynprompt export`` (``dynprompt_sb.export``), ``encode_batch`` runs the
recipe's path (WavLM with prompts -> weighted layer sum -> per-utterance
mean and variance normalisation -> ECAPA-TDNN), and ``verify_batch`` /
``verify_files`` decide at the threshold stored with the model.

Loading only trusted model folders
----------------------------------
A model folder's ``hyperparams.yaml`` is HyperPyYAML: loading it imports
the Python modules it names and runs the code it calls (``!new:``,
``!name:``, ``!apply:``), with your permissions. Load model folders only
from people you trust, as you would only run their scripts. The weights
(the ``.ckpt`` files) are read with ``torch.load(..., weights_only=True)``,
which builds tensors and plain containers only and refuses pickled code, so
the weights alone cannot run anything; the yaml file can.

Authors
 * dynprompt-sb contributors 2026
"""

import os
import pathlib
import re

import soundfile
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.inference.speaker import SpeakerRecognition
from speechbrain.utils.data_utils import batch_pad_right
from speechbrain.utils.fetching import FetchConfig, LocalStrategy, fetch
from tqdm import tqdm

from dynprompt_sb.audio import MIN_SAMPLES, AudioError, pad_to_length
from dynprompt_sb.audio import read_audio as _read_audio
from dynprompt_sb.scoring import cosine_score_trials
from dynprompt_sb.trials import (
    check_trial_files,
    read_trials,
    trial_utterances,
)

__all__ = ["DynPromptSpeakerRecognition", "load_checkpoint"]

HPARAMS_FILE = "hyperparams.yaml"
# Decimals of the durations in the recipe's CSV files.
DURATION_DECIMALS = 6


class DynPromptSpeakerRecognition(SpeakerRecognition):
    """Speaker embeddings and verification with a prompted WavLM.

    Built by ``from_hparams`` from a model folder; the modules and the
    values below come from its ``hyperparams.yaml``.

    Arguments
    ---------
    modules : dict
        ``wavlm`` (``PromptedWavLM``), ``layer_sum``, ``mean_var_norm`` and
        ``embedding_model``.
    hparams : dict
        Needs ``sample_rate``, ``min_audio_len`` and ``test_batch_size``;
        ``threshold`` is the default decision threshold.
    **kwargs
        ``run_opts`` (e.g. ``{"device": "cuda:0"}``) and ``freeze_params``,
        as for any SpeechBrain ``Pretrained``.

    Example
    -------
    >>> model = DynPromptSpeakerRecognition.from_hparams(
    ...     source="path/to/exported_model", run_opts={"device": "cpu"}
    ... )  # doctest: +SKIP
    >>> score, same = model.verify_files("a.wav", "b.wav")  # doctest: +SKIP
    >>> embeddings = model.embed_files(["a.wav", "b.wav"])  # doctest: +SKIP
    """

    MODULES_NEEDED = ["wavlm", "layer_sum", "mean_var_norm", "embedding_model"]
    HPARAMS_NEEDED = ["sample_rate", "min_audio_len", "test_batch_size"]

    def __init__(self, modules=None, hparams=None, **kwargs):
        # Checked before the parent builds anything, so that a hand-written
        # yaml file gets one message naming everything it lacks.
        missing = [
            name for name in self.MODULES_NEEDED if name not in (modules or {})
        ]
        missing += [
            f"hparams '{name}'"
            for name in self.HPARAMS_NEEDED
            if name not in (hparams or {})
        ]
        if missing:
            raise ValueError(
                "The model's hyperparams.yaml lacks "
                + ", ".join(missing)
                + " (modules are looked up under `modules:`)."
            )
        super().__init__(modules=modules, hparams=hparams, **kwargs)
        self.sample_rate = int(hparams["sample_rate"])
        self.min_samples = max(
            MIN_SAMPLES, int(round(hparams["min_audio_len"] * self.sample_rate))
        )
        self.test_batch_size = int(hparams["test_batch_size"])
        self.threshold = hparams.get("threshold")

    @classmethod
    def from_hparams(
        cls,
        source,
        hparams_file=HPARAMS_FILE,
        savedir=None,
        overrides=None,
        local_strategy=LocalStrategy.SYMLINK,
        fetch_config=None,
        **kwargs,
    ):
        """Loads a model folder (a local folder or a hub repository).

        Does what ``speechbrain.inference.interfaces.pretrained_from_hparams``
        does, with three differences: ``model_folder`` in the yaml file is
        set to the folder, so that a backbone copied into it is found
        wherever the folder moves; every weight file is read with
        ``torch.load(..., weights_only=True)`` and loaded strictly
        (``load_checkpoint``); and a missing file is named in the error.

        Arguments
        ---------
        source : str or os.PathLike
            The model folder, or a Hugging Face hub id holding the same
            files (a backbone copied into such a repository is not
            fetched: use a hub id as its ``wavlm_source``).
        hparams_file : str
            The yaml file in ``source``.
        savedir : str, optional
            Where to collect the files (links to them for a local folder);
            by default a local folder is read in place.
        overrides : dict, optional
            Changes to the yaml file's values.
        local_strategy : speechbrain.utils.fetching.LocalStrategy
            How files are collected into ``savedir``.
        fetch_config : speechbrain.utils.fetching.FetchConfig, optional
            Hub download options; by default SpeechBrain's.
        **kwargs
            ``run_opts`` and ``freeze_params``, for the constructor.

        Returns
        -------
        model : DynPromptSpeakerRecognition

        Raises
        ------
        FileNotFoundError
            When the folder, its yaml file, a weight file or a backbone
            folder it references does not exist.
        ValueError
            When a weight file does not fit the model the yaml file builds.
        """
        # Imported here: export imports this module's load_checkpoint.
        from dynprompt_sb.export import resolved_hparams

        if fetch_config is None:
            fetch_config = FetchConfig()
        local_folder = _local_folder(source)
        if local_folder is not None:
            hparams_path = os.path.join(local_folder, hparams_file)
            if not os.path.isfile(hparams_path):
                raise FileNotFoundError(
                    f"Model folder {local_folder} has no {hparams_file}: "
                    "expected a folder written by `dynprompt export`."
                )
        hparams_path = fetch(
            filename=hparams_file,
            source=source,
            savedir=savedir,
            local_strategy=local_strategy,
            fetch_config=fetch_config,
        )
        with open(hparams_path, encoding="utf-8") as hparams_stream:
            text = hparams_stream.read()

        overrides = dict(overrides or {})
        # Only a file that declares model_folder gets it: HyperPyYAML
        # rejects overrides of keys a file does not have.
        if re.search(r"^model_folder\s*:", text, flags=re.MULTILINE):
            overrides.setdefault(
                "model_folder",
                local_folder or str(pathlib.Path(hparams_path).parent),
            )
        _check_backbone(resolved_hparams(text, overrides), hparams_path)
        with open(hparams_path, encoding="utf-8") as hparams_stream:
            hparams = load_hyperpyyaml(hparams_stream, overrides)
        if "pretrainer" not in hparams or "modules" not in hparams:
            raise ValueError(
                f"{hparams_path} defines no `pretrainer` or no `modules`: "
                "expected a model folder's hyperparams.yaml."
            )
        hparams["savedir"] = savedir

        pretrainer = hparams["pretrainer"]
        pretrainer.set_collect_in(savedir)
        if local_folder is not None:
            _check_weight_files(pretrainer, local_folder)
        pretrainer.collect_files(
            default_source=source,
            local_strategy=local_strategy,
            fetch_config=fetch_config,
        )
        # SpeechBrain's load_collected() calls torch.load without saying
        # weights_only, so safety rests on torch's default (which an
        # environment variable can turn off), and it loads modules
        # non-strictly, only logging weights that do not fit. Every
        # loadable goes through load_checkpoint instead.
        for name, loadable in pretrainer.loadables.items():
            if pretrainer.is_loadable(name):
                load_checkpoint(loadable, pretrainer.paths[name])
        return cls(modules=hparams["modules"], hparams=hparams, **kwargs)

    def encode_batch(self, wavs, wav_lens=None, normalize=False):
        """Speaker embeddings of a batch of waveforms.

        Runs the recipe's embedding path in eval mode without gradients:
        ``wavlm -> layer_sum -> mean_var_norm -> embedding_model``.
        Utterances shorter than ``min_audio_len`` seconds are repeated end
        to start up to it first, as the recipe's test stage does.

        Note that padding in a batch changes the embeddings a little (the
        back-end's convolutions see the padded frames), as in the recipe;
        ``embed_files`` batches like the recipe's test stage.

        Arguments
        ---------
        wavs : torch.Tensor
            Mono waveforms at ``sample_rate``, [batch, samples] or
            [samples], zero-padded to the longest.
        wav_lens : torch.Tensor, optional
            Relative lengths in (0, 1], [batch]; None: all full length.
        normalize : bool
            Apply ``mean_var_norm_emb`` from the hparams, as SpeechBrain's
            ``encode_batch`` does; these models have none (cosine scoring
            needs none), so True is an error unless the yaml defines one.

        Returns
        -------
        embeddings : torch.Tensor
            [batch, 1, emb_dim], float32, on the model's device.
        """
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        if wavs.dim() != 2:
            raise ValueError(
                f"encode_batch expects mono waveforms [batch, samples], got "
                f"shape {tuple(wavs.shape)}; load_audio downmixes files."
            )
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        wav_lens = torch.as_tensor(wav_lens, dtype=torch.float32)
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
        wavs, wav_lens = self._pad_short(wavs.float(), wav_lens.cpu())
        wavs, wav_lens = wavs.to(self.device), wav_lens.to(self.device)

        # Modules may have been put in training mode by the caller; dropout
        # in the back-end would make embeddings random.
        self.mods.eval()
        wavlm = _unwrap(self.mods.wavlm)
        with torch.no_grad(), self.inference_ctx:
            hidden_states = self.mods.wavlm(wavs, wav_lens)
            feats = self.mods.layer_sum(hidden_states)
            lens = wavlm.output_lens(wav_lens, feats.shape[1])
            feats = self.mods.mean_var_norm(feats, lens)
            embeddings = self.mods.embedding_model(feats, lens).float()
            if normalize:
                if not hasattr(self.hparams, "mean_var_norm_emb"):
                    raise ValueError(
                        "normalize=True needs `mean_var_norm_emb` in the "
                        "hparams; this model has none (cosine scoring "
                        "needs no embedding normalisation)."
                    )
                embeddings = self.hparams.mean_var_norm_emb(
                    embeddings,
                    torch.ones(embeddings.shape[0], device=self.device),
                )
        return embeddings

    def verify_batch(
        self, wavs1, wavs2, wav1_lens=None, wav2_lens=None, threshold=None
    ):
        """Cosine scores of pairs of waveforms, and the decisions.

        Arguments
        ---------
        wavs1 : torch.Tensor
            First waveform of each pair, [batch, samples].
        wavs2 : torch.Tensor
            Second waveform of each pair, [batch, samples].
        wav1_lens : torch.Tensor, optional
            Relative lengths of ``wavs1``.
        wav2_lens : torch.Tensor, optional
            Relative lengths of ``wavs2``.
        threshold : float, optional
            Decide "same speaker" above it; by default the model's
            ``threshold`` (SpeechBrain's default, 0.25, suits no model in
            particular).

        Returns
        -------
        score : torch.Tensor
            Cosine similarities, [batch, 1].
        decision : torch.Tensor
            True where the score is above the threshold, [batch, 1].
        """
        threshold = self._decision_threshold(threshold)
        emb1 = self.encode_batch(wavs1, wav1_lens)
        emb2 = self.encode_batch(wavs2, wav2_lens)
        score = self.similarity(emb1, emb2)
        return score, score > threshold

    def verify_files(self, path_x, path_y, threshold=None, **kwargs):
        """Verifies that two audio files hold the same speaker.

        Arguments
        ---------
        path_x : str or os.PathLike
            First audio file.
        path_y : str or os.PathLike
            Second audio file.
        threshold : float, optional
            As in ``verify_batch``; by default the model's.
        **kwargs
            Passed to ``load_audio``.

        Returns
        -------
        score : torch.Tensor
            The cosine similarity, shape [1].
        decision : torch.Tensor
            True when the score is above the threshold, shape [1].
        """
        batch_x = self.load_audio(path_x, **kwargs).unsqueeze(0)
        batch_y = self.load_audio(path_y, **kwargs).unsqueeze(0)
        score, decision = self.verify_batch(
            batch_x, batch_y, threshold=threshold
        )
        return score[0], decision[0]

    def load_audio(self, path, savedir=None):
        """Reads a local audio file in the model's input format.

        Multi-channel files are averaged to mono; other sample rates are
        resampled to the model's, with a warning naming the file
        (``dynprompt_sb.audio.read_audio``).

        Arguments
        ---------
        path : str or os.PathLike
            An audio file that soundfile reads (wav, flac, ogg...).
        savedir : None
            Unused: files are read where they are, never fetched.

        Returns
        -------
        wav : torch.Tensor
            [samples], float32, on the model's device.

        Raises
        ------
        FileNotFoundError
            When the file does not exist.
        dynprompt_sb.audio.AudioError
            When it cannot be decoded or holds no usable samples.
        """
        del savedir
        return _read_audio(path, sample_rate=self.sample_rate).to(self.device)

    def embed_files(self, paths, batch_size=None, progress=False):
        """Speaker embeddings of audio files, batched as the recipe does.

        The files are embedded longest first, ``batch_size`` at a time, as
        the recipe's test stage embeds its trial utterances: with the same
        files, the same batches, hence the same embeddings.

        Arguments
        ---------
        paths : list of str or os.PathLike
            Audio files.
        batch_size : int, optional
            Files per batch; by default the model's ``test_batch_size``.
        progress : bool
            Show a progress bar (tqdm, on stderr).

        Returns
        -------
        embeddings : torch.Tensor
            [len(paths), emb_dim], float32 on the CPU, in the order of
            ``paths``.

        Raises
        ------
        FileNotFoundError
            When a file does not exist (all are checked before any work).
        """
        paths = [os.fspath(path) for path in paths]
        if not paths:
            raise ValueError("embed_files needs at least one file.")
        batch_size = self.test_batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        durations = [_duration(path) for path in paths]
        # SpeechBrain's filtered_sorted(sort_key="duration", reverse=True),
        # which orders the test stage's batches, sorts (duration, index)
        # pairs in reverse: equal durations come last index first.
        order = sorted(
            range(len(paths)), key=lambda i: (durations[i], i), reverse=True
        )
        embeddings = [None] * len(paths)
        starts = range(0, len(order), batch_size)
        for start in tqdm(
            starts,
            desc="Embedding",
            unit="batch",
            disable=not progress,
            dynamic_ncols=True,
        ):
            chunk = order[start : start + batch_size]
            wavs = [
                pad_to_length(
                    _read_audio(paths[i], sample_rate=self.sample_rate),
                    self.min_samples,
                )
                for i in chunk
            ]
            batch, wav_lens = batch_pad_right(wavs)
            batch_embeddings = self.encode_batch(batch, wav_lens)
            batch_embeddings = batch_embeddings.squeeze(1).cpu()
            finite = torch.isfinite(batch_embeddings).all(dim=1)
            if not bool(finite.all()):
                bad = [
                    paths[i]
                    for i, ok in zip(chunk, finite, strict=True)
                    if not ok
                ]
                raise FloatingPointError(
                    f"Non-finite speaker embedding for {', '.join(bad)}"
                )
            for i, embedding in zip(chunk, batch_embeddings, strict=True):
                embeddings[i] = embedding
        return torch.stack(embeddings)

    def score_trials(
        self, trial_file, data_root, batch_size=None, progress=False
    ):
        """Cosine scores of a trial list, as the recipe's test stage has them.

        Every utterance of the list is embedded once (``embed_files``) and
        the trials are scored by ``dynprompt_sb.scoring.cosine_score_trials``,
        the recipe's own scoring.

        Arguments
        ---------
        trial_file : str or os.PathLike
            Lines ``label enrol_path test_path`` (VoxCeleb format).
        data_root : str or os.PathLike
            Folder holding ``wav/<path>`` for the list's paths.
        batch_size : int, optional
            As in ``embed_files``.
        progress : bool
            Show a progress bar.

        Returns
        -------
        trials : list of (int, str, str)
            (label, enrol_id, test_id), in file order.
        scores : numpy.ndarray
            One cosine score per trial.
        """
        trials = read_trials(trial_file)
        if not trials:
            raise ValueError(f"Trial list {os.fspath(trial_file)} is empty.")
        wav_paths = check_trial_files(trials, data_root, trial_file)
        utterance_ids = trial_utterances(trials)
        vectors = self.embed_files(
            [wav_paths[utt] for utt in utterance_ids], batch_size, progress
        )
        embeddings = dict(zip(utterance_ids, vectors, strict=True))
        return trials, cosine_score_trials(trials, embeddings)

    def classify_batch(self, wavs, wav_lens=None):
        """Not available: the model has no speaker classifier.

        Arguments
        ---------
        wavs : torch.Tensor
            Unused.
        wav_lens : torch.Tensor, optional
            Unused.
        """
        raise NotImplementedError(
            "This is a verification model: the training classifier is not "
            "exported. Use encode_batch, verify_batch or verify_files."
        )

    def classify_file(self, path, **kwargs):
        """Not available: the model has no speaker classifier.

        Arguments
        ---------
        path : str
            Unused.
        **kwargs
            Unused.
        """
        return self.classify_batch(None)

    def _decision_threshold(self, threshold):
        """The threshold given, or the model's."""
        if threshold is None:
            threshold = self.threshold
        if threshold is None:
            raise ValueError(
                "No decision threshold: the model's hyperparams.yaml has no "
                "`threshold`; pass threshold=..."
            )
        return float(threshold)

    def _pad_short(self, wavs, wav_lens):
        """Repeats utterances shorter than min_samples, then re-batches."""
        num_samples = torch.round(wav_lens * wavs.shape[1]).long()
        if bool((num_samples >= self.min_samples).all()):
            return wavs, wav_lens
        utterances = [
            pad_to_length(wav[:length], self.min_samples)
            for wav, length in zip(wavs, num_samples.tolist(), strict=True)
        ]
        return batch_pad_right(utterances)


def load_checkpoint(loadable, path):
    """Loads one weight file into a module, safely and strictly.

    The file is read with ``torch.load(..., weights_only=True)``: tensors
    and plain containers only, no pickled code. A ``torch.nn.Module`` gets
    ``load_state_dict(strict=True)``, so a file written for another model
    size fails here instead of leaving weights at random;
    ``InputNormalization`` gets its statistics.

    Arguments
    ---------
    loadable : torch.nn.Module
        The object to fill.
    path : str or os.PathLike
        A ``<key>.ckpt`` file written by SpeechBrain's Checkpointer.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When it cannot be read safely or does not fit ``loadable``.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.ckpt")
    >>> torch.save(torch.nn.Linear(2, 3).state_dict(), path)
    >>> layer = torch.nn.Linear(2, 3)
    >>> load_checkpoint(layer, path)
    >>> load_checkpoint(torch.nn.Linear(2, 4), path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../layer.ckpt does not fit the model built from the yaml...
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Cannot load {path} with weights_only=True (a corrupt file, or "
            f"one holding more than tensors): {error}"
        ) from error
    # InputNormalization keeps its statistics outside its state_dict and
    # saves them with a hook of its own.
    if hasattr(loadable, "_load_statistics_dict"):
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no normalisation statistics.")
        loadable._load_statistics_dict(state)
        return
    if not isinstance(loadable, torch.nn.Module):
        raise ValueError(
            f"Cannot load {path} into a {type(loadable).__name__}: only "
            "torch modules are loadable."
        )
    try:
        loadable.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        message = " ".join(str(error).split())
        raise ValueError(
            f"{path} does not fit the model built from the yaml file: {message}"
        ) from error


def _local_folder(source):
    """The absolute path of a local model folder, or None for a hub id."""
    if not isinstance(source, (str, os.PathLike)):
        return None  # e.g. a speechbrain FetchSource
    path = os.fspath(source)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise NotADirectoryError(
            f"Model source {path} is a file: give the folder that holds "
            f"{HPARAMS_FILE}."
        )
    # A hub id is "owner/name"; anything else that does not exist is a
    # local folder that is missing.
    hub_like = (
        path.count("/") == 1
        and not os.path.isabs(path)
        and not path.startswith(".")
    )
    if not hub_like:
        raise FileNotFoundError(f"Model folder not found: {path}")
    return None


def _check_backbone(tree, hparams_path):
    """Fails clearly when the yaml names a backbone folder that is missing."""
    wavlm = (tree.get("modules") or {}).get("wavlm")
    kwargs = getattr(wavlm, "value", None)
    if not isinstance(kwargs, dict):
        return
    source = kwargs.get("source")
    if isinstance(source, str) and os.path.isabs(source):
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"WavLM backbone folder not found: {source} (the wavlm "
                f"source in {hparams_path})."
            )


def _check_weight_files(pretrainer, folder):
    """Names every weight file missing from a local model folder."""
    missing = [
        os.path.join(folder, f"{name}.ckpt")
        for name in pretrainer.loadables
        if pretrainer.is_loadable(name)
        and name not in pretrainer.paths
        and not os.path.isfile(os.path.join(folder, f"{name}.ckpt"))
    ]
    # Paths the yaml gives itself (e.g. a run's CKPT folder); a relative
    # one may be a hub path, which fetch resolves.
    missing += [
        os.fspath(path)
        for name, path in pretrainer.paths.items()
        if pretrainer.is_loadable(name)
        and os.path.isabs(os.fspath(path))
        and not os.path.isfile(path)
    ]
    if missing:
        raise FileNotFoundError(
            f"Model folder {folder} is incomplete: missing "
            + ", ".join(missing)
        )


def _duration(path):
    """Seconds of audio in a file, from its header.

    Rounded to microseconds as voxceleb_prepare writes them to the CSVs
    whose durations order the recipe's batches.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Audio file not found: {path}")
    try:
        info = soundfile.info(path)
    except (RuntimeError, soundfile.SoundFileError) as error:
        raise AudioError(f"Cannot read audio file {path}: {error}") from error
    return round(info.frames / info.samplerate, DURATION_DECIMALS)


def _unwrap(module):
    """The module itself, out of DDP/DataParallel or torch.compile."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)
