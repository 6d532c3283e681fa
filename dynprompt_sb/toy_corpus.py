"""A synthetic multi-speaker corpus in the VoxCeleb layout.

No real speech ships with the project, yet the demo and the tests need
speakers to tell apart. Each synthetic speaker gets persistent voice
traits drawn from a seeded random generator, in the spirit of a
source-filter (Klatt-style) synthesiser:

* pitch: a mean f0 and how widely the intonation moves around it;
* vocal tract: a length scale on all formant frequencies, small
  per-vowel offsets (an accent of sorts), the speaker's own F4 and F5,
  and a scale on the formant bandwidths;
* voice quality: glottal open quotient, spectral tilt and breathiness
  (the share of aspiration noise in the source);
* speaking rate.

Each utterance says something different: a random sequence of vowel-like,
fricative-like and silent segments. Vowels are a glottal-pulse train that
follows the speaker's pitch contour, filtered through five formant
resonators (the vowel's F1-F3, the speaker's F4-F5); segments are
cross-faded. Each
recording session adds its own channel (band limits, a colouring
resonance, background noise, level), so sessions of one speaker differ
the way VoxCeleb's YouTube videos do.

The corpus is written as ``<folder>/wav/<spk>/<session>/<utt>.wav``
(16-bit mono), plus ``<folder>/meta/trials.txt``, a trial list in the
``veri_test2.txt`` format over held-out test speakers.

Authors
 * dynprompt-sb contributors 2026
"""

import functools
import json
import os
import shutil
import string

import numpy as np
import scipy.fft
import soundfile
from scipy import signal

# Bumped whenever the synthesis changes, so corpora cached on disk by an
# older version are regenerated instead of silently reused.
GENERATOR_VERSION = 1

MARKER_FILE = "toy_corpus.json"  # in meta/, written last: corpus complete
PARTIAL_FILE = "toy_corpus.partial"  # in meta/, written first
TRIALS_FILE = "trials.txt"

# Speaker ids look like VoxCeleb1's (id10001...).
FIRST_SPEAKER_NUMBER = 10001
SESSION_NAME_LENGTH = 11  # as YouTube video ids
SESSION_ALPHABET = string.ascii_letters + string.digits

# F1-F3 (Hz) of ten English vowels, adult male averages (Peterson and
# Barney, 1952). They carry the words; the speaker scales them.
VOWEL_FORMANTS = np.array(
    [
        [270, 2290, 3010],  # i
        [390, 1990, 2550],  # I
        [530, 1840, 2480],  # E
        [660, 1720, 2410],  # ae
        [730, 1090, 2440],  # a
        [570, 840, 2410],  # o (open)
        [440, 1020, 2240],  # U
        [300, 870, 2240],  # u
        [640, 1190, 2390],  # ^
        [490, 1350, 1690],  # er
    ],
    dtype=float,
)
# F4 and F5 barely move with the vowel but differ between speakers, as
# they depend on the shape of the larynx tube and the head: each speaker
# draws them once, within these ranges (Hz, before the tract scale).
UPPER_FORMANT_RANGES = ((3200.0, 3900.0), (4300.0, 5000.0))
NUM_FORMANTS = VOWEL_FORMANTS.shape[1] + len(UPPER_FORMANT_RANGES)
# Formant bandwidths (Hz) of an average voice; each speaker scales them.
FORMANT_BANDWIDTHS = np.array([60.0, 90.0, 120.0, 180.0, 250.0])

# (low, high) noise bands (Hz) of fricative-like segments: s, sh, f.
FRICATIVE_BANDS = ((4500.0, 7500.0), (2200.0, 4200.0), (1200.0, 7000.0))

SEGMENT_KINDS = ("vowel", "fricative", "pause")
SEGMENT_PROBABILITIES = (0.75, 0.15, 0.10)
# Duration ranges (s) per segment kind, at a speaking rate of 1.
SEGMENT_DURATIONS = {
    "vowel": (0.06, 0.22),
    "fricative": (0.05, 0.12),
    "pause": (0.05, 0.20),
}
CROSSFADE_SECONDS = 0.01  # half the length of a segment-to-segment fade
# Zero padding after each segment in the batched FFT filtering: the
# narrowest resonator (42 Hz) decays by over 60 dB within it.
TAIL_SECONDS = 0.06

