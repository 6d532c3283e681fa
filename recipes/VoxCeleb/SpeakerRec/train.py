#!/usr/bin/env python3
"""Recipe for training speaker embeddings with speaker-aware dynamic prompts
on a frozen WavLM (Li, Mak, Lee, Meng, Interspeech 2024), and verifying them.

A frozen WavLM gets, at every transformer layer, N prompts picked per
utterance from a pool of M learnable prompts. A learnable weighted sum of
its hidden states feeds an ECAPA-TDNN trained with AAM-softmax on the
VoxCeleb1 dev speakers. After training, every utterance of the trial list
is embedded at full length and scored with cosine similarity (and s-norm).

To run this recipe, do the following:
> python train.py hparams/dynprompt.yaml --data_folder=/path/to/VoxCeleb1

Baselines are overrides of the same file (frozen WavLM without prompts:
``--prompt_mode=none``; static prompts: ``--prompt_mode=static``) or
hparams/finetune.yaml (full fine-tuning). Rerunning a command resumes it
from its last checkpoint; ``--test_only`` runs only the test stage.

Authors
 * dynprompt-sb contributors 2026
"""

import json
import math
import os
import random
import sys
import zipfile
from collections import defaultdict

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import if_main_process, run_on_main
from speechbrain.utils.logger import get_logger
from tqdm import tqdm

from dynprompt_sb.audio import MIN_SAMPLES, pad_to_length, read_audio
from dynprompt_sb.scoring import (
    cosine_score_trials,
    verification_metrics,
    write_scores,
)
from dynprompt_sb.trials import read_trials, trial_utterances

logger = get_logger(__name__)

# Names of the score normalisations the test stage knows.
SCORE_NORMS = ("none", "s-norm")


def set_aside_broken_checkpoints(checkpointer):
    """Renames checkpoints that a killed run left half-written.

    SpeechBrain writes a checkpoint's CKPT.yaml before its files, so a run
    killed while saving leaves a folder that recovery would pick and fail
    to load. Such a folder (a recoverable's file missing, or a torch file
    truncated) becomes ``broken+<name>``: kept for inspection, never loaded,
    so the rerun resumes from the newest complete checkpoint.

    Arguments
    ---------
    checkpointer : speechbrain.utils.checkpoints.Checkpointer
        With all its recoverables registered.
    """
    for checkpoint in checkpointer.list_checkpoints():
        folder = checkpoint.path
        problems = []
        for name in checkpointer.recoverables:
            path = folder / f"{name}.ckpt"
            if not path.is_file():
                problems.append(f"{path.name} missing")
            elif path.stat().st_size == 0:
                problems.append(f"{path.name} empty")
            elif _looks_like_torch_zip(path) and not zipfile.is_zipfile(path):
                problems.append(f"{path.name} truncated")
        if problems:
            target = folder.with_name(f"broken+{folder.name}")
            logger.warning(
                "Checkpoint %s is incomplete (%s), probably from a run killed "
                "while saving; moved to %s.",
                folder,
                ", ".join(problems),
                target,
            )
            os.replace(folder, target)


def _looks_like_torch_zip(path):
    # torch.save writes zip archives; SpeechBrain's other savers write text.
    with open(path, "rb") as checkpoint_file:
        return checkpoint_file.read(2) == b"PK"


