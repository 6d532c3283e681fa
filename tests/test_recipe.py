"""End-to-end tests of the VoxCeleb recipe on a tiny synthetic corpus.

train.py and verify.py run as subprocesses, as a user runs them (verify.py
in-process where it only has to reject its input), on a toy corpus of 6
training and 4 test speakers and a tiny WavLM folder, both written once
per session; everything stays offline. SpeechBrain's ``--debug`` keeps a
run to 2 batches of 2 epochs.

Authors
 * dynprompt-sb contributors 2026
"""

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch
import yaml

from dynprompt_sb.tiny_wavlm import save_tiny_wavlm
from dynprompt_sb.toy_corpus import make_toy_corpus
from dynprompt_sb.trials import read_trials

RECIPE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "recipes",
    "VoxCeleb",
    "SpeakerRec",
)
TRAIN = os.path.join(RECIPE, "train.py")
VERIFY = os.path.join(RECIPE, "verify.py")
DEMO_YAML = os.path.join(RECIPE, "hparams", "demo.yaml")
NUM_TRAIN_SPEAKERS = 6

# Small and quick everywhere; the corpus has 6 training speakers.
FAST_OVERRIDES = {
    "out_n_neurons": NUM_TRAIN_SPEAKERS,
    "batch_size": 4,
    "sentence_len": 1.0,
    "test_batch_size": 8,
    "cohort_utts_per_speaker": 2,
    "cohort_top_k": 3,
}
TIMEOUT = 240


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A toy corpus and a tiny WavLM (WavLM Large's encoder kind)."""
    root = tmp_path_factory.mktemp("recipe")
    corpus = make_toy_corpus(
        root / "corpus",
        num_train_speakers=NUM_TRAIN_SPEAKERS,
        num_test_speakers=4,
        sessions_per_speaker=2,
        utts_per_session=2,
        min_duration=0.8,
        max_duration=1.5,
    )
    wavlm = save_tiny_wavlm(root / "wavlm", style="large")
    return {
        "root": root,
        "data_folder": corpus["data_folder"],
        "trials": corpus["trials"],
        "wavlm": wavlm,
    }


def train_command(setup, output_folder, *flags, **overrides):
    """The train.py command line on the toy corpus.

    ``flags`` are run options such as "--debug"; ``overrides`` replace
    hyperparameters, FAST_OVERRIDES included.
    """
    overrides = {**FAST_OVERRIDES, **overrides}
    return [
        sys.executable,
        TRAIN,
        DEMO_YAML,
        f"--data_folder={setup['data_folder']}",
        f"--wavlm_source={setup['wavlm']}",
        f"--output_folder={output_folder}",
        "--noprogressbar",
        *flags,
        *(f"--{key}={value}" for key, value in overrides.items()),
    ]


def run(command, timeout=TIMEOUT):
    """Runs a command with one thread per process; returns the result."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        command,
        cwd=RECIPE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_ok(result):
    """Asserts a zero exit status, showing the output's end otherwise."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def checkpoints(save_folder):
    """The CKPT+ folders of a save folder, with their meta data."""
    found = []
    for name in sorted(os.listdir(save_folder)):
        meta_path = os.path.join(save_folder, name, "CKPT.yaml")
        if name.startswith("CKPT+") and os.path.isfile(meta_path):
            with open(meta_path) as meta_file:
                found.append(
                    (os.path.join(save_folder, name), yaml.safe_load(meta_file))
                )
    return found


def check_scores(path, trials):
    """One finite score per trial, in trial order."""
    with open(path) as score_file:
        lines = [line.split() for line in score_file if line.strip()]
    assert len(lines) == len(trials)
    for (label, enrol, test), fields in zip(trials, lines, strict=True):
        assert fields[:3] == [enrol, test, str(label)]
        assert math.isfinite(float(fields[3]))


@pytest.fixture(scope="module")
def debug_run(setup, tmp_path_factory):
    """A train.py --debug run; checkpoints kept in its save folder."""
    output = tmp_path_factory.mktemp("debug") / "run"
    result = run(
        train_command(setup, output, "--debug", "--debug_persistently")
    )
    check_ok(result)
    return output


def test_debug_run_trains_checkpoints_and_scores(setup, debug_run):
    output = debug_run
    trials = read_trials(setup["trials"])
    check_scores(output / "scores.txt", trials)
    check_scores(output / "scores_snorm.txt", trials)
    for name in ("det.png", "det_snorm.png", "prompt_usage.png"):
        assert (output / name).stat().st_size > 0
    assert (output / "results.json").is_file()

    saved = checkpoints(output / "save")
    assert saved, "no checkpoint was kept"
    backbone_size = os.path.getsize(
        os.path.join(setup["wavlm"], "model.safetensors")
    )
    for ckpt_path, _ in saved:
        # The WavLM entry holds the prompt pool and none of the frozen
        # backbone's weights.
        state = torch.load(os.path.join(ckpt_path, "wavlm.ckpt"))
        assert not any(key.startswith("wavlm.") for key in state)
        # demo.yaml: one pool of M=15 prompts of T'=5 frames of width 32.
        assert sum(value.numel() for value in state.values()) == 15 * 5 * 32
        assert os.path.getsize(os.path.join(ckpt_path, "wavlm.ckpt")) < (
            backbone_size / 4
        )


def test_killed_run_resumes_from_intra_epoch_checkpoint(setup, tmp_path):
    output = tmp_path / "run"
    # Batches of 2 give about 10 steps in the epoch, a checkpoint each.
    command = train_command(
        setup,
        output,
        "--ckpt_interval_steps=1",
        batch_size=2,
        number_of_epochs=1,
        score_norm="none",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        command,
        cwd=RECIPE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        intra = wait_for_intra_epoch_checkpoint(process, output / "save")
    finally:
        process.kill()
        process.wait()
    with open(os.path.join(intra, "brain.ckpt")) as brain_file:
        step = yaml.safe_load(brain_file)["step"]
    assert step >= 2
    assert not (output / "results.json").exists()

    result = run(command)
    check_ok(result)
    with open(output / "log.txt") as log_file:
        log = log_file.read()
    assert f"Loading a checkpoint from {intra}" in log
    with open(output / "train_log.txt") as train_log:
        epochs = [line.split(",")[0] for line in train_log if "epoch:" in line]
    assert epochs == ["epoch: 1"]
    check_scores(output / "scores.txt", read_trials(setup["trials"]))


def wait_for_intra_epoch_checkpoint(process, save_folder, timeout=TIMEOUT):
    """Stops the process at a complete intra-epoch checkpoint of step >= 2.

    The process is frozen (SIGSTOP) before the checkpoint is read, so that
    it cannot be half-written or deleted while it is checked; when it is
    not complete yet, the process goes on (SIGCONT) and the wait too.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended before the kill"
        if os.path.isdir(save_folder):
            process.send_signal(signal.SIGSTOP)
            intra = complete_intra_checkpoint(save_folder)
            if intra is not None:
                return intra
            process.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    raise TimeoutError("no intra-epoch checkpoint appeared")


def complete_intra_checkpoint(save_folder):
    """The newest intra-epoch checkpoint past step 1, if fully written."""
    intra = [
        path
        for path, meta in checkpoints(save_folder)
        if meta.get("brain_intra_epoch_ckpt")
    ]
    if not intra:
        return None
    path = intra[-1]
    try:
        with open(os.path.join(path, "brain.ckpt")) as brain_file:
            if yaml.safe_load(brain_file)["step"] < 2:
                return None
        # The optimizer is the last recoverable written.
        torch.load(os.path.join(path, "optimizer.ckpt"))
    except (OSError, EOFError, RuntimeError, TypeError, KeyError):
        return None
    return path


def test_ddp_two_processes_on_cpu(setup, tmp_path):
    output = tmp_path / "ddp"
    command = train_command(
        setup,
        output,
        "--device=cpu",
        "--distributed_backend=gloo",
        "--debug",
        "--debug_persistently",
    )
    # python -m torch.distributed.run is torchrun.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        *command[1:],
    ]
    result = run(command)
    check_ok(result)
    check_scores(output / "scores.txt", read_trials(setup["trials"]))
    assert checkpoints(output / "save")


def free_port():
    """A TCP port nobody listens on now, for torchrun's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_missing_data_folder_is_named(setup, tmp_path):
    missing = tmp_path / "no_such_corpus"
    result = run(
        [
            sys.executable,
            TRAIN,
            DEMO_YAML,
            f"--data_folder={missing}",
            f"--verification_file={setup['trials']}",
            f"--wavlm_source={setup['wavlm']}",
            f"--output_folder={tmp_path / 'run'}",
        ]
    )
    assert result.returncode != 0
    # SpeechBrain logs uncaught exceptions to stdout.
    assert f"Data folder not found: {missing}" in result.stdout + result.stderr


def test_train_trial_with_missing_wav_is_named(setup, tmp_path):
    trials = trials_with_missing_wav(setup, tmp_path)
    output = tmp_path / "run"
    result = run(train_command(setup, output, verification_file=trials))
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert f"{trials}, line 3" in message
    assert "id99999/nosession/00001.wav not found" in message
    # Nothing half-prepared is left for a rerun to trust.
    assert not (output / "save" / "train.csv").exists()


def trials_with_missing_wav(setup, tmp_path):
    """The toy trial list with a third line naming a wav that is not there."""
    trials = tmp_path / "trials.txt"
    with open(setup["trials"]) as source:
        lines = source.readlines()
    test_path = lines[0].split()[2]
    lines.insert(2, f"1 id99999/nosession/00001.wav {test_path}\n")
    trials.write_text("".join(lines))
    return trials


@pytest.fixture(scope="module")
def verify_main():
    """verify.py's main, imported in-process (no interpreter start-up)."""
    sys.path.insert(0, RECIPE)
    try:
        import verify
    finally:
        sys.path.remove(RECIPE)
    return verify.main


def test_verify_trial_with_missing_wav_is_named(setup, tmp_path, verify_main):
    trials = trials_with_missing_wav(setup, tmp_path)
    # Any folder will do: the trial list is checked before the model.
    with pytest.raises(FileNotFoundError) as error:
        verify_main(
            [
                str(tmp_path),
                f"--trials={trials}",
                f"--data_folder={setup['data_folder']}",
            ]
        )
    assert f"{trials}, line 3" in str(error.value)
    assert "id99999/nosession/00001.wav not found" in str(error.value)


def test_malformed_trial_line_is_named(setup, tmp_path, verify_main):
    trials = tmp_path / "trials.txt"
    trials.write_text("1 a/b/1.wav a/b/2.wav\nyes a/b/1.wav\n")
    with pytest.raises(ValueError, match=re.escape(f"{trials}, line 2")):
        verify_main(
            [
                str(tmp_path),
                f"--trials={trials}",
                f"--data_folder={setup['data_folder']}",
            ]
        )


def test_verify_awkward_audio_and_corrupt_file(setup, debug_run, tmp_path):
    rng = np.random.default_rng(0)
    wav = tmp_path / "corpus" / "wav"
    (wav / "s1" / "a").mkdir(parents=True)
    (wav / "s2" / "b").mkdir(parents=True)
    soundfile.write(
        wav / "s1/a/stereo.wav", rng.normal(0, 0.1, (32000, 2)), 16000
    )
    soundfile.write(wav / "s1/a/rate8k.wav", rng.normal(0, 0.1, 16000), 8000)
    # Shorter than WavLM's receptive field, and digital silence.
    soundfile.write(wav / "s2/b/short.wav", rng.normal(0, 0.1, 100), 16000)
    soundfile.write(wav / "s2/b/zeros.wav", np.zeros(24000), 16000)
    trials = tmp_path / "trials.txt"
    trials.write_text(
        "1 s1/a/stereo.wav s1/a/rate8k.wav\n"
        "0 s1/a/stereo.wav s2/b/short.wav\n"
        "0 s1/a/rate8k.wav s2/b/zeros.wav\n"
        "1 s2/b/short.wav s2/b/zeros.wav\n"
    )
    command = [
        sys.executable,
        VERIFY,
        str(debug_run),
        f"--trials={trials}",
        f"--data_folder={tmp_path / 'corpus'}",
        f"--output_folder={tmp_path / 'out'}",
        "--noprogressbar",
    ]
    result = run(command)
    check_ok(result)
    assert "rate8k.wav: sample rate 8000 Hz, resampled to 16000" in (
        result.stderr
    )
    check_scores(tmp_path / "out" / "scores.txt", read_trials(trials))
    check_scores(tmp_path / "out" / "scores_snorm.txt", read_trials(trials))

    (wav / "s2/b/zeros.wav").write_bytes(b"RIFF\0\0\0\0WAVEjunk")
    result = run(command)
    assert result.returncode != 0
    assert f"{trials}, line 3: cannot read {wav / 's2/b/zeros.wav'}" in (
        result.stderr
    )


def test_half_written_checkpoint_is_set_aside(tmp_path, monkeypatch):
    from speechbrain.utils.checkpoints import Checkpointer

    monkeypatch.syspath_prepend(RECIPE)
    from train import set_aside_broken_checkpoints

    layer = torch.nn.Linear(3, 3)
    counter = torch.nn.Linear(1, 1)
    checkpointer = Checkpointer(
        tmp_path, recoverables={"layer": layer, "counter": counter}
    )
    complete = checkpointer.save_checkpoint(name="complete").path
    time.sleep(0.01)
    newest = checkpointer.save_checkpoint(name="newest").path
    data = (newest / "layer.ckpt").read_bytes()
    (newest / "layer.ckpt").write_bytes(data[: len(data) // 2])
    (newest / "counter.ckpt").unlink()

    set_aside_broken_checkpoints(checkpointer)

    assert not newest.exists()
    assert (tmp_path / f"broken+{newest.name}" / "layer.ckpt").exists()
    assert checkpointer.find_checkpoint().path == complete
    checkpointer.recover_if_possible()  # loads the complete one
