"""Turns a training run into a self-contained pretrained model folder.

A run of recipes/VoxCeleb/SpeakerRec/train.py leaves ``hyperparams.yaml``
(with every override applied), checkpoints in ``save/CKPT+...``,
``save/label_encoder.txt`` and, after its test stage, ``results.json``.
``export_model`` picks the best (lowest dev error) or the last checkpoint
and writes a folder that ``DynPromptSpeakerRecognition.from_hparams`` loads
offline:

    hyperparams.yaml      hparams/inference.yaml, filled from the run
    wavlm.ckpt            the prompts (the whole WavLM if fine-tuned)
    layer_sum.ckpt        the layer weights
    normalizer.ckpt       the statistics of mean_var_norm
    embedding_model.ckpt  the ECAPA-TDNN
    label_encoder.txt     the training speakers
    wavlm/                the backbone, with ``copy_backbone`` only

Every argument the run gave to the four modules is carried over (sizes,
prompt options, the released-code switches), and the export checks it by
resolving both yaml files and comparing the modules' arguments. The
decision threshold is the EER threshold of the run's cosine scores, taken
from ``results.json`` only when those scores came from the exported
checkpoint.

Authors
 * dynprompt-sb contributors 2026
"""

import collections
import importlib
import inspect
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import warnings

import ruamel.yaml
import yaml
from hyperpyyaml import resolve_references
from ruamel.yaml.comments import CommentedSeq, TaggedScalar
from ruamel.yaml.representer import RoundTripRepresenter

__all__ = ["Tagged", "export_model", "find_run_checkpoint", "resolved_hparams"]

# hparams/ sits beside the package in a source checkout.
TEMPLATE_PATH = (
    pathlib.Path(__file__).resolve().parents[1] / "hparams" / "inference.yaml"
)
HPARAMS_FILE = "hyperparams.yaml"
LABEL_ENCODER_FILE = "label_encoder.txt"
RESULTS_FILE = "results.json"
BACKBONE_FOLDER = "wavlm"
# The recipe keeps the checkpoint with the lowest dev error as "best".
BEST_KEY = "ErrorRate"
CHECKPOINT_CHOICES = ("best", "last")

# Template keys the export sets itself, never copied from the run: the run's
# hub cache is a path of the training machine.
EXPORT_KEYS = ("model_folder", "threshold", "wavlm_source", "wavlm_hub_cache")
# Module arguments that matter only in training (or that the export sets),
# per checkpoint key.
TRAINING_ONLY_ARGS = {
    "wavlm": ("source", "save_path", "gradient_checkpointing"),
}

_PLAIN_REF = re.compile(r"^<([^<>\[\]]+)>$")

Tagged = collections.namedtuple("Tagged", ["tag", "value"])
Tagged.__doc__ = """A yaml node with a tag (``!new:...``), not built."""


def resolved_hparams(yaml_text, overrides=None):
    """Reads a HyperPyYAML file's values without building anything.

    References (``!ref``, ``!copy``) are resolved by HyperPyYAML itself;
    every other tagged node (``!new:``, ``!name:``, ``!PLACEHOLDER``...)
    comes back as a ``Tagged(tag, value)``, so nothing is imported or run.

    Arguments
    ---------
    yaml_text : str
        The yaml file's content.
    overrides : dict, optional
        Values to replace, as in ``load_hyperpyyaml``.

    Returns
    -------
    tree : dict
        Top-level key -> value. A node referenced twice is one object.

    Example
    -------
    >>> tree = resolved_hparams(
    ...     "size: 4\\nlayer: !new:torch.nn.Linear\\n"
    ...     "    in_features: !ref <size> * 2\\n    out_features: 3\\n"
    ... )
    >>> tree["layer"].tag, tree["layer"].value["in_features"]
    ('!new:torch.nn.Linear', 8)
    """
    stream = resolve_references(yaml_text, overrides)
    return yaml.load(stream, Loader=_TaggedLoader) or {}