class SpeakerBrain(sb.core.Brain):
    """Trains WavLM prompts and an ECAPA-TDNN back-end as a speaker
    classifier, and embeds utterances for verification."""

    def compute_embeddings(self, wavs, wav_lens, modules=None):
        """Speaker embeddings of a batch of waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            Waveforms at the model's sample rate, [batch, samples].
        wav_lens : torch.Tensor
            Relative lengths of the waveforms, [batch].
        modules : dict, optional
            The modules to run; by default ``self.modules``. The test stage
            passes them unwrapped from DDP, as it runs on one process.

        Returns
        -------
        embeddings : torch.Tensor
            [batch, 1, emb_dim].
        """
        modules = self.modules if modules is None else modules
        hidden_states = modules["wavlm"](wavs, wav_lens)  # [L+1, B, T, D]
        feats = modules["layer_sum"](hidden_states)  # [B, T, D]
        # With the released code's option the states also hold the prompt
        # frames; the relative lengths must count them as valid.
        lens = _unwrap(modules["wavlm"]).output_lens(wav_lens, feats.shape[1])
        feats = modules["mean_var_norm"](feats, lens)
        return modules["embedding_model"](feats, lens)

    def compute_forward(self, batch, stage):
        """Computes speaker posteriors (cosines to each speaker's weight)."""
        batch = batch.to(self.device)
        wavs, lens = batch.sig

        if stage == sb.Stage.TRAIN and self.hparams.augment:
            wavs, lens = self.hparams.wav_augment(wavs, lens)

        embeddings = self.compute_embeddings(wavs, lens)
        outputs = self.modules.classifier(embeddings)
        return outputs, lens

    def compute_objectives(self, predictions, batch, stage):
        """AAM-softmax on the speaker labels, plus the key pull loss."""
        predictions, lens = predictions
        spkid, _ = batch.spk_id_encoded

        if stage == sb.Stage.TRAIN and self.hparams.augment:
            spkid = self.hparams.wav_augment.replicate_labels(spkid)

        loss = self.hparams.compute_cost(predictions, spkid, lens)

        # Only added when it counts: with weight 0 (the released code) the
        # learnable keys must get no gradient at all, else weight decay
        # would still shrink them.
        if stage == sb.Stage.TRAIN and self.hparams.key_loss_weight > 0:
            key_loss = _unwrap(self.modules.wavlm).key_loss()
            loss = loss + self.hparams.key_loss_weight * key_loss

        if stage != sb.Stage.TRAIN:
            self.error_metrics.append(batch.id, predictions, spkid, lens)

        return loss

    def init_optimizers(self):
        """Creates the optimizers over the parameters that train.

        A frozen WavLM contributes only its prompts, which train with the
        back-end. When WavLM's own weights train (``freeze_wavlm: False``,
        full fine-tuning), they get an optimizer of their own,
        ``wavlm_opt_class``, with a learning rate far below the back-end's:
        the pretrained weights need small steps, the random back-end large
        ones.
        """
        backbone = _unwrap(self.modules.wavlm).wavlm
        backbone_params = _trainable(backbone)
        backbone_ids = {id(param) for param in backbone_params}
        other_params = [
            param
            for param in _trainable(self.modules)
            if id(param) not in backbone_ids
        ]
        self.optimizer = self.opt_class(other_params)
        self.optimizers_dict = {"optimizer": self.optimizer}
        if backbone_params:
            if not hasattr(self.hparams, "wavlm_opt_class"):
                raise ValueError(
                    "WavLM is not frozen, but the hparams define no "
                    "wavlm_opt_class for its weights: use "
                    "hparams/finetune.yaml for full fine-tuning."
                )
            self.wavlm_optimizer = self.hparams.wavlm_opt_class(backbone_params)
            self.optimizers_dict["wavlm_optimizer"] = self.wavlm_optimizer

        if self.checkpointer is not None:
            for name, optimizer in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(name, optimizer)
            # Every recoverable is known now, just before recovery.
            run_on_main(set_aside_broken_checkpoints, args=[self.checkpointer])

    def _wrap_distributed(self):
        """Wraps the modules in DDP, also on CPU.

        SpeechBrain's own wrapping turns every BatchNorm into a
        SyncBatchNorm, which runs on GPUs only; with ``--device=cpu`` (gloo)
        the modules are wrapped as they are, each process normalising with
        its own batch statistics.
        """
        if not (self.distributed_launch and self.device_type == "cpu"):
            super()._wrap_distributed()
            return
        for name, module in self.modules.items():
            if any(param.requires_grad for param in module.parameters()):
                self.modules[name] = torch.nn.parallel.DistributedDataParallel(
                    module,
                    device_ids=None,
                    find_unused_parameters=self.find_unused_parameters,
                )

    def on_stage_start(self, stage, epoch=None):
        """Gets called at the beginning of each epoch."""
        if stage != sb.Stage.TRAIN:
            self.error_metrics = self.hparams.error_stats()
        _unwrap(self.modules.wavlm).reset_prompt_usage()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Gets called at the end of each epoch."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            stage_stats.update(self.log_prompt_usage(epoch))
            self.train_stats = stage_stats
        else:
            stage_stats["ErrorRate"] = self.error_metrics.summarize("average")

        if stage == sb.Stage.VALID:
            old_lr, new_lr = self.hparams.lr_annealing(epoch)
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            stats_meta = {"epoch": epoch, "lr": old_lr}
            if hasattr(self, "wavlm_optimizer"):
                old_lr, new_lr = self.hparams.lr_annealing_wavlm(epoch)
                sb.nnet.schedulers.update_learning_rate(
                    self.wavlm_optimizer, new_lr
                )
                stats_meta["lr_wavlm"] = old_lr

            self.hparams.train_logger.log_stats(
                stats_meta=stats_meta,
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"ErrorRate": stage_stats["ErrorRate"]},
                min_keys=["ErrorRate"],
            )

    def log_prompt_usage(self, epoch):
        """Logs how often each layer picked each prompt this epoch.

        A pool collapses when a few prompts win every selection; the log
        shows it as layers using few prompts, one with a large share, and
        a low usage entropy (1 = uniform use of the pool, 0 = one prompt).

        Arguments
        ---------
        epoch : int
            The epoch that just ended.

        Returns
        -------
        stats : dict
            Mean over layers of the prompts used and of the usage entropy,
            for the train log; empty without dynamic prompts.
        """
        wavlm = _unwrap(self.modules.wavlm)
        if wavlm.prompt_mode != "dynamic":
            return {}
        usage = wavlm.prompt_usage()
        if torch.distributed.is_available() and (
            torch.distributed.is_initialized()
        ):
            # Each process counted its own share of the batches.
            usage = usage.to(self.device)
            torch.distributed.all_reduce(usage)
        usage = usage.cpu()
        summary = summarize_prompt_usage(usage)
        logger.info(
            f"Prompt usage, epoch {epoch} (selections per prompt, one row "
            "per layer):\n" + "\n".join(summary["lines"])
        )
        if if_main_process():
            path = os.path.join(
                self.hparams.output_folder, "prompt_usage_train.jsonl"
            )
            with open(path, "a", encoding="utf-8") as usage_file:
                record = {"epoch": epoch, "usage": usage.tolist()}
                usage_file.write(json.dumps(record) + "\n")
        return {
            "prompts_used": summary["prompts_used"],
            "usage_entropy": summary["usage_entropy"],
        }

    def embed(self, dataset, description="Embedding"):
        """Embeds every utterance of a dataset, in one process.

        Arguments
        ---------
        dataset : DynamicItemDataset
            Provides "id" and "sig" (full-length waveforms), with a
            "duration" to sort by: batches of similar lengths waste little
            computation on padding, and the longest come first, so a batch
            too large for the device fails at once.
        description : str
            Label of the progress bar.

        Returns
        -------
        embeddings : dict
            Utterance id -> embedding, a 1-D float32 CPU tensor.
        """
        modules = {
            name: _unwrap(module) for name, module in self.modules.items()
        }
        self.modules.eval()
        loader = sb.dataio.dataloader.make_dataloader(
            dataset.filtered_sorted(sort_key="duration", reverse=True),
            batch_size=self.hparams.test_batch_size,
            num_workers=self.hparams.num_workers,
        )
        embeddings = {}
        with torch.no_grad():
            for batch in tqdm(
                loader,
                desc=description,
                dynamic_ncols=True,
                disable=self.noprogressbar,
            ):
                batch = batch.to(self.device)
                wavs, lens = batch.sig
                with self.evaluation_ctx:
                    batch_embeddings = self.compute_embeddings(
                        wavs, lens, modules
                    )
                batch_embeddings = batch_embeddings.squeeze(1).float().cpu()
                finite = torch.isfinite(batch_embeddings).all(dim=1)
                if not bool(finite.all()):
                    bad = [
                        f"{utt_id} ({wav})"
                        for utt_id, wav, ok in zip(
                            batch.id, batch.wav, finite, strict=True
                        )
                        if not ok
                    ]
                    raise FloatingPointError(
                        "Non-finite speaker embedding for " + ", ".join(bad)
                    )
                embeddings.update(zip(batch.id, batch_embeddings, strict=True))
        return embeddings


