"""Verification scoring: cosine trial scores, s-norm, EER and minDCF.

Every stage that reports a verification result (the recipe's test stage,
``verify.py``, the pretrained interface, the command line) goes through
this module, so their numbers cannot drift apart.

``eer`` and ``min_dcf`` return exactly what
``speechbrain.utils.metric_stats.EER`` and ``minDCF`` return: the same
candidate thresholds (every distinct score and the midpoint of each pair of
neighbours), the same float32 error rates and the same choice among tied
thresholds. SpeechBrain re-counts the errors at every threshold, which
costs O(n^2) time (``EER``) or thresholds x scores matrices (``minDCF``,
some 18 GB for VoxCeleb1-O's 37,611 trials); here one sort and cumulative
counts give every error rate in O(n log n) time and O(n) memory.

``cosine_score_trials`` streams a trial list in chunks, so that millions of
trials need no more memory than the embeddings and one chunk; with a cohort
it applies adaptive s-norm as SpeechBrain's VoxCeleb recipe does, computing
each utterance's cohort statistics once.

Authors
 * dynprompt-sb contributors 2026
"""

import os
import uuid
from itertools import islice
from operator import itemgetter

import numpy as np
import torch

__all__ = [
    "cosine_score_trials",
    "eer",
    "min_dcf",
    "read_scores",
    "verification_metrics",
    "write_scores",
]

# torch.nn.CosineSimilarity's default in SpeechBrain's verification recipe.
COSINE_EPS = 1e-6

# Cohort scores held at once while computing s-norm statistics (16 MB in
# float32): large enough for a fast matrix product, small next to a chunk.
# Utterances get their statistics in blocks of this many / cohort size.
COHORT_BLOCK_ELEMENTS = 1 << 22

# Trials whose embeddings are gathered at once for the raw cosines: the two
# gathered blocks (1.5 MB at 192 dimensions) stay in cache.
PAIR_BLOCK = 1024


def eer(positive_scores, negative_scores):
    """Computes the equal error rate and its threshold.

    Same definition as ``speechbrain.utils.metric_stats.EER``: among the
    candidate thresholds (every distinct score and the midpoint of each pair
    of neighbouring distinct scores), the one where the false-acceptance rate
    (negatives above it) and the false-rejection rate (positives at or below
    it) are closest; the EER is their mean there.

    Arguments
    ---------
    positive_scores : torch.Tensor or numpy.ndarray
        1-D scores of target trials (same speaker).
    negative_scores : torch.Tensor or numpy.ndarray
        1-D scores of non-target trials.

    Returns
    -------
    eer : float
        The equal error rate, in [0, 1].
    threshold : float
        The threshold where it is reached.

    Raises
    ------
    ValueError
        When either set is empty or not 1-D, or a score is NaN or infinite.

    Example
    -------
    >>> positive = torch.tensor([0.6, 0.7, 0.8, 0.5])
    >>> negative = torch.tensor([0.4, 0.3, 0.2, 0.55])
    >>> value, threshold = eer(positive, negative)
    >>> value
    0.25
    >>> round(threshold, 4)
    0.5
    """
    return _DetCounts(positive_scores, negative_scores).eer()


def min_dcf(
    positive_scores, negative_scores, p_target=0.01, c_miss=1.0, c_fa=1.0
):
    """Computes the minimum detection cost and its threshold.

    Same definition as ``speechbrain.utils.metric_stats.minDCF``: the
    minimum over the candidate thresholds of
    ``c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)``, not
    normalised by the cost of the best trivial system.

    Arguments
    ---------
    positive_scores : torch.Tensor or numpy.ndarray
        1-D scores of target trials (same speaker).
    negative_scores : torch.Tensor or numpy.ndarray
        1-D scores of non-target trials.
    p_target : float
        Prior probability of a target trial.
    c_miss : float
        Cost of a missed target.
    c_fa : float
        Cost of a false alarm.

    Returns
    -------
    min_dcf : float
        The minimum detection cost.
    threshold : float
        The threshold where it is reached.

    Raises
    ------
    ValueError
        When either set is empty or not 1-D, or a score is NaN or infinite.

    Example
    -------
    >>> positive = torch.tensor([0.6, 0.7, 0.8, 0.5])
    >>> negative = torch.tensor([0.4, 0.3, 0.2, 0.55])
    >>> value, threshold = min_dcf(positive, negative, p_target=0.5)
    >>> value
    0.125
    >>> round(threshold, 4)
    0.4
    """
    counts = _DetCounts(positive_scores, negative_scores)
    return counts.min_dcf(p_target, c_miss, c_fa)


