"""End to end: train.py on a toy corpus -> export -> interface and CLI.

The recipe runs for two short epochs on a tiny WavLM; its test stage
writes scores.txt. The exported model folder must give the same scores,
trial by trial, through DynPromptSpeakerRecognition and through
`dynprompt score`, and the command line must fail with one clear line.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dynprompt_sb import cli
from dynprompt_sb.export import export_model, resolved_hparams
from dynprompt_sb.inference import DynPromptSpeakerRecognition
from dynprompt_sb.scoring import read_scores
from dynprompt_sb.tiny_wavlm import save_tiny_wavlm
from dynprompt_sb.toy_corpus import make_toy_corpus
from dynprompt_sb.trials import read_trials

RECIPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "recipes",
    "VoxCeleb",
    "SpeakerRec",
)
# A few seconds of training: two epochs of two batches of four crops.
TRAIN_OVERRIDES = [
    "--number_of_epochs=2",
    "--batch_size=4",
    "--sentence_len=1.0",
    "--out_n_neurons=4",
    "--split_ratio=[50, 50]",
    # Several batches of different lengths in the test stage, so that the
    # interface must batch exactly as the recipe does.
    "--test_batch_size=5",
    "--score_norm=none",
    "--device=cpu",
    "--noprogressbar",
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """A finished run of train.py with hparams/demo.yaml."""
    root = tmp_path_factory.mktemp("recipe")
    corpus = make_toy_corpus(
        root / "corpus",
        num_train_speakers=4,
        num_test_speakers=3,
        sessions_per_speaker=2,
        utts_per_session=2,
        min_duration=1.0,
        max_duration=2.0,
    )
    wavlm = save_tiny_wavlm(root / "tiny_wavlm", style="large")
    run_folder = root / "run"
    command = [
        sys.executable,
        os.path.join(RECIPE, "train.py"),
        os.path.join(RECIPE, "hparams", "demo.yaml"),
        f"--data_folder={corpus['data_folder']}",
        f"--wavlm_source={wavlm}",
        f"--output_folder={run_folder}",
        *TRAIN_OVERRIDES,
    ]
    # As demo.py runs it: one thread is faster for tensors this small.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "root": root,
        "folder": run_folder,
        "data": corpus["data_folder"],
        "trials": corpus["trials"],
        "results": json.loads((run_folder / "results.json").read_text()),
    }


@pytest.fixture(scope="module")
def model_folder(recipe_run):
    folder = recipe_run["root"] / "model"
    return export_model(recipe_run["folder"], folder, copy_backbone=True)


@pytest.fixture(scope="module")
def model(model_folder):
    return DynPromptSpeakerRecognition.from_hparams(
        source=model_folder, run_opts={"device": "cpu"}
    )


def recipe_scores(recipe_run):
    return read_scores(recipe_run["folder"] / "scores.txt")


def run_cli(capsys, *argv):
    """Runs `dynprompt` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main([str(arg) for arg in argv])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_export_carries_the_run_and_its_threshold(recipe_run, model):
    results = recipe_run["results"]
    assert model.threshold == pytest.approx(results["cosine"]["eer_threshold"])
    assert model.test_batch_size == 5
    assert model.mods.wavlm.num_layers == 3
    assert model.mods.embedding_model.blocks[0].conv.conv.out_channels == 64
    # The best checkpoint, the one the test stage scored.
    text = (
        open(os.path.join(model.hparams.model_folder, "hyperparams.yaml"))
        .read()
        .splitlines()
    )
    tested = os.path.basename(results["checkpoint"])
    assert any(tested in line for line in text if line.startswith("#"))
    labels = open(os.path.join(model.hparams.model_folder, "label_encoder.txt"))
    assert "id10001" in labels.read()


def test_interface_scores_equal_the_recipe(recipe_run, model):
    trials, scores = model.score_trials(
        recipe_run["trials"], recipe_run["data"]
    )
    expected_trials, expected = recipe_scores(recipe_run)
    assert trials == expected_trials == read_trials(recipe_run["trials"])
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE, rtol=0)


def test_cli_score_equals_the_recipe(
    recipe_run, model_folder, capsys, tmp_path
):
    out = tmp_path / "scored"
    status, stdout, err = run_cli(
        capsys,
        "score",
        recipe_run["trials"],
        "--data-root",
        recipe_run["data"],
        "--model",
        model_folder,
        "--out",
        out,
    )
    assert status == 0, err
    trials, scores = read_scores(out / "scores.txt")
    expected_trials, expected = recipe_scores(recipe_run)
    assert trials == expected_trials
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE, rtol=0)
    eer = 100 * recipe_run["results"]["cosine"]["eer"]
    assert f"EER {eer:.2f}%" in stdout
    assert (out / "det.png").stat().st_size > 0