def summarize_prompt_usage(usage):
    """Describes a prompt-usage matrix, one line per layer.

    Arguments
    ---------
    usage : torch.Tensor
        Selection counts, [layers, prompts].

    Returns
    -------
    summary : dict
        "lines" (one string per layer), "prompts_used" (mean over layers of
        the prompts picked at least once) and "usage_entropy" (mean over
        layers of the entropy of the selection shares, divided by its
        maximum, log M).

    Example
    -------
    >>> summary = summarize_prompt_usage(torch.tensor([[2, 2, 0, 0]]))
    >>> summary["prompts_used"], summary["usage_entropy"]
    (2.0, 0.5)
    >>> summary["lines"][0]
    'layer  1: used 2/4, top share 0.50, entropy 0.50 | 2 2 0 0'
    """
    usage = usage.double()
    num_prompts = usage.shape[1]
    shares = usage / usage.sum(dim=1, keepdim=True).clamp(min=1)
    logs = torch.where(shares > 0, shares.log(), torch.zeros_like(shares))
    entropy = -(shares * logs).sum(dim=1) / math.log(max(num_prompts, 2))
    used = (usage > 0).sum(dim=1)
    lines = []
    for layer, counts in enumerate(usage.long().tolist()):
        lines.append(
            f"layer {layer + 1:2d}: used {int(used[layer])}/{num_prompts}, "
            f"top share {float(shares[layer].max()):.2f}, "
            f"entropy {float(entropy[layer]):.2f} | "
            + " ".join(str(count) for count in counts)
        )
    return {
        "lines": lines,
        "prompts_used": round(float(used.double().mean()), 2),
        "usage_entropy": round(float(entropy.mean()), 3),
    }


