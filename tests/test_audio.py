"""Tests of dynprompt_sb.audio: reading, downmixing, resampling, padding."""

import warnings

import numpy as np
import pytest
import soundfile
import torch

from dynprompt_sb.audio import (
    MIN_SAMPLES,
    AudioError,
    pad_to_length,
    read_audio,
)
from dynprompt_sb.tiny_wavlm import CONV_KERNEL, CONV_STRIDE


def write_wav(path, samples, sample_rate=16000, subtype="PCM_16"):
    soundfile.write(str(path), samples, sample_rate, subtype=subtype)
    return path


def test_min_samples_is_the_cnn_receptive_field():
    receptive_field, hop = 1, 1
    for kernel, stride in zip(CONV_KERNEL, CONV_STRIDE, strict=True):
        receptive_field += (kernel - 1) * hop
        hop *= stride
    assert MIN_SAMPLES == receptive_field


def test_reads_pcm16_as_float32(tmp_path):
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, 1600)
    path = write_wav(tmp_path / "a.wav", samples)
    wav = read_audio(path)
    assert wav.dtype == torch.float32 and wav.shape == (1600,)
    expected, _ = soundfile.read(str(path), dtype="float32")
    assert torch.equal(wav, torch.from_numpy(expected))


def test_reads_only_the_span(tmp_path):
    samples = np.arange(1000) / 1000.0
    path = write_wav(tmp_path / "ramp.wav", samples, subtype="FLOAT")
    wav = read_audio(path, start=250, stop=260)
    assert torch.allclose(wav, torch.arange(250, 260) / 1000.0)
    assert read_audio(path, start=990).shape == (10,)


def test_downmixes_by_averaging_channels(tmp_path):
    left = np.full(500, 0.6)
    right = np.full(500, -0.2)
    path = write_wav(
        tmp_path / "stereo.wav", np.stack([left, right], 1), subtype="FLOAT"
    )
    wav = read_audio(path)
    assert wav.shape == (500,)
    assert torch.allclose(wav, torch.full((500,), 0.2))


def test_resamples_and_warns_once_per_file(tmp_path):
    time = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * time)
    path = write_wav(tmp_path / "narrow.wav", tone, sample_rate=8000)
    with pytest.warns(UserWarning) as record:
        wav = read_audio(path, sample_rate=16000)
    message = str(record[0].message)
    assert str(path) in message and "8000" in message and "16000" in message
    assert wav.shape == (16000,)
    # Still a 440 Hz tone: the spectrum peaks at 440 Hz at the new rate.
    spectrum = torch.fft.rfft(wav).abs()
    assert int(spectrum.argmax()) == 440
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_audio(path, sample_rate=16000)


def test_span_counts_samples_of_the_file_before_resampling(tmp_path):
    path = write_wav(tmp_path / "narrow.wav", np.zeros(8000), 8000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wav = read_audio(path, sample_rate=16000, start=0, stop=4000)
    assert wav.shape == (8000,)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(path)


def test_corrupt_file_is_named_with_the_reader_message(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="corrupt.wav") as error:
        read_audio(path)
    assert isinstance(error.value, ValueError)
    # The reader's own explanation follows the path.
    assert len(str(error.value)) > len(f"Cannot read audio file {path}: ")


def test_empty_file_is_an_audio_error(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(AudioError, match="empty.wav.*no samples"):
        read_audio(path)


def test_span_outside_the_file_is_rejected(tmp_path):
    path = write_wav(tmp_path / "short.wav", np.zeros(100))
    with pytest.raises(AudioError, match="short.wav.*100 samples"):
        read_audio(path, start=0, stop=101)
    with pytest.raises(AudioError, match=r"\[100, 100\)"):
        read_audio(path, start=100)
    with pytest.raises(ValueError, match="start must be >= 0"):
        read_audio(path, start=-1)
    with pytest.raises(TypeError, match="start must be an integer"):
        read_audio(path, start=1.5)


def test_non_finite_samples_are_rejected(tmp_path):
    samples = np.zeros(100)
    samples[10] = np.nan
    path = write_wav(tmp_path / "nan.wav", samples, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav"):
        read_audio(path)


def test_pad_wraps_the_signal_around():
    wav = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pad_to_length(wav, 10).tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


def test_pad_keeps_long_signals_unchanged():
    wav = torch.arange(500.0)
    assert pad_to_length(wav, MIN_SAMPLES) is wav
    assert pad_to_length(wav, 500) is wav


def test_pad_works_along_the_last_dimension_of_batches():
    batch = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert pad_to_length(batch, 5).tolist() == [
        [1, 2, 1, 2, 1],
        [3, 4, 3, 4, 3],
    ]


def test_pad_of_silence_or_nothing_has_no_nan():
    for wav in (torch.zeros(7), torch.zeros(0), torch.zeros(2, 0)):
        padded = pad_to_length(wav, MIN_SAMPLES)
        assert padded.shape[-1] == MIN_SAMPLES
        assert torch.isfinite(padded).all() and not padded.any()


def test_pad_rejects_negative_length():
    with pytest.raises(ValueError, match="-3"):
        pad_to_length(torch.ones(4), -3)