def verification_metrics(labels, scores):
    """Computes the EER and the minDCF at p_target 0.01 and 0.05.

    The scores are sorted and counted once for all three metrics.

    Arguments
    ---------
    labels : array-like
        1-D trial labels, 1 for a target trial and 0 for a non-target one.
    scores : torch.Tensor or numpy.ndarray
        1-D trial scores, in the order of ``labels``.

    Returns
    -------
    metrics : dict
        ``eer``, ``eer_threshold``, ``min_dcf_0.01``,
        ``min_dcf_0.01_threshold``, ``min_dcf_0.05`` and
        ``min_dcf_0.05_threshold``, all floats.

    Raises
    ------
    ValueError
        When labels and scores differ in length, a label is not 0 or 1, or
        the scores are rejected by ``eer``.

    Example
    -------
    >>> labels = [1, 1, 1, 1, 0, 0, 0, 0]
    >>> scores = torch.tensor([0.6, 0.7, 0.8, 0.5, 0.4, 0.3, 0.2, 0.55])
    >>> metrics = verification_metrics(labels, scores)
    >>> metrics["eer"], round(metrics["min_dcf_0.01"], 6)
    (0.25, 0.0025)
    """
    labels = np.asarray(_to_numpy(labels))
    scores = _as_scores(scores, "scores")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores differ in shape: {labels.shape} against "
            f"{scores.shape}"
        )
    target = labels == 1
    if not np.all(target | (labels == 0)):
        raise ValueError("labels must be 1 (target) or 0 (non-target)")
    counts = _DetCounts(scores[target], scores[~target])
    metrics = {}
    metrics["eer"], metrics["eer_threshold"] = counts.eer()
    for p_target in (0.01, 0.05):
        key = f"min_dcf_{p_target}"
        metrics[key], metrics[key + "_threshold"] = counts.min_dcf(p_target)
    return metrics