# Seed-sequence tags, one per kind of random draw, so that adding a
# speaker or an utterance never changes what the others sound like.
_VOICE, _SESSION, _UTTERANCE, _TRIALS = range(4)


def make_toy_corpus(
    folder,
    num_train_speakers=24,
    num_test_speakers=8,
    sessions_per_speaker=2,
    utts_per_session=4,
    min_duration=1.5,
    max_duration=3.5,
    sample_rate=16000,
    seed=0,
):
    """Writes a synthetic corpus in the VoxCeleb layout, with trials.

    A folder already completed with the same arguments is reused as is;
    one left half-written (or written with other arguments) is
    regenerated.

    Arguments
    ---------
    folder : str or os.PathLike
        Where to write ``wav/`` and ``meta/``.
    num_train_speakers : int
        Speakers for training (they never appear in the trials).
    num_test_speakers : int
        Held-out speakers of the trial list (at least 2).
    sessions_per_speaker : int
        Recording sessions per speaker, each with its own channel.
    utts_per_session : int
        Utterances per session.
    min_duration : float
        Shortest utterance, in seconds.
    max_duration : float
        Longest utterance, in seconds.
    sample_rate : int
        Sample rate of the wav files, in Hz.
    seed : int
        Seed of every random draw: same seed, same corpus.

    Returns
    -------
    corpus : dict
        "data_folder" (``folder``), "trials" (path of the trial list,
        ``<folder>/meta/trials.txt``), "train_speakers" and
        "test_speakers" (lists of speaker ids).

    Example
    -------
    >>> import tempfile
    >>> corpus = make_toy_corpus(
    ...     tempfile.mkdtemp(),
    ...     num_train_speakers=1,
    ...     num_test_speakers=2,
    ...     sessions_per_speaker=1,
    ...     utts_per_session=2,
    ...     min_duration=0.5,
    ...     max_duration=0.5,
    ... )
    >>> corpus["train_speakers"], corpus["test_speakers"]
    (['id10001'], ['id10002', 'id10003'])
    >>> open(corpus["trials"]).readline().split()[0]
    '1'
    """
    arguments = dict(
        num_train_speakers=num_train_speakers,
        num_test_speakers=num_test_speakers,
        sessions_per_speaker=sessions_per_speaker,
        utts_per_session=utts_per_session,
        min_duration=min_duration,
        max_duration=max_duration,
        sample_rate=sample_rate,
        seed=seed,
        generator_version=GENERATOR_VERSION,
    )
    _check_arguments(arguments)
    folder = os.fspath(folder)
    wav_dir = os.path.join(folder, "wav")
    meta_dir = os.path.join(folder, "meta")
    marker_path = os.path.join(meta_dir, MARKER_FILE)
    partial_path = os.path.join(meta_dir, PARTIAL_FILE)
    trials_path = os.path.join(meta_dir, TRIALS_FILE)

    marker = _read_marker(marker_path)
    if (
        marker is not None
        and marker["arguments"] == arguments
        and not os.path.exists(partial_path)
    ):
        return _corpus_dict(folder, trials_path, marker)
    _clear_own_corpus(folder, wav_dir, meta_dir, marker, partial_path)

    os.makedirs(meta_dir, exist_ok=True)
    # Written before any wav: it marks the folder as ours, so a crash
    # leaves a folder that the next call knows it may wipe.
    with open(partial_path, "w", encoding="utf-8") as partial_file:
        json.dump(arguments, partial_file)

    total_speakers = num_train_speakers + num_test_speakers
    speaker_ids = [
        f"id{FIRST_SPEAKER_NUMBER + index}" for index in range(total_speakers)
    ]
    test_utterances = {}
    for speaker_index, speaker_id in enumerate(speaker_ids):
        utterance_ids = _write_speaker(
            wav_dir, speaker_index, speaker_id, arguments
        )
        if speaker_index >= num_train_speakers:
            test_utterances[speaker_id] = utterance_ids

    trials = _draw_trials(test_utterances, seed)
    with open(trials_path, "w", encoding="utf-8") as trials_file:
        for label, enrol_id, test_id in trials:
            trials_file.write(f"{label} {enrol_id}.wav {test_id}.wav\n")

    marker = dict(
        arguments=arguments,
        train_speakers=speaker_ids[:num_train_speakers],
        test_speakers=speaker_ids[num_train_speakers:],
    )
    temporary_path = marker_path + ".tmp"
    with open(temporary_path, "w", encoding="utf-8") as marker_file:
        json.dump(marker, marker_file, indent=2)
    os.replace(temporary_path, marker_path)
    os.remove(partial_path)
    return _corpus_dict(folder, trials_path, marker)


