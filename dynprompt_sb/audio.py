"""Reading waveforms for WavLM, and padding the short ones.

WavLM expects 16 kHz mono float audio and at least one full window of its
CNN. Corpora break each of these now and then (a stereo file, an 8 kHz
file, an empty or truncated download), and an error deep inside the model
then says nothing about which file caused it. ``read_audio`` brings every
file to the model's format or names the file it could not read.

Authors
 * dynprompt-sb contributors 2026
"""

import math
import operator
import os
import warnings

import soundfile
import torch

# WavLM's CNN reads 400 samples (25 ms at 16 kHz) for its first frame;
# anything shorter yields no frame at all.
MIN_SAMPLES = 400

# Paths already warned about, so a resampled file read every epoch warns
# once instead of flooding the log.
_RESAMPLE_WARNED = set()


class AudioError(ValueError):
    """An audio file that exists but cannot be used (corrupt, empty...)."""


def read_audio(path, sample_rate=16000, start=0, stop=None):
    """Reads a span of an audio file as a mono float32 waveform.

    Multi-channel files are averaged to mono and other sample rates are
    resampled to ``sample_rate`` (with a warning naming the file, once per
    file), so the model always sees the format it was trained on.

    Arguments
    ---------
    path : str or os.PathLike
        The audio file (any format soundfile reads: wav, flac, ogg...).
    sample_rate : int
        The sample rate of the returned waveform, in Hz.
    start : int
        First sample of the span, counted at the file's own sample rate.
    stop : int or None
        Sample after the last one of the span, at the file's own rate;
        None reads to the end of the file.

    Returns
    -------
    wav : torch.Tensor
        Float32 tensor of shape [samples].

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    AudioError
        When the file cannot be decoded, is empty, holds non-finite
        samples, or the span does not fit in it.

    Example
    -------
    >>> import os, tempfile
    >>> import numpy as np, soundfile
    >>> tmp = tempfile.mkdtemp()
    >>> path = os.path.join(tmp, "stereo.wav")
    >>> stereo = np.stack([np.full(1000, 0.5), np.zeros(1000)], axis=1)
    >>> soundfile.write(path, stereo, 16000, subtype="FLOAT")
    >>> wav = read_audio(path, start=100, stop=600)
    >>> wav.shape, wav.dtype, float(wav[0])
    (torch.Size([500]), torch.float32, 0.25)
    """
    path = os.fspath(path)
    start = _sample_index(start, "start", path)
    if stop is not None:
        stop = _sample_index(stop, "stop", path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Audio file not found: {path}")
    try:
        with soundfile.SoundFile(path) as audio_file:
            file_rate = audio_file.samplerate
            num_frames = audio_file.frames
            if num_frames == 0:
                raise AudioError(f"Audio file {path} holds no samples")
            end = num_frames if stop is None else stop
            if end > num_frames or start >= end:
                raise AudioError(
                    f"Cannot read samples [{start}, {end}) of {path}: the "
                    f"file has {num_frames} samples"
                )
            audio_file.seek(start)
            samples = audio_file.read(
                end - start, dtype="float32", always_2d=True
            )
    except (RuntimeError, soundfile.SoundFileError) as error:
        raise AudioError(f"Cannot read audio file {path}: {error}") from error
    if samples.shape[0] != end - start:
        # A header promising more frames than the data holds: truncated.
        raise AudioError(
            f"Audio file {path} is truncated: read {samples.shape[0]} of "
            f"{end - start} samples"
        )
    wav = torch.from_numpy(samples).mean(dim=1)
    if not torch.isfinite(wav).all():
        raise AudioError(f"Audio file {path} holds NaN or infinite samples")
    if file_rate != sample_rate:
        wav = _resample(wav, file_rate, sample_rate, path)
    return wav


def pad_to_length(wav, length):
    """Repeats a waveform end to start until it is ``length`` samples long.

    Used for utterances shorter than the training crop, or than WavLM's
    receptive field (``MIN_SAMPLES``). Repetition keeps the speaker's voice
    in every frame, where zero padding would add frames of silence that
    the pooling layers would average in. A waveform already long enough is
    returned unchanged (cropping is the caller's choice); an empty one
    becomes silence, never NaN.

    Arguments
    ---------
    wav : torch.Tensor
        Waveform of shape [..., samples].
    length : int
        The minimum number of samples of the result.

    Returns
    -------
    padded : torch.Tensor
        Shape [..., max(samples, length)].

    Example
    -------
    >>> pad_to_length(torch.tensor([1.0, 2.0, 3.0]), 7)
    tensor([1., 2., 3., 1., 2., 3., 1.])
    >>> pad_to_length(torch.zeros(0), 3)
    tensor([0., 0., 0.])
    """
    length = operator.index(length)
    if length < 0:
        raise ValueError(f"pad_to_length: length must be >= 0, got {length}")
    num_samples = wav.shape[-1]
    if num_samples >= length:
        return wav
    if num_samples == 0:
        return wav.new_zeros(*wav.shape[:-1], length)
    repeats = math.ceil(length / num_samples)
    tiled = wav.repeat(*([1] * (wav.dim() - 1)), repeats)
    return tiled[..., :length]


def _sample_index(value, name, path):
    """Checks that a span bound is a non-negative integer."""
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(
            f"read_audio({path}): {name} must be an integer sample index, "
            f"got {value!r}"
        ) from None
    if index < 0:
        raise ValueError(
            f"read_audio({path}): {name} must be >= 0, got {index}"
        )
    return index


def _resample(wav, file_rate, sample_rate, path):
    """Resamples to the model's rate, warning once per file."""
    # Imported here: reading 16 kHz files, the usual case, never needs it.
    import torchaudio.functional

    if path not in _RESAMPLE_WARNED:
        _RESAMPLE_WARNED.add(path)
        warnings.warn(
            f"{path}: sample rate {file_rate} Hz, resampled to "
            f"{sample_rate} Hz",
            stacklevel=3,
        )
    return torchaudio.functional.resample(wav, file_rate, sample_rate)
