"""Training and inference cost of dynamic prompts against their baselines.

Compares, on randomly initialised WavLMs of the released sizes (Base+ and
Large, written once per size with ``save_tiny_wavlm`` and loaded through
``from_pretrained`` like a hub checkpoint), four ways of adapting WavLM:

* ``dynamic``: the paper's speaker-aware dynamic prompts on a frozen WavLM
  (one shared pool, M=15 prompts of T'=5 frames, N=3 picked per utterance
  and layer, so 15 prompt frames per layer);
* ``static``: N*T' = 15 learnable prompt frames per layer, frozen WavLM;
* ``none``: frozen WavLM without prompts (only the back-end trains);
* ``full``: full fine-tuning of the transformer (``freeze=False``; the CNN
  stays frozen as usual).

Two more configurations serve as references: ``none+15f``, the frozen WavLM
on an input lengthened by N*T' frames (15 * 320 samples), which is the
floor for dynamic inference since every layer then sees as many frames as
with prompts; and ``dynamic+ckpt``, dynamic prompts with gradient
checkpointing, at the longest input length only.

For every configuration, a batch of ``--batch`` random waveforms of each
length in ``--seconds`` (relative lengths all 1, as with equal crops):

trainable parameters
    Parameters of the encoder (``PromptedWavLM``) with ``requires_grad``,
    and their share of all its parameters. The back-end below trains in
    every mode and is counted apart.
training step
    Forward, a small back-end (softmax-weighted sum of all hidden states,
    time mean, linear layer to 192 dimensions) with the loss ``mean(e^2)``,
    backward and an optimizer step: SGD (lr 0.01, momentum 0.9, weight
    decay 1e-4, as the paper's recipe) for the prompt modes and the frozen
    baseline, Adam for full fine-tuning. WavLM's LayerDrop is set to
    ``--layerdrop`` (default 0, so that every step runs every layer and a
    few steps give a stable time); dropout keeps its default, so it is
    active when fine-tuning.
peak memory
    Each configuration runs in a fresh subprocess. On CPU: peak resident
    set size (``getrusage`` ``ru_maxrss``) after the training steps minus
    the resident set size after the imports, so model weights,
    activations, gradients and optimizer state all count. On CUDA:
    ``torch.cuda.max_memory_allocated`` over the training steps (the peak
    is reset once the model is on the GPU, whose weights stay allocated
    and so count).
inference
    The encoder forward alone, in eval mode under ``torch.no_grad``.
    Fine-tuning changes WavLM's weights, not its computation, so the
    ``full`` model is not run for inference: its inference cost is that of
    ``none``.
prompt selection
    For ``dynamic``, every pool's ``select`` (query, cosine similarity,
    top-N) is wrapped with ``perf_counter`` timers during the inference
    passes, and its summed time is given as a share of the encoder
    forward; the CNN is timed the same way, to give the share of the
    transformer part too. On CUDA both timers synchronise, so they run in
    passes of their own, apart from the timed ones.

Timing: on CPU, ``torch.set_num_threads`` is set to the usable cores and
float32 is used; one warm-up call on a 0.5 s input runs first, then a
full-size warm-up call when the extrapolated full-size call is short
(under 20 s), then timed calls until ``--steps`` calls are done or the next
would exceed ``--budget`` seconds (at least one call); the median is
reported with the number of calls behind it. On CUDA: bf16 autocast, two
full-size warm-up calls, ``torch.cuda.synchronize`` around every timed call.

Busy machines: every timed call also records the process CPU time, and
every worker the 1-minute load average; when other processes competed for
the cores, a warning says so, and the ratios are also given in CPU time
and the selection share from medians (median ``select`` call x calls per
pass / median pass), which single stalled calls sway less. On a machine
shared with other jobs, ``--threads 1`` gives far steadier numbers: with
every core's thread in each parallel region, one descheduled thread
stalls the others (and their spinning inflates the CPU time too).

Targets (checked and printed as PASS/FAIL, never asserted), per size:

1. dynamic training step <= 0.7x the time of a full fine-tuning step
   (shortest length, 2 s by default);
2. dynamic peak training memory <= 0.5x that of full fine-tuning,
   optimizer state included (shortest length);
3. dynamic with gradient checkpointing <= 0.5x full fine-tuning's peak
   memory (longest length, 8 s by default);
4. dynamic inference <= 1.05x the ``none+15f`` floor (every length),
   judged on paired calls: the dynamic worker loads the floor model beside
   its own and alternates their calls, and the median of the pairs' ratios
   is checked (the ratio of the two separate workers' medians is shown
   beside it);
5. prompt selection <= 2 % of the encoder forward (every length).

Usage::

    python benchmarks/bench_cost.py --out bench_output/cost.json
    python benchmarks/bench_cost.py --quick        # Base+, 2 s: smoke run
    python benchmarks/bench_cost.py --device cuda  # bf16, on a GPU
    python benchmarks/bench_cost.py --sizes tiny --seconds 1  # the script

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SAMPLE_RATE = 16000
HOP = 320  # samples per WavLM frame
POOL = dict(num_prompts=15, prompt_len=5, top_n=3, pool_per_layer=False)
PROMPT_FRAMES = POOL["top_n"] * POOL["prompt_len"]
EMBEDDING_DIM = 192
SHORT_WARMUP_SECONDS = 0.5
FULL_WARMUP_MAX_S = 20.0  # CPU: skip the full-size warm-up above this
RESULT_TAG = "BENCH_RESULT "

# size name -> style of save_tiny_wavlm ("tiny": a 3-layer pre-LN WavLM
# with D=32, to test this script itself in seconds)
SIZES = {"base-plus": "base-plus", "large": "large-full", "tiny": "large"}

# configuration name -> PromptedWavLM arguments and what is measured
CONFIGS = {
    "dynamic": dict(prompt_mode="dynamic", freeze=True, infer=True),
    "static": dict(prompt_mode="static", freeze=True, infer=True),
    "none": dict(prompt_mode="none", freeze=True, infer=True),
    "full": dict(prompt_mode="none", freeze=False, infer=False),
    "none+15f": dict(
        prompt_mode="none",
        freeze=True,
        train=False,
        infer=True,
        extra=PROMPT_FRAMES,
    ),
    "dynamic+ckpt": dict(
        prompt_mode="dynamic", freeze=True, ckpt=True, infer=False
    ),
}

TARGETS = {
    "train_time": 0.7,
    "train_memory": 0.5,
    "ckpt_memory": 0.5,
    "infer_floor": 1.05,
    "selection_share": 0.02,
}


# --------------------------------------------------------------------------
# Worker: one configuration, in a fresh process
# --------------------------------------------------------------------------


def current_rss_mb():
    """Resident set size of this process now, in MiB.

    Returns
    -------
    rss : float
    """
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB.

    Returns
    -------
    peak : float
        ``ru_maxrss`` (KiB on Linux).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_call(run, inputs, sync, cpu_times=None):
    """Wall-clock time of one call, synchronised on both sides.

    Arguments
    ---------
    run : callable
        Called as ``run(*inputs)``.
    inputs : tuple
        Its arguments.
    sync : callable
        Waits for queued device work (a no-op on CPU).
    cpu_times : list, optional
        Receives the process CPU time of the call (all threads).

    Returns
    -------
    seconds : float
    """
    sync()
    cpu_start = time.process_time()
    start = time.perf_counter()
    run(*inputs)
    sync()
    seconds = time.perf_counter() - start
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    return seconds


def load_average():
    """The 1-minute load average, or None where it cannot be read."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def time_calls(run, full, short, sync, steps, budget, cuda, before_timed=None):
    """Warms up, then times calls of ``run`` on the full-size inputs.

    Arguments
    ---------
    run : callable
        One training step or one forward pass, ``run(wavs, wav_lens)``.
    full : tuple
        Full-size inputs.
    short : tuple
        0.5 s inputs for a cheap first warm-up call (CPU).
    sync : callable
        Device synchronisation.
    steps : int
        At most this many timed calls.
    budget : float
        No further timed call starts when it would end past this many
        seconds of timed calls (extrapolated from the last one); at least
        one call is timed.
    cuda : bool
        Two full-size warm-up calls instead of the CPU policy.
    before_timed : callable, optional
        Called once after the warm-up, before the first timed call.

    Returns
    -------
    timing : dict
        ``median`` and all ``times`` in seconds, the process CPU time of
        each timed call (``cpu_times``), and ``warmup``: the warm-up calls
        that ran.
    """
    if cuda:
        warmup = ["full", "full"]
    else:
        short_time = timed_call(run, short, sync)
        warmup = ["0.5s"]
        ratio = full[0].shape[1] / short[0].shape[1]
        if short_time * ratio <= FULL_WARMUP_MAX_S:
            warmup.append("full")
    for kind in warmup:
        if kind == "full":
            run(*full)
    if before_timed is not None:
        before_timed()
    times, cpu_times = [], []
    while len(times) < steps:
        times.append(timed_call(run, full, sync, cpu_times))
        if sum(times) + times[-1] > budget:
            break
    return dict(
        median=statistics.median(times),
        times=times,
        cpu_times=cpu_times,
        warmup=warmup,
    )