def cosine_score_trials(
    trials, embeddings, cohort=None, top_k=300, chunk_size=50000
):
    """Scores trials by cosine similarity, with optional adaptive s-norm.

    With a cohort, each raw score s is normalised as in SpeechBrain's
    VoxCeleb verification recipe:
    ``0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)``, where mu and sd are
    the mean and (unbiased) standard deviation of the ``top_k`` highest
    cosine scores of the enrol (e) or test (t) embedding against the cohort.
    Trials are read and scored ``chunk_size`` at a time and each utterance's
    statistics are computed once, the first time a chunk needs them, so
    memory stays at the embeddings plus one chunk.

    Arguments
    ---------
    trials : iterable of (label, enrol_id, test_id)
        The trials; a generator works, and is consumed once.
    embeddings : dict
        Utterance id -> embedding (torch tensor or numpy array, 1-D or any
        shape holding one vector, such as SpeechBrain's [1, D]).
    cohort : torch.Tensor or numpy.ndarray, optional
        [C, D] embeddings of training utterances; None scores raw cosines.
    top_k : int or None
        How many of the highest cohort scores give the statistics; clipped
        to the cohort size, and None uses the whole cohort.
    chunk_size : int
        Trials scored at once.

    Returns
    -------
    scores : numpy.ndarray
        One score per trial, in trial order; float64 when the embeddings
        are float64, otherwise float32.

    Raises
    ------
    KeyError
        When a trial names an utterance without an embedding.
    ValueError
        When embeddings or cohort disagree in dimension, or fewer than two
        cohort scores would give the statistics.

    Example
    -------
    >>> embeddings = {
    ...     "a": torch.tensor([1.0, 0.0]),
    ...     "b": torch.tensor([1.0, 1.0]),
    ...     "c": torch.tensor([0.0, 2.0]),
    ... }
    >>> trials = [(1, "a", "b"), (0, "a", "c")]
    >>> cosine_score_trials(trials, embeddings).round(4)
    array([0.7071, 0.    ], dtype=float32)
    >>> cohort = torch.tensor([[1.0, 0.2], [0.3, 1.0], [-1.0, 0.5]])
    >>> cosine_score_trials(trials, embeddings, cohort, top_k=2).shape
    (2,)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    row_of = {utt: row for row, utt in enumerate(embeddings)}
    table = _unit_rows(_stack_embeddings(embeddings))

    if cohort is not None:
        cohort = np.asarray(_to_numpy(cohort), dtype=table.dtype)
        if cohort.ndim != 2 or cohort.shape[1] != table.shape[1]:
            raise ValueError(
                f"cohort must be [C, {table.shape[1]}] like the embeddings, "
                f"got {list(cohort.shape)}"
            )
        cohort = _unit_rows(cohort)
        k = len(cohort) if top_k is None else min(top_k, len(cohort))
        if k < 2:
            raise ValueError(
                "s-norm needs at least 2 cohort scores per utterance for a "
                f"standard deviation, got top_k={top_k} with a cohort of "
                f"{len(cohort)}"
            )
        mean = np.empty(len(table), dtype=table.dtype)
        std = np.empty(len(table), dtype=table.dtype)
        # Statistics are computed for fixed blocks of the embedding table,
        # so each utterance's come from the same matrix product whatever
        # the chunking, and chunk size cannot change a score's last bits.
        block = max(1, COHORT_BLOCK_ELEMENTS // len(cohort))
        known = np.zeros(-(-len(table) // block), dtype=bool)

    scores = []
    trials = iter(trials)
    while chunk := list(islice(trials, chunk_size)):
        enrol, test = _trial_rows(chunk, row_of)
        raw = _paired_dots(table, enrol, test)
        if cohort is not None:
            needed = np.concatenate([enrol, test]) // block
            for b in np.unique(needed[~known[needed]]):
                rows = slice(b * block, (b + 1) * block)
                mean[rows], std[rows] = _cohort_stats(table[rows], cohort, k)
                known[b] = True
            raw = 0.5 * (
                (raw - mean[enrol]) / std[enrol]
                + (raw - mean[test]) / std[test]
            )
        scores.append(raw)
    if not scores:
        return np.zeros(0, dtype=table.dtype)
    return np.concatenate(scores)


def write_scores(path, trials, scores):
    """Writes a SpeechBrain ``scores.txt``, atomically.

    One line per trial, ``enrol_id test_id label score``, with the score to
    6 decimals as SpeechBrain's recipe writes it. The lines go to a
    temporary file in the same folder, which then replaces ``path`` in one
    step, so a reader never sees half a file and an interrupted run leaves
    the previous file intact.

    Arguments
    ---------
    path : str or os.PathLike
        The score file to write.
    trials : iterable of (label, enrol_id, test_id)
        The trials, in score order.
    scores : torch.Tensor or numpy.ndarray or sequence of float
        One score per trial.

    Raises
    ------
    ValueError
        When trials and scores differ in number.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "scores.txt")
    >>> write_scores(path, [(1, "a", "b"), (0, "a", "c")], [0.25, -0.125])
    >>> print(open(path).read(), end="")
    a b 1 0.250000
    a c 0 -0.125000
    """
    scores = _to_numpy(scores)
    path = os.fspath(path)
    # A unique name in the destination folder: os.replace is only atomic
    # within one file system, and concurrent writers must not collide.
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)),
        f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp",
    )
    try:
        with open(tmp, "x") as f:
            pairs = zip(trials, np.asarray(scores).tolist(), strict=True)
            f.writelines(
                f"{enrol} {test} {int(label)} {score:f}\n"
                for (label, enrol, test), score in pairs
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_scores(path):
    """Reads a SpeechBrain ``scores.txt``.

    Arguments
    ---------
    path : str or os.PathLike
        A file of ``enrol_id test_id label score`` lines; blank lines are
        skipped.

    Returns
    -------
    trials : list of (int, str, str)
        (label, enrol_id, test_id) per line, in file order.
    scores : numpy.ndarray
        The float64 scores, in file order.

    Raises
    ------
    ValueError
        When a line is malformed; the message names the file and the line.

    Example
    -------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "scores.txt")
    >>> write_scores(path, [(1, "a", "b")], [0.5])
    >>> read_scores(path)
    ([(1, 'a', 'b')], array([0.5]))
    """
    trials, scores = [], []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                enrol, test, label, score = fields
                trials.append((int(label), enrol, test))
                scores.append(float(score))
            except ValueError:
                raise ValueError(
                    f"{os.fspath(path)}, line {line_number}: expected "
                    f"'enrol_id test_id label score' with an integer label "
                    f"and a numeric score, got {line.rstrip()!r}"
                ) from None
    return trials, np.array(scores, dtype=np.float64)


class _DetCounts:
    """Error counts at every distinct score, from one sort.

    SpeechBrain's candidate thresholds are the distinct scores u_0 < ... <
    u_{K-1} interleaved with midpoints m_k = (u_k + u_{k+1}) / 2, computed
    in the scores' dtype: u_0, m_0, u_1, ..., u_{K-1}, candidate j being u_k
    for j = 2k and m_k for j = 2k + 1. A midpoint has the error counts of
    u_k, or of u_{k+1} when rounding makes it equal to u_{k+1}, so counts
    at the K distinct scores describe all 2K - 1 candidates.

    Arguments
    ---------
    positive_scores : torch.Tensor or numpy.ndarray
        1-D scores of target trials.
    negative_scores : torch.Tensor or numpy.ndarray
        1-D scores of non-target trials.
    """

    def __init__(self, positive_scores, negative_scores):
        pos = _as_scores(positive_scores, "positive_scores")
        neg = _as_scores(negative_scores, "negative_scores")
        for name, scores in (("positive", pos), ("negative", neg)):
            if not len(scores):
                raise ValueError(
                    f"no {name} scores: EER and minDCF need both target "
                    "and non-target trials"
                )
        # torch.cat promotes mixed dtypes, and so must we.
        dtype = np.result_type(pos.dtype, neg.dtype)
        pos = np.sort(pos.astype(dtype, copy=False))
        neg = np.sort(neg.astype(dtype, copy=False))
        merged = np.concatenate([pos, neg])
        # A stable sort of two sorted runs is one linear merge (timsort).
        merged.sort(kind="stable")
        last = np.empty(len(merged), dtype=bool)
        np.not_equal(merged[1:], merged[:-1], out=last[:-1])
        last[-1] = True
        self.values = merged[last]
        del merged
        scores_le = np.flatnonzero(last) + 1
        del last
        self.n_pos, self.n_neg = len(pos), len(neg)
        self.pos_le = np.searchsorted(pos, self.values, side="right")
        self.neg_gt = self.n_neg - (scores_le - self.pos_le)

    def eer(self):
        """Returns (eer, threshold) as SpeechBrain's ``EER`` chooses them.

        SpeechBrain scans the candidates in order and moves to candidate j
        when its float32 ``|FAR - FRR|`` is strictly below the float64
        ``|FAR - FRR|`` of the current choice. FAR - FRR never increases
        along the candidates, so ``|FAR - FRR|`` falls to a minimum d and
        rises again, and the scan can only settle on a candidate within a
        few float32 ulps of d. The scan is replayed exactly over that
        window; its start is a candidate the scan is certain to move to.
        """
        gap = self._signed_gap
        n = 2 * len(self.values) - 1
        # FAR - FRR keeps its sign under float32 rounding, so this finds
        # where the float64 gap turns negative.
        turn = _first_true(lambda j: gap(j) <= 0, 0, n)
        lowest = min(abs(gap(j)) for j in (turn - 1, turn) if 0 <= j < n)
        # Float32 rounding moves a gap by half an ulp, so a candidate
        # further than a few ulps above the minimum can never be chosen.
        reach = lowest + 16 * float(np.spacing(np.float32(lowest)))
        lo = _first_true(lambda j: gap(j) <= reach, 0, turn)
        hi = _first_true(lambda j: -gap(j) > reach, turn, n) - 1
        # Before the window |FAR - FRR| only falls, so the scan's choice
        # there is at least the previous candidate's gap; a candidate whose
        # rounded gap lies strictly below that is certainly moved to.
        start = lo
        while start > 0 and not self._rounded(start) < abs(gap(start - 1)):
            start -= 1
        best, best_gap = start, abs(gap(start))
        for j in range(start + 1, hi + 1):
            if self._rounded(j) < best_gap:
                best, best_gap = j, abs(gap(j))
        far, frr = self._rates(best)
        return (float(far) + float(frr)) / 2, float(self._threshold(best))

    def min_dcf(self, p_target, c_miss=1.0, c_fa=1.0):
        """Returns (min_dcf, threshold) as SpeechBrain's ``minDCF`` does.

        The cost is computed in float32 as SpeechBrain computes it, so that
        equal costs tie the same way. Candidates sharing the counts of u_k
        share its cost, and the first of them lies at u_k's value, so the
        distinct scores alone give the minimum and its threshold.
        """
        p_miss = self.pos_le.astype(np.float32) / np.float32(self.n_pos)
        p_fa = self.neg_gt.astype(np.float32) / np.float32(self.n_neg)
        cost = np.float32(c_miss) * p_miss * np.float32(p_target)
        cost += np.float32(c_fa) * p_fa * np.float32(1 - p_target)
        best = int(np.argmin(cost))
        return float(cost[best]), float(self.values[best])

    def _count_index(self, j):
        """Index k of the distinct score whose counts candidate j has."""
        k, is_midpoint = divmod(j, 2)
        if is_midpoint and self._threshold(j) == self.values[k + 1]:
            k += 1
        return k

    def _threshold(self, j):
        """Value of candidate j, in the scores' dtype."""
        k, is_midpoint = divmod(j, 2)
        if is_midpoint:
            two = self.values.dtype.type(2)
            return (self.values[k] + self.values[k + 1]) / two
        return self.values[k]

    def _rates(self, j):
        """(FAR, FRR) at candidate j, as float32 like SpeechBrain's."""
        k = self._count_index(j)
        far = np.float32(self.neg_gt[k]) / np.float32(self.n_neg)
        frr = np.float32(self.pos_le[k]) / np.float32(self.n_pos)
        return far, frr

    def _signed_gap(self, j):
        """FAR - FRR at candidate j, exact in float64."""
        far, frr = self._rates(j)
        return float(far) - float(frr)

    def _rounded(self, j):
        """|FAR - FRR| at candidate j, rounded to float32 like torch's."""
        far, frr = self._rates(j)
        return float(abs(far - frr))


