"""Tests for the pretrained interface on a model folder built offline.

A "run" is written by hand here (a yaml file with the four modules and a
checkpointer, one checkpoint of random weights, a label encoder and a
results.json), so that these tests need no training; the end-to-end check
against the recipe's own scores lives in test_export_cli.py.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.data_utils import batch_pad_right

from dynprompt_sb.audio import AudioError, pad_to_length
from dynprompt_sb.export import TEMPLATE_PATH, export_model, resolved_hparams
from dynprompt_sb.inference import DynPromptSpeakerRecognition
from dynprompt_sb.tiny_wavlm import save_tiny_wavlm
from dynprompt_sb.toy_corpus import make_toy_corpus

SAMPLE_RATE = 16000
THRESHOLD = 0.3125
WEIGHT_FILES = (
    "wavlm.ckpt",
    "layer_sum.ckpt",
    "normalizer.ckpt",
    "embedding_model.ckpt",
)
RECIPE_YAML = os.path.join(
    os.path.dirname(__file__),
    "..",
    "recipes",
    "VoxCeleb",
    "SpeakerRec",
    "hparams",
    "dynprompt.yaml",
)

# Unlike the template on purpose: sizes written literally, arguments left
# at their defaults, an argument the template lacks (layer_norm), the
# released code's switches on, and a training-only option.
RUN_YAML = """
seed: 3
wavlm_source: {wavlm}
wavlm_layers: 3
sample_rate: 16000
min_audio_len: 0.5
test_batch_size: 3
wavlm: !new:dynprompt_sb.PromptedWavLM
    source: !ref <wavlm_source>
    save_path: {root}/hub_cache
    num_prompts: 6
    prompt_len: 2
    top_n: 2
    pool_per_layer: True
    prompt_frames_to_backend: True
    gradient_checkpointing: True
layer_sum: !new:dynprompt_sb.WeightedLayerSum
    num_layers: !ref <wavlm_layers> + 1
    layer_norm: True
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: 32
    channels: [32, 32, 32, 32, 96]
    attention_channels: 16
    lin_neurons: 16
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: {root}/run/save
    recoverables:
        wavlm: !ref <wavlm>
        layer_sum: !ref <layer_sum>
        normalizer: !ref <mean_var_norm>
        embedding_model: !ref <embedding_model>
"""


def write_run(root, text):
    """Writes a run folder from a yaml text: hparams, one checkpoint of
    random weights, a label encoder and results.json."""
    run_folder = root / "run"
    run_folder.mkdir()
    (run_folder / "hyperparams.yaml").write_text(text)
    hparams = load_hyperpyyaml(text)
    torch.manual_seed(0)
    # Not the initial values, so that a weight file that failed to load
    # would show.
    for name in ("layer_sum", "embedding_model", "wavlm"):
        for param in hparams[name].parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.5)
    checkpoint = hparams["checkpointer"].save_checkpoint(
        meta={"ErrorRate": 0.25}
    )
    (run_folder / "save" / "label_encoder.txt").write_text(
        "'id10001' => 0\n'id10002' => 1\n================\n"
        "'starting_index' => 0\n"
    )
    results = {
        "checkpoint": str(checkpoint.path),
        "cosine": {"eer": 0.2, "eer_threshold": THRESHOLD},
    }
    (run_folder / "results.json").write_text(json.dumps(results))
    return run_folder


def run_embeddings(run_folder, wavs, wav_lens):
    """Embeddings by the run's modules, loaded by SpeechBrain's own
    Checkpointer and run as train.py's compute_embeddings runs them."""
    hparams = load_hyperpyyaml((run_folder / "hyperparams.yaml").read_text())
    assert hparams["checkpointer"].recover_if_possible() is not None
    modules = {
        name: hparams[name].eval()
        for name in ("wavlm", "layer_sum", "mean_var_norm", "embedding_model")
    }
    return recipe_embeddings(modules, wavs, wav_lens)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A hand-written training run with one checkpoint."""
    root = tmp_path_factory.mktemp("inference")
    wavlm = save_tiny_wavlm(root / "tiny_wavlm", style="large")
    run_folder = write_run(root, RUN_YAML.format(wavlm=wavlm, root=root))
    return {"root": root, "folder": run_folder, "wavlm": wavlm}


@pytest.fixture(scope="module")
def model_folder(run):
    """The run exported with a copy of its backbone."""
    return export_model(
        run["folder"], run["root"] / "model", copy_backbone=True
    )


@pytest.fixture(scope="module")
def model(model_folder):
    return DynPromptSpeakerRecognition.from_hparams(
        source=model_folder, run_opts={"device": "cpu"}
    )


@pytest.fixture(scope="module")
def run_modules(run):
    """The run's modules, loaded by SpeechBrain's own Checkpointer."""
    text = (run["folder"] / "hyperparams.yaml").read_text()
    hparams = load_hyperpyyaml(text)
    assert hparams["checkpointer"].recover_if_possible() is not None
    modules = {
        name: hparams[name].eval()
        for name in ("wavlm", "layer_sum", "mean_var_norm", "embedding_model")
    }
    return modules


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_toy_corpus(
        tmp_path_factory.mktemp("corpus"),
        num_train_speakers=1,
        num_test_speakers=2,
        sessions_per_speaker=1,
        utts_per_session=2,
        min_duration=0.8,
        max_duration=1.6,
    )


def corpus_wavs(corpus):
    wav_dir = os.path.join(corpus["data_folder"], "wav")
    return sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(wav_dir)
        for name in names
    )


def recipe_embeddings(modules, wavs, wav_lens):
    """train.py's SpeakerBrain.compute_embeddings, written out."""
    with torch.no_grad():
        hidden_states = modules["wavlm"](wavs, wav_lens)
        feats = modules["layer_sum"](hidden_states)
        lens = modules["wavlm"].output_lens(wav_lens, feats.shape[1])
        feats = modules["mean_var_norm"](feats, lens)
        return modules["embedding_model"](feats, lens)