def _check_arguments(arguments):
    """Rejects arguments that cannot make a usable corpus."""
    at_least = dict(
        num_train_speakers=1,
        num_test_speakers=2,  # non-target trials need two speakers
        sessions_per_speaker=1,
        utts_per_session=1,
        sample_rate=8000,  # room for the formants below Nyquist
        seed=0,  # numpy seed sequences take non-negative integers
    )
    for name, minimum in at_least.items():
        value = arguments[name]
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(
                f"make_toy_corpus: {name} must be an integer >= {minimum}, "
                f"got {value!r}"
            )
    if arguments["sessions_per_speaker"] * arguments["utts_per_session"] < 2:
        raise ValueError(
            "make_toy_corpus: target trials need at least 2 utterances per "
            "speaker (sessions_per_speaker * utts_per_session >= 2)"
        )
    shortest = arguments["min_duration"]
    longest = arguments["max_duration"]
    if not 0 < shortest <= longest:
        raise ValueError(
            "make_toy_corpus: need 0 < min_duration <= max_duration, got "
            f"min_duration={shortest!r}, max_duration={longest!r}"
        )


def _read_marker(marker_path):
    """The completion marker's content, or None if absent or unreadable."""
    try:
        with open(marker_path, encoding="utf-8") as marker_file:
            marker = json.load(marker_file)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or "arguments" not in marker:
        return None
    return marker


def _clear_own_corpus(folder, wav_dir, meta_dir, marker, partial_path):
    """Removes a previous toy corpus; refuses to touch anyone else's wavs."""
    ours = marker is not None or os.path.exists(partial_path)
    if ours:
        shutil.rmtree(wav_dir, ignore_errors=True)
        for name in (MARKER_FILE, TRIALS_FILE):
            path = os.path.join(meta_dir, name)
            if os.path.exists(path):
                os.remove(path)
    elif os.path.isdir(wav_dir) and os.listdir(wav_dir):
        raise FileExistsError(
            f"{wav_dir} already holds files that make_toy_corpus did not "
            f"write (no {MARKER_FILE} or {PARTIAL_FILE} in {meta_dir}); "
            "give an empty or new folder"
        )


def _corpus_dict(folder, trials_path, marker):
    """The return value of make_toy_corpus."""
    return {
        "data_folder": folder,
        "trials": trials_path,
        "train_speakers": list(marker["train_speakers"]),
        "test_speakers": list(marker["test_speakers"]),
    }


def _write_speaker(wav_dir, speaker_index, speaker_id, arguments):
    """Synthesises and writes all utterances of one speaker.

    Returns the utterance ids (``<spk>/<session>/<utt>``) it wrote.
    """
    seed = arguments["seed"]
    sample_rate = arguments["sample_rate"]
    voice = _draw_voice(np.random.default_rng([seed, _VOICE, speaker_index]))
    utterance_ids = []
    session_names = set()
    for session_index in range(arguments["sessions_per_speaker"]):
        session_rng = np.random.default_rng(
            [seed, _SESSION, speaker_index, session_index]
        )
        session_name = _session_name(session_rng)
        while session_name in session_names:
            session_name = _session_name(session_rng)
        session_names.add(session_name)
        channel = _draw_channel(session_rng, sample_rate)
        session_dir = os.path.join(wav_dir, speaker_id, session_name)
        os.makedirs(session_dir, exist_ok=True)
        for utt_index in range(arguments["utts_per_session"]):
            rng = np.random.default_rng(
                [seed, _UTTERANCE, speaker_index, session_index, utt_index]
            )
            duration = rng.uniform(
                arguments["min_duration"], arguments["max_duration"]
            )
            num_samples = max(1, int(round(duration * sample_rate)))
            wav = _synthesize(voice, channel, num_samples, sample_rate, rng)
            utt_name = f"{utt_index + 1:05d}"
            soundfile.write(
                os.path.join(session_dir, utt_name + ".wav"),
                wav,
                sample_rate,
                subtype="PCM_16",
            )
            utterance_ids.append(f"{speaker_id}/{session_name}/{utt_name}")
    return utterance_ids