def test_console_script_fails_with_one_line(tmp_path):
    # The installed `dynprompt`, in a process of its own.
    script = os.path.join(os.path.dirname(sys.executable), "dynprompt")
    if not os.path.isfile(script):
        pytest.skip("the package is not installed: no dynprompt script")
    result = subprocess.run(
        [script, "export", tmp_path / "no_run", tmp_path / "out"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"dynprompt: error: Run folder not found: {tmp_path / 'no_run'}\n"
    )


def test_verify_decides_at_the_run_threshold(recipe_run, model, capsys):
    # The target trial scored highest and the non-target trial scored
    # lowest by the recipe fall either side of its EER threshold; the
    # model must decide both as the threshold says (SpeechBrain's default
    # 0.25, or a flipped comparison, would get one wrong).
    trials, scores = recipe_scores(recipe_run)
    labels = np.array([label for label, _, _ in trials])
    best_target = int(np.argmax(np.where(labels == 1, scores, -np.inf)))
    worst_impostor = int(np.argmin(np.where(labels == 0, scores, np.inf)))
    threshold = model.threshold
    assert scores[best_target] > threshold > scores[worst_impostor]

    def wav(utterance_id):
        return os.path.join(recipe_run["data"], "wav", utterance_id + ".wav")

    for index, expected in ((best_target, True), (worst_impostor, False)):
        _, enrol_id, test_id = trials[index]
        score, decision = model.verify_files(wav(enrol_id), wav(test_id))
        assert bool(decision) is expected
        # Alone rather than in the recipe's batches: close, not equal.
        assert float(score) == pytest.approx(scores[index], abs=0.01)

    # The command line prints the same decision, at the same threshold.
    _, enrol_id, test_id = trials[best_target]
    argv = ["verify", wav(enrol_id), wav(test_id)]
    status, out, _ = run_cli(
        capsys, *argv, "--model", model.hparams.model_folder
    )
    assert status == 0
    assert "same speaker" in out and f"(threshold {threshold:.6f})" in out


def test_cli_embed_writes_arrays(recipe_run, model, capsys, tmp_path):
    trials = read_trials(recipe_run["trials"])
    ids = [trials[0][1], trials[0][2], trials[1][2]]
    paths = [
        os.path.join(recipe_run["data"], "wav", utt + ".wav") for utt in ids
    ]
    expected = model.embed_files(paths).numpy()

    status, _, err = run_cli(
        capsys,
        "embed",
        *paths,
        "--model",
        model.hparams.model_folder,
        "--out",
        tmp_path / "emb.npy",
    )
    assert status == 0, err
    np.testing.assert_allclose(
        np.load(tmp_path / "emb.npy"), expected, atol=1e-6, rtol=0
    )

    # The toy corpus reuses file names across folders: a folder output
    # would overwrite one with another, so it is refused...
    status, _, err = run_cli(
        capsys,
        "embed",
        *paths,
        "--model",
        model.hparams.model_folder,
        "--out",
        tmp_path / "folder",
    )
    assert status == 1 and "would both be written" in err
    # ...and works once the names differ.
    renamed = []
    for index, path in enumerate(paths):
        renamed.append(tmp_path / f"utt{index}.wav")
        shutil.copyfile(path, renamed[-1])
    status, _, err = run_cli(
        capsys,
        "embed",
        *renamed,
        "--model",
        model.hparams.model_folder,
        "--out",
        tmp_path / "folder",
    )
    assert status == 0, err
    for index in range(len(paths)):
        np.testing.assert_allclose(
            np.load(tmp_path / "folder" / f"utt{index}.npy"),
            expected[index],
            atol=1e-6,
            rtol=0,
        )


def test_cli_export_and_its_errors(recipe_run, capsys, tmp_path):
    run_folder = recipe_run["folder"]
    out = tmp_path / "model"
    status, stdout, err = run_cli(capsys, "export", run_folder, out)
    assert status == 0, err
    assert err.startswith("dynprompt: warning: The backbone is the local")
    assert sorted(os.listdir(out)) == [
        "embedding_model.ckpt",
        "hyperparams.yaml",
        "label_encoder.txt",
        "layer_sum.ckpt",
        "normalizer.ckpt",
        "wavlm.ckpt",
    ]
    # The run named the tiny WavLM by a local path: without a copy the
    # folder names it absolutely, and says so.
    tree = resolved_hparams(
        (out / "hyperparams.yaml").read_text(), {"model_folder": str(out)}
    )
    assert os.path.isabs(tree["wavlm_source"])

    status, _, err = run_cli(capsys, "export", run_folder, out)
    assert status == 1 and "not empty" in err
    status, _, err = run_cli(capsys, "export", run_folder, out, "--force")
    assert status == 0, err
    # --force replaces model folders only, never the run or other data.
    status, _, err = run_cli(
        capsys, "export", run_folder, run_folder.parent, "--force"
    )
    assert status == 1 and "holds the run" in err
    status, _, err = run_cli(
        capsys, "export", run_folder, run_folder / "save", "--force"
    )
    assert status == 1 and "no model folder" in err
    assert (run_folder / "save" / "label_encoder.txt").is_file()

    # --last: the test stage scored the best checkpoint, so the last one
    # has no threshold of its own unless it is the same checkpoint.
    checkpoints = sorted(os.listdir(run_folder / "save"))
    checkpoints = [name for name in checkpoints if name.startswith("CKPT+")]
    tested = os.path.basename(recipe_run["results"]["checkpoint"])
    status, _, err = run_cli(
        capsys, "export", run_folder, tmp_path / "last", "--last"
    )
    if checkpoints[-1] == tested:
        assert status == 0, err
    else:
        assert status == 1 and "give a threshold" in err
        status, _, err = run_cli(
            capsys,
            "export",
            run_folder,
            tmp_path / "last",
            "--last",
            "--threshold",
            "0.5",
        )
        assert status == 0, err
        model = DynPromptSpeakerRecognition.from_hparams(tmp_path / "last")
        assert model.threshold == 0.5


def broken_copy(recipe_run, tmp_path, breakage):
    """A copy of the run (without its wavs) with one thing broken."""
    run = shutil.copytree(recipe_run["folder"], tmp_path / "run")
    save = run / "save"
    best = os.path.basename(recipe_run["results"]["checkpoint"])
    if breakage == "hyperparams":
        os.remove(run / "hyperparams.yaml")
    elif breakage == "save":
        shutil.rmtree(save)
    elif breakage == "checkpoints":
        for name in os.listdir(save):
            if name.startswith("CKPT+"):
                shutil.rmtree(save / name)
    elif breakage == "weights":
        os.remove(save / best / "embedding_model.ckpt")
    elif breakage == "results":
        os.remove(run / "results.json")
    elif breakage == "other_results":
        results = dict(recipe_run["results"], checkpoint="save/CKPT+other")
        (run / "results.json").write_text(json.dumps(results))
    elif breakage == "label_encoder":
        os.remove(save / "label_encoder.txt")
    return run


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("hyperparams", "has no hyperparams.yaml"),
        ("save", "has no save/ folder"),
        ("checkpoints", r"No checkpoint \(CKPT\+...\)"),
        ("weights", "lacks embedding_model.ckpt"),
        ("results", "has no results.json"),
        ("other_results", "scores checkpoint CKPT\\+other"),
        ("label_encoder", "has no save/label_encoder.txt"),
    ],
)
def test_export_names_what_the_run_lacks(
    recipe_run, tmp_path, capsys, breakage, message
):
    run = broken_copy(recipe_run, tmp_path, breakage)
    status, out, err = run_cli(capsys, "export", run, tmp_path / "model")
    assert status == 1 and out == ""
    assert err.startswith("dynprompt: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "model")


def test_export_with_a_given_threshold_needs_no_results(recipe_run, tmp_path):
    run = broken_copy(recipe_run, tmp_path, "results")
    with pytest.warns(UserWarning, match="absolute path"):
        folder = export_model(run, tmp_path / "model", threshold=0.125)
    model = DynPromptSpeakerRecognition.from_hparams(folder)
    assert model.threshold == 0.125


def test_cli_errors_are_one_line(recipe_run, model_folder, capsys, tmp_path):
    wav = os.path.join(
        recipe_run["data"], "wav", read_trials(recipe_run["trials"])[0][1]
    )
    wav += ".wav"
    cases = [
        (
            ["verify", wav, wav, "--model", tmp_path / "no_model"],
            "Model folder not found",
        ),
        (
            ["verify", wav, tmp_path / "gone.wav", "--model", model_folder],
            "gone.wav",
        ),
        (
            [
                "embed",
                tmp_path / "gone.wav",
                "--model",
                model_folder,
                "--out",
                tmp_path / "e.npy",
            ],
            "Audio file not found",
        ),
        (
            [
                "score",
                tmp_path / "no_trials.txt",
                "--data-root",
                recipe_run["data"],
                "--model",
                model_folder,
            ],
            "Trial list not found",
        ),
        (
            [
                "score",
                recipe_run["trials"],
                "--data-root",
                tmp_path,
                "--model",
                model_folder,
            ],
            "not found",
        ),
        (["export", tmp_path / "no_run", tmp_path / "out"], "not found"),
        ([], "give a command"),
    ]
    for argv, message in cases:
        status, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 1, argv
        assert lines[-1].startswith("dynprompt: error: "), err
        assert message in lines[-1], err
        assert "Traceback" not in err
    # A command's own usage errors are argparse's: status 2.
    status, _, err = run_cli(capsys, "verify", wav)
    assert status == 2 and "required" in err


def test_cli_verify_with_a_threshold(recipe_run, model_folder, capsys):
    trials = read_trials(recipe_run["trials"])
    wav = os.path.join(recipe_run["data"], "wav", trials[0][1] + ".wav")
    # A file against itself scores 1, the same speaker at any threshold
    # below: "different" can only come from --threshold.
    argv = ["verify", wav, wav, "--model", model_folder]
    status, out, _ = run_cli(capsys, *argv, "--threshold", "1.5")
    assert status == 0
    assert out == "score 1.000000  different speakers (threshold 1.500000)\n"