def test_encode_batch_equals_the_run_on_a_padded_batch(model, run_modules):
    torch.manual_seed(1)
    wavs, wav_lens = batch_pad_right(
        [torch.randn(24000), torch.randn(9000), torch.randn(16000)]
    )
    expected = recipe_embeddings(run_modules, wavs, wav_lens)
    embeddings = model.encode_batch(wavs, wav_lens)
    assert embeddings.shape == (3, 1, 16)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_exported_modules_keep_every_option_of_the_run(model, run_modules):
    wavlm = model.mods.wavlm
    assert wavlm.prompt_frames_to_backend and len(wavlm.pools) == 3
    assert model.mods.layer_sum.layer_norm is True
    assert model.mods.mean_var_norm.std_norm is True
    assert model.test_batch_size == 3
    for name, module in run_modules.items():
        theirs = module.state_dict()
        mine = model.mods[name].state_dict()
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key])


def test_short_utterances_are_repeated_to_min_audio_len(model, run_modules):
    torch.manual_seed(2)
    short, long = torch.randn(3000), torch.randn(20000)
    wavs, wav_lens = batch_pad_right([long, short])
    # The recipe pads each utterance before batching.
    expected = recipe_embeddings(
        run_modules, *batch_pad_right([long, pad_to_length(short, 8000)])
    )
    torch.testing.assert_close(
        model.encode_batch(wavs, wav_lens), expected, atol=1e-5, rtol=0
    )
    # Shorter than WavLM's receptive field, and a single 1-D waveform.
    tiny = torch.randn(300)
    expected = recipe_embeddings(
        run_modules, pad_to_length(tiny, 8000)[None], torch.ones(1)
    )
    torch.testing.assert_close(
        model.encode_batch(tiny), expected, atol=1e-5, rtol=0
    )


def test_encode_batch_runs_in_eval_mode(model):
    torch.manual_seed(3)
    wav = torch.randn(1, 12000)
    model.mods.train()
    first = model.encode_batch(wav)
    second = model.encode_batch(wav)
    assert not model.mods.training
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert not first.requires_grad


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="mono waveforms"):
        model.encode_batch(torch.zeros(1, 2, 16000))
    with pytest.raises(ValueError, match=r"relative lengths in \(0, 1\]"):
        model.encode_batch(torch.zeros(2, 16000), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mean_var_norm_emb"):
        model.encode_batch(torch.zeros(1, 16000), normalize=True)
    with pytest.raises(NotImplementedError, match="verification model"):
        model.classify_file("a.wav")


def test_verify_batch_decides_at_the_exported_threshold(model):
    assert model.threshold == THRESHOLD
    torch.manual_seed(4)
    wavs1, wavs2 = torch.randn(2, 16000), torch.randn(2, 16000)
    score, decision = model.verify_batch(wavs1, wavs2)
    emb1, emb2 = model.encode_batch(wavs1), model.encode_batch(wavs2)
    expected = torch.nn.functional.cosine_similarity(emb1, emb2, dim=-1)
    torch.testing.assert_close(score, expected, atol=1e-6, rtol=0)
    assert torch.equal(decision, score > THRESHOLD)
    # Thresholds just either side of a score flip its decision.
    first = float(score[0, 0])
    _, above = model.verify_batch(wavs1, wavs2, threshold=first - 1e-4)
    _, below = model.verify_batch(wavs1, wavs2, threshold=first + 1e-4)
    assert bool(above[0, 0]) and not bool(below[0, 0])


def test_verify_files_reads_stereo_and_other_rates(model, corpus, tmp_path):
    path = corpus_wavs(corpus)[0]
    mono, rate = soundfile.read(path, dtype="float32")
    stereo_path = tmp_path / "stereo.wav"
    soundfile.write(stereo_path, np.stack([mono, mono], axis=1), rate)
    assert model.load_audio(stereo_path).shape == (len(mono),)
    score, decision = model.verify_files(path, stereo_path)
    assert score.shape == (1,) and float(score) > 0.9999 and bool(decision)

    low_rate_path = tmp_path / "8k.wav"
    soundfile.write(low_rate_path, mono[::2], 8000)
    with pytest.warns(UserWarning, match="8000 Hz, resampled to 16000"):
        wav = model.load_audio(low_rate_path)
    assert abs(wav.shape[0] - len(mono)) <= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score, _ = model.verify_files(path, low_rate_path)
    assert float(score) > 0.5  # the same voice, band-limited


def test_missing_or_broken_audio_is_named(model, corpus, tmp_path):
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        model.verify_files(corpus_wavs(corpus)[0], missing)
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        model.embed_files([corpus_wavs(corpus)[0], missing])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="broken.wav"):
        model.load_audio(broken)