def dataio_prep(hparams):
    """Creates the training and validation datasets and their pipelines.

    Training reads a random crop of ``sentence_len`` seconds of each
    utterance, a new one every epoch; validation reads the middle
    ``sentence_len`` seconds, so that its error rate, which picks the best
    checkpoint, does not move with the draw of the crops. An utterance
    shorter than the crop is repeated end to start up to the crop's length
    (``dynprompt_sb.audio.pad_to_length``): the crop stays full of the
    speaker's voice, where zero padding would add silent frames that the
    pooling layers would average in.

    Arguments
    ---------
    hparams : dict
        The loaded hyperparameters.

    Returns
    -------
    train_data : DynamicItemDataset
    valid_data : DynamicItemDataset
    label_encoder : CategoricalEncoder
        Speaker id -> class index, saved in ``<save_folder>/label_encoder.txt``.
    """
    train_data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=hparams["train_annotation"],
        replacements=_replacements(hparams),
    )
    valid_data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=hparams["valid_annotation"],
        replacements=_replacements(hparams),
    )
    datasets = [train_data, valid_data]
    label_encoder = sb.dataio.encoder.CategoricalEncoder()
    sample_rate = hparams["sample_rate"]
    crop_seconds = hparams["sentence_len"]
    crop = int(round(crop_seconds * sample_rate))

    @sb.utils.data_pipeline.takes("wav", "start", "stop", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def train_audio_pipeline(wav, start, stop, duration):
        start, stop = int(start), int(stop)
        # start/stop count samples at the file's own rate; the crop is
        # counted at the model's rate (they differ for resampled files).
        file_crop = _file_samples(crop_seconds, start, stop, duration)
        if stop - start > file_crop:
            start = random.randint(start, stop - file_crop)
            stop = start + file_crop
        sig = read_audio(wav, sample_rate, start, stop)
        return pad_to_length(sig, crop)[:crop]

    @sb.utils.data_pipeline.takes("wav", "start", "stop", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def valid_audio_pipeline(wav, start, stop, duration):
        start, stop = int(start), int(stop)
        file_crop = _file_samples(crop_seconds, start, stop, duration)
        if stop - start > file_crop:
            start += (stop - start - file_crop) // 2
            stop = start + file_crop
        sig = read_audio(wav, sample_rate, start, stop)
        return pad_to_length(sig, crop)[:crop]

    sb.dataio.dataset.add_dynamic_item([train_data], train_audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([valid_data], valid_audio_pipeline)

    @sb.utils.data_pipeline.takes("spk_id")
    @sb.utils.data_pipeline.provides("spk_id", "spk_id_encoded")
    def label_pipeline(spk_id):
        yield spk_id
        spk_id_encoded = label_encoder.encode_sequence_torch([spk_id])
        yield spk_id_encoded

    sb.dataio.dataset.add_dynamic_item(datasets, label_pipeline)

    # Load or compute the label encoder (main process first under DDP).
    lab_enc_file = os.path.join(hparams["save_folder"], "label_encoder.txt")
    label_encoder.load_or_create(
        path=lab_enc_file, from_didatasets=[train_data], output_key="spk_id"
    )
    if len(label_encoder) > hparams["out_n_neurons"]:
        raise ValueError(
            f"{hparams['train_annotation']} has {len(label_encoder)} "
            f"training speakers, more than out_n_neurons="
            f"{hparams['out_n_neurons']}: set --out_n_neurons="
            f"{len(label_encoder)}."
        )

    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "spk_id_encoded"])
    return train_data, valid_data, label_encoder


def embedding_dataset(data, hparams, max_len=None):
    """A dataset of full-length utterances to embed.

    Utterances shorter than ``min_audio_len`` seconds (or than WavLM's
    receptive field) are repeated end to start up to that length: WavLM
    yields no frame below 400 samples, and ECAPA-TDNN's dilated
    convolutions need a few frames more.

    Arguments
    ---------
    data : str or dict
        A CSV with columns ID, duration, wav, start, stop (start/stop in
        samples of the file), or the same as a dict id -> fields.
    hparams : dict
        The loaded hyperparameters.
    max_len : float, optional
        Keep at most the first ``max_len`` seconds of each utterance.

    Returns
    -------
    dataset : DynamicItemDataset
        Provides "id", "sig" and "wav" (the file, for error messages).
    """
    if isinstance(data, dict):
        dataset = sb.dataio.dataset.DynamicItemDataset(data)
    else:
        dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(
            csv_path=data, replacements=_replacements(hparams)
        )
    sample_rate = hparams["sample_rate"]
    min_samples = max(
        MIN_SAMPLES, int(round(hparams["min_audio_len"] * sample_rate))
    )

    @sb.utils.data_pipeline.takes("wav", "start", "stop", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav, start, stop, duration):
        start, stop = int(start), int(stop)
        if max_len is not None:
            stop = min(
                stop, start + _file_samples(max_len, start, stop, duration)
            )
        sig = read_audio(wav, sample_rate, start, stop)
        return pad_to_length(sig, min_samples)

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "wav"])
    return dataset


