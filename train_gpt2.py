"""
modded-nanogpt-moe: the NanoGPT speedrun record of 2024-11-03 (10.8 min on 8xH100) in one file, with an
optional Mixture-of-Experts MLP. Launch it with torchrun (./run_dense.sh, ./run_moe.sh); `--help` lists the
flags. Importing it has no side effects. A speedrun tweak edits the sections before "Run control".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import itertools
import math
import os
import platform
import signal
import subprocess
import sys
import time
import typing
import uuid
import zipfile
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Hyperparameters: one dataclass; every field is a command-line flag, logged and checkpointed.

def flag(default, help, minimum=None, choices=None, run_control=False):
    """A Hyperparameters field. minimum: the least value allowed; choices: a function giving {choice: help};
    run_control: how a run runs, not what it computes (records/compare.py groups runs by the other fields)."""
    return field(default=default, metadata=dict(help=help, minimum=minimum, choices=choices, run_control=run_control))

@dataclass
class Hyperparameters:
    # data
    input_bin: str = flag("data/fineweb10B/fineweb_train_*.bin", "glob of the training shards", run_control=True)
    input_val_bin: str = flag("data/fineweb10B/fineweb_val_*.bin", "glob of the validation shards", run_control=True)
    data_seed: int = flag(0, "training data order: 0 the shards in name order from their first token (the record), "
                          "else the corpus's sequences in a random order drawn from this seed", 0, run_control=True)
    # optimization
    batch_size: int = flag(8 * 64, "sequences per optimizer step, summed over all ranks", 1)
    device_batch_size: int = flag(64, "sequences per forward pass on one rank", 1)
    sequence_length: int = flag(1024, "tokens per sequence", 1)
    num_iterations: int = flag(4578, "optimizer steps", 1)
    warmup_iters: int = flag(0, "steps of linear lr warmup", 0)
    warmdown_iters: int = flag(1308, "final steps over which the lr decays linearly to zero", 0)
    embed_lr: float = flag(0.3, "Adam lr of the token embedding", 0)
    head_lr: float = flag(0.002, "Adam lr of the lm head", 0)
    muon_lr: float = flag(0.02, "Muon lr of the matrices in the transformer blocks", 0)
    muon_momentum: float = flag(0.95, "Muon (Nesterov) momentum")
    # evaluation
    val_loss_every: int = flag(125, "validate every this many steps and at the end (0: only at the end)", 0)
    val_tokens: int = flag(10485760, "validation tokens, the same ones each time (0: all of the validation shards)", 0)
    # model
    vocab_size: int = flag(50304, "vocabulary size (GPT-2's 50257 padded to a multiple of 128)", 1)
    n_layer: int = flag(12, "transformer blocks", 1)
    n_head: int = flag(6, "attention heads (head dim 128, suggested by @Grad62304977)", 1)
    n_embd: int = flag(768, "model width", 1)
    mlp_output_scale: float = flag(1.0, "a constant on every MLP branch's output (dense, routed and shared experts); "
                                   "with Muon the same as scaling the out-projection's lr (tests/test_scale.py)")
    # mixture of experts (num_experts 1 is the dense MLP)
    num_experts: int = flag(1, "experts per MLP (1: the dense model)", 1)
    top_k: int = flag(1, "experts per token")
    expert_hidden: typing.Optional[int] = flag(
        None, "hidden width of each routed expert, or of the dense MLP (default: 4 x n_embd, the record's MLP)", 1)
    shared_expert_hidden: int = flag(0, "hidden width of a shared expert, a dense MLP every token passes through "
                                     "besides its routed experts (0: none)", 0)
    router: str = flag("learned", "how each token chooses its experts",
                       choices=lambda: {name: kind.summary for name, kind in ROUTERS.items()})
    router_gate: typing.Literal["renorm", "prob", "st"] = flag(
        "renorm", "renorm: chosen probabilities renormalised to sum to 1 (1 for top-1); prob: the probabilities; "
        "st: renorm's value with prob's gradient (straight-through)")
    null_expert_bias: float = flag(0.0, "b in the renorm gate p / (sum of chosen p + b)", 0)
    aux_loss_coef: float = flag(0.0, "weight of the Switch balance loss, summed over layers (training only)", 0)
    balance_scope: typing.Literal["micro", "global"] = flag(
        "micro", "balance-loss load fractions per micro-batch, or gathered over all ranks and micro-batches")
    router_z_loss_coef: float = flag(0.0, "weight of the router z-loss, mean logsumexp(logits)^2 (training only)", 0)
    router_bias_rate: float = flag(
        0.0, "auxiliary-loss-free balancing: per-step move of the expert-selection biases (0: off)", 0)
    router_optimizer: typing.Literal["muon", "adam"] = flag("muon", "optimizer of the router weights")
    router_lr: float = flag(0.02, "learning rate of the router weights", 0)
    # run control
    save_every: int = flag(0, "checkpoint every this many steps (0: only at the end)", 0, run_control=True)
    keep_checkpoints: int = flag(0, "keep the newest this many checkpoints of the run (0: all)", 0, run_control=True)
    resume: str = flag("", "continue from this checkpoint, or 'latest': the newest under --log_dir", run_control=True)
    log_dir: str = flag("logs", "where run logs and checkpoints go", run_control=True)
    seed: int = flag(-1, "random seed of the initialisation (-1: draw one, written in the log)", run_control=True)
    dtype: typing.Literal["auto", "bfloat16", "float32"] = flag(
        "auto", "compute precision: bf16 autocast and Newton-Schulz (auto: bfloat16 on CUDA, float32 on CPU)")
    compile: typing.Optional[bool] = flag(None, "torch.compile the model and Newton-Schulz (default: with CUDA)",
                                          run_control=True)
    check_only: bool = flag(False, "check the flags, the data and the checkpoint, then exit", run_control=True)
    wandb: bool = flag(False, "also send the metrics to Weights & Biases (needs the wandb package)", run_control=True)
    wandb_project: str = flag("modded-nanogpt-moe", "Weights & Biases project", run_control=True)

    @property
    def mlp_hidden(self) -> int:
        """The hidden width of each routed expert, or of the dense MLP."""
        return self.expert_hidden or 4 * self.n_embd

class ConfigError(ValueError):
    """Bad flags or inputs; the message is one line that names the culprit and the fix."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train GPT-2 small, optionally with a Mixture-of-Experts MLP; the "
                                     "defaults are the 2024-11-03 speedrun record.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Hyperparameters)
    for f in fields(Hyperparameters):
        hint, kwargs = hints[f.name], dict(default=f.default, help=f.metadata["help"])
        hint = int if hint == typing.Optional[int] else hint  # None: derived from other flags
        if f.metadata["choices"]:
            choices = f.metadata["choices"]()
            kwargs.update(choices=list(choices), type=str,
                          help=kwargs["help"] + ": " + "; ".join(f"{k}: {v}" for k, v in choices.items()))
        elif typing.get_origin(hint) is typing.Literal:
            kwargs.update(choices=typing.get_args(hint), type=str)
        elif hint in (bool, typing.Optional[bool]):
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type=hint, metavar=hint.__name__.upper())
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser

def parse_args(argv=None) -> Hyperparameters:
    return Hyperparameters(**vars(build_parser().parse_args(argv)))