def test_embed_files_batches_longest_first(model, corpus):
    paths = corpus_wavs(corpus)
    embeddings = model.embed_files(paths, batch_size=4)
    assert embeddings.shape == (len(paths), 16)
    # By hand: sorted by duration, longest first, in batches of 4.
    wavs = [model.load_audio(path) for path in paths]
    order = sorted(
        range(len(paths)), key=lambda i: (len(wavs[i]), i), reverse=True
    )
    expected = torch.zeros_like(embeddings)
    for start in range(0, len(order), 4):
        chunk = order[start : start + 4]
        batch, lens = batch_pad_right([wavs[i] for i in chunk])
        expected[chunk] = model.encode_batch(batch, lens).squeeze(1)
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)
    # Batching changes the embeddings a little: scoring must batch as the
    # recipe did to give its scores.
    pair = [paths[order[0]], paths[order[-1]]]  # longest and shortest
    alone = model.embed_files(pair, batch_size=1)
    together = model.embed_files(pair, batch_size=2)
    assert not torch.allclose(alone, together, atol=1e-6, rtol=0)


def test_a_fine_tuned_backbone_loads_from_its_checkpoint(run, tmp_path):
    # The recipe's full fine-tuning: no prompts, WavLM weights trained, so
    # wavlm.ckpt holds the whole backbone and must load strictly.
    text = (run["folder"] / "hyperparams.yaml").read_text()
    text = text.replace("    num_prompts: 6\n", "    prompt_mode: none\n")
    text = text.replace("    top_n: 2\n", "    top_n: 2\n    freeze: False\n")
    text = text.replace(str(run["root"]), str(tmp_path))
    text = text.replace(f"{tmp_path}/tiny_wavlm", run["wavlm"])
    run_folder = write_run(tmp_path, text)
    (checkpoint,) = (run_folder / "save").glob("CKPT+*")
    weights = torch.load(checkpoint / "wavlm.ckpt", weights_only=True)
    assert any(key.startswith("wavlm.encoder") for key in weights)
    folder = export_model(run_folder, tmp_path / "model", copy_backbone=True)
    model = DynPromptSpeakerRecognition.from_hparams(
        source=folder, savedir=tmp_path / "collected"
    )
    assert model.mods.wavlm.prompt_mode == "none"
    assert not model.mods.wavlm.freeze
    torch.manual_seed(7)
    wavs, lens = batch_pad_right([torch.randn(12000), torch.randn(9000)])
    torch.testing.assert_close(
        model.encode_batch(wavs, lens),
        run_embeddings(run_folder, wavs, lens),
        atol=1e-5,
        rtol=1e-5,
    )
    # savedir collects links to the folder's files, as SpeechBrain does.
    assert os.path.islink(tmp_path / "collected" / "wavlm.ckpt")


def test_copied_backbone_moves_with_the_folder(model, model_folder, tmp_path):
    moved = shutil.copytree(model_folder, tmp_path / "moved")
    text = (moved / "hyperparams.yaml").read_text()
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any(os.sep + "tmp" in line for line in settings)
    assert (moved / "wavlm" / "config.json").is_file()
    copy = DynPromptSpeakerRecognition.from_hparams(source=moved)
    torch.manual_seed(5)
    wav = torch.randn(1, 14000)
    torch.testing.assert_close(
        copy.encode_batch(wav), model.encode_batch(wav), atol=0, rtol=0
    )