def time_against_floor(forward, full, spec, device, autocast, **measure):
    """Times dynamic inference and its floor side by side, call by call.

    The floor (the frozen model without prompts on an input N*T' frames
    longer) is loaded beside the dynamic model, and the two alternate:
    one dynamic call, one floor call, and so on. Each pair runs within
    seconds, so a slow spell of the machine slows both calls of a pair,
    and the median of the pairs' ratios is far steadier than a ratio of
    two medians taken minutes apart in different processes.

    Arguments
    ---------
    forward : callable
        The dynamic model's inference call, ``forward(wavs, wav_lens)``.
    full : tuple
        Its full-size inputs.
    spec : dict
        The worker's spec (``folder``).
    device : torch.device
    autocast : callable
        The worker's autocast context.
    **measure
        ``sync``, ``steps``, ``budget`` and ``cuda``, as ``time_calls``.

    Returns
    -------
    paired : dict
        ``dynamic`` and ``floor`` call times, in pairs, and
        ``ratio_median``, the median of dynamic / floor over the pairs.
    """
    import torch

    from dynprompt_sb.prompted_wavlm import PromptedWavLM

    floor = PromptedWavLM(spec["folder"], prompt_mode="none", **POOL)
    floor = floor.to(device).eval()
    wavs, wav_lens = full
    extra = torch.zeros(wavs.shape[0], PROMPT_FRAMES * HOP, device=device)
    floor_inputs = (torch.cat([wavs, extra], dim=1), wav_lens)

    def floor_forward(wavs, wav_lens):
        with torch.no_grad(), autocast():
            floor(wavs, wav_lens)

    sync = measure["sync"]
    for _ in range(2 if measure["cuda"] else 1):
        forward(*full)
        floor_forward(*floor_inputs)
    dynamic_times, floor_times = [], []
    while len(dynamic_times) < measure["steps"]:
        dynamic_times.append(timed_call(forward, full, sync))
        floor_times.append(timed_call(floor_forward, floor_inputs, sync))
        spent = sum(dynamic_times) + sum(floor_times)
        if spent + dynamic_times[-1] + floor_times[-1] > 2 * measure["budget"]:
            break
    ratios = [d / f for d, f in zip(dynamic_times, floor_times, strict=True)]
    return dict(
        dynamic=dynamic_times,
        floor=floor_times,
        ratio_median=statistics.median(ratios),
    )