def check_args(args: Hyperparameters, world_size: int) -> None:
    """Reject flags that cannot work, before any work starts."""
    for f in fields(args):
        value, minimum = getattr(args, f.name), f.metadata["minimum"]
        if minimum is not None and value is not None and not value >= minimum:  # also rejects nan
            raise ConfigError(f"--{f.name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    if args.warmup_iters + args.warmdown_iters > args.num_iterations:
        raise ConfigError(f"--warmup_iters {args.warmup_iters} + --warmdown_iters {args.warmdown_iters} exceed "
                          f"--num_iterations {args.num_iterations}; lower them or train longer")
    per_step = args.device_batch_size * world_size
    if args.batch_size % per_step:
        raise ConfigError(f"--batch_size {args.batch_size} is not a multiple of --device_batch_size {args.device_batch_size}"
                          f" x {world_size} ranks = {per_step}; pick a batch_size that is, or change device_batch_size")
    val_chunk = per_step * args.sequence_length
    if args.val_tokens % val_chunk:  # (0 is a multiple: the whole validation set)
        raise ConfigError(f"--val_tokens {args.val_tokens} is not a multiple of device_batch_size x sequence_length x "
                          f"{world_size} ranks = {val_chunk}; use {max(1, args.val_tokens // val_chunk) * val_chunk}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise ConfigError(f"--n_embd {args.n_embd} must split into --n_head {args.n_head} heads of even size")
    if args.vocab_size > 65536:
        raise ConfigError(f"--vocab_size {args.vocab_size} does not fit the shards' uint16 tokens (max 65536)")
    if not math.isfinite(args.mlp_output_scale) or args.mlp_output_scale <= 0:
        raise ConfigError(f"--mlp_output_scale must be positive and finite, got {args.mlp_output_scale}")
    if not 1 <= args.top_k <= args.num_experts:
        raise ConfigError(f"--top_k {args.top_k} must lie in [1, --num_experts {args.num_experts}]")
    if args.shared_expert_hidden and args.num_experts == 1:
        raise ConfigError("--shared_expert_hidden needs --num_experts 2 or more (a wider dense MLP: --expert_hidden)")
    if args.null_expert_bias and args.router_gate != "renorm":
        raise ConfigError(f"--null_expert_bias {args.null_expert_bias} needs --router_gate renorm")
    if args.num_experts > 1:
        ROUTERS[args.router].check_args(args)
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package: pip install wandb (or drop --wandb)")

# -----------------------------------------------------------------------------
# Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al.)

def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise G, or each matrix of a stack G[..., rows, cols]: a quintic Newton-Schulz
    iteration whose coefficients maximise the slope at zero, so the result is not exactly U V^T but U S' V^T
    with S' roughly uniform in [0.7, 1.2], which does not hurt training."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X

def newton_schulz_flops(shape: torch.Size | tuple, steps: int = 5) -> int:
    """The FLOPs of zeropower_via_newtonschulz5 on a tensor of this shape: per iteration and matrix, X X^T and
    B X cost 2 m^2 n each and A A 2 m^3, with m <= n the matrix's sides."""
    *stack, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return math.prod(stack) * steps * (4 * m * m * n + 2 * m ** 3)

def balance_by_cost(costs: list[int], world_size: int) -> list[int]:
    """The rank that owns each item: largest cost first, each to the least-loaded rank so far (ties: the lowest
    rank), the same on every rank. Within 4/3 of the best possible maximum load (Graham's LPT rule)."""
    load, owner = [0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner

class Muon(torch.optim.Optimizer):
    """Muon: SGD-momentum whose update is orthogonalised by Newton-Schulz, for 2-D (or stacked 3-D) weights; for
    a stack of experts [E, rows, cols] the iteration, its normalisation and the scale are per expert. Each matrix
    is orthogonalised on one rank, chosen by Newton-Schulz cost (not i % world_size, which gives some ranks
    several expert stacks), the updates are summed across ranks in one flat buffer, every rank applies them."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16,
                 zeropower=None, rank=None, world_size=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.ns_dtype = ns_dtype
        self.zeropower = zeropower or zeropower_via_newtonschulz5  # compiled on GPUs (make_optimizers)
        every = [p for group in self.param_groups for p in group["params"]]
        owners = balance_by_cost([newton_schulz_flops(p.shape, ns_steps) for p in every], self.world_size)
        self.owner = {id(p): r for p, r in zip(every, owners)}

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank computes the update of matrix p."""
        return self.owner[id(p)] == self.rank

    def share(self, params: list, owned: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every rank contributes owned[i], a tensor shaped like params[i], for the matrices it owns; all ranks get
        all of them back (one all-reduce of a flat buffer, zeros elsewhere)."""
        flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=dtype)
        offsets = list(itertools.accumulate([p.numel() for p in params], initial=0))
        for i, value in owned.items():
            flat[offsets[i]:offsets[i + 1]] = value.flatten()
        if self.world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return [flat[offsets[i]:offsets[i + 1]].view_as(p) for i, p in enumerate(params)]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, updates = group["params"], {}
            for i, p in enumerate(params):
                if self.owns(p):
                    if p.grad is None:
                        raise RuntimeError(f"Muon: parameter {i} of shape {tuple(p.shape)} has no gradient")
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.zeropower(g, steps=group["ns_steps"], dtype=self.ns_dtype)
                    updates[i] = g * max(1, g.size(-2) / g.size(-1)) ** 0.5
            for p, update in zip(params, self.share(params, updates, self.ns_dtype)):
                p.add_(update.type_as(p), alpha=-group["lr"])

    def full_state_dict(self) -> dict:
        """state_dict() with every matrix's momentum, each gathered from the rank that owns it. A collective:
        every rank must call it. The result is the same whatever the world size, so a run can resume on
        another number of GPUs."""
        state = self.state_dict()
        index = itertools.count()  # state_dict() numbers the parameters across groups in order
        for group in self.param_groups:
            params = group["params"]
            owned = {i: self.state[p]["momentum_buffer"] for i, p in enumerate(params)
                     if self.owns(p) and "momentum_buffer" in self.state[p]}
            for momentum in self.share(params, owned, torch.float32):
                state["state"][next(index)] = dict(momentum_buffer=momentum.clone())
        return state

    def load_state_dict(self, state_dict: dict):
        """Load a full_state_dict(), keeping only the momenta of the matrices this rank owns."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if not self.owns(p):
                    self.state.pop(p, None)

# -----------------------------------------------------------------------------
# Model: rotary embedding, attention, MLP, routers, MoE, GPT

class Rotary(nn.Module):
    """Rotary position embedding (Su et al.), half-split layout: channel i pairs with i + head_dim/2."""

    def __init__(self, dim: int, base: float = 10000):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim))
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], 3)

class CausalSelfAttention(nn.Module):
    def __init__(self, config: Hyperparameters):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj.weight.data.zero_()  # zero init suggested by @Grad62304977
        self.rotary = Rotary(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK norm, @Grad62304977
        cos, sin = self.rotary(q)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view_as(x))

def activation(h: torch.Tensor) -> torch.Tensor:
    """The MLP's and every expert's nonlinearity: ReLU^2 (So et al. 2021), ~1-2% better than GELU here;
    suggested by @SKYLINEZ007 and @Grad62304977."""
    return F.relu(h).square()

class MLP(nn.Module):
    def __init__(self, config: Hyperparameters, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.c_proj.weight.data.zero_()  # zero init suggested by @Grad62304977

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activation(self.c_fc(x)))

# Routers. A new one is a Router subclass under @register_router("name") (its --router choice) with a summary
# for --help and a forward(x, idx); nothing else names a router kind. Router.check_args refuses the flags it
# does not take, its parameters (if any) go to the router optimizer, and the log reports its statistics.

ROUTERS: dict[str, type[Router]] = {}
# the flags that only some routers use; a router lists in `takes` those it does
ROUTER_FLAGS = ["router_gate", "null_expert_bias", "aux_loss_coef", "balance_scope", "router_z_loss_coef",
                "router_bias_rate"]