def _session_name(rng):
    """A random YouTube-like id, as VoxCeleb's session folders."""
    letters = rng.choice(list(SESSION_ALPHABET), size=SESSION_NAME_LENGTH)
    return "".join(letters)


def _draw_voice(rng):
    """Draws the persistent traits of one speaker's voice.

    Arguments
    ---------
    rng : numpy.random.Generator
        The speaker's own generator.

    Returns
    -------
    voice : dict
        f0_mean (Hz), f0_spread (std of log f0), formants (one row of
        NUM_FORMANTS frequencies per vowel, Hz), bandwidths (Hz, one per
        formant), open_quotient, tilt (one-pole low-pass coefficient on
        the glottal flow), breathiness (aspiration to voicing ratio) and
        rate (speaking rate, 1 is average).
    """
    # Log-uniform pitch over low male to high female voices.
    f0_mean = float(np.exp(rng.uniform(np.log(85.0), np.log(255.0))))
    # A vocal-tract length scale: short tracts raise every formant.
    formant_scale = rng.uniform(0.85, 1.2)
    accent = np.exp(rng.normal(0.0, 0.07, size=VOWEL_FORMANTS.shape))
    upper = [rng.uniform(low, high) for low, high in UPPER_FORMANT_RANGES]
    formants = np.concatenate(
        [VOWEL_FORMANTS * accent, np.tile(upper, (len(VOWEL_FORMANTS), 1))],
        axis=1,
    )
    return dict(
        f0_mean=f0_mean,
        f0_spread=rng.uniform(0.04, 0.18),
        formants=formants * formant_scale,
        bandwidths=FORMANT_BANDWIDTHS * rng.uniform(0.7, 1.5),
        open_quotient=rng.uniform(0.4, 0.75),
        tilt=rng.uniform(0.0, 0.8),
        breathiness=float(np.exp(rng.uniform(np.log(0.03), np.log(0.4)))),
        rate=rng.uniform(0.8, 1.25),
    )


def _draw_channel(rng, sample_rate):
    """Draws a recording session's channel: filters, noise and level.

    Returns a dict with "sos" (second-order sections: band limits and a
    colouring resonance), "snr_db" and "peak".
    """
    nyquist = sample_rate / 2
    low_cut = rng.uniform(50.0, 200.0)
    high_cut = min(rng.uniform(3800.0, 7600.0), 0.9 * nyquist)
    colour_centre = rng.uniform(400.0, min(3000.0, 0.6 * nyquist))
    colour = signal.butter(
        1,
        [colour_centre / 1.4, colour_centre * 1.4],
        "bandpass",
        fs=sample_rate,
        output="sos",
    )[0]
    # Colouring adds a band-passed copy: 1 + g * b(z) / a(z) is the single
    # section (a(z) + g * b(z)) / a(z).
    colour_gain = rng.uniform(-0.5, 0.8)
    colour = np.concatenate([colour[3:] + colour_gain * colour[:3], colour[3:]])
    sos = np.concatenate(
        [
            signal.butter(2, low_cut, "highpass", fs=sample_rate, output="sos"),
            signal.butter(2, high_cut, "lowpass", fs=sample_rate, output="sos"),
            colour[None, :],
        ]
    )
    return dict(
        sos=sos,
        snr_db=rng.uniform(15.0, 35.0),
        peak=rng.uniform(0.3, 0.8),
    )


def _synthesize(voice, channel, num_samples, sample_rate, rng):
    """Synthesises one utterance of a voice through a session's channel.

    Arguments
    ---------
    voice : dict
        From ``_draw_voice``.
    channel : dict
        From ``_draw_channel``.
    num_samples : int
        Length of the utterance.
    sample_rate : int
        In Hz.
    rng : numpy.random.Generator
        The utterance's own generator: draws its content.

    Returns
    -------
    wav : numpy.ndarray
        float64 samples in [-1, 1], shape [num_samples].
    """
    fade = max(1, int(CROSSFADE_SECONDS * sample_rate))
    # Everything is computed on a buffer padded by one fade on each side,
    # so the first and last segments cross-fade like the inner ones.
    padded_length = num_samples + 2 * fade
    kinds, starts, stops, choices = _plan_segments(
        voice, padded_length, sample_rate, fade, rng
    )
    source = _glottal_source(voice, padded_length, sample_rate, rng)
    speech = np.zeros(padded_length)
    sounding = np.flatnonzero(kinds != SEGMENT_KINDS.index("pause"))
    if len(sounding) > 0:
        filtered = _filter_segments(
            voice,
            source,
            kinds[sounding],
            starts[sounding],
            stops[sounding],
            choices[sounding],
            sample_rate,
            rng,
        )
        # Raised-cosine fades of 2 * fade samples: where neighbouring
        # segments overlap, one falls as the other rises, summing to one.
        ramp_length = 2 * fade
        ramp = 0.5 - 0.5 * np.cos(
            np.pi * (np.arange(ramp_length) + 0.5) / ramp_length
        )
        for row, segment in enumerate(sounding):
            start, stop = starts[segment], stops[segment]
            sound = filtered[row, : stop - start]
            edge = min(ramp_length, stop - start)
            sound[:edge] *= ramp[:edge]
            sound[len(sound) - edge :] *= ramp[::-1][ramp_length - edge :]
            speech[start:stop] += sound
    return _record(speech[fade : fade + num_samples], channel, rng)


