"""Unit tests for PromptPool: selection, layout, gradients, options."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dynprompt_sb.prompt_pool import PromptPool, masked_time_mean


def brute_force_selection(pool, x, lengths=None):
    """Best N-subset by summed similarity, sorted by decreasing similarity."""
    query = masked_time_mean(x, lengths)
    keys = pool.prompts.mean(dim=1)
    similarity = F.cosine_similarity(
        query[:, None, :], keys[None, :, :], dim=-1
    )
    picks = []
    for row in similarity:
        best = max(
            itertools.combinations(range(pool.num_prompts), pool.top_n),
            key=lambda subset: sum(row[j].item() for j in subset),
        )
        picks.append(sorted(best, key=lambda j: -row[j].item()))
    return torch.tensor(picks)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_n", [1, 3, 5])
def test_selection_equals_brute_force_search(seed, top_n):
    torch.manual_seed(seed)
    pool = PromptPool(num_prompts=8, prompt_len=3, dim=16, top_n=top_n)
    x = torch.randn(6, 40, 16)
    lengths = torch.tensor([1.0, 0.5, 0.8, 0.3, 1.0, 0.9])
    expected = brute_force_selection(pool, x, lengths)
    assert torch.equal(pool.select(x, lengths), expected)


def test_padded_frames_do_not_enter_the_query():
    torch.manual_seed(0)
    pool = PromptPool(num_prompts=10, prompt_len=2, dim=8, top_n=3)
    x = torch.randn(1, 30, 8)
    padded = torch.cat([x, 1e3 * torch.randn(1, 20, 8)], dim=1)
    assert torch.equal(
        pool.select(x), pool.select(padded, torch.tensor([30 / 50]))
    )


def test_different_content_gets_different_prompts():
    torch.manual_seed(0)
    pool = PromptPool(num_prompts=15, prompt_len=5, dim=32, top_n=3)
    # Utterances whose means point along different directions.
    directions = torch.randn(8, 1, 32)
    x = directions + 0.1 * torch.randn(8, 60, 32)
    indices = pool.select(x)
    assert len({tuple(row.tolist()) for row in indices}) > 1


def test_forward_concatenates_selected_prompts_in_order():
    torch.manual_seed(0)
    pool = PromptPool(num_prompts=6, prompt_len=4, dim=8, top_n=3)
    prompts, indices = pool(torch.randn(5, 20, 8))
    assert prompts.shape == (5, 12, 8)
    for b in range(5):
        expected = torch.cat([pool.prompts[j] for j in indices[b]], dim=0)
        assert torch.equal(prompts[b], expected)


def test_initialisation_is_uniform_in_minus_one_one():
    pool = PromptPool(num_prompts=15, prompt_len=5, dim=64, top_n=3)
    assert pool.prompts.shape == (15, 5, 64)
    assert pool.prompts.min() >= -1 and pool.prompts.max() <= 1
    assert pool.prompts.std() > 0.5  # uniform(-1, 1) has std 0.577


def test_gradient_reaches_only_selected_prompts():
    torch.manual_seed(0)
    pool = PromptPool(num_prompts=10, prompt_len=2, dim=8, top_n=2)
    x = torch.randn(3, 20, 8)
    prompts, indices = pool(x)
    prompts.pow(2).sum().backward()
    selected = set(indices.flatten().tolist())
    for j in range(10):
        grad = pool.prompts.grad[j]
        if j in selected:
            assert grad.abs().sum() > 0
        else:
            assert torch.count_nonzero(grad) == 0


def test_batch_selection_gives_the_majority_to_everyone():
    torch.manual_seed(0)
    pool = PromptPool(
        num_prompts=8, prompt_len=2, dim=16, top_n=2, selection="batch"
    )
    x = torch.randn(9, 30, 16)
    indices = pool.select(x)
    assert (indices == indices[0]).all()
    # The winners hold the two largest vote counts of the instance search,
    # most voted first.
    pool.selection = "instance"
    votes = torch.bincount(pool.select(x).flatten(), minlength=8)
    assert (
        votes[indices[0]].tolist()
        == votes.sort(descending=True).values[:2].tolist()
    )


def test_learnable_keys_select_by_keys_and_pull_loss_trains_them():
    torch.manual_seed(0)
    pool = PromptPool(
        num_prompts=6, prompt_len=2, dim=8, top_n=2, key="learnable"
    )
    assert pool.keys.shape == (6, 8)
    x = torch.randn(4, 10, 8)
    with torch.no_grad():
        pool.keys.zero_()
        pool.keys[4] = x.mean(dim=(0, 1))  # the key closest to every query
    assert (pool.select(x)[:, 0] == 4).all()
    indices = pool.select(x)
    loss = pool.pull_loss(x, indices)
    loss.backward()
    assert pool.keys.grad is not None and pool.keys.grad.abs().sum() > 0
    assert pool.prompts.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prompts=3, top_n=4), "top_n=4"),
        (dict(selection="vote"), "selection='vote'"),
        (dict(key="random"), "key='random'"),
    ],
)
def test_bad_configuration_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptPool(dim=8, **kwargs)


def test_bad_input_names_the_value():
    pool = PromptPool(num_prompts=4, prompt_len=1, dim=8, top_n=2)
    with pytest.raises(ValueError, match=r"\(20, 8\)"):
        pool.select(torch.randn(20, 8))
    with pytest.raises(ValueError, match="width 7"):
        pool.select(torch.randn(2, 20, 7))
    with pytest.raises(ValueError, match="1.5"):
        pool.select(torch.randn(2, 20, 8), torch.tensor([1.0, 1.5]))
