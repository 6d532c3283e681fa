"""A learnable softmax-weighted sum of a model's hidden states.

Speaker information peaks in different WavLM layers for different models
and tasks, so the back-end learns how much of each layer it reads (as in
the WavLM paper's speaker verification set-up and SUPERB).

Authors
 * dynprompt-sb contributors 2026
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightedLayerSum(nn.Module):
    """Sums L + 1 hidden states with softmax-normalised learnable weights.

    Arguments
    ---------
    num_layers : int
        How many hidden states come in (CNN output + every layer: L + 1).
    layer_norm : bool
        Normalise each hidden state over its features (no learnable
        affine) before weighting, so that no layer dominates by scale.

    Example
    -------
    >>> layer_sum = WeightedLayerSum(num_layers=3)
    >>> hidden_states = torch.randn(3, 2, 50, 8)  # [L + 1, batch, T, D]
    >>> layer_sum(hidden_states).shape
    torch.Size([2, 50, 8])
    """

    def __init__(self, num_layers, layer_norm=False):
        super().__init__()
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        # Zeros: every layer starts with the same weight, 1 / num_layers.
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden_states):
        """Returns the weighted sum.

        Arguments
        ---------
        hidden_states : torch.Tensor
            [num_layers, batch, time, D].

        Returns
        -------
        summed : torch.Tensor
            [batch, time, D], ready for SpeechBrain's ECAPA_TDNN.
        """
        if hidden_states.dim() != 4 or (
            hidden_states.shape[0] != self.num_layers
        ):
            raise ValueError(
                f"WeightedLayerSum expects [{self.num_layers}, batch, time, "
                f"D] hidden states, got {tuple(hidden_states.shape)}."
            )
        if self.layer_norm:
            hidden_states = F.layer_norm(
                hidden_states, hidden_states.shape[-1:]
            )
        weights = F.softmax(self.weights, dim=0).to(hidden_states.dtype)
        return torch.einsum("l,lbtd->btd", weights, hidden_states)

    def layer_weights(self):
        """The normalised weight of every hidden state, [num_layers]."""
        return F.softmax(self.weights.detach(), dim=0)