def _plan_segments(voice, length, sample_rate, fade, rng):
    """Draws the segment sequence covering ``length`` samples.

    Consecutive segments overlap by ``2 * fade`` samples (their
    cross-fade).

    Returns
    -------
    kinds : numpy.ndarray
        Index into SEGMENT_KINDS per segment.
    starts, stops : numpy.ndarray
        Sample span of each segment.
    choices : numpy.ndarray
        The vowel (index into VOWEL_FORMANTS) or the fricative band (into
        FRICATIVE_BANDS) of each segment.
    """
    # Every segment advances by at least 2 * fade: that many draws
    # always cover the length.
    max_segments = length // (2 * fade) + 2
    kinds = rng.choice(
        len(SEGMENT_KINDS), size=max_segments, p=SEGMENT_PROBABILITIES
    )
    shortest, longest = np.array(
        [SEGMENT_DURATIONS[kind] for kind in SEGMENT_KINDS]
    ).T
    seconds = rng.uniform(shortest[kinds], longest[kinds]) / voice["rate"]
    # Long enough for a fade in and a fade out.
    lengths = np.maximum(4 * fade, (seconds * sample_rate).astype(int))
    starts = np.concatenate([[0], np.cumsum(lengths - 2 * fade)[:-1]])
    count = int(np.sum(starts < length - 2 * fade))
    kinds, starts, lengths = kinds[:count], starts[:count], lengths[:count]
    stops = np.minimum(starts + lengths, length)
    is_vowel = kinds == SEGMENT_KINDS.index("vowel")
    choices = np.where(
        is_vowel,
        rng.integers(len(VOWEL_FORMANTS), size=count),
        rng.integers(len(FRICATIVE_BANDS), size=count),
    )
    return kinds, starts, stops, choices


def _glottal_source(voice, length, sample_rate, rng):
    """Voicing plus aspiration noise, following the speaker's pitch."""
    f0 = _pitch_contour(voice, length, sample_rate, rng)
    cycle_position = np.cumsum(f0 / sample_rate) % 1.0
    glottal_flow = _rosenberg_pulse(cycle_position, voice["open_quotient"])
    tilt = voice["tilt"]
    glottal_flow = signal.lfilter([1.0 - tilt], [1.0, -tilt], glottal_flow)
    # Lip radiation differentiates the flow.
    voicing = np.diff(glottal_flow, prepend=glottal_flow[0])
    voicing /= np.sqrt(np.mean(voicing**2)) + 1e-12
    # Aspiration is louder while the glottis is open.
    open_phase = cycle_position < voice["open_quotient"]
    aspiration = rng.standard_normal(length) * (0.3 + 0.7 * open_phase)
    return voicing + voice["breathiness"] * aspiration