def _first_true(predicate, lo, hi):
    """First index in [lo, hi) where a monotone predicate holds, else hi."""
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _to_numpy(values):
    """Returns a numpy view of a tensor (on CPU) or an array-like."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # numpy has no bfloat16, and half precision gains nothing here.
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def _as_scores(scores, name):
    """Checks 1-D finite scores and returns them as a floating array."""
    scores = _to_numpy(scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        # torch.unique keeps integers and the midpoints come out float32,
        # so SpeechBrain compares integer scores as float32.
        scores = scores.astype(np.float32)
    if not np.isfinite(scores).all():
        kind = "NaN" if np.isnan(scores).any() else "infinite"
        raise ValueError(f"{name} contains {kind} scores")
    return scores


def _stack_embeddings(embeddings):
    """Stacks a dict of embeddings into one [U, D] float array."""
    if not embeddings:
        raise ValueError("no embeddings given")
    vectors = [_to_numpy(v).reshape(-1) for v in embeddings.values()]
    dim = len(vectors[0])
    for utt, vector in zip(embeddings, vectors, strict=True):
        if len(vector) != dim:
            raise ValueError(
                f"embedding of {utt!r} has {len(vector)} values, the first "
                f"one has {dim}"
            )
    dtype = np.float64 if vectors[0].dtype == np.float64 else np.float32
    return np.stack(vectors).astype(dtype, copy=False)


def _unit_rows(matrix):
    """Divides each row by its norm, floored like CosineSimilarity's eps."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, COSINE_EPS).astype(matrix.dtype)