def speaker_cohort(brain, hparams):
    """Mean embedding of each training speaker, the cohort of s-norm.

    Embedding all of VoxCeleb1 dev (148,642 utterances) would cost more
    than training an epoch; at most ``cohort_utts_per_speaker`` random
    utterances per speaker, cut to ``cohort_max_len`` seconds, give each
    speaker's mean direction well enough. Each embedding is length
    normalised before averaging, as cosine scoring only sees directions.

    Arguments
    ---------
    brain : SpeakerBrain
        The trained model.
    hparams : dict
        The loaded hyperparameters (``train_annotation`` names the CSV).

    Returns
    -------
    cohort : torch.Tensor
        [speakers, emb_dim].
    """
    rows = sb.dataio.dataio.load_data_csv(
        hparams["train_annotation"], replacements=_replacements(hparams)
    )
    by_speaker = defaultdict(list)
    for utt_id in sorted(rows):
        by_speaker[rows[utt_id]["spk_id"]].append(utt_id)
    rng = random.Random(hparams["seed"])
    chosen = {}
    for spk_id in sorted(by_speaker):
        utt_ids = by_speaker[spk_id]
        count = min(len(utt_ids), hparams["cohort_utts_per_speaker"])
        for utt_id in rng.sample(utt_ids, count):
            chosen[utt_id] = rows[utt_id]
    dataset = embedding_dataset(chosen, hparams, hparams["cohort_max_len"])
    embeddings = brain.embed(dataset, description="Cohort")
    cohort = []
    for spk_id in sorted(by_speaker):
        vectors = [
            embeddings[utt_id]
            for utt_id in by_speaker[spk_id]
            if utt_id in chosen
        ]
        vectors = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
        cohort.append(vectors.mean(dim=0))
    return torch.stack(cohort)