def _filter_segments(
    voice, source, kinds, starts, stops, choices, sample_rate, rng
):
    """Filters every sounding segment in one batched FFT.

    Vowels filter the glottal source through their formant resonators,
    fricatives filter white noise through their band. One FFT for all
    segments is much faster than one IIR filter call per segment; the
    zero padding of TAIL_SECONDS keeps the filters' ringing from wrapping
    around onto the segment's start.

    Returns
    -------
    filtered : numpy.ndarray
        One row per segment: its filtered samples, times a random level,
        from column 0 on.
    """
    lengths = stops - starts
    fft_length = scipy.fft.next_fast_len(
        int(lengths.max()) + int(TAIL_SECONDS * sample_rate), real=True
    )
    is_vowel = kinds == SEGMENT_KINDS.index("vowel")
    excitation = np.zeros((len(kinds), fft_length))
    for row in range(len(kinds)):
        if is_vowel[row]:
            excitation[row, : lengths[row]] = source[starts[row] : stops[row]]
        else:
            excitation[row, : lengths[row]] = rng.standard_normal(lengths[row])

    sos = np.empty((len(kinds), NUM_FORMANTS, 6))
    # Each occurrence of a vowel is said a little differently.
    targets = voice["formants"][choices[is_vowel]] * np.exp(
        rng.normal(0.0, 0.03, size=(int(is_vowel.sum()), NUM_FORMANTS))
    )
    sos[is_vowel] = _formant_sos(targets, voice["bandwidths"], sample_rate)
    sos[~is_vowel] = _fricative_sos(sample_rate)[choices[~is_vowel]]
    # A polynomial in z^-1, zero-padded, has the FFT of its coefficients
    # as its values on the unit circle: the response costs two more FFTs.
    numerator = scipy.fft.rfft(
        _polynomial_product(sos[..., :3]), n=fft_length, axis=1
    )
    denominator = scipy.fft.rfft(
        _polynomial_product(sos[..., 3:]), n=fft_length, axis=1
    )
    spectrum = scipy.fft.rfft(excitation, axis=1) * numerator / denominator
    levels = np.where(
        is_vowel,
        rng.uniform(0.6, 1.0, size=len(kinds)),
        rng.uniform(0.05, 0.2, size=len(kinds)),
    )
    return levels[:, None] * scipy.fft.irfft(spectrum, n=fft_length, axis=1)


def _polynomial_product(quadratics):
    """Multiplies second-order polynomials, [..., sections, 3] -> [..., K].

    Coefficients are in increasing powers (of z^-1), K = 2 * sections + 1.
    """
    product = quadratics[..., 0, :]
    for section in range(1, quadratics.shape[-2]):
        factor = quadratics[..., section, :]
        grown = np.zeros(product.shape[:-1] + (product.shape[-1] + 2,))
        for power in range(3):
            grown[..., power : power + product.shape[-1]] += (
                product * factor[..., power : power + 1]
            )
        product = grown
    return product


def _pitch_contour(voice, length, sample_rate, rng):
    """f0 in Hz per sample: smooth intonation around the speaker's mean.

    A random walk through knots every ~0.25 s, smoothed, with a slight
    declination over the utterance, as in read speech.
    """
    knot_step = max(1, int(0.25 * sample_rate / voice["rate"]))
    num_knots = length // knot_step + 2
    knots = rng.normal(0.0, 1.0, size=num_knots)
    log_f0 = np.interp(
        np.arange(length), np.arange(num_knots) * knot_step, knots
    )
    # A one-pole low-pass rounds off the corners of the linear interpolation.
    smoothing = np.exp(-1.0 / (0.05 * sample_rate))
    log_f0 = signal.lfilter(
        [1.0 - smoothing], [1.0, -smoothing], log_f0, zi=[smoothing * knots[0]]
    )[0]
    declination = np.linspace(0.05, -0.05, length)
    f0 = voice["f0_mean"] * np.exp(voice["f0_spread"] * log_f0 + declination)
    return np.clip(f0, 50.0, 500.0)


def _rosenberg_pulse(cycle_position, open_quotient):
    """Glottal flow over each cycle (Rosenberg, 1971).

    Arguments
    ---------
    cycle_position : numpy.ndarray
        Position within the glottal cycle, in [0, 1), per sample.
    open_quotient : float
        Share of the cycle with the glottis open.

    Returns
    -------
    flow : numpy.ndarray
        Glottal flow in [0, 1], per sample.
    """
    opening = 0.6 * open_quotient
    closing = open_quotient - opening
    flow = np.zeros_like(cycle_position)
    rising = cycle_position < opening
    falling = ~rising & (cycle_position < open_quotient)
    flow[rising] = 0.5 - 0.5 * np.cos(np.pi * cycle_position[rising] / opening)
    flow[falling] = np.cos(
        0.5 * np.pi * (cycle_position[falling] - opening) / closing
    )
    return flow