class SelectionTimer:
    """Sums the time spent in prompt selection and in the CNN.

    Wraps every pool's ``select`` and the feature extractor's ``forward``
    with ``perf_counter`` timers, as instance attributes so that the
    classes stay untouched; ``remove`` restores them.

    Arguments
    ---------
    model : PromptedWavLM
        A model in "dynamic" prompt mode.
    sync : callable
        Device synchronisation, called around every timed call.
    """

    def __init__(self, model, sync):
        self.sync = sync
        self.reset()
        self.wrapped = [(pool, "select") for pool in model.pools]
        self.wrapped.append((model.wavlm.feature_extractor, "forward"))
        for owner, name in self.wrapped:
            key = "select" if name == "select" else "cnn"
            setattr(owner, name, self._wrap(getattr(owner, name), key))

    def _wrap(self, function, key):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            output = function(*args, **kwargs)
            self.sync()
            elapsed = time.perf_counter() - start
            self.seconds[key] += elapsed
            self.calls[key] += 1
            if key == "select":
                self.select_times.append(elapsed)
            return output

        return timed

    def reset(self):
        """Sets the sums to zero."""
        self.seconds = {"select": 0.0, "cnn": 0.0}
        self.calls = {"select": 0, "cnn": 0}
        self.select_times = []

    def remove(self):
        """Restores the unwrapped methods."""
        for owner, name in self.wrapped:
            delattr(owner, name)

    def summary(self, forward_times):
        """Shares of the forward spent in selection.

        Arguments
        ---------
        forward_times : list of float
            Times of the forward passes the timers saw.

        Returns
        -------
        selection : dict
            Seconds in ``select``, in the CNN and in the whole forward,
            the ``select`` calls, the share of the whole forward
            (``share``, the target's measure) and that of the forward
            without the CNN. ``share_median`` (median ``select`` call x
            calls per pass / median pass) is less swayed by other
            processes stalling single calls on a busy machine.
        """
        select, cnn = self.seconds["select"], self.seconds["cnn"]
        forward = sum(forward_times)
        per_pass = self.calls["select"] / len(forward_times)
        return dict(
            passes=len(forward_times),
            select_calls=self.calls["select"],
            select_s=select,
            select_call_median_ms=1e3 * statistics.median(self.select_times),
            cnn_s=cnn,
            forward_s=forward,
            share=select / forward,
            share_of_transformer=select / max(forward - cnn, 1e-9),
            share_median=statistics.median(self.select_times)
            * per_pass
            / statistics.median(forward_times),
        )