def verify(
    brain, hparams, test_data, trials, output_folder, cohort_fn=None, info=None
):
    """Embeds the trial utterances, scores the trials and reports.

    Writes ``scores.txt`` (and ``scores_snorm.txt`` with s-norm), a DET
    curve per score file, a heat map of the prompts the test pass picked
    (dynamic prompts only) and ``results.json`` to ``output_folder``.

    Arguments
    ---------
    brain : SpeakerBrain
        The model, with the weights to evaluate loaded.
    hparams : dict
        The loaded hyperparameters (``score_norm``, ``cohort_top_k``...).
    test_data : DynamicItemDataset
        Every trial utterance, as built by ``embedding_dataset``.
    trials : list of (label, enrol_id, test_id)
        The trials, as ``dynprompt_sb.trials.read_trials`` returns them.
    output_folder : str
        Where the results go.
    cohort_fn : callable, optional
        Returns the [C, emb_dim] s-norm cohort; called only when
        ``score_norm`` is "s-norm".
    info : dict, optional
        Extra entries for ``results.json`` (which checkpoint, which data).

    Returns
    -------
    results : dict
        What ``results.json`` holds.
    """
    # Imported here: matplotlib is only needed once training is over.
    from dynprompt_sb.plots import plot_det, plot_prompt_usage

    score_norm = hparams["score_norm"]
    if score_norm not in SCORE_NORMS:
        raise ValueError(
            f"score_norm={score_norm!r}: expected one of {SCORE_NORMS}."
        )
    os.makedirs(output_folder, exist_ok=True)
    wavlm = _unwrap(brain.modules.wavlm)
    dynamic = wavlm.prompt_mode == "dynamic"

    wavlm.reset_prompt_usage()
    embeddings = brain.embed(test_data, description="Trial utterances")
    results = dict(info or {})
    results["num_trials"] = len(trials)
    results["num_utterances"] = len(embeddings)
    results["files"] = {}
    if dynamic:
        usage = wavlm.prompt_usage()
        usage_path = os.path.join(output_folder, "prompt_usage.png")
        plot_prompt_usage(
            usage, usage_path, title="Prompt usage on the trial utterances"
        )
        summary = summarize_prompt_usage(usage)
        logger.info(
            "Prompt usage on the trial utterances:\n"
            + "\n".join(summary["lines"])
        )
        results["prompt_usage"] = usage.tolist()
        results["files"]["prompt_usage_plot"] = usage_path

    labels = [label for label, _, _ in trials]
    norms = [("cosine", None, "")]
    if score_norm == "s-norm":
        norms.append(("s-norm", cohort_fn(), "_snorm"))
    for name, cohort, suffix in norms:
        scores = cosine_score_trials(
            trials, embeddings, cohort=cohort, top_k=hparams["cohort_top_k"]
        )
        score_path = os.path.join(output_folder, f"scores{suffix}.txt")
        write_scores(score_path, trials, scores)
        metrics = verification_metrics(labels, scores)
        det_path = os.path.join(output_folder, f"det{suffix}.png")
        positive = scores[[label == 1 for label in labels]]
        negative = scores[[label == 0 for label in labels]]
        plot_det(
            positive,
            negative,
            det_path,
            title=f"DET, {name} scoring: EER {100 * metrics['eer']:.2f}%",
        )
        results[name] = metrics
        results["files"][f"scores{suffix}"] = score_path
        results["files"][f"det{suffix}"] = det_path
        logger.info(
            f"{name} scoring: EER {100 * metrics['eer']:.2f}%, "
            f"minDCF(0.01) {metrics['min_dcf_0.01']:.4f}, "
            f"minDCF(0.05) {metrics['min_dcf_0.05']:.4f}"
        )

    with open(os.path.join(output_folder, "results.json"), "w") as fout:
        json.dump(results, fout, indent=2)
    return results