def find_run_checkpoint(run_folder, checkpoint="best"):
    """Finds the checkpoint of a training run to export.

    Arguments
    ---------
    run_folder : str or os.PathLike
        The run's output folder, holding ``save/CKPT+...``.
    checkpoint : str
        "best": the lowest ``ErrorRate`` (the recipe's choice for its test
        stage); "last": the most recent.

    Returns
    -------
    checkpoint : speechbrain.utils.checkpoints.Checkpoint

    Raises
    ------
    FileNotFoundError
        When the run has no save folder or no (suitable) checkpoint.
    """
    # Imported here: speechbrain is slow to import and the doctests of this
    # module do not need it.
    from speechbrain.utils.checkpoints import Checkpointer

    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(
            f"checkpoint={checkpoint!r}: expected one of {CHECKPOINT_CHOICES}."
        )
    save_folder = os.path.join(os.fspath(run_folder), "save")
    if not os.path.isdir(save_folder):
        raise FileNotFoundError(
            f"Run folder {os.fspath(run_folder)} has no save/ folder: no "
            "checkpoint to export (has the run trained an epoch?)."
        )
    checkpointer = Checkpointer(save_folder)
    if not checkpointer.list_checkpoints():
        raise FileNotFoundError(
            f"No checkpoint (CKPT+...) in {save_folder}: train the model first."
        )
    if checkpoint == "best":
        found = checkpointer.find_checkpoint(min_key=BEST_KEY)
        if found is None:
            raise FileNotFoundError(
                f"No checkpoint in {save_folder} records a dev {BEST_KEY} "
                "(only intra-epoch ones): export the last one instead."
            )
        return found
    return checkpointer.find_checkpoint()


def export_model(
    run_folder,
    out_folder,
    checkpoint="best",
    copy_backbone=False,
    threshold=None,
    overwrite=False,
    template=None,
):
    """Writes a pretrained model folder from a training run.

    Arguments
    ---------
    run_folder : str or os.PathLike
        The run's output folder (``hyperparams.yaml``, ``save/``,
        ``results.json``).
    out_folder : str or os.PathLike
        The model folder to write; it must not exist, or be empty, unless
        ``overwrite``.
    checkpoint : str
        "best" (lowest dev error, the checkpoint the recipe tests) or
        "last".
    copy_backbone : bool
        False: the folder names the backbone as the run did (a hub id; a
        local folder is named by its absolute path, with a warning).
        True: a copy of the backbone goes to ``<out_folder>/wavlm``
        (``save_pretrained``), referenced relative to the folder, so the
        folder works offline and can be moved.
    threshold : float, optional
        The decision threshold; by default the EER threshold of the
        run's cosine scores (``results.json``), which must come from the
        exported checkpoint.
    overwrite : bool
        Replace an existing, non-empty ``out_folder``.
    template : str or os.PathLike, optional
        The yaml template; by default hparams/inference.yaml.

    Returns
    -------
    out_folder : str
        The model folder, for ``DynPromptSpeakerRecognition.from_hparams``.

    Raises
    ------
    FileNotFoundError
        Naming what the run lacks: its hyperparams.yaml, a checkpoint, a
        weight file, the label encoder, results.json.
    ValueError
        When the run's modules do not match the template's, or
        results.json belongs to another checkpoint.

    Example
    -------
    >>> export_model("results/run", "my_model")  # doctest: +SKIP
    'my_model'
    """
    run_folder = os.fspath(run_folder)
    out_folder = os.fspath(out_folder)
    if not os.path.isdir(run_folder):
        raise FileNotFoundError(f"Run folder not found: {run_folder}")
    run_hparams_path = os.path.join(run_folder, HPARAMS_FILE)
    if not os.path.isfile(run_hparams_path):
        raise FileNotFoundError(
            f"Run folder {run_folder} has no {HPARAMS_FILE}: expected the "
            "output folder of a training run (SpeechBrain copies the hparams "
            "there)."
        )
    _check_out_folder(out_folder, run_folder, overwrite)
    template = TEMPLATE_PATH if template is None else template
    if not os.path.isfile(template):
        raise FileNotFoundError(
            f"Model template not found: {template} (it ships in the "
            "repository's hparams/ folder)."
        )

    found = find_run_checkpoint(run_folder, checkpoint)
    with open(run_hparams_path, encoding="utf-8") as run_file:
        run_tree = resolved_hparams(run_file.read())
    with open(template, encoding="utf-8") as template_file:
        template_text = template_file.read()
    loadables = _template_loadables(template_text)
    _check_checkpoint_files(found.path, loadables)
    label_encoder = os.path.join(run_folder, "save", LABEL_ENCODER_FILE)
    if not os.path.isfile(label_encoder):
        raise FileNotFoundError(
            f"Run folder {run_folder} has no save/{LABEL_ENCODER_FILE}."
        )
    run_modules = _run_modules(run_tree, loadables, run_hparams_path)

    threshold_note = "given to the export"
    if threshold is None:
        threshold, threshold_note = _run_threshold(run_folder, found.path)

    wavlm_source = run_modules["wavlm"].value.get("source")
    if not wavlm_source:
        raise ValueError(f"{run_hparams_path}: the wavlm module has no source.")
    wavlm_source = str(wavlm_source)
    if not copy_backbone and os.path.isdir(wavlm_source):
        wavlm_source = os.path.abspath(wavlm_source)
        warnings.warn(
            f"The backbone is the local folder {wavlm_source}: the model "
            "folder names it by its absolute path and works only where it "
            "exists; copy_backbone makes a self-contained folder.",
            stacklevel=2,
        )

    text = _fill_template(
        template_text,
        run_tree,
        run_modules,
        loadables,
        wavlm_source=None if copy_backbone else wavlm_source,
        threshold=float(threshold),
    )
    header = "".join(
        f"# {line}\n"
        for line in (
            "Exported by `dynprompt export` from the training run",
            os.path.abspath(run_folder),
            f"checkpoint {found.path.name} ({checkpoint})",
            f"threshold {float(threshold):.6f}: {threshold_note}",
        )
    )

    parent = os.path.dirname(os.path.abspath(out_folder))
    os.makedirs(parent, exist_ok=True)
    # Written next to its destination and renamed at the end, so that an
    # interrupted export leaves no folder that looks complete.
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out_folder)}.", dir=parent
    )
    try:
        # mkdtemp makes the folder private; a model folder gets the
        # permissions of any folder the user creates.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        for key in loadables:
            shutil.copyfile(
                found.path / f"{key}.ckpt",
                os.path.join(staging, f"{key}.ckpt"),
            )
        shutil.copyfile(
            label_encoder, os.path.join(staging, LABEL_ENCODER_FILE)
        )
        if copy_backbone:
            _copy_backbone(
                wavlm_source,
                run_modules["wavlm"].value.get("save_path"),
                os.path.join(staging, BACKBONE_FOLDER),
            )
        with open(
            os.path.join(staging, HPARAMS_FILE), "w", encoding="utf-8"
        ) as out_file:
            out_file.write(header + text)
        if os.path.isdir(out_folder):
            shutil.rmtree(out_folder)
        os.replace(staging, out_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_folder


def _check_out_folder(out_folder, run_folder, overwrite):
    """Refuses destinations whose replacement would destroy other data."""
    out = os.path.realpath(out_folder)
    run = os.path.realpath(run_folder)
    if out == run or run.startswith(out + os.sep):
        raise FileExistsError(
            f"{out_folder} holds the run {run_folder}: write the model "
            "folder elsewhere."
        )
    if os.path.exists(out_folder) and not os.path.isdir(out_folder):
        raise FileExistsError(f"{out_folder} exists and is not a folder.")
    if not os.path.isdir(out_folder) or not os.listdir(out_folder):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_folder} exists and is not empty; choose a new folder, or "
            "overwrite it (--force)."
        )
    # Overwriting removes the folder: only ever a model folder.
    if not os.path.isfile(os.path.join(out_folder, HPARAMS_FILE)):
        raise FileExistsError(
            f"Not overwriting {out_folder}: it holds files but no "
            f"{HPARAMS_FILE}, so it is no model folder."
        )