def _trial_rows(chunk, row_of):
    """Embedding rows of the enrol and test sides of a chunk of trials."""
    try:
        # map() keeps the per-trial work in C: millions of trials pass here.
        enrol = np.fromiter(
            map(row_of.__getitem__, map(itemgetter(1), chunk)),
            dtype=np.intp,
            count=len(chunk),
        )
        test = np.fromiter(
            map(row_of.__getitem__, map(itemgetter(2), chunk)),
            dtype=np.intp,
            count=len(chunk),
        )
    except KeyError as error:
        raise KeyError(
            f"trial utterance {error.args[0]!r} has no embedding"
        ) from None
    return enrol, test


def _paired_dots(table, left, right):
    """Row-wise dot products of table[left] and table[right].

    The rows are gathered a block at a time so that the gathered copies stay
    in cache; gathering a whole chunk first is twice as slow.
    """
    dots = np.empty(len(left), dtype=table.dtype)
    block = PAIR_BLOCK
    a = np.empty((block, table.shape[1]), dtype=table.dtype)
    b = np.empty_like(a)
    for start in range(0, len(left), block):
        n = min(block, len(left) - start)
        np.take(table, left[start : start + n], axis=0, out=a[:n])
        np.take(table, right[start : start + n], axis=0, out=b[:n])
        dots[start : start + n] = np.einsum("ij,ij->i", a[:n], b[:n])
    return dots


def _cohort_stats(vectors, cohort, k):
    """Mean and unbiased std of each vector's k best cohort cosines.

    Arguments
    ---------
    vectors : numpy.ndarray
        [N, D] unit-norm embeddings.
    cohort : numpy.ndarray
        [C, D] unit-norm cohort embeddings.
    k : int
        How many of the highest cohort scores to keep.

    Returns
    -------
    mean : numpy.ndarray
        [N] means.
    std : numpy.ndarray
        [N] standard deviations.
    """
    # torch's matrix product (MKL) beats numpy's here.
    scores = (torch.from_numpy(vectors) @ torch.from_numpy(cohort).T).numpy()
    # Mean and std ignore order, so a partition replaces a full top-k.
    top = np.partition(scores, len(cohort) - k, axis=1)[:, -k:]
    mean = top.mean(axis=1, dtype=np.float64)
    std = top.std(axis=1, ddof=1, dtype=np.float64)
    return mean, std