def run_test_stage(brain, hparams):
    """Evaluates the best checkpoint (lowest dev error) on the trial lists.

    With one ``verification_file`` the results go to ``output_folder``;
    with a list of them (e.g. VoxCeleb1-O, E and H), each list's results
    go to ``<output_folder>/<list name>/``.

    Arguments
    ---------
    brain : SpeakerBrain
        The brain after ``fit``.
    hparams : dict
        The loaded hyperparameters.

    Returns
    -------
    results : dict
        Trial list -> what ``verify`` returned for it.
    """
    checkpoint = brain.checkpointer.find_checkpoint(min_key="ErrorRate")
    if checkpoint is None:
        raise FileNotFoundError(
            "No end-of-epoch checkpoint in "
            f"{brain.checkpointer.checkpoints_dir}: train the model before "
            "testing it."
        )
    brain.checkpointer.load_checkpoint(checkpoint)
    logger.info(f"Testing the checkpoint {checkpoint.path}")

    cohort = []  # computed once, for the first trial list that needs it

    def cohort_fn():
        if not cohort:
            cohort.append(speaker_cohort(brain, hparams))
        return cohort[0]

    trial_files = hparams["verification_file"]
    if not isinstance(trial_files, list):
        trial_files = [trial_files]
    all_results = {}
    for trial_file in trial_files:
        output_folder = hparams["output_folder"]
        if len(trial_files) > 1:
            name = os.path.splitext(os.path.basename(trial_file))[0]
            output_folder = os.path.join(output_folder, name)
        trials = read_trials(trial_file)
        rows = trial_rows(trials, trial_file, hparams)
        results = verify(
            brain,
            hparams,
            embedding_dataset(rows, hparams),
            trials,
            output_folder,
            cohort_fn=cohort_fn,
            info={
                "checkpoint": str(checkpoint.path),
                "verification_file": os.path.abspath(trial_file),
            },
        )
        all_results[trial_file] = results

        test_stats = {}
        for name, suffix in (("cosine", ""), ("s-norm", "_snorm")):
            if name in results:
                metrics = results[name]
                test_stats["EER" + suffix] = round(100 * metrics["eer"], 3)
                for p_target in ("0.01", "0.05"):
                    test_stats[f"minDCF_{p_target}{suffix}"] = round(
                        metrics[f"min_dcf_{p_target}"], 4
                    )
        brain.hparams.train_logger.log_stats(
            stats_meta={
                "Epoch loaded": hparams["epoch_counter"].current,
                "trials": os.path.basename(trial_file),
            },
            test_stats=test_stats,
        )
    return all_results