def _run_threshold(run_folder, checkpoint_path):
    """The EER threshold of the run's cosine scores, and where it came from."""
    results_path = os.path.join(run_folder, RESULTS_FILE)
    if not os.path.isfile(results_path):
        raise FileNotFoundError(
            f"Run folder {run_folder} has no {RESULTS_FILE}, which holds the "
            "decision threshold: run the recipe's test stage, or give a "
            "threshold."
        )
    with open(results_path, encoding="utf-8") as results_file:
        results = json.load(results_file)
    # The interface scores raw cosines, so the threshold is that of the
    # cosine scores, not of the s-normalised ones.
    metrics = results.get("cosine", results)
    threshold = metrics.get("eer_threshold")
    if threshold is None:
        raise ValueError(
            f"{results_path} holds no cosine eer_threshold; give a threshold."
        )
    tested = results.get("checkpoint")
    if tested and pathlib.Path(tested).name != checkpoint_path.name:
        raise ValueError(
            f"{results_path} scores checkpoint {pathlib.Path(tested).name}, "
            f"not the exported {checkpoint_path.name}: its threshold does not "
            "apply. Export that checkpoint, test this one, or give a "
            "threshold."
        )
    eer = metrics.get("eer")
    eer_note = f", EER {100 * eer:.2f}%" if eer is not None else ""
    return float(threshold), f"the EER threshold in results.json{eer_note}"