def test_hub_backbone_is_named_not_copied(run, tmp_path):
    with pytest.warns(UserWarning, match="absolute path"):
        folder = export_model(run["folder"], tmp_path / "model")
    assert not os.path.exists(os.path.join(folder, "wavlm"))
    tree = resolved_hparams(
        open(os.path.join(folder, "hyperparams.yaml")).read(),
        {"model_folder": folder},
    )
    assert tree["wavlm_source"] == os.path.abspath(run["wavlm"])
    assert sorted(os.listdir(folder)) == sorted(
        [*WEIGHT_FILES, "hyperparams.yaml", "label_encoder.txt"]
    )


@pytest.mark.parametrize("missing", ["normalizer.ckpt", "hyperparams.yaml"])
def test_a_file_missing_from_the_folder_is_named(
    model_folder, tmp_path, missing
):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    os.remove(folder / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        DynPromptSpeakerRecognition.from_hparams(source=folder)


def test_missing_folders_are_named(model_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="Model folder not found"):
        DynPromptSpeakerRecognition.from_hparams(source=tmp_path / "none")
    folder = shutil.copytree(model_folder, tmp_path / "model")
    shutil.rmtree(folder / "wavlm")
    with pytest.raises(FileNotFoundError, match="backbone folder not found"):
        DynPromptSpeakerRecognition.from_hparams(source=folder)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # Unpickling calls open(marker, "w"): a file appears if it ran.
        return (open, (self.marker, "w"))


def test_weights_load_with_weights_only(model_folder, tmp_path):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    marker = tmp_path / "code_ran"
    state = torch.load(folder / "layer_sum.ckpt", weights_only=True)
    state["payload"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, folder / "layer_sum.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        DynPromptSpeakerRecognition.from_hparams(source=folder)
    assert not marker.exists()


def test_weights_of_another_size_are_refused(model_folder, tmp_path):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    state = torch.load(folder / "layer_sum.ckpt", weights_only=True)
    state["weights"] = torch.zeros(7)
    torch.save(state, folder / "layer_sum.ckpt")
    with pytest.raises(ValueError, match="layer_sum.ckpt does not fit"):
        DynPromptSpeakerRecognition.from_hparams(source=folder)


def test_a_module_missing_from_the_yaml_is_named(model_folder, tmp_path):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    path = folder / "hyperparams.yaml"
    text = path.read_text().replace(
        "    embedding_model: !ref <embedding_model>\n\n# Keys", "\n# Keys"
    )
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(ValueError, match="lacks embedding_model"):
        DynPromptSpeakerRecognition.from_hparams(source=folder)


def test_template_matches_the_recipe_yaml():
    with open(TEMPLATE_PATH) as template_file:
        template = resolved_hparams(
            template_file.read(), {"model_folder": "m", "threshold": 0.5}
        )
    with open(RECIPE_YAML) as recipe_file:
        recipe = resolved_hparams(recipe_file.read(), {"data_folder": "d"})
    # Every size and option of the template is a key the recipe sets, so
    # export can fill it in by name.
    own = {"model_folder", "threshold", "modules", "pretrainer"}
    for name, value in template.items():
        if name in own or hasattr(value, "tag"):
            continue
        assert name in recipe, name
    loadables = template["pretrainer"].value["loadables"]
    recoverables = recipe["checkpointer"].value["recoverables"]
    assert set(loadables) <= set(recoverables)
    for key, node in loadables.items():
        assert node.tag == recoverables[key].tag, key


def test_template_builds_the_model(run):
    with open(TEMPLATE_PATH) as template_file:
        hparams = load_hyperpyyaml(
            template_file,
            {
                "model_folder": "unused",
                "wavlm_source": run["wavlm"],
                "wavlm_dim": 32,
                "wavlm_layers": 3,
                "threshold": 0.5,
            },
        )
    model = DynPromptSpeakerRecognition(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts={"device": "cpu"},
    )
    assert model.encode_batch(torch.randn(1, 8000)).shape == (1, 1, 192)
    assert model.threshold == 0.5


def test_template_and_exported_yaml_pass_yamllint(model_folder):
    config = os.path.join(os.path.dirname(__file__), "..", ".yamllint")
    exported = os.path.join(model_folder, "hyperparams.yaml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "-c",
            config,
            TEMPLATE_PATH,
            exported,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model_folder, model):
    gpu = DynPromptSpeakerRecognition.from_hparams(
        source=model_folder, run_opts={"device": "cuda:0"}
    )
    torch.manual_seed(6)
    wavs, lens = batch_pad_right([torch.randn(20000), torch.randn(9000)])
    on_gpu = gpu.encode_batch(wavs, lens)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(
        on_gpu.cpu(), model.encode_batch(wavs, lens), atol=1e-4, rtol=0
    )