def build_head(num_states, dim):
    """The small back-end every mode trains.

    Arguments
    ---------
    num_states : int
        Hidden states handed on by the encoder, L + 1.
    dim : int
        Their width D.

    Returns
    -------
    head : torch.nn.Module
        Softmax-weighted layer sum, mean over time, linear layer to a
        192-dimensional embedding.
    """
    import torch.nn as nn

    from dynprompt_sb.layer_sum import WeightedLayerSum

    class TimeMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=1)

    return nn.Sequential(
        WeightedLayerSum(num_states),
        TimeMean(),
        nn.Linear(dim, EMBEDDING_DIM),
    )


def run_worker(spec):
    """Measures one configuration; prints its result as a tagged JSON line.

    Arguments
    ---------
    spec : dict
        ``folder``, ``size``, ``config``, ``seconds``, ``batch``,
        ``device``, ``threads``, ``steps`` and ``budget``.
    """
    import warnings

    import torch
    import transformers

    from dynprompt_sb.prompted_wavlm import PromptedWavLM

    warnings.filterwarnings("ignore", message="Support for mismatched")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    config = CONFIGS[spec["config"]]
    rss_imports = current_rss_mb()
    load_start = load_average()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    model = PromptedWavLM(
        spec["folder"],
        prompt_mode=config["prompt_mode"],
        freeze=config["freeze"],
        gradient_checkpointing=config.get("ckpt", False),
        **POOL,
    ).to(device)
    head = build_head(model.num_hidden_states, model.output_size).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    result = dict(
        spec,
        trainable=sum(p.numel() for p in trainable),
        total=total,
        head_params=sum(p.numel() for p in head.parameters()),
    )
    result["trainable_share"] = result["trainable"] / total
    if not cuda:
        result["rss_after_load_mb"] = current_rss_mb() - rss_imports

    def batch(samples):
        wavs = 0.1 * torch.randn(spec["batch"], samples, device=device)
        return wavs, torch.ones(spec["batch"], device=device)

    samples = round(spec["seconds"] * SAMPLE_RATE)
    samples += config.get("extra", 0) * HOP
    result["samples"] = samples
    full = batch(samples)
    short = batch(round(SHORT_WARMUP_SECONDS * SAMPLE_RATE))
    measure = dict(
        sync=sync, steps=spec["steps"], budget=spec["budget"], cuda=cuda
    )

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    if config.get("train", True):
        params = trainable + list(head.parameters())
        if config["freeze"]:
            optimizer = torch.optim.SGD(
                params, lr=0.01, momentum=0.9, weight_decay=1e-4
            )
        else:
            optimizer = torch.optim.Adam(params, lr=1e-5)
        result["optimizer"] = type(optimizer).__name__
        model.train()
        head.train()

        def train_step(wavs, wav_lens):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                embeddings = head(model(wavs, wav_lens))
            loss = embeddings.float().pow(2).mean()
            loss.backward()
            optimizer.step()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        result["train"] = time_calls(train_step, full, short, **measure)
        if cuda:
            result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            result["peak_mb"] = peak_rss_mb() - rss_imports
        optimizer.zero_grad(set_to_none=True)
        del optimizer

    if config["infer"]:
        model.eval()

        def forward(wavs, wav_lens):
            with torch.no_grad(), autocast():
                model(wavs, wav_lens)

        dynamic = config["prompt_mode"] == "dynamic"
        timer = None
        if dynamic and not cuda:
            # Timers without synchronisation cost microseconds per layer:
            # read them on the timed passes themselves.
            timer = SelectionTimer(model, sync)
        result["infer"] = time_calls(
            forward,
            full,
            short,
            before_timed=timer.reset if timer else None,
            **measure,
        )
        if timer is not None:
            timer.remove()
            result["selection"] = timer.summary(result["infer"]["times"])
        elif dynamic:
            # Synchronising timers distort the timed passes: time apart.
            timer = SelectionTimer(model, sync)
            times = [timed_call(forward, full, sync) for _ in range(3)]
            timer.remove()
            result["selection"] = timer.summary(times)
        if dynamic:
            result["paired_floor"] = time_against_floor(
                forward, full, spec, device, autocast, **measure
            )
    result["load_average"] = [load_start, load_average()]
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# Driver: plans the runs, spawns the workers, reports
# --------------------------------------------------------------------------