def _template_loadables(template_text):
    """Checkpoint key -> template module name, from the pretrainer."""
    tree = resolved_hparams(
        template_text, {"model_folder": "model", "threshold": 0.0}
    )
    pretrainer = tree.get("pretrainer")
    if not isinstance(pretrainer, Tagged) or "loadables" not in (
        pretrainer.value or {}
    ):
        raise ValueError("The model template defines no pretrainer loadables.")
    loadables = {}
    for key, node in pretrainer.value["loadables"].items():
        names = [
            name
            for name, value in tree.items()
            if value is node and name not in ("modules", "pretrainer")
        ]
        if not names:
            raise ValueError(
                f"The model template's loadable {key!r} is no top-level node."
            )
        loadables[key] = names[0]
    if "wavlm" not in loadables:
        raise ValueError("The model template has no 'wavlm' loadable.")
    return loadables


def _check_checkpoint_files(checkpoint_path, loadables):
    """Names every weight file the checkpoint lacks."""
    missing = [
        f"{key}.ckpt"
        for key in loadables
        if not (checkpoint_path / f"{key}.ckpt").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_path} lacks {', '.join(missing)}."
        )


def _run_modules(run_tree, loadables, run_hparams_path):
    """Checkpoint key -> the run's module node, via its checkpointer."""
    checkpointer = run_tree.get("checkpointer")
    recoverables = None
    if isinstance(checkpointer, Tagged) and isinstance(
        checkpointer.value, dict
    ):
        recoverables = checkpointer.value.get("recoverables")
    if not isinstance(recoverables, dict):
        raise ValueError(
            f"{run_hparams_path} has no checkpointer with recoverables: "
            "cannot tell which module each checkpoint file holds."
        )
    modules = {}
    for key in loadables:
        node = recoverables.get(key)
        if not isinstance(node, Tagged) or not isinstance(node.value, dict):
            raise ValueError(
                f"{run_hparams_path}: the checkpointer has no {key!r} module "
                "built with keyword arguments."
            )
        modules[key] = node
    return modules


def _fill_template(
    template_text, run_tree, run_modules, loadables, wavlm_source, threshold
):
    """The template's text with the run's sizes, options and threshold.

    Top-level values shared with the run come first; then each value a
    module argument refers to (``!ref <name>``) takes the run's argument;
    then any argument that still differs is written literally. The result
    is checked: its modules' arguments equal the run's.
    """
    rt_yaml = _round_trip_yaml()
    tree = rt_yaml.load(template_text)
    template_tree = resolved_hparams(
        template_text, {"model_folder": "model", "threshold": 0.0}
    )
    module_names = set(loadables.values())

    for name in list(tree):
        run_value = run_tree.get(name)
        if (
            name in EXPORT_KEYS
            or name in ("modules", "pretrainer")
            or isinstance(template_tree.get(name), Tagged)
            or name not in run_tree
            or isinstance(run_value, Tagged)
        ):
            continue
        tree[name] = _plain(run_value)

    for key, module_name in loadables.items():
        node = tree[module_name]
        run_node = run_modules[key]
        template_tag = template_tree[module_name].tag
        if run_node.tag != template_tag:
            raise ValueError(
                f"The run's {key!r} module is {run_node.tag}, the model "
                f"template builds {template_tag}: export cannot convert it."
            )
        skip = TRAINING_ONLY_ARGS.get(key, ())
        for arg, value in list(node.items()):
            if arg in skip or not isinstance(value, TaggedScalar):
                continue
            match = _PLAIN_REF.match(str(value.value))
            if value.tag.value != "!ref" or match is None:
                continue
            referenced = match.group(1)
            if referenced in EXPORT_KEYS or referenced in module_names:
                continue
            if arg in run_node.value:
                tree[referenced] = _plain(run_node.value[arg])
            else:
                # The run left it at the class default: name that value.
                default = _default_argument(run_node.tag, arg)
                if default is _NO_DEFAULT:
                    _delete_arg(node, arg)
                else:
                    tree[referenced] = _plain(default)

    if wavlm_source is None:
        tree["wavlm_source"] = TaggedScalar(
            f"<model_folder>/{BACKBONE_FOLDER}", tag="!ref"
        )
    else:
        tree["wavlm_source"] = wavlm_source
    tree["threshold"] = threshold

    # What shared names could not say (a size written literally in the
    # run, an argument the template lacks) is written literally.
    for key, module_name in loadables.items():
        differing = _differing_args(
            _dump(rt_yaml, tree), key, module_name, run_modules[key]
        )
        node = tree[module_name]
        for arg, (_, run_value) in differing.items():
            if run_value is _MISSING:
                _delete_arg(node, arg)
            else:
                _set_arg(node, arg, _plain(run_value))

    text = _dump(rt_yaml, tree)
    for key, module_name in loadables.items():
        differing = _differing_args(text, key, module_name, run_modules[key])
        if differing:
            raise RuntimeError(
                f"Export bug: module {module_name!r} still differs from the "
                f"run's in {sorted(differing)}."
            )
    return text


