"""A pool of learnable prompts searched per utterance by cosine similarity.

Li, Mak, Lee, Meng, "Parameter-efficient Fine-tuning of Speaker-Aware
Dynamic Prompts for Speaker Verification", Interspeech 2024, section 2:
each utterance picks the N prompts of a pool P = {P_1 .. P_M} whose key
p(P_j) (the time-mean of the prompt) is most cosine-similar to its query
q(X) (the time-mean of the layer input). Similar speakers pick, and so
train, the same prompts.

Authors
 * dynprompt-sb contributors 2026
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

SELECTIONS = ("instance", "batch")
KEYS = ("prompt_mean", "learnable")


def masked_time_mean(x, lengths=None):
    """Mean over time of the valid frames of each sequence.

    Arguments
    ---------
    x : torch.Tensor
        Sequences, [batch, time, dim].
    lengths : torch.Tensor, optional
        Relative lengths in (0, 1], [batch] (SpeechBrain's convention).
        Frames past ``round(length * time)`` are padding and ignored.

    Returns
    -------
    mean : torch.Tensor
        [batch, dim].

    Example
    -------
    >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
    >>> masked_time_mean(x, torch.tensor([2 / 3]))
    tensor([[2.]])
    """
    if lengths is None:
        return x.mean(dim=1)
    num_frames = x.shape[1]
    valid_frames = torch.round(lengths * num_frames).clamp(min=1)
    mask = torch.arange(num_frames, device=x.device)[None, :]
    mask = (mask < valid_frames[:, None]).to(x.dtype)
    total = torch.einsum("btd,bt->bd", x, mask)
    return total / valid_frames[:, None].to(x.dtype)


class PromptPool(nn.Module):
    """M learnable prompts of T' frames; each utterance gets the top N.

    Arguments
    ---------
    num_prompts : int
        M, the size of the pool.
    prompt_len : int
        T', the frames of one prompt.
    dim : int
        D, the width of the hidden states the prompts join.
    top_n : int
        N, the prompts given to each utterance.
    selection : str
        "instance" (the paper): every utterance gets its own N prompts.
        "batch" (the authors' released code): the N prompts picked most
        often across the batch go to every utterance in it; ties go to
        the prompt with the larger summed similarity.
    key : str
        "prompt_mean" (the paper): a prompt's key is its time-mean, so it
        moves as the prompt trains. "learnable" (the released code):
        separate learnable keys [M, D], trained only through
        ``pull_loss``, which the caller adds with a weight (the released
        code computes it but adds it with weight 0).

    Example
    -------
    >>> pool = PromptPool(num_prompts=6, prompt_len=2, dim=8, top_n=3)
    >>> x = torch.randn(4, 50, 8)
    >>> prompts, indices = pool(x)
    >>> prompts.shape, indices.shape
    (torch.Size([4, 6, 8]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        num_prompts=15,
        prompt_len=5,
        dim=1024,
        top_n=3,
        selection="instance",
        key="prompt_mean",
    ):
        super().__init__()
        if not 1 <= top_n <= num_prompts:
            raise ValueError(
                f"top_n={top_n} must be between 1 and num_prompts="
                f"{num_prompts}: a pool cannot give more prompts than it has."
            )
        if prompt_len < 1:
            raise ValueError(f"prompt_len={prompt_len} must be at least 1.")
        if selection not in SELECTIONS:
            raise ValueError(
                f"selection={selection!r}: expected one of {SELECTIONS}."
            )
        if key not in KEYS:
            raise ValueError(f"key={key!r}: expected one of {KEYS}.")
        self.num_prompts = num_prompts
        self.prompt_len = prompt_len
        self.dim = dim
        self.top_n = top_n
        self.selection = selection
        self.key = key
        self.prompts = nn.Parameter(
            torch.empty(num_prompts, prompt_len, dim).uniform_(-1, 1)
        )
        if key == "learnable":
            self.keys = nn.Parameter(
                torch.empty(num_prompts, dim).uniform_(-1, 1)
            )

    @property
    def num_frames(self):
        """N * T': the frames prepended to each utterance."""
        return self.top_n * self.prompt_len

    def prompt_keys(self):
        """Returns the keys p(P_j) of the M prompts, [M, D]."""
        if self.key == "learnable":
            return self.keys
        return self.prompts.mean(dim=1)

    def similarity(self, x, lengths=None, check_lengths=True):
        """Cosine similarity of every utterance's query to every key.

        Arguments
        ---------
        x : torch.Tensor
            Layer input, [batch, time, D].
        lengths : torch.Tensor, optional
            Relative lengths, [batch]; padded frames stay out of the query.
        check_lengths : bool
            Check that ``lengths`` lie in (0, 1]. Reading them back costs a
            device synchronisation, so a caller that has checked them
            already (``PromptedWavLM``, once per batch) turns it off.

        Returns
        -------
        similarity : torch.Tensor
            [batch, M].
        """
        self._check_input(x, lengths, check_lengths)
        query = masked_time_mean(x, lengths)
        return (
            F.normalize(query, dim=-1)
            @ F.normalize(self.prompt_keys(), dim=-1).T
        )

    def select(self, x, lengths=None, check_lengths=True):
        """Indices of the N prompts for each utterance.

        Selection is a hard top-N, so no gradient flows through it.

        Arguments
        ---------
        x : torch.Tensor
            Layer input, [batch, time, D].
        lengths : torch.Tensor, optional
            Relative lengths in (0, 1], [batch].
        check_lengths : bool
            See ``similarity``.

        Returns
        -------
        indices : torch.LongTensor
            [batch, N], in decreasing similarity (for "batch" selection:
            decreasing vote count, the same row for every utterance).

        Example
        -------
        >>> pool = PromptPool(num_prompts=4, prompt_len=1, dim=2, top_n=1)
        >>> with torch.no_grad():
        ...     _ = pool.prompts.copy_(torch.tensor(
        ...         [[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]], [[0.0, -1.0]]]
        ...     ))
        >>> pool.select(torch.tensor([[[0.1, 2.0]], [[-3.0, 0.2]]]))
        tensor([[1],
                [2]])
        """
        with torch.no_grad():
            similarity = self.similarity(x, lengths, check_lengths)
            indices = similarity.topk(self.top_n, dim=1).indices
            if self.selection == "batch":
                indices = self._batch_vote(indices, similarity)
        return indices

    def forward(self, x, lengths=None, check_lengths=True):
        """Selects prompts for each utterance and lays them out in time.

        Arguments
        ---------
        x : torch.Tensor
            Layer input, [batch, time, D].
        lengths : torch.Tensor, optional
            Relative lengths in (0, 1], [batch].
        check_lengths : bool
            See ``similarity``.

        Returns
        -------
        prompts : torch.Tensor
            [batch, N * T', D]: P_s1; ...; P_sN concatenated along time.
        indices : torch.LongTensor
            [batch, N], the order of the prompts in ``prompts``.
        """
        indices = self.select(x, lengths, check_lengths)
        batch = indices.shape[0]
        # [batch, N, T', D] -> [batch, N * T', D]
        prompts = self.prompts[indices].reshape(batch, self.num_frames, -1)
        return prompts, indices

    def pull_loss(self, x, indices, lengths=None):
        """L2P's surrogate loss pulling the selected keys to the query.

        Only meaningful with ``key="learnable"``: the query is detached,
        so the loss trains the keys alone, as in L2P where the query
        comes from a frozen model.

        Arguments
        ---------
        x : torch.Tensor
            Layer input, [batch, time, D].
        indices : torch.LongTensor
            The selection returned by ``select``, [batch, N].
        lengths : torch.Tensor, optional
            Relative lengths, [batch].

        Returns
        -------
        loss : torch.Tensor
            Scalar: mean over the batch of sum over the N picks of
            (1 - cosine similarity).
        """
        query = F.normalize(masked_time_mean(x.detach(), lengths), dim=-1)
        keys = F.normalize(self.prompt_keys(), dim=-1)[indices]
        similarity = torch.einsum("bd,bnd->bn", query, keys)
        return (1.0 - similarity).sum(dim=1).mean()

    def _batch_vote(self, indices, similarity):
        """The N prompts picked most often in the batch, for every row."""
        batch = indices.shape[0]
        picks = indices.flatten()
        votes = torch.zeros_like(similarity[0]).index_add_(
            0, picks, torch.ones_like(picks, dtype=similarity.dtype)
        )
        # Similarities lie in [-1, 1], so dividing their batch sum by
        # 2 * batch + 1 keeps the tie-break strictly below one vote.
        ranking = votes + similarity.sum(dim=0) / (2 * batch + 1)
        winners = ranking.topk(self.top_n).indices
        return winners.unsqueeze(0).expand(batch, -1)

    def _check_input(self, x, lengths, check_lengths=True):
        if x.dim() != 3:
            raise ValueError(
                f"PromptPool expects [batch, time, dim] input, got a tensor "
                f"of shape {tuple(x.shape)}."
            )
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"Input width {x.shape[-1]} does not match the pool's "
                f"dim={self.dim}."
            )
        if lengths is None:
            return
        if lengths.shape != (x.shape[0],) or (
            check_lengths and bool(((lengths <= 0) | (lengths > 1)).any())
        ):
            raise ValueError(
                f"lengths must be {x.shape[0]} relative lengths in (0, 1], "
                f"got {lengths.tolist()}."
            )