def plan_runs(sizes, seconds):
    """The configurations to measure, in order.

    Arguments
    ---------
    sizes : list of str
        Keys of ``SIZES``.
    seconds : list of float
        Input lengths.

    Returns
    -------
    runs : list of tuple
        ``(size, seconds, config)``; ``dynamic+ckpt`` at the longest
        length only.
    """
    runs = []
    for size in sizes:
        for length in seconds:
            for config in ("dynamic", "static", "none", "full", "none+15f"):
                runs.append((size, length, config))
        runs.append((size, max(seconds), "dynamic+ckpt"))
    return runs


def spawn_worker(spec):
    """Runs one configuration in a fresh Python process.

    Arguments
    ---------
    spec : dict
        Passed on to ``run_worker``.

    Returns
    -------
    result : dict
        The worker's result, or the spec with an ``error``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])
    )
    command = [sys.executable, os.path.abspath(__file__)]
    command += ["--worker", json.dumps(spec)]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    error = (process.stderr or process.stdout).strip().splitlines()[-5:]
    return dict(
        spec, error=f"exit code {process.returncode}: " + "\n".join(error)
    )


def machine_info(device):
    """CPU, core count, library versions and the device measured on.

    Arguments
    ---------
    device : str
        "cpu" or "cuda".

    Returns
    -------
    info : dict
    """
    import torch
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(
        cpu_model=cpu_model,
        cpu_cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
    )
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = cpu_model
        info["threads"] = torch.get_num_threads()
    return info


def find(results, size, seconds, config):
    """The result of one configuration, or None if missing or failed."""
    for result in results:
        if (
            result["size"] == size
            and result["seconds"] == seconds
            and result["config"] == config
            and "error" not in result
        ):
            return result
    return None


def _value(result, key):
    """A measured value of one configuration, or None.

    ``key`` is "train" or "infer" (median wall time), "train_cpu" or
    "infer_cpu" (median process CPU time), or "peak_mb".
    """
    if result is None:
        return None
    if key == "peak_mb":
        return result.get("peak_mb")
    timing = result.get(key.removesuffix("_cpu"))
    if not timing:
        return None
    if key.endswith("_cpu"):
        return statistics.median(timing["cpu_times"])
    return timing["median"]


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compute_ratios(results, sizes, seconds):
    """Ratios of dynamic prompts to full fine-tuning and to the floors.

    Arguments
    ---------
    results : list of dict
        Worker results.
    sizes : list of str
    seconds : list of float

    Returns
    -------
    ratios : dict
        ``{size: {seconds: {name: ratio or None}}}``.
    """
    ratios = {}
    for size in sizes:
        ratios[size] = {}
        for length in seconds:

            def get(config, key, length=length, size=size):
                return _value(find(results, size, length, config), key)

            dynamic = find(results, size, length, "dynamic")
            selection = (dynamic or {}).get("selection") or {}
            entry = {
                "dynamic/full train time": _ratio(
                    get("dynamic", "train"), get("full", "train")
                ),
                "dynamic/full peak memory": _ratio(
                    get("dynamic", "peak_mb"), get("full", "peak_mb")
                ),
                "static/full train time": _ratio(
                    get("static", "train"), get("full", "train")
                ),
                "none/full train time": _ratio(
                    get("none", "train"), get("full", "train")
                ),
                "dynamic/none+15f inference, paired": (
                    (dynamic or {}).get("paired_floor") or {}
                ).get("ratio_median"),
                "dynamic/none+15f inference": _ratio(
                    get("dynamic", "infer"), get("none+15f", "infer")
                ),
                "dynamic/full train CPU time": _ratio(
                    get("dynamic", "train_cpu"), get("full", "train_cpu")
                ),
                "dynamic/none+15f inference CPU": _ratio(
                    get("dynamic", "infer_cpu"), get("none+15f", "infer_cpu")
                ),
                "dynamic/none inference": _ratio(
                    get("dynamic", "infer"), get("none", "infer")
                ),
                "static/none+15f inference": _ratio(
                    get("static", "infer"), get("none+15f", "infer")
                ),
                "selection share of forward": selection.get("share"),
                "selection share without CNN": selection.get(
                    "share_of_transformer"
                ),
                "selection share (medians)": selection.get("share_median"),
            }
            if find(results, size, length, "dynamic+ckpt"):
                entry["dynamic+ckpt/full peak memory"] = _ratio(
                    get("dynamic+ckpt", "peak_mb"), get("full", "peak_mb")
                )
                entry["dynamic+ckpt/full train time"] = _ratio(
                    get("dynamic+ckpt", "train"), get("full", "train")
                )
            ratios[size][length] = entry
    return ratios


def check_targets(ratios, sizes, seconds):
    """PASS/FAIL of the five targets, one entry per target and size.

    The verdict uses the measure the target names (wall time, peak
    memory, summed selection time); where a steadier measure exists for a
    busy machine (CPU time, the median-based selection share) it is shown
    beside it, in brackets, without a verdict of its own. Target 4 is
    judged on the paired calls, with the separate workers' ratio beside.

    Arguments
    ---------
    ratios : dict
        From ``compute_ratios``.
    sizes : list of str
    seconds : list of float

    Returns
    -------
    targets : list of dict
        ``target``, ``size``, ``status`` ("PASS", "FAIL" or "N/A"),
        ``limit``, ``values`` and ``steady_values`` (length -> ratio) and
        a printable ``line``.
    """
    short, long = min(seconds), max(seconds)
    checks = [
        (1, "dynamic train step / full FT", "dynamic/full train time",
         "dynamic/full train CPU time", "CPU time", "train_time", [short]),
        (2, "dynamic peak memory / full FT", "dynamic/full peak memory",
         None, None, "train_memory", [short]),
        (3, "dynamic+ckpt peak memory / full FT",
         "dynamic+ckpt/full peak memory", None, None, "ckpt_memory", [long]),
        (4, "dynamic inference / none on +15 frames, paired calls",
         "dynamic/none+15f inference, paired", "dynamic/none+15f inference",
         "timed in separate processes", "infer_floor", seconds),
        (5, "prompt selection / encoder forward",
         "selection share of forward", "selection share (medians)",
         "medians", "selection_share", seconds),
    ]  # fmt: skip
    targets = []
    for size in sizes:
        for number, label, name, steady, kind, limit_key, lengths in checks:
            limit = TARGETS[limit_key]
            values = {s: ratios[size][s].get(name) for s in lengths}
            known = [v for v in values.values() if v is not None]
            if len(known) < len(values):
                status = "N/A"
            else:
                status = "PASS" if max(known) <= limit else "FAIL"
            percent = limit_key == "selection_share"
            shown = ", ".join(
                f"{_format_ratio(v, percent)} at {s:g} s"
                for s, v in values.items()
            )
            steady_values = {}
            if steady is not None:
                steady_values = {
                    s: ratios[size][s].get(steady) for s in lengths
                }
                shown += f" [{kind}: " + ", ".join(
                    _format_ratio(v, percent) for v in steady_values.values()
                )
                shown += "]"
            bound = f"<= {100 * limit:g} %" if percent else f"<= {limit:g}x"
            line = f"{status} ({number}) {size}: {label}: {shown} ({bound})"
            targets.append(
                dict(
                    target=number,
                    size=size,
                    status=status,
                    limit=limit,
                    values={str(s): v for s, v in values.items()},
                    steady_values={str(s): v for s, v in steady_values.items()},
                    line=line,
                )
            )
    return targets


def _format_ratio(value, percent=False):
    """A ratio as "0.62x", or a share as "1.23 %"; "n/a" for None."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f} %" if percent else f"{value:.2f}x"