_MISSING = object()
_NO_DEFAULT = object()


def _differing_args(text, key, module_name, run_node):
    """Arguments where the exported module and the run's differ.

    An argument one side leaves out has its class default there, so an
    argument the template spells out at its default matches a run that
    left it out.
    """
    tree = resolved_hparams(text, {"model_folder": "model"})
    exported = tree[module_name].value or {}
    skip = TRAINING_ONLY_ARGS.get(key, ())
    differing = {}
    for arg in set(exported) | set(run_node.value):
        if arg in skip:
            continue
        default = _default_argument(run_node.tag, arg)
        if default is _NO_DEFAULT:
            default = _MISSING
        mine = exported.get(arg, default)
        theirs = run_node.value.get(arg, default)
        if not _same_value(mine, theirs):
            differing[arg] = (mine, theirs)
    return differing


def _same_value(first, second):
    """Equal as yaml values: tuples match lists, True does not match 1."""
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(
            _same_value(a, b) for a, b in zip(first, second, strict=True)
        )
    if isinstance(first, bool) != isinstance(second, bool):
        return False
    return first == second


def _default_argument(tag, arg):
    """The default of a constructor argument named by a ``!new:`` tag."""
    if not tag.startswith("!new:"):
        return _NO_DEFAULT
    module_name, _, class_name = tag[len("!new:") :].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        parameter = inspect.signature(cls).parameters.get(arg)
    except (ImportError, AttributeError, TypeError, ValueError):
        return _NO_DEFAULT
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return _NO_DEFAULT
    return parameter.default


def _set_arg(node, arg, value):
    """Sets a module argument, keeping the blank line after the block."""
    if arg in node:
        node[arg] = value
        return
    last = list(node)[-1] if len(node) else None
    comment = node.ca.items.pop(last, None) if last is not None else None
    node[arg] = value
    if comment is not None:
        node.ca.items[arg] = comment


def _delete_arg(node, arg):
    """Removes a module argument, keeping the blank line after the block."""
    keys = list(node)
    comment = node.ca.items.pop(arg, None)
    del node[arg]
    if comment is not None and keys[-1] == arg and len(node):
        node.ca.items[list(node)[-1]] = comment


def _plain(value):
    """A yaml-ready copy of a value: lists stay in flow style."""
    if isinstance(value, (list, tuple)):
        sequence = CommentedSeq(_plain(item) for item in value)
        sequence.fa.set_flow_style()
        return sequence
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _copy_backbone(source, save_path, destination):
    """Writes the run's backbone with save_pretrained."""
    from dynprompt_sb.prompted_wavlm import load_wavlm

    # The run's hub cache is a path of the training machine; use it only
    # where it exists.
    if save_path is not None and not os.path.isdir(str(save_path)):
        save_path = None
    try:
        model = load_wavlm(source, save_path)
    except OSError as error:
        raise FileNotFoundError(
            f"Cannot load the run's backbone {source} to copy it: {error}"
        ) from error
    model.save_pretrained(destination)


def _round_trip_yaml():
    """ruamel.yaml that keeps comments and tags, writing True/False/null."""
    rt_yaml = ruamel.yaml.YAML()
    rt_yaml.Representer = _Representer
    rt_yaml.indent(mapping=4, sequence=4, offset=2)
    rt_yaml.width = 80
    return rt_yaml


def _dump(rt_yaml, tree):
    stream = io.StringIO()
    rt_yaml.dump(tree, stream)
    return stream.getvalue()


class _Representer(RoundTripRepresenter):
    """Writes booleans and None as the project's yamllint wants them."""


_Representer.add_representer(
    bool,
    lambda representer, value: representer.represent_scalar(
        "tag:yaml.org,2002:bool", "True" if value else "False"
    ),
)
_Representer.add_representer(
    type(None),
    lambda representer, value: representer.represent_scalar(
        "tag:yaml.org,2002:null", "null"
    ),
)


class _TaggedLoader(yaml.SafeLoader):
    """A safe yaml loader that keeps tagged nodes as ``Tagged``."""


def _construct_tagged(loader, tag_suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged("!" + tag_suffix, value)


_TaggedLoader.add_multi_constructor("!", _construct_tagged)