def register_router(name: str):
    """Class decorator: make a Router subclass the --router choice `name`."""
    def register(kind: type[Router]) -> type[Router]:
        kind.name = name
        ROUTERS[name] = kind
        return kind
    return register

class Router(nn.Module):
    """forward(x [N, C], idx [N] token ids) -> (experts [N, top_k] int64, gates [N, top_k] float32, stats), stats
    what the router can tell: `prob` [E], each expert's mean probability (for the balance loss); `z`, the mean
    squared logsumexp of the logits (the z-loss); `entropy` over ln E (logged). None without probabilities. A
    router that takes --router_bias_rate also has update_bias(load, rate), called after each step."""
    name = ""
    summary = ""  # one line for --help
    max_top_k: int | None = None  # how many experts a token can go to (None: any)
    takes: frozenset[str] = frozenset()  # which of ROUTER_FLAGS it uses

    def __init__(self, config: Hyperparameters):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k

    @classmethod
    def check_args(cls, args: Hyperparameters) -> None:
        """Refuse a flag this router does not use, when it is set away from its default."""
        if cls.max_top_k is not None and args.top_k > cls.max_top_k:
            raise ConfigError(f"--router {cls.name} sends each token to {cls.max_top_k} expert(s); use --top_k "
                              f"{cls.max_top_k}, not {args.top_k}")
        defaults = Hyperparameters()
        for option in ROUTER_FLAGS:
            if option not in cls.takes and getattr(args, option) != getattr(defaults, option):
                users = [name for name, kind in ROUTERS.items() if option in kind.takes]
                raise ConfigError(f"--router {cls.name} does not use --{option} (got {getattr(args, option)}); leave it "
                                  f"at {getattr(defaults, option)}, or use a router that does: {', '.join(users) or 'none'}")

@register_router("learned")
class LearnedRouter(Router):
    """Softmax over a bias-free linear map of the token, in float32 whatever the autocast dtype. Experts are
    chosen by probability + bias, where the bias (zero unless --router_bias_rate moves it) balances the load
    without an auxiliary loss (DeepSeek-V3); the gate uses the unbiased probability (--router_gate)."""
    summary = "a linear router (softmax, top-k)"
    takes = frozenset(ROUTER_FLAGS)

    def __init__(self, config: Hyperparameters):
        super().__init__(config)
        self.gate_kind, self.null_expert_bias = config.router_gate, config.null_expert_bias
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.n_embd))
        nn.init.uniform_(self.weight, -config.n_embd ** -0.5, config.n_embd ** -0.5)  # nn.Linear's init
        self.register_buffer("bias", torch.zeros(config.num_experts))  # a buffer: checkpointed, not trained

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float):
        """Raise the bias of under-loaded experts, lower the over-loaded ones."""
        self.bias += rate * torch.sign(load.mean() - load)
        self.bias -= self.bias.mean()

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        experts = (probs + self.bias).topk(self.top_k, dim=-1).indices
        chosen = probs.gather(-1, experts)
        if self.gate_kind == "prob":  # Switch Transformer: the cross-entropy reaches the router through the gate
            gates = chosen
        else:  # renorm: p / (sum of chosen p + b), exactly 1 for top-1 with b = 0
            total = chosen.sum(dim=-1, keepdim=True) + self.null_expert_bias
            # written as 1 - (total - p) / total so that top-1 with b = 0 also has an exactly zero gradient:
            # plain p / p leaves ~1e-9 of rounding noise, which Muon's normalisation would turn into full-size
            # random router updates when nothing else (no balance loss) trains the router
            gates = 1 - (total - chosen) / total
            if self.gate_kind == "st":  # straight-through: renorm's value, the probability's gradient
                gates = gates + (chosen - chosen.detach())
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean() / math.log(self.num_experts)
        z = logits.logsumexp(dim=-1).square().mean()
        return experts, gates, dict(prob=probs.mean(0), entropy=entropy, z=z)

@register_router("hash")
class HashRouter(Router):
    """Token id mod num_experts, gate 1, no parameters (Roller et al. 2021)."""
    summary = "token id mod E, no parameters"
    max_top_k = 1

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        experts = (idx % self.num_experts).unsqueeze(1)
        return experts, torch.ones(experts.shape, device=x.device), {}

# grouped GEMM: one kernel for all experts over their contiguous runs of rows (CUTLASS on sm90 in bf16)
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

def expert_matmul(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] of x [N, in] times weight[g].T, for stacked weights [E, out, in]."""
    if grouped_mm is not None and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
        return grouped_mm(x, weight.mT, offs=offs)
    # the slow path, which the run log announces: torch.compile traces grouped_mm in bf16 only, so for float32
    # (or a torch without grouped_mm) every expert multiplies every row and each row keeps its own expert's
    # result (E x the FLOPs, but no host sync and no data-dependent shape)
    rows = torch.arange(x.size(0), device=x.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True).unsqueeze(1)
    return sum((group == g) * (x @ weight[g].mT) for g in range(weight.size(0)))

class MoE(nn.Module):
    """num_experts MLPs of hidden width mlp_hidden, top_k per token, dropless; optionally a shared expert, a dense
    MLP that every token passes through. Tokens are sorted by expert (stable), counted per expert on the device,
    multiplied by one grouped GEMM per projection, scattered back and gated. No value is read back to the host,
    so the block compiles with fullgraph=True and every expert is in every step's graph (DDP needs no
    find_unused_parameters; an expert that saw no token gets a zero gradient)."""

    def __init__(self, config: Hyperparameters):
        super().__init__()
        E, C, H = config.num_experts, config.n_embd, config.mlp_hidden
        self.num_experts, self.top_k = E, config.top_k
        self.router = ROUTERS[config.router](config)
        # stacked [E, out, in] like nn.Linear weights, each expert initialised like a dense MLP of its shape
        self.c_fc = nn.Parameter(torch.empty(E, H, C).uniform_(-C ** -0.5, C ** -0.5))  # nn.Linear's bound
        self.c_proj = nn.Parameter(torch.zeros(E, C, H))  # zero init, as the dense MLP
        # DeepSeekMoE's shared expert: what every token needs need not be learnt by every routed expert
        self.shared_expert = MLP(config, config.shared_expert_hidden) if config.shared_expert_hidden else None

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        experts, gates, stats = self.router(x, idx.reshape(B * T))
        flat = experts.flatten()  # token n's j-th choice sits at n * top_k + j
        order = torch.argsort(flat, stable=True)
        load = (flat.unsqueeze(1) == torch.arange(self.num_experts, device=x.device)).sum(0)
        offs = load.cumsum(0).to(torch.int32)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = expert_matmul(x[order // self.top_k].to(dtype), self.c_fc.to(dtype), offs)
        h = expert_matmul(activation(h), self.c_proj.to(dtype), offs)
        y = torch.index_copy(torch.empty_like(h), 0, order, h)  # back to token order
        y = (y.view(B * T, self.top_k, C) * gates.unsqueeze(-1).to(dtype)).sum(1)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.view(B, T, C), dict(load=load.float(), gate=gates.mean(), **stats)

class Block(nn.Module):
    def __init__(self, config: Hyperparameters):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config) if config.num_experts == 1 else MoE(config)
        self.mlp_output_scale = config.mlp_output_scale

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)))
        h = F.rms_norm(x, (x.size(-1),))
        y, stats = self.mlp(h, idx) if isinstance(self.mlp, MoE) else (self.mlp(h), None)
        if self.mlp_output_scale != 1.0:  # at 1.0 the graph stays exactly the record's
            y = self.mlp_output_scale * y
        return x + y, stats

class GPT(nn.Module):
    def __init__(self, config: Hyperparameters):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.lm_head.weight.data.zero_()  # @Grad62304977: the loss at step 0 is exactly ln(vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy of predicting targets (-1 is ignored) from idx, both [B, T], and the MoE layers'
        statistics stacked over layers ({} for the dense model): load [L, E] (tokens per expert), gate [L] (its
        mean), and whatever the router gives (prob [L, E], z [L], entropy [L] for the learned router)."""
        x = F.rms_norm(self.transformer.wte(idx), (self.config.n_embd,))  # @Grad62304977
        layer_stats = []
        for block in self.transformer.h:
            x, stats = block(x, idx)
            if stats is not None:
                layer_stats.append(stats)
        x = F.rms_norm(x, (self.config.n_embd,))
        logits = self.lm_head(x).float()  # the loss in fp32
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return loss, {k: torch.stack([s[k] for s in layer_stats]) for k in (layer_stats[0] if layer_stats else {})}