def _seconds_cell(timing):
    if not timing:
        return "-"
    return f"{timing['median']:.3f} ({len(timing['times'])})"


def format_table(results, sizes, seconds):
    """The per-configuration table as text.

    Arguments
    ---------
    results : list of dict
    sizes : list of str
    seconds : list of float

    Returns
    -------
    table : str
    """
    header = (
        f"{'size':<10} {'len':>4} {'config':<13} {'trainable':>11} "
        f"{'share %':>8} {'train s (n)':>14} {'peak MiB':>9} "
        f"{'infer s (n)':>13} {'select %':>8} {'load':>5}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        if "error" in result:
            lines.append(
                f"{result['size']:<10} {result['seconds']:>4g} "
                f"{result['config']:<13} FAILED: "
                + result["error"].splitlines()[-1][:60]
            )
            continue
        infer = _seconds_cell(result.get("infer"))
        if result["config"] == "full":
            infer = "= none"
        selection = result.get("selection")
        share = "-" if not selection else f"{100 * selection['share']:.2f}"
        peak = result.get("peak_mb")
        peak = "-" if peak is None else f"{peak:.0f}"
        lines.append(
            f"{result['size']:<10} {result['seconds']:>4g} "
            f"{result['config']:<13} {result['trainable']:>11,} "
            f"{100 * result['trainable_share']:>8.3f} "
            f"{_seconds_cell(result.get('train')):>14} "
            f"{peak:>9} {infer:>13} {share:>8} {_max_load(result):>5}"
        )
    return "\n".join(lines)


def _max_load(result):
    """Highest 1-minute load average seen by a worker, as text."""
    loads = [x for x in result.get("load_average") or [] if x is not None]
    return f"{max(loads):.1f}" if loads else "-"


def busy_warning(results, threads, cores):
    """A warning when other processes competed for the CPU, or None.

    Arguments
    ---------
    results : list of dict
    threads : int
        Threads of each worker (its own share of the load average).
    cores : int
        Usable cores.

    Returns
    -------
    warning : str or None
    """
    loads = [
        x
        for result in results
        for x in result.get("load_average") or []
        if x is not None
    ]
    if not loads or max(loads) - threads <= 0.5:
        return None
    return (
        f"WARNING: the machine was busy: 1-minute load average up to "
        f"{max(loads):.1f} on {cores} cores, of which the benchmark's own "
        f"worker accounts for about {threads}. Wall times are inflated and "
        "noisy, short operations (prompt selection) most; compare the CPU "
        "time ratios and the median-based selection share, and rerun on "
        "an idle machine for numbers to quote."
    )


def format_ratios(ratios):
    """The ratios as text, one block per size and length."""
    lines = []
    for size, by_length in ratios.items():
        for length, entry in by_length.items():
            lines.append(f"{size}, {length:g} s:")
            for name, value in entry.items():
                if value is None:
                    shown = "n/a"
                elif "share" in name:
                    shown = f"{100 * value:.2f} %"
                else:
                    shown = f"{value:.3f}x"
                lines.append(f"  {name:<36} {shown}")
    return "\n".join(lines)


def write_model(folder, style, layerdrop):
    """Writes a randomly initialised WavLM of a released size.

    Arguments
    ---------
    folder : str
    style : str
        "base-plus" or "large-full" (see ``save_tiny_wavlm``).
    layerdrop : float
        WavLM's LayerDrop probability, used by full fine-tuning only.
    """
    import transformers

    from dynprompt_sb.tiny_wavlm import save_tiny_wavlm

    transformers.utils.logging.disable_progress_bar()
    save_tiny_wavlm(folder, style=style, layerdrop=layerdrop)


def parse_args(argv=None):
    """Command-line options; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench_output/cost.json")
    parser.add_argument("--sizes", default="base-plus,large")
    parser.add_argument("--seconds", default="2,8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="most timed calls per measurement (CPU 3, CUDA 10)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed calls per measurement (CPU 45, CUDA 20)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads on CPU (default: the usable cores)",
    )
    parser.add_argument("--layerdrop", type=float, default=0.0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: Base+ at 2 s only"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seconds = "base-plus", "2"
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}: expected {list(SIZES)}")
    args.seconds = sorted({float(s) for s in args.seconds.split(",")})
    cuda = args.device == "cuda"
    if args.steps is None:
        args.steps = 10 if cuda else 3
    if args.budget is None:
        args.budget = 20.0 if cuda else 45.0
    return args


def main(argv=None):
    """Runs every configuration and reports; see the module docstring."""
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    started = time.perf_counter()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available.")
    machine = machine_info(args.device)
    runs = plan_runs(args.sizes, args.seconds)
    print(
        f"{len(runs)} configurations on {machine['device_name']} "
        f"({args.device}, {args.threads} threads), batch {args.batch}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_cost_") as tmp:
        for size in args.sizes:
            folder = os.path.join(tmp, size)
            tic = time.perf_counter()
            write_model(folder, SIZES[size], args.layerdrop)
            print(
                f"wrote {size} ({SIZES[size]}) in "
                f"{time.perf_counter() - tic:.0f} s",
                flush=True,
            )
            for run_size, length, config in runs:
                if run_size != size:
                    continue
                spec = dict(
                    folder=folder,
                    size=size,
                    config=config,
                    seconds=length,
                    batch=args.batch,
                    device=args.device,
                    threads=args.threads,
                    steps=args.steps,
                    budget=args.budget,
                )
                tic = time.perf_counter()
                result = spawn_worker(spec)
                del result["folder"]
                result["wall_s"] = time.perf_counter() - tic
                results.append(result)
                print(_progress(result, started), flush=True)
            shutil.rmtree(folder, ignore_errors=True)

    ratios = compute_ratios(results, args.sizes, args.seconds)
    targets = check_targets(ratios, args.sizes, args.seconds)
    total = time.perf_counter() - started
    print()
    print(format_table(results, args.sizes, args.seconds))
    print(
        "\ntrain/infer: median seconds over (n) timed calls; load: highest "
        "1-minute load average during the configuration; peak: "
        + (
            "max_memory_allocated"
            if args.device == "cuda"
            else "peak RSS minus RSS after imports"
        )
        + "; select %: share of the encoder forward in PromptPool.select"
    )
    print("\nRatios")
    print(format_ratios(ratios))
    warning = None
    if args.device == "cpu":
        warning = busy_warning(results, args.threads, machine["usable_cores"])
    if warning:
        print("\n" + warning)
    print("\nTargets")
    for target in targets:
        print(target["line"])
    print(f"\nTotal run time: {total:.0f} s")

    report = dict(
        machine=machine,
        settings=dict(
            sizes=args.sizes,
            seconds=args.seconds,
            batch=args.batch,
            device=args.device,
            threads=args.threads,
            steps=args.steps,
            budget_s=args.budget,
            layerdrop=args.layerdrop,
            pool=POOL,
            precision="bf16 autocast" if args.device == "cuda" else "fp32",
            memory=(
                "torch.cuda.max_memory_allocated"
                if args.device == "cuda"
                else "ru_maxrss - RSS after imports"
            ),
        ),
        runs=results,
        ratios={
            size: {str(s): v for s, v in by_length.items()}
            for size, by_length in ratios.items()
        },
        targets=targets,
        warning=warning,
        total_seconds=total,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=2)
    print(f"Wrote {args.out}")


def _progress(result, started):
    """One line per finished configuration, for the impatient."""
    elapsed = time.perf_counter() - started
    head = f"[{elapsed:6.0f} s] {result['size']} {result['seconds']:g} s "
    head += f"{result['config']}:"
    if "error" in result:
        return head + " FAILED " + result["error"]
    parts = []
    if result.get("train"):
        parts.append(f"train {_seconds_cell(result['train'])}")
        parts.append(f"peak {result['peak_mb']:.0f} MiB")
    if result.get("infer"):
        parts.append(f"infer {_seconds_cell(result['infer'])}")
    if result.get("selection"):
        parts.append(f"select {100 * result['selection']['share']:.2f} %")
    parts.append(f"(worker {result['wall_s']:.0f} s)")
    return head + " " + ", ".join(parts)


if __name__ == "__main__":
    main()