def trial_rows(trials, trial_file, hparams):
    """The rows of the prepared test CSV, in the order of a trial list.

    The order (with the sort by duration) decides the batches, and padding
    in a batch changes embeddings slightly: verify.py and the pretrained
    interface embed trial utterances in this order too, so that all three
    give the same scores.

    Arguments
    ---------
    trials : list of (label, enrol_id, test_id)
        The trials of ``trial_file``.
    trial_file : str
        The trial list, named in errors.
    hparams : dict
        The loaded hyperparameters (``test_annotation`` names the CSV).

    Returns
    -------
    rows : dict
        Utterance id -> CSV fields, for ``embedding_dataset``.
    """
    rows = sb.dataio.dataio.load_data_csv(
        hparams["test_annotation"], replacements=_replacements(hparams)
    )
    ordered = {}
    for utt_id in trial_utterances(trials):
        if utt_id not in rows:
            raise KeyError(
                f"{trial_line(trial_file, utt_id)}: utterance {utt_id!r} is "
                f"not in {hparams['test_annotation']}; delete that file to "
                "prepare it again for this trial list."
            )
        ordered[utt_id] = rows[utt_id]
    return ordered


def trial_line(trials_path, utt_id):
    """Names the first line of a trial list that mentions an utterance.

    Arguments
    ---------
    trials_path : str
        The trial list.
    utt_id : str
        The utterance id (its path without ``.wav``).

    Returns
    -------
    where : str
        "<trials_path>, line <n>", for error messages.
    """
    with open(trials_path, encoding="utf-8") as trial_file:
        for number, line in enumerate(trial_file, start=1):
            if utt_id in line.split() or utt_id + ".wav" in line.split():
                return f"{trials_path}, line {number}"
    return str(trials_path)


def check_model_sizes(hparams):
    """Checks that the back-end fits the WavLM that was loaded."""
    wavlm = hparams["wavlm"]
    if (
        wavlm.output_size != hparams["wavlm_dim"]
        or wavlm.num_hidden_states != hparams["wavlm_layers"] + 1
    ):
        raise ValueError(
            f"{hparams['wavlm_source']} has {wavlm.num_hidden_states - 1} "
            f"layers of width {wavlm.output_size}, but the hparams say "
            f"wavlm_layers={hparams['wavlm_layers']}, wavlm_dim="
            f"{hparams['wavlm_dim']}: pass --wavlm_layers="
            f"{wavlm.num_hidden_states - 1} --wavlm_dim={wavlm.output_size}."
        )


def _file_samples(seconds, start, stop, duration):
    """Samples of the file (at its own rate) spanning ``seconds``."""
    if duration > 0:
        return int(math.ceil(seconds * (stop - start) / duration))
    return stop - start


def _replacements(hparams):
    """CSV replacements: $data_root is the (first) data folder."""
    data_folder = hparams["data_folder"]
    if isinstance(data_folder, list):
        data_folder = data_folder[0]
    return {"data_root": data_folder}


def _trainable(module):
    """The parameters of a module that require a gradient."""
    return [param for param in module.parameters() if param.requires_grad]


def _unwrap(module):
    """The module itself, out of a DDP or DataParallel wrapper."""
    wrappers = (
        torch.nn.parallel.DistributedDataParallel,
        torch.nn.DataParallel,
    )
    return module.module if isinstance(module, wrappers) else module


if __name__ == "__main__":
    # CLI:
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])

    # Initialize ddp (useful only for multi-GPU DDP training)
    sb.utils.distributed.ddp_init_group(run_opts)

    # Load hyperparameters file with command-line overrides
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    # Create experiment directory
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    check_model_sizes(hparams)

    # Dataset prep (parsing VoxCeleb and the trial list into csv files)
    from voxceleb_prepare import prepare_voxceleb  # noqa: E402

    run_on_main(
        prepare_voxceleb,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["save_folder"],
            "verification_pairs_file": hparams["verification_file"],
            "split_ratio": hparams["split_ratio"],
            "seed": hparams["seed"],
            "skip_prep": hparams["skip_prep"],
        },
    )

    # Dataset IO prep: creating Dataset objects and the label encoder
    train_data, valid_data, label_encoder = dataio_prep(hparams)

    # Brain class initialization
    speaker_brain = SpeakerBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )

    # Training
    speaker_brain.fit(
        speaker_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=hparams["train_dataloader_options"],
        valid_loader_kwargs=hparams["valid_dataloader_options"],
    )

    # Verification on the trial list, on the main process only
    run_on_main(run_test_stage, args=[speaker_brain, hparams])