def balance_loss(load: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i P_i, summed over layers: f_i is the fraction of
    assignments routed to expert i (no gradient), P_i its mean router probability. 1 per layer when uniform."""
    fraction = load / load.sum(dim=-1, keepdim=True)
    return load.size(-1) * (fraction * prob).sum()

# -----------------------------------------------------------------------------
# Data loader: shards of uint16 GPT-2 tokens behind a 256-word int32 header

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
DOWNLOAD_HINT = "python data/cached_fineweb10B.py"

class ShardError(ValueError):
    """A shard that is missing or malformed; the message names the file and the fix."""

def read_shard_header(path: str) -> int:
    """Check a shard's header against its size; return its token count."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard; download the data with `{DOWNLOAD_HINT}`")
    size = os.path.getsize(path)
    if size < HEADER_WORDS * 4:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_WORDS * 4}-byte header; "
                         f"delete it and download it again")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}; not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {header[1]} is not {SHARD_VERSION}; regenerate the shard")
    num_tokens = int(header[2])
    if size != HEADER_WORDS * 4 + 2 * num_tokens:
        raise ShardError(f"{path}: header says {num_tokens} tokens ({HEADER_WORDS * 4 + 2 * num_tokens} bytes) "
                         f"but the file has {size} bytes; delete it and download it again")
    return num_tokens

def load_shard(path: str) -> np.ndarray:
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_WORDS * 4, shape=(num_tokens,))

