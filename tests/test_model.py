import math

import pytest
import torch

from train_gpt2 import GPT, MLP, CausalSelfAttention, Hyperparameters, apply_rotary_emb, rotary

SMALL = Hyperparameters(vocab_size=256, n_layer=2, n_head=2, n_embd=64)


def test_loss_at_init_is_ln_vocab_exactly():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 16))
    loss, stats = model(idx, torch.randint(0, SMALL.vocab_size, (3, 16)))
    assert stats == {}  # the dense model has no routers
    # the zero-initialised head makes every logit 0, so the loss is the log of the vocabulary size
    assert loss.item() == pytest.approx(math.log(SMALL.vocab_size), abs=1e-6)


def test_full_size_loss_at_init_is_ln_50304():
    model = GPT(Hyperparameters(n_layer=1))
    loss, _ = model(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
    assert loss.item() == pytest.approx(10.8258, abs=1e-4)


def test_output_projections_start_at_zero_and_head_is_untied():
    model = GPT(SMALL)
    block = model.transformer.h[0]
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight, model.lm_head.weight):
        assert torch.count_nonzero(w) == 0
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_shapes():
    torch.manual_seed(0)
    attn, mlp = CausalSelfAttention(SMALL), MLP(SMALL)
    x = torch.randn(2, 10, SMALL.n_embd)
    y, stats = mlp(x)
    assert attn(x).shape == x.shape and y.shape == x.shape and stats == {}  # the MLP slot's interface
    assert mlp.c_fc.weight.shape == (4 * SMALL.n_embd, SMALL.n_embd)
    cos, sin = rotary(torch.zeros(2, 10, 2, 32))
    assert cos.shape == sin.shape == (1, 10, 1, 16)
    loss, _ = GPT(SMALL)(torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 10)))
    assert loss.shape == ()


def test_targets_of_minus_one_are_ignored():
    torch.manual_seed(0)
    model = GPT(SMALL)
    torch.nn.init.normal_(model.lm_head.weight)
    idx, targets = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))
    masked = targets.clone()
    masked[0, 4:] = -1
    # causal: the first four positions' logits see only the first four tokens
    torch.testing.assert_close(model(idx, masked)[0], model(idx[:, :4], targets[:, :4])[0])


def test_rotary_rotates_channel_i_with_channel_i_plus_half():
    head_dim, T = 8, 5
    cos, sin = rotary(torch.zeros(1, T, 1, head_dim))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(head_dim // 2):
        x = torch.zeros(1, T, 1, head_dim)
        x[..., i] = 1.0
        y = apply_rotary_emb(x, cos, sin)[0, :, 0]
        angle = torch.arange(T) * inv_freq[i]
        torch.testing.assert_close(y[:, i], angle.cos())
        torch.testing.assert_close(y[:, i + head_dim // 2], -angle.sin())
        others = [j for j in range(head_dim) if j not in (i, i + head_dim // 2)]
        assert torch.count_nonzero(y[:, others]) == 0


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, T = 16, 12
    cos, sin = rotary(torch.zeros(1, T, 1, head_dim))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = apply_rotary_emb(q.expand(1, T, 1, head_dim), cos, sin)[0, :, 0]
    rk = apply_rotary_emb(k.expand(1, T, 1, head_dim), cos, sin)[0, :, 0]
    scores = rq @ rk.T
    for offset in range(-3, 4):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq[0], q)  # position 0 is not rotated


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = CausalSelfAttention(SMALL)
    torch.nn.init.normal_(attn.c_proj.weight)
    x = torch.randn(1, 10, SMALL.n_embd)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, SMALL.n_embd)
    torch.testing.assert_close(attn(x)[:, :6], attn(x2)[:, :6])
    assert not torch.allclose(attn(x)[:, 6:], attn(x2)[:, 6:])