def _formant_sos(formants, bandwidths, sample_rate):
    """Cascades of two-pole resonators with unit gain at 0 Hz.

    Arguments
    ---------
    formants : numpy.ndarray
        Formant frequencies in Hz, shape [..., formants].
    bandwidths : numpy.ndarray
        Their bandwidths in Hz, shape [formants].
    sample_rate : int
        In Hz.

    Returns
    -------
    sos : numpy.ndarray
        Second-order sections, shape [..., formants, 6].
    """
    # Formants above Nyquist would alias; 0.45 keeps them in band.
    formants = np.minimum(formants, 0.45 * sample_rate)
    radius = np.exp(-np.pi * bandwidths / sample_rate)
    pole_b = -2 * radius * np.cos(2 * np.pi * formants / sample_rate)
    pole_c = np.broadcast_to(radius**2, pole_b.shape)
    zeros = np.zeros_like(pole_b)
    return np.stack(
        [
            1.0 + pole_b + pole_c,
            zeros,
            zeros,
            np.ones_like(pole_b),
            pole_b,
            pole_c,
        ],
        axis=-1,
    )


@functools.lru_cache(maxsize=8)
def _fricative_sos(sample_rate):
    """Band-pass SOS of each FRICATIVE_BANDS entry: [bands, NUM_FORMANTS, 6]."""
    nyquist = sample_rate / 2
    filters = []
    for low, high in FRICATIVE_BANDS:
        # At low sample rates the band moves down to fit below Nyquist.
        high = min(high, 0.95 * nyquist)
        low = min(low, 0.6 * high)
        band = signal.butter(
            2, [low, high], "bandpass", fs=sample_rate, output="sos"
        )
        # Pass-through sections pad it to the formant cascade's length,
        # so both kinds filter in one batch.
        passthrough = np.tile(
            [1.0, 0, 0, 1.0, 0, 0], (NUM_FORMANTS - len(band), 1)
        )
        filters.append(np.concatenate([band, passthrough]))
    return np.stack(filters)


def _record(speech, channel, rng):
    """Passes speech through a session's channel; returns it in [-1, 1]."""
    recorded = signal.sosfilt(channel["sos"], speech)
    speech_power = np.mean(recorded**2) + 1e-12
    # Pink-ish background noise (a one-pole low-pass on white noise).
    noise = signal.lfilter([1.0], [1.0, -0.9], rng.standard_normal(len(speech)))
    noise *= np.sqrt(
        speech_power
        / (np.mean(noise**2) + 1e-12)
        / 10 ** (channel["snr_db"] / 10)
    )
    recorded += noise
    level = channel["peak"] * rng.uniform(0.7, 1.0)
    return recorded * (level / (np.max(np.abs(recorded)) + 1e-12))


def _draw_trials(test_utterances, seed):
    """Balanced trials in which every test utterance is an enrolment.

    Each utterance enrols one target trial (another utterance of its
    speaker, from another session when there is one) and one non-target
    trial (an utterance of another test speaker). A pair of utterances
    is used at most once while unused pairs remain.

    Arguments
    ---------
    test_utterances : dict
        Speaker id -> list of utterance ids (``<spk>/<session>/<utt>``).
    seed : int
        Seed of the draws.

    Returns
    -------
    trials : list of (int, str, str)
        (label, enrol_id, test_id).
    """
    rng = np.random.default_rng([seed, _TRIALS])
    used_pairs = set()
    trials = []

    def pick(enrol_id, candidates):
        """A random candidate, preferring pairs not used yet."""
        fresh = [
            candidate
            for candidate in candidates
            if frozenset((enrol_id, candidate)) not in used_pairs
        ]
        pool = fresh or candidates
        chosen = pool[int(rng.integers(len(pool)))]
        used_pairs.add(frozenset((enrol_id, chosen)))
        return chosen

    speakers = list(test_utterances)
    for speaker in speakers:
        others = [
            utterance
            for other in speakers
            if other != speaker
            for utterance in test_utterances[other]
        ]
        for enrol_id in test_utterances[speaker]:
            session = _session_of(enrol_id)
            same_speaker = [
                utterance
                for utterance in test_utterances[speaker]
                if utterance != enrol_id
            ]
            cross_session = [
                utterance
                for utterance in same_speaker
                if _session_of(utterance) != session
            ]
            trials.append(
                (1, enrol_id, pick(enrol_id, cross_session or same_speaker))
            )
            trials.append((0, enrol_id, pick(enrol_id, others)))
    return trials


def _session_of(utterance_id):
    """The session folder of a ``<spk>/<session>/<utt>`` id."""
    return utterance_id.split("/")[1]