class DistributedDataLoader:
    """Reads [B, T] batches from the shards. data_seed 0 is the record's order: rank r takes B*T+1 tokens at
    offset r*B*T of each global chunk of B*T*world tokens, and all ranks move to the next shard (cyclically)
    together when the next chunk would not fit. Another data seed samples the corpus: it is cut into sequences
    of T+1 tokens starting every T tokens of each shard, and read in a seeded random order (a new one each
    pass), sequence g of the order going to micro-batch g // (B*world), rank (g // B) % world. Every rank
    computes the same order, and a global batch reads the same sequences on any number of ranks."""

    def __init__(self, filename_pattern: str, B: int, T: int, process_rank: int, num_processes: int,
                 device: str | torch.device = "cpu", data_seed: int = 0):
        self.B, self.T, self.rank, self.world, self.data_seed = B, T, process_rank, num_processes, data_seed
        self.device = torch.device(device)
        tokens = {path: read_shard_header(path) for path in sorted(glob.glob(filename_pattern))}
        if not tokens:
            raise ShardError(f"{filename_pattern}: no shard matches; download the data with `{DOWNLOAD_HINT}`")
        self.chunk = B * T * num_processes
        for path, n in tokens.items():
            if n < self.chunk + 1:
                raise ShardError(f"{path}: {n} tokens are fewer than one batch needs "
                                 f"({B} x {T} x {num_processes} ranks + 1 = {self.chunk + 1})")
        self.files, self.shard_tokens = list(tokens), list(tokens.values())
        # sampled order: the index of each shard's first sequence, and the corpus's sequence count at the end
        self.first_sequence = np.cumsum([0] + [(n - 1) // T for n in self.shard_tokens])
        self.order, self.order_pass = None, None
        self.reset()

    def batches_per_pass(self) -> int:
        """Global batches in one pass over all shards, before the loader wraps around."""
        if self.data_seed:
            return int(self.first_sequence[-1]) // (self.B * self.world)
        return sum((n - 1) // self.chunk for n in self.shard_tokens)

    def reset(self):
        self.load_state_dict(dict(sequence=0, sequences=int(self.first_sequence[-1])) if self.data_seed else
                             dict(shard=0, position=0))

    def state_dict(self) -> dict:
        if self.data_seed:  # the corpus's size too: other shards would be another order
            return dict(sequence=self.sequence, sequences=int(self.first_sequence[-1]))
        return dict(shard=self.current_shard, position=self.current_position)

    def load_state_dict(self, state: dict):
        if self.data_seed:
            if "sequences" not in state:
                raise ShardError("the saved data order is the older one of this data seed (shards from random "
                                 "offsets); resume with the train_gpt2.py that wrote the checkpoint")
            if state["sequences"] != int(self.first_sequence[-1]):
                raise ShardError(f"the training shards hold {int(self.first_sequence[-1])} sequences, not the "
                                 f"{state['sequences']} of the saved data order; resume with the same shards")
            self.sequence = state["sequence"]
            self.shards = [load_shard(path) for path in self.files]  # memory-mapped: read only where sampled
        else:
            self.current_shard, self.current_position = state["shard"], state["position"]
            self.tokens = load_shard(self.files[self.current_shard])

    def sampled_batch(self) -> np.ndarray:
        """This rank's B sequences of the sampled order, [B, T+1]."""
        total = int(self.first_sequence[-1])
        first = self.sequence + self.rank * self.B
        self.sequence += self.B * self.world
        rows = []
        for g in range(first, first + self.B):
            if self.order_pass != g // total:  # a new pass, a new order: the seed and the pass seed it
                self.order_pass = g // total
                self.order = np.arange(total, dtype=np.uint32 if total < 2 ** 32 else np.int64)
                np.random.default_rng([self.data_seed, self.order_pass]).shuffle(self.order)
            s = int(self.order[g % total])
            shard = int(np.searchsorted(self.first_sequence, s, side="right")) - 1
            start = (s - int(self.first_sequence[shard])) * self.T
            rows.append(self.shards[shard][start:start + self.T + 1])
        return np.stack(rows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_seed:
            rows = self.sampled_batch()
            buf = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]).astype(np.int64))  # x, y contiguous
        else:
            start = self.current_position + self.rank * self.B * self.T
            buf = torch.from_numpy(self.tokens[start:start + self.B * self.T + 1].astype(np.int64))
            self.current_position += self.chunk
            if self.current_position + self.chunk + 1 > len(self.tokens):
                following = (self.current_shard + 1) % len(self.files)
                self.load_state_dict(dict(shard=following, position=0))
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        if self.data_seed:
            return buf[0], buf[1]
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

# -----------------------------------------------------------------------------
# Training: the schedule, the optimizers, the loss, one step, the validation and the loop

def get_lr(step: int, args: Hyperparameters) -> float:
    """The learning-rate multiplier of every optimizer at this step: no warmup by default, constant, then a
    linear warmdown to zero."""
    if step < args.warmup_iters:
        return (step + 1) / args.warmup_iters
    if step < args.num_iterations - args.warmdown_iters or not args.warmdown_iters:
        return 1.0
    return (args.num_iterations - step) / args.warmdown_iters

def make_optimizers(model: GPT, args: Hyperparameters, ns_dtype: torch.dtype = torch.bfloat16,
                    compile_ns: bool = False) -> list[torch.optim.Optimizer]:
    """Adam for the embedding and the head, Muon for the blocks' matrices (Newton-Schulz compiled with
    compile_ns); the routers (a group of their own) in Muon or Adam as --router_optimizer says. Each group
    keeps its base lr as "initial_lr"; train_step scales it by get_lr."""
    fused = dict(fused=True) if model.lm_head.weight.is_cuda else {}
    routers = [p for name, p in model.transformer.h.named_parameters() if ".router." in name]
    matrices = [p for name, p in model.transformer.h.named_parameters() if ".router." not in name]
    zeropower = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5
    optimizers = [
        torch.optim.Adam([model.transformer.wte.weight], lr=args.embed_lr, betas=(0.9, 0.95), **fused),
        torch.optim.Adam([model.lm_head.weight], lr=args.head_lr, betas=(0.9, 0.95), **fused),
        Muon([dict(params=matrices)] + ([dict(params=routers, lr=args.router_lr)]
                                        if routers and args.router_optimizer == "muon" else []),
             lr=args.muon_lr, momentum=args.muon_momentum, ns_dtype=ns_dtype, zeropower=zeropower),
    ]
    if routers and args.router_optimizer == "adam":
        optimizers.append(torch.optim.Adam(routers, lr=args.router_lr, betas=(0.9, 0.95), **fused))
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["initial_lr"] = group["lr"]
    return optimizers

def objective(loss: torch.Tensor, stats: dict, balance_load: torch.Tensor | None,
              args: Hyperparameters) -> torch.Tensor:
    """The training loss: cross-entropy plus the router's auxiliary losses (check_args has refused any that the
    router cannot give)."""
    if args.num_experts > 1 and args.aux_loss_coef:
        loss = loss + args.aux_loss_coef * balance_loss(balance_load, stats["prob"])
    if args.num_experts > 1 and args.router_z_loss_coef:  # ST-MoE's z-loss, summed over layers
        loss = loss + args.router_z_loss_coef * stats["z"].sum()
    return loss

@dataclass
class TrainState:
    """What a checkpoint restores besides the step: the model, its optimizers, the loader's place, the clock."""
    model: GPT  # the bare model (not compiled, not DDP-wrapped): parameters, optimizers, checkpoints
    optimizers: list
    train_loader: DistributedDataLoader
    clock: TrainClock

def train_step(wrapped_model: nn.Module, state: TrainState, lr_mult: float, args: Hyperparameters,
               rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the batch's micro-batches, run by wrapped_model (compiled and, on several ranks,
    DDP-wrapped), at lr_mult x each group's lr. Returns this rank's mean train loss (on the device) and the
    tokens it routed to each layer's experts [L, E]."""
    wrapped_model.train()
    accumulation = args.batch_size // (args.device_batch_size * rt.world_size)
    moe = args.num_experts > 1
    train_loss = torch.zeros((), device=rt.device)
    step_load = torch.zeros(args.n_layer, args.num_experts, device=rt.device)  # this rank's routed tokens
    global_step_load = torch.zeros_like(step_load)  # all ranks' so far (global balance scope)
    for micro_step in range(accumulation):
        syncing = rt.world_size == 1 or micro_step == accumulation - 1  # no_sync wraps forward and backward
        x, y = state.train_loader.next_batch()  # a pinned, non-blocking copy: it overlaps the GPU's work
        with contextlib.nullcontext() if syncing else wrapped_model.no_sync():
            with rt.autocast():
                loss, stats = wrapped_model(x, y)
            balance_load = stats.get("load")
            if moe:
                step_load += stats["load"].detach()
            if moe and args.balance_scope == "global":
                # global-batch balance (Qiu et al. 2025): the load fractions of all ranks and of this step's
                # micro-batches so far; exactly the global batch's when a step is one micro-batch per rank
                global_step_load += rt.all_reduce_sum(stats["load"].detach().clone())
                balance_load = global_step_load
            (objective(loss, stats, balance_load, args) / accumulation).backward()
        train_loss += loss.detach()
    for opt in state.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        opt.step()
    state.model.zero_grad(set_to_none=True)
    if moe and args.router_bias_rate:
        # auxiliary-loss-free balancing (DeepSeek-V3), outside the compiled graph: one all-reduce of the step's
        # loads over ranks and micro-batches, so every rank moves its biases alike
        for block, load in zip(state.model.transformer.h, rt.all_reduce_sum(step_load.clone())):
            block.mlp.router.update_bias(load, args.router_bias_rate)
    return train_loss / accumulation, step_load

def evaluate(wrapped_model: nn.Module, val_loader: DistributedDataLoader, args: Hyperparameters,
             rt: Runtime) -> tuple[float, dict]:
    """The mean validation loss over --val_tokens (the same tokens each time, all ranks), and the MoE statistics
    that the router gives: load [L, E] summed, gate and entropy [L] averaged."""
    wrapped_model.eval()
    val_loader.reset()
    val_steps = args.val_tokens // val_loader.chunk if args.val_tokens else val_loader.batches_per_pass()
    val_loss, totals = torch.zeros((), device=rt.device), {}
    with torch.no_grad():
        for _ in range(val_steps):
            x_val, y_val = val_loader.next_batch()
            with rt.autocast():
                loss, stats = wrapped_model(x_val, y_val)
            val_loss += loss
            for name in [n for n in ("entropy", "gate", "load") if n in stats]:  # one order on every rank
                totals[name] = totals.get(name, 0) + stats[name]
    count = val_steps * rt.world_size
    return rt.all_reduce_sum(val_loss).item() / count, {
        name: rt.all_reduce_sum(total) / (1 if name == "load" else count) for name, total in totals.items()}

# The log's line formats are the speedrun's, so that tools reading its logs read ours; records/compare.py
# reads them, and accepts extra key:value fields at the end of a step line.
VAL_LINE = "step:{step}/{num_iterations} val_loss:{val_loss:.4f} train_time:{train_time:.0f}ms step_avg:{step_avg:.2f}ms"
TRAIN_LINE = ("step:{step}/{num_iterations} train_loss:{train_loss:.4f} train_time:{train_time:.0f}ms "
              "step_avg:{step_avg:.2f}ms lr_mult:{lr_mult:.4f}")
PEAK_MEMORY_LINE = "peak memory consumption: {mib} MiB"

def step_avg(ms: float, steps: int) -> float:
    return ms / steps if steps > 0 else float("nan")

def validate(step: int, wrapped_model: nn.Module, val_loader: DistributedDataLoader, train_load: torch.Tensor,
             state: TrainState, args: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """The validation loss line and, for an MoE, the router lines; train_load (routed tokens since the last
    validation) starts again from zero. A collective: every rank calls it."""
    val_loss, val_stats = evaluate(wrapped_model, val_loader, args, rt)
    clock = state.clock
    log(VAL_LINE.format(step=step, num_iterations=args.num_iterations, val_loss=val_loss, train_time=clock.ms,
                        step_avg=step_avg(clock.ms, clock.steps)))
    log.metrics(dict(val_loss=val_loss), step)
    if args.num_experts > 1:
        report_routers(step, train_load, val_stats, state.model, val_loader, args, rt, log)
        train_load.zero_()

def log_step(step: int, train_loss: float, lr_mult: float, clock: TrainClock, args: Hyperparameters,
             log: RunLog) -> None:
    ms = clock.elapsed_ms()
    log(TRAIN_LINE.format(step=step, num_iterations=args.num_iterations, train_loss=train_loss, train_time=ms,
                          step_avg=step_avg(ms, clock.steps), lr_mult=lr_mult))
    log.metrics(dict(train_loss=train_loss, lr_mult=lr_mult), step)

def report_routers(step: int, train_load: torch.Tensor, val_stats: dict, model: GPT,
                   val_loader: DistributedDataLoader, args: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """Router diagnostics at a validation (MoE runs, outside the timed region): train_load is this rank's
    routed tokens since the last report. A collective: every rank calls it."""
    load = rt.all_reduce_sum(train_load.clone())
    if not rt.master:
        return
    per_layer = dict(gate_mean=val_stats["gate"])
    if "entropy" in val_stats:
        per_layer.update(entropy=val_stats["entropy"])
    if any(p.requires_grad for p in model.transformer.h[0].mlp.router.parameters()):  # weights to train
        val_loader.reset()
        x_probe, y_probe = val_loader.next_batch()
        probe = min(8, args.device_batch_size)  # a few sequences: an eager pass at full size costs memory
        per_layer.update(router_grad_norms(model, x_probe[:probe], y_probe[:probe], rt.autocast()))
    if args.router_bias_rate:
        per_layer.update(bias=torch.stack([block.mlp.router.bias for block in model.transformer.h]))
    lines, fields_ = router_report(f"step:{step}/{args.num_iterations}", load, val_stats["load"], per_layer)
    for line in lines:
        log(line, console="warning" in line)
    log.metrics({f"router/layer{layer}/{name}" + (f"_{e}" if v.dim() > 1 else ""): x
                 for name, v in fields_.items() for layer in range(len(v))
                 for e, x in enumerate(v[layer].reshape(-1).tolist())}, step)

def router_grad_norms(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast) -> dict[str, torch.Tensor]:
    """Per-layer norms of the router parameters' gradients from the cross-entropy alone (ce_grad_norm) and, for a
    router with probabilities, from the balance loss alone (balance_grad_norm), on one probe batch (eager,
    outside DDP: it neither touches .grad nor syncs ranks)."""
    routers = [list(block.mlp.router.parameters()) for block in model.transformer.h]

    def norms(loss, retain):
        grads = iter(torch.autograd.grad(loss, [p for params in routers for p in params], retain_graph=retain))
        return torch.tensor([math.sqrt(sum(next(grads).norm().item() ** 2 for _ in params)) for params in routers])

    with autocast:
        loss, stats = model(x, y)
    if "prob" not in stats:
        return dict(ce_grad_norm=norms(loss, retain=False))
    with autocast:
        balance = balance_loss(stats["load"], stats["prob"])
    return dict(ce_grad_norm=norms(loss, retain=True), balance_grad_norm=norms(balance, retain=False))

def router_report(prefix: str, train_load: torch.Tensor, val_load: torch.Tensor,
                  per_layer: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """One log line per MoE layer: the train and val loads as fractions, max_violation (the largest train load
    x E - 1) and the per_layer fields, vectors comma-separated; then a warning line for each layer with experts
    whose val load fell below a quarter of uniform. Also returns the fields, each [L] or [L, E]."""
    def value(v):
        return ",".join(f"{x:.4f}" for x in v.tolist()) if v.dim() else f"{v.item():.4g}"

    train_frac, val_frac = (load / load.sum(dim=-1, keepdim=True).clamp_min(1) for load in (train_load, val_load))
    layers, E = val_frac.shape
    max_violation = torch.where(train_load.sum(-1) > 0, train_frac.max(-1).values * E - 1, float("nan"))
    fields_ = dict(train_load=train_frac, val_load=val_frac, max_violation=max_violation, **per_layer)
    lines = [f"{prefix} router layer:{layer} " + " ".join(f"{name}:{value(v[layer])}" for name, v in fields_.items())
             for layer in range(layers)]
    floor = 0.25 / E
    for layer in range(layers):  # one line per layer, however many experts starve
        starved = (val_frac[layer] < floor).nonzero().flatten()
        if len(starved):
            lines.append(f"{prefix} warning: layer {layer} experts {','.join(map(str, starved.tolist()))} val_load "
                         f"{value(val_frac[layer, starved])} below a quarter of uniform ({floor:.4f})")
    return lines, fields_

def validation_due(step: int, args: Hyperparameters) -> bool:
    return step == args.num_iterations or (args.val_loss_every > 0 and step % args.val_loss_every == 0)

def checkpoint_due(step: int, start_step: int, args: Hyperparameters) -> bool:
    """At the end and every --save_every steps, never at the step a session started from."""
    return step > start_step and (step == args.num_iterations or (args.save_every > 0 and step % args.save_every == 0))

def main(argv=None) -> int:
    """Train; return the exit status (0 done or stopped by a signal, 2 bad input, 3 diverged)."""
    args = parse_args(argv)
    try:
        checkpoint = check_run(args)  # the flags, the data and the checkpoint to resume from
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"ok: the flags, the data and the checkpoint check out for {os.environ.get('WORLD_SIZE', 1)} rank(s)")
        return 0
    rt = setup_runtime(args)  # ranks, device, precision, the seed
    log = RunLog(args, rt, checkpoint)
    state, val_loader, start_step = build_run(args, rt, log, checkpoint)  # data, model, optimizers
    wrapped_model = wrap_model(state.model, rt)
    train_load = torch.zeros(args.n_layer, args.num_experts, device=rt.device)  # routed tokens since the last val
    N, last_checkpoint, stop, exit_code = args.num_iterations, checkpoint and checkpoint["path"], None, 0
    with stop_signals() as received:
        try:
            for step in range(start_step, N + 1):
                if step == start_step + 10:  # the clock leaves out a session's first 10 steps (compilation)
                    state.clock.start()
                if validation_due(step, args) and not stop:  # a stop goes straight to its checkpoint
                    with state.clock.paused():
                        validate(step, wrapped_model, val_loader, train_load, state, args, rt, log)
                if stop or checkpoint_due(step, start_step, args):
                    with state.clock.paused():
                        last_checkpoint = write_checkpoint(state, step, log, args, rt)
                    if stop:
                        log(f"step:{step}/{N} stopped by {stop}: checkpoint {last_checkpoint}")
                        log(f"resume: rerun the same command with --resume {last_checkpoint}")
                        break
                if step == N:
                    break
                lr_mult = get_lr(step, args)
                train_loss, step_load = train_step(wrapped_model, state, lr_mult, args, rt)
                train_load += step_load
                state.clock.count_step()
                train_loss, stop = agree_at_step_end(train_loss, received, rt)
                log_step(step + 1, train_loss, lr_mult, state.clock, args, log)
                if not math.isfinite(train_loss):  # the same value on every rank, so every rank stops here
                    raise Diverged(f"step:{step + 1}/{N} stopped: the train loss is {train_loss}, so nothing "
                                   f"after step {step} was saved")
        except Diverged as e:
            log(f"{e}; " + (f"the last checkpoint is {last_checkpoint}: resume with --resume {last_checkpoint} "
                            "and lower learning rates" if last_checkpoint else
                            "no checkpoint was written before it; lower the learning rates and start again"))
            exit_code = 3
    finish_run(rt, log)
    return exit_code

# -----------------------------------------------------------------------------
# Run control: log lines, checkpoints, signals, ranks and devices. A tweak should not need to touch these.

# the fields that fix the parameters' shapes, their optimizers and the data order: a checkpoint resumes only
# into the same ones
FIXED_AT_RESUME = ["vocab_size", "n_layer", "n_head", "n_embd", "num_experts", "expert_hidden",
                   "shared_expert_hidden", "router", "router_optimizer", "data_seed"]

def check_run(args: Hyperparameters) -> dict | None:
    """Check the flags, the shards and the checkpoint to resume from, before any work starts; each problem is a
    one-line ConfigError. Returns the checkpoint (None for a new run)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world_size)
    checkpoint = None
    try:
        train = DistributedDataLoader(args.input_bin, args.device_batch_size, args.sequence_length, 0, world_size,
                                      data_seed=args.data_seed)
        DistributedDataLoader(args.input_val_bin, args.device_batch_size, args.sequence_length, 0, world_size)
        checkpoint = load_checkpoint(args) if args.resume else None
        if checkpoint:  # the same data order over the same shards, or the resumed run would read other text
            train.load_state_dict(checkpoint["train_loader"])
    except ShardError as e:
        raise ConfigError(f"--resume {checkpoint['path']}: {e}" if args.resume and checkpoint else str(e)) from None
    return checkpoint

def load_checkpoint(args: Hyperparameters) -> dict:
    """--resume PATH, or 'latest' (the newest checkpoint under --log_dir/<run id>/), read to the CPU (tensors only:
    no code runs) and checked against the flags; its path is added as "path"."""
    path = args.resume
    if path == "latest":
        found = glob.glob(os.path.join(args.log_dir, "*", "state_step*.pt"))
        if not found:
            raise ConfigError(f"--resume latest: no checkpoint (state_step*.pt) under {args.log_dir}/*/; give its "
                              f"path or --log_dir")
        path = max(found, key=os.path.getmtime)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at its very end
        raise ConfigError(f"--resume {path}: truncated, or not a checkpoint (no zip directory at its end); "
                          f"pick an earlier one")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume {path}: unreadable checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pick an earlier one") from None
    missing = {"step", "args", "model", "optimizers", "train_loader"} - set(checkpoint)
    if missing:
        raise ConfigError(f"--resume {path}: not a checkpoint of this trainer (missing {sorted(missing)})")
    # a field the checkpoint lacks did not exist when it was written: the run used the field's default
    saved = {**dataclasses.asdict(Hyperparameters()), **checkpoint["args"]}
    differ = [f"{name} (checkpoint {saved[name]!r}, now {getattr(args, name)!r})"
              for name in FIXED_AT_RESUME if saved[name] != getattr(args, name)]
    if differ:
        raise ConfigError(f"--resume {path}: the model, its optimizers or the data order differ in " + ", ".join(differ)
                          + "; resume with the checkpoint's values")
    if checkpoint["step"] > args.num_iterations:
        raise ConfigError(f"--resume {path}: the checkpoint is at step {checkpoint['step']}, beyond "
                          f"--num_iterations {args.num_iterations}")
    return dict(checkpoint, path=path)

def save_checkpoint(contents: dict, path: str, keep: int) -> None:
    """Write atomically (a temporary file, then a rename), so that a crash never leaves a broken checkpoint;
    then delete all but the newest `keep` checkpoints of the run (0: keep all)."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(contents, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "state_step*.pt")))[:-keep] if keep else []:
        os.remove(old)

class Diverged(Exception):
    """Training cannot go on: a loss or a parameter is not finite. The message says where."""

def write_checkpoint(state: TrainState, step: int, log: RunLog, args: Hyperparameters, rt: Runtime) -> str:
    """Write the checkpoint of this step and return its path. A collective (Muon's momenta are spread over
    ranks): every rank takes part, rank 0 writes. The optimizers' states hold each group's lr and initial_lr,
    so the schedule resumes from the step alone. A poisoned state never replaces a good checkpoint."""
    if not torch.stack([p.isfinite().all() for p in state.model.parameters()]).all().item():
        raise Diverged(f"step:{step}/{args.num_iterations} stopped: the parameters are not finite, so no "
                       f"checkpoint was written")
    contents = dict(
        step=step, run_id=log.run_id, code=log.code, args=dataclasses.asdict(args), world_size=rt.world_size,
        model=state.model.state_dict(),
        optimizers=[opt.full_state_dict() if isinstance(opt, Muon) else opt.state_dict() for opt in state.optimizers],
        train_loader=state.train_loader.state_dict(),  # ranks move in lockstep: one position describes all
        train_time_ms=state.clock.ms, timed_steps=state.clock.steps,
        rng=dict(cpu=torch.get_rng_state(), **(dict(cuda=torch.cuda.get_rng_state()) if rt.cuda else {})))
    path = os.path.join(log.run_dir, f"state_step{step:06d}.pt")
    if rt.master:
        save_checkpoint(contents, path, args.keep_checkpoints)
    if rt.world_size > 1:
        dist.barrier()
    return path

def restore(state: TrainState, checkpoint: dict, rt: Runtime) -> int:
    """Put a checkpoint's contents back in place (the inverse of write_checkpoint); return its step."""
    state.model.load_state_dict(checkpoint["model"])
    for opt, saved in zip(state.optimizers, checkpoint["optimizers"]):
        opt.load_state_dict(saved)
    state.train_loader.load_state_dict(checkpoint["train_loader"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if rt.cuda and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    state.clock = TrainClock(checkpoint["train_time_ms"], checkpoint["timed_steps"], rt.sync)
    return checkpoint["step"]

class TrainClock:
    """Training time in ms: it runs only while training, never during validation or checkpointing."""

    def __init__(self, ms: float = 0.0, steps: int = 0, sync=lambda: None):
        self.ms, self.steps, self.sync, self.t0 = ms, steps, sync, None  # steps: completed steps on the clock

    def start(self):
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self):
        if self.t0 is not None:
            self.sync()
            self.ms += 1000 * (time.perf_counter() - self.t0)
            self.t0 = None

    @contextlib.contextmanager
    def paused(self):
        """Off the clock inside (validation, checkpoints); running again afterwards if it was running."""
        running = self.t0 is not None
        self.stop()
        yield
        if running:
            self.start()

    def count_step(self):
        self.steps += self.t0 is not None

    def elapsed_ms(self) -> float:
        return self.ms + (1000 * (time.perf_counter() - self.t0) if self.t0 is not None else 0.0)

@contextlib.contextmanager
def stop_signals():
    """Preemption: SIGTERM (a scheduler) or SIGINT (Ctrl-C) asks for a checkpoint at the next step boundary.
    Yields the list of the names of the signals received; the handlers before are put back on leaving."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def agree_at_step_end(train_loss: torch.Tensor, received: list[str], rt: Runtime) -> tuple[float, str | None]:
    """One small all-reduce per step: the train loss averaged over ranks (rather than rank 0's last micro-batch),
    and the stop asked for on any rank: the name of the signal, or None."""
    control = torch.stack([train_loss, torch.tensor(float(bool(received)), device=rt.device)])
    train_loss, stop_votes = rt.all_reduce_sum(control).tolist()
    return train_loss / rt.world_size, (received or ["a signal on another rank"])[0] if stop_votes else None

@dataclass
class Runtime:
    """Where this process runs: its place among the ranks, its device, precision and seed."""
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # autocast and Newton-Schulz precision
    compile_model: bool
    attention: str = "default"  # the attention backend that runs, or the fallback taken
    seed: int = 0

    master = property(lambda self: self.rank == 0)
    cuda = property(lambda self: self.device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sync(self):
        return torch.cuda.synchronize() if self.cuda else None

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

def use_record_attention(device: torch.device, head_dim: int) -> str:
    """The record's attention: cuDNN, with flash, memory-efficient and math disabled (recent torch tries flash
    first, so leaving it enabled would never run cuDNN). If cuDNN attention cannot run here, fall back to
    torch's default order and say so. Returns the backend that runs."""
    for backend, enabled in (("flash", False), ("mem_efficient", False), ("math", False), ("cudnn", True)):
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(enabled)
    q = torch.randn(1, 1, 128, head_dim, device=device, dtype=torch.bfloat16)
    try:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize(device)
        return "cudnn"
    except RuntimeError as e:
        for backend in ("flash", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(True)
        return f"torch's default order (flash first): cuDNN attention failed here ({str(e).splitlines()[0][:120]})"

def setup_runtime(args: Hyperparameters) -> Runtime:
    """NCCL on GPUs, gloo on CPU, a plain process without torchrun; the record's GPU settings (cuDNN attention,
    inductor's coordinate-descent tuning); and one random seed on every rank: --seed, or one drawn by rank 0."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    compile_model = use_cuda if args.compile is None else args.compile
    attention = "default"
    if use_cuda:
        torch.cuda.set_device(device)
        attention = use_record_attention(device, args.n_embd // args.n_head)
        if compile_model and "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING" not in os.environ:  # the variable wins
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True  # slower compiles, faster kernels
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    dtype = {"auto": torch.bfloat16 if use_cuda else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    rt = Runtime(rank, world_size, device, dtype, compile_model, attention)
    seed = args.seed if args.seed >= 0 else int.from_bytes(os.urandom(4), "little") >> 1
    rt.seed = int(rt.all_reduce_sum(torch.tensor([seed if rt.master else 0], device=device)).item())
    torch.manual_seed(rt.seed)
    return rt

def wrap_model(model: GPT, rt: Runtime) -> nn.Module:
    """The model as the steps run it: compiled, then DDP-wrapped on several ranks. One rank runs it without DDP,
    which would only split the compiled graph at its gradient buckets."""
    wrapped = torch.compile(model) if rt.compile_model else model
    return DDP(wrapped, device_ids=[rt.device.index] if rt.cuda else None) if rt.world_size > 1 else wrapped

def build_run(args: Hyperparameters, rt: Runtime, log: RunLog,
              checkpoint: dict | None) -> tuple[TrainState, DistributedDataLoader, int]:
    """The loaders, the model and its optimizers, with the checkpoint's state over them; and the first step."""
    B, T = args.device_batch_size, args.sequence_length
    train_loader = DistributedDataLoader(args.input_bin, B, T, rt.rank, rt.world_size, rt.device, args.data_seed)
    val_loader = DistributedDataLoader(args.input_val_bin, B, T, rt.rank, rt.world_size, rt.device)
    log(f"training data: {len(train_loader.files)} shards, {sum(train_loader.shard_tokens):,} tokens, order: "
        + (f"sampled (data_seed {args.data_seed})" if args.data_seed else "record")
        + f"; validation: {sum(val_loader.shard_tokens):,} tokens")
    accumulation = args.batch_size // (B * rt.world_size)
    if train_loader.batches_per_pass() < args.num_iterations * accumulation:
        log(f"warning: the training shards hold {train_loader.batches_per_pass() // accumulation} "
            f"steps of data, fewer than --num_iterations {args.num_iterations}; "
            + ("the loader starts another pass in a new order" if args.data_seed else
               "the loader wraps around to the first shard") + " (download more shards to avoid it)")
    model = GPT(args).to(rt.device)
    optimizers = make_optimizers(model, args, rt.dtype, compile_ns=rt.compile_model)
    state = TrainState(model, optimizers, train_loader, TrainClock(sync=rt.sync))
    start_step = restore(state, checkpoint, rt) if checkpoint else 0
    return state, val_loader, start_step

def finish_run(rt: Runtime, log: RunLog) -> None:
    if rt.cuda:
        log(PEAK_MEMORY_LINE.format(mib=torch.cuda.max_memory_allocated() // 1024 // 1024))
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; gloo aborts if a peer leaves early
        dist.destroy_process_group()
    if log.wandb:
        log.wandb.finish()

def cpu_model() -> str:
    """The host CPU's name, for the log: step times on a CPU depend on it."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine() or "unknown"

class RunLog:
    """logs/<run id>.txt, written by rank 0, and the run's checkpoint folder logs/<run id>/. The log is the
    record, so it begins with this file's source, the versions, the CPU and nvidia-smi, each part fenced; a
    resumed run appends to its log. With --wandb the metrics also go to Weights & Biases."""

    def __init__(self, args: Hyperparameters, rt: Runtime, checkpoint: dict | None = None):
        self.code = open(os.path.abspath(__file__)).read()
        self.run_id = checkpoint["run_id"] if checkpoint else str(uuid.uuid4())
        self.master, self.wandb = rt.master, None
        self.run_dir, self.path = os.path.join(args.log_dir, self.run_id), os.path.join(args.log_dir, f"{self.run_id}.txt")
        if self.master:
            os.makedirs(self.run_dir, exist_ok=True)
            if not os.path.exists(self.path):
                with open(self.path, "w") as f:
                    f.write(self.header())
            if args.wandb:
                import wandb
                self.wandb = wandb.init(project=args.wandb_project, name=self.run_id, resume="allow",
                                        config=dataclasses.asdict(args))
        if checkpoint:
            self(f"resume: from {checkpoint['path']} at step {checkpoint['step']}")
            changed = {k: (v, getattr(args, k)) for k, v in checkpoint["args"].items()
                       if k not in ("resume", "check_only") and getattr(args, k, v) != v}
            if changed:
                self(f"resume: flags changed since the checkpoint (was, now): {changed}")
            if checkpoint["code"] != self.code:
                self("warning: train_gpt2.py differs from the source the checkpoint was trained with")
        self(f"hyperparameters: {dataclasses.asdict(args)}", console=False)
        self(f"seed:{rt.seed} world_size:{rt.world_size} device:{rt.device.type} dtype:{str(rt.dtype)[6:]} "
             f"compile:{rt.compile_model}" + (f" attention:{rt.attention}" if rt.attention == "cudnn" else ""))
        if rt.cuda and rt.attention != "cudnn":
            self(f"warning: attention falls back to {rt.attention}")
        if args.num_experts > 1 and (grouped_mm is None or (rt.compile_model and rt.dtype == torch.float32)):
            why = (f"torch {torch.__version__} has no grouped_mm (upgrade torch, see requirements.txt)"
                   if grouped_mm is None else
                   "torch.compile traces grouped_mm in bf16 only (use --dtype bfloat16, or --no-compile)")
            self(f"warning: the MoE's slow path: every expert multiplies every token, {args.num_experts}x the "
                 f"expert FLOPs, because {why}")

    def header(self) -> str:
        fence = "=" * 100 + "\n"
        try:
            smi = subprocess.run(["nvidia-smi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout
        except OSError:
            smi = "nvidia-smi: not available\n"
        return (fence + self.code + ("" if self.code.endswith("\n") else "\n") + fence
                + f"Running pytorch {torch.version.__version__} compiled for CUDA {torch.version.cuda}\n"
                + f"python {platform.python_version()}, cpu: {cpu_model()}, {os.cpu_count()} cores\n"
                + f"nvidia-smi:\n{smi}\n" + fence)

    def __call__(self, line: str, console: bool = True):
        if self.master:
            if console:
                print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def metrics(self, values: dict[str, float], step: int):
        if self.wandb:
            self.wandb.log(values, step=step)


if __name__ == "__main__":
    exit_code = main()
    # leave without the interpreter's teardown: a gloo worker thread that DDP keeps alive and that frees tensors
    # during it aborts ~1 run in 20 with SIGABRT (cf. pytorch/pytorch#179291); everything is written by now
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(exit_code)
