"""
modded-nanogpt-moe: the NanoGPT speedrun record of 2024-11-03 (10.8 min on 8xH100) in one file, with an optional
Mixture-of-Experts MLP. Launch it with torchrun (./run_dense.sh, ./run_moe.sh); `--help` lists the flags.
A speedrun tweak edits the sections before "Run control".
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, glob, importlib.util, itertools, math, os, platform, signal, subprocess
import sys, time, typing, uuid
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Hyperparameters: one dataclass; every field is a command-line flag, logged and checkpointed.

def flag(default, help, min=None, choices=None, roles=""):
    """roles: run_control (how a run runs, not what it computes: not in compare.py's groups), fixed (a checkpoint
    resumes into the same value only), router_only (used by the routers that list it in `takes`)."""
    return field(default=default, metadata=dict(help=help, min=min, choices=choices, roles=roles.split()))

@dataclass
class Hyperparameters:
    # data
    input_bin: str = flag("data/fineweb10B/fineweb_train_*.bin", "glob of the training shards", roles="run_control")
    input_val_bin: str = flag("data/fineweb10B/fineweb_val_*.bin", "glob of the validation shards", roles="run_control")
    data_seed: int = flag(0, "0: the shards in order (the record), else sampled in an order of this seed", min=0,
                          roles="run_control fixed")
    # optimization
    batch_size: int = flag(8 * 64, "sequences per optimizer step, summed over all ranks", min=1)
    device_batch_size: int = flag(64, "sequences per forward pass on one rank", min=1)
    sequence_length: int = flag(1024, "tokens per sequence", min=1)
    num_iterations: int = flag(4578, "optimizer steps", min=1)
    warmup_iters: int = flag(0, "steps of linear lr warmup", min=0)
    warmdown_iters: int = flag(1308, "final steps over which the lr decays linearly to zero", min=0)
    embed_lr: float = flag(0.3, "Adam lr of the token embedding", min=0)
    head_lr: float = flag(0.002, "Adam lr of the lm head", min=0)
    muon_lr: float = flag(0.02, "Muon lr of the matrices in the transformer blocks", min=0)
    muon_momentum: float = flag(0.95, "Muon (Nesterov) momentum")
    # evaluation
    val_loss_every: int = flag(125, "validate every this many steps and at the end (0: only at the end)", min=0)
    val_tokens: int = flag(10485760, "validation tokens, the same each time (0: all of the validation shards)", min=0)
    # model
    vocab_size: int = flag(50304, "vocabulary size (GPT-2's 50257 padded to a multiple of 128)", min=1, roles="fixed")
    n_layer: int = flag(12, "transformer blocks", min=1, roles="fixed")
    n_head: int = flag(6, "attention heads (head dim 128, suggested by @Grad62304977)", min=1, roles="fixed")
    n_embd: int = flag(768, "model width", min=1, roles="fixed")
    mlp_output_scale: float = flag(1.0, "a constant on every MLP branch's output (with Muon: its c_proj lr)")
    # mixture of experts (num_experts 1 is the dense MLP)
    num_experts: int = flag(1, "experts per MLP (1: the dense model)", min=1, roles="fixed")
    top_k: int = flag(1, "experts per token")
    expert_hidden: typing.Optional[int] = flag(None, "each expert's hidden width (4 n_embd)", min=1, roles="fixed")
    shared_expert_hidden: int = flag(0, "hidden width of a shared expert (0: none)", min=0, roles="fixed")
    router: str = flag("learned", "how each token chooses its experts", roles="fixed", choices=lambda: ROUTERS)
    router_gate: typing.Literal["renorm", "prob", "st"] = flag(
        "renorm", "renorm: chosen probabilities to sum 1; prob: as is; st: renorm, prob's grad", roles="router_only")
    null_expert_bias: float = flag(0.0, "b in the renorm gate p / (sum of chosen p + b)", min=0, roles="router_only")
    aux_loss_coef: float = flag(0.0, "weight of the Switch balance loss", min=0, roles="router_only")
    balance_scope: typing.Literal["micro", "global"] = flag(
        "micro", "balance-loss loads per micro-batch, or gathered over ranks and micro-batches", roles="router_only")
    router_z_loss_coef: float = flag(0.0, "weight of the router z-loss", min=0, roles="router_only")
    router_bias_rate: float = flag(0.0, "aux-loss-free balancing: the biases' move a step", min=0, roles="router_only")
    router_optimizer: typing.Literal["muon", "adam"] = flag("muon", "optimizer of the router weights", roles="fixed")
    router_lr: float = flag(0.02, "learning rate of the router weights", min=0)
    # run control
    save_every: int = flag(0, "checkpoint every this many steps (0: only at the end)", min=0, roles="run_control")
    keep_checkpoints: int = flag(0, "keep the newest this many checkpoints (0: all)", min=0, roles="run_control")
    resume: str = flag("", "continue from this checkpoint, or 'latest' under --log_dir", roles="run_control")
    log_dir: str = flag("logs", "where run logs and checkpoints go", roles="run_control")
    seed: int = flag(-1, "random seed of the initialisation (-1: draw one, written in the log)", roles="run_control")
    dtype: typing.Literal["auto", "bfloat16", "float32"] = flag("auto", "precision (auto: bfloat16 on CUDA, else fp32)")
    compile: typing.Optional[bool] = flag(None, "torch.compile (default: on CUDA)", roles="run_control")
    check_only: bool = flag(False, "check the flags, the data and the checkpoint, then exit", roles="run_control")
    wandb: bool = flag(False, "also send the metrics to Weights & Biases (pip install wandb)", roles="run_control")
    wandb_project: str = flag("modded-nanogpt-moe", "Weights & Biases project", roles="run_control")

    @property
    def mlp_hidden(self) -> int:  # each routed expert's hidden width, or the dense MLP's
        return self.expert_hidden or 4 * self.n_embd

FIXED_AT_RESUME = [f.name for f in fields(Hyperparameters) if "fixed" in f.metadata["roles"]]
ROUTER_FLAGS = [f.name for f in fields(Hyperparameters) if "router_only" in f.metadata["roles"]]

class ConfigError(ValueError):
    """Bad flags or inputs; the message is one line that names the culprit and the fix."""

def build_parser():
    parser = argparse.ArgumentParser(description="GPT-2 small, the 2024-11-03 speedrun record by default, with an "
                                     "optional MoE MLP. @FILE reads flags from a file (# comments): @flags/seed_moe",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = lambda line: line.split("#")[0].split()
    hints = typing.get_type_hints(Hyperparameters)
    for f in fields(Hyperparameters):
        hint, kwargs = hints[f.name], dict(default=f.default, help=f.metadata["help"])
        hint = int if hint == typing.Optional[int] else hint  # None: derived from other flags
        if f.metadata["choices"]:
            choices = f.metadata["choices"]()  # {name: a class with a summary}
            kwargs.update(choices=list(choices), type=str,
                          help=kwargs["help"] + ": " + "; ".join(f"{k}: {v.summary}" for k, v in choices.items()))
        elif typing.get_origin(hint) is typing.Literal:
            kwargs.update(choices=typing.get_args(hint), type=str)
        elif hint in (bool, typing.Optional[bool]):
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type=hint, metavar=hint.__name__.upper())
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser

def parse_args(argv=None):
    return Hyperparameters(**vars(build_parser().parse_args(argv)))

def check_args(args, world_size):
    for f in fields(args):
        value, least = getattr(args, f.name), f.metadata["min"]
        if least is not None and value is not None and not value >= least:  # also rejects nan
            raise ConfigError(f"--{f.name} must be {'positive' if least == 1 else f'>= {least}'}, got {value}")
    if args.warmup_iters + args.warmdown_iters > args.num_iterations:
        raise ConfigError(f"--warmup_iters {args.warmup_iters} + --warmdown_iters {args.warmdown_iters} exceed "
                          f"--num_iterations {args.num_iterations}; lower them or train longer")
    per_step = args.device_batch_size * world_size
    if args.batch_size % per_step:
        raise ConfigError(f"--batch_size {args.batch_size} is not a multiple of --device_batch_size "
                          f"{args.device_batch_size} x {world_size} ranks = {per_step}; change either")
    val_chunk = per_step * args.sequence_length
    if args.val_tokens % val_chunk:  # (0 is a multiple: the whole validation set)
        raise ConfigError(f"--val_tokens {args.val_tokens} is not a multiple of device_batch_size x sequence_length x "
                          f"{world_size} ranks = {val_chunk}; use {max(1, args.val_tokens // val_chunk) * val_chunk}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise ConfigError(f"--n_embd {args.n_embd} must split into --n_head {args.n_head} heads of even size")
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

def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Approximately orthogonalise G, or each matrix of a stack G[..., rows, cols]. The quintic's coefficients
    maximise the slope at zero: the result is U S' V^T, S' roughly uniform in [0.7, 1.2], which does not hurt."""
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

def newton_schulz_flops(shape, steps=5):
    """Per iteration and matrix of sides m <= n: X X^T and B X cost 2 m^2 n each, A A 2 m^3."""
    *stack, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return math.prod(stack) * steps * (4 * m * m * n + 2 * m ** 3)

def balance_by_cost(costs, world_size):
    """The rank that owns each item: largest cost first, each to the least-loaded rank (Graham's LPT rule)."""
    load, owner = [0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner

class Muon(torch.optim.Optimizer):
    """SGD-momentum orthogonalised by Newton-Schulz, for matrices or expert stacks [E, rows, cols]. Each matrix is
    orthogonalised on one rank, chosen by cost (not i % world_size, which can pile expert stacks on one rank)."""
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16,
                 compile=False, rank=None, world_size=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.world_size = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
        self.ns_dtype = ns_dtype
        self.zeropower = torch.compile(zeropower_via_newtonschulz5) if compile else zeropower_via_newtonschulz5
        every = [p for group in self.param_groups for p in group["params"]]
        owners = balance_by_cost([newton_schulz_flops(p.shape, ns_steps) for p in every], self.world_size)
        self.owner = {id(p): r for p, r in zip(every, owners)}

    def share(self, params, owned, dtype):
        """Each rank gives owned[i] for the matrices it owns; every rank gets all of them back."""
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
                if self.owner[id(p)] == self.rank:
                    if p.grad is None:
                        raise RuntimeError(f"Muon: parameter {i} of shape {tuple(p.shape)} has no gradient")
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.zeropower(g, steps=group["ns_steps"], dtype=self.ns_dtype)
                    updates[i] = g * max(1, g.size(-2) / g.size(-1)) ** 0.5
            for p, update in zip(params, self.share(params, updates, self.ns_dtype)):
                p.add_(update.type_as(p), alpha=-group["lr"])

    def full_state_dict(self):
        """A collective: state_dict() with every momentum, so a run can resume on another number of GPUs."""
        state = self.state_dict()
        index = itertools.count()  # state_dict() numbers the parameters across groups in order
        for group in self.param_groups:
            params = group["params"]
            owned = {i: self.state[p]["momentum_buffer"] for i, p in enumerate(params)
                     if self.owner[id(p)] == self.rank and "momentum_buffer" in self.state[p]}
            for momentum in self.share(params, owned, torch.float32):
                state["state"][next(index)] = dict(momentum_buffer=momentum.clone())
        return state

    def load_state_dict(self, state_dict):  # a full_state_dict(): keep the momenta this rank owns
        super().load_state_dict(state_dict)
        for p in [p for group in self.param_groups for p in group["params"] if self.owner[id(p)] != self.rank]:
            self.state.pop(p, None)

# -----------------------------------------------------------------------------
# Model: rotary embedding, attention, MLP, routers, MoE, GPT

def rotary(x, base=10000):
    """cos and sin of rotary position embedding (Su et al.) for x [B, T, heads, head_dim]; half-split layout."""
    dim = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(x.size(1), device=x.device, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

def apply_rotary_emb(x, cos, sin):
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], 3)

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj.weight.data.zero_()  # zero init suggested by @Grad62304977

    def forward(self, x):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK norm, @Grad62304977
        cos, sin = rotary(q)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view_as(x))

def activation(h):
    """ReLU^2 (So et al. 2021), ~1-2% better than GELU here; suggested by @SKYLINEZ007 and @Grad62304977."""
    return F.relu(h).square()

class MLP(nn.Module):
    """A block's MLP slot holds an MLP or an MoE: mlp(x [B, T, C], idx [B, T] token ids) -> (y, stats), none here."""
    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.c_proj.weight.data.zero_()  # zero init suggested by @Grad62304977

    def forward(self, x, idx=None):
        return self.c_proj(activation(self.c_fc(x))), {}

ROUTERS = {}  # --router choice: Router subclass

class Router(nn.Module):
    """A new router: `class MyRouter(Router, name="mine")`, a summary for --help and forward(x [N, C], idx [N] token
    ids) -> (experts [N, top_k], gates [N, top_k] float32, stats: as it can, `prob` [E] mean probabilities for the
    balance loss, `z` the z-loss, `entropy` over ln E). With --router_bias_rate, update_bias(load, rate) too."""
    summary = ""
    max_top_k = None  # how many experts a token can go to (None: any)
    takes = frozenset()  # which of ROUTER_FLAGS it uses

    def __init_subclass__(cls, name, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name, ROUTERS[name] = name, cls

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k

    @classmethod
    def check_args(cls, args):
        if cls.max_top_k is not None and args.top_k > cls.max_top_k:
            raise ConfigError(f"--router {cls.name} takes --top_k {cls.max_top_k} at most, not {args.top_k}")
        defaults = Hyperparameters()
        for option in ROUTER_FLAGS:
            default = getattr(defaults, option)
            if option not in cls.takes and getattr(args, option) != default:
                users = ", ".join(name for name, kind in ROUTERS.items() if option in kind.takes) or "none"
                raise ConfigError(f"--router {cls.name} does not use --{option}; leave it at {default}, or use a "
                                  f"router that does: {users}")

class LearnedRouter(Router, name="learned"):
    """Softmax of a linear map in float32; experts chosen by probability + a bias that --router_bias_rate moves."""
    summary = "a linear router (softmax, top-k)"
    takes = frozenset(ROUTER_FLAGS)

    def __init__(self, config):
        super().__init__(config)
        self.gate_kind, self.null_expert_bias = config.router_gate, config.null_expert_bias
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.n_embd))
        nn.init.uniform_(self.weight, -config.n_embd ** -0.5, config.n_embd ** -0.5)  # nn.Linear's init
        self.register_buffer("bias", torch.zeros(config.num_experts))  # a buffer: checkpointed, not trained

    @torch.no_grad()
    def update_bias(self, load, rate):  # raise the under-loaded experts, lower the others
        self.bias += rate * torch.sign(load.mean() - load)
        self.bias -= self.bias.mean()

    def forward(self, x, idx):
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        experts = (probs + self.bias).topk(self.top_k, dim=-1).indices
        chosen = probs.gather(-1, experts)
        if self.gate_kind == "prob":  # Switch Transformer: the cross-entropy reaches the router through the gate
            gates = chosen
        else:  # renorm: p / (sum of chosen p + b), exactly 1 for top-1 with b = 0
            total = chosen.sum(dim=-1, keepdim=True) + self.null_expert_bias
            # 1 - (total - p) / total, not p / total: top-1 with b = 0 then has an exactly zero gradient, where
            # p / p's ~1e-9 of rounding noise would become full-size random updates after Muon's normalisation
            gates = 1 - (total - chosen) / total
            if self.gate_kind == "st":  # straight-through: renorm's value, the probability's gradient
                gates = gates + (chosen - chosen.detach())
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean() / math.log(self.num_experts)
        z = logits.logsumexp(dim=-1).square().mean()
        return experts, gates, dict(prob=probs.mean(0), entropy=entropy, z=z)

class HashRouter(Router, name="hash"):
    """Token id mod num_experts, gate 1, no parameters (Roller et al. 2021)."""
    summary, max_top_k = "token id mod E, no parameters", 1

    def forward(self, x, idx):
        experts = (idx % self.num_experts).unsqueeze(1)
        return experts, torch.ones(experts.shape, device=x.device), {}

# grouped GEMM: one kernel for all experts over their contiguous runs of rows (CUTLASS on sm90 in bf16)
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

def expert_matmul(x, weight, offs):
    """Rows offs[g-1]:offs[g] of x [N, in] times weight[g].T, for stacked weights [E, out, in]."""
    if grouped_mm is not None and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
        return grouped_mm(x, weight.mT, offs=offs)
    # the slow path (the log says so): torch.compile traces grouped_mm in bf16 only, so in float32 every expert
    # multiplies every row and each row keeps its own expert's result (E x the FLOPs, but no host sync)
    rows = torch.arange(x.size(0), device=x.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True).unsqueeze(1)
    return sum((group == g) * (x @ weight[g].mT) for g in range(weight.size(0)))

class MoE(nn.Module):
    """Dropless top_k of num_experts MLPs, and a shared expert: tokens sorted by expert, one grouped GEMM a projection,
    scattered back and gated. No host sync, so it compiles with fullgraph=True, and every expert is in every step's
    graph (no find_unused_parameters for DDP). stats: load [E] (tokens per expert), gate (its mean), the router's."""
    def __init__(self, config):
        super().__init__()
        E, C, H = config.num_experts, config.n_embd, config.mlp_hidden
        self.num_experts, self.top_k = E, config.top_k
        self.router = ROUTERS[config.router](config)
        # stacked [E, out, in] like nn.Linear weights, each expert initialised like a dense MLP of its shape
        self.c_fc = nn.Parameter(torch.empty(E, H, C).uniform_(-C ** -0.5, C ** -0.5))  # nn.Linear's bound
        self.c_proj = nn.Parameter(torch.zeros(E, C, H))  # zero init, as the dense MLP
        # DeepSeekMoE's shared expert: what every token needs need not be learnt by every routed expert
        self.shared_expert = MLP(config, config.shared_expert_hidden) if config.shared_expert_hidden else None

    def forward(self, x, idx):
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
            y = y + self.shared_expert(x)[0]
        return y.view(B, T, C), dict(load=load.float(), gate=gates.mean(), **stats)

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config) if config.num_experts == 1 else MoE(config)
        self.mlp_output_scale = config.mlp_output_scale

    def forward(self, x, idx):
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)))
        y, stats = self.mlp(F.rms_norm(x, (x.size(-1),)), idx)
        if self.mlp_output_scale != 1.0:  # at 1.0 the graph stays exactly the record's
            y = self.mlp_output_scale * y
        return x + y, stats

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd),
                                              h=nn.ModuleList([Block(config) for _ in range(config.n_layer)])))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.lm_head.weight.data.zero_()  # @Grad62304977: the loss at step 0 is exactly ln(vocab_size)

    def forward(self, idx, targets):
        x = F.rms_norm(self.transformer.wte(idx), (self.config.n_embd,))  # @Grad62304977
        layer_stats = []
        for block in self.transformer.h:
            x, stats = block(x, idx)
            layer_stats.append(stats)
        x = F.rms_norm(x, (self.config.n_embd,))
        logits = self.lm_head(x).float()  # the loss in fp32
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return loss, {k: torch.stack([s[k] for s in layer_stats]) for k in layer_stats[0]}

def balance_loss(load, prob):
    """Switch Transformer's E sum_i f_i P_i: f_i expert i's share of tokens, P_i its mean probability; 1 if uniform."""
    fraction = load / load.sum(dim=-1, keepdim=True)
    return load.size(-1) * (fraction * prob).sum()

# -----------------------------------------------------------------------------
# Data loader: shards of uint16 GPT-2 tokens behind a 256-word int32 header

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
DOWNLOAD_HINT = "python data/cached_fineweb10B.py"

class ShardError(ConfigError):
    """A shard that is missing or malformed; the message names the file and the fix."""

def read_shard_header(path):
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard; download the data with `{DOWNLOAD_HINT}`")
    size = os.path.getsize(path)
    if size < HEADER_WORDS * 4:
        raise ShardError(f"{path}: {size} bytes, shorter than the header; delete it and download it again")
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

def load_shard(path):
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_WORDS * 4, shape=(num_tokens,))

class DistributedDataLoader:
    """data_seed 0 is the record's order: rank r reads B*T+1 tokens at r*B*T of each chunk of B*T*world. Another seed
    reads sequences of T+1 tokens, one every T tokens, in a seeded random order (new each pass): sequence g goes to
    micro-batch g // (B*world), rank (g // B) % world, so a global batch is the same on any number of ranks."""
    def __init__(self, filename_pattern, B, T, process_rank, num_processes, device="cpu", data_seed=0):
        self.B, self.T, self.rank, self.world, self.data_seed = B, T, process_rank, num_processes, data_seed
        self.device, self.chunk = torch.device(device), B * T * num_processes
        tokens = {path: read_shard_header(path) for path in sorted(glob.glob(filename_pattern))}
        if not tokens:
            raise ShardError(f"{filename_pattern}: no shard matches; download the data with `{DOWNLOAD_HINT}`")
        for path, n in tokens.items():
            if n < self.chunk + 1:
                raise ShardError(f"{path}: {n} tokens, fewer than a batch needs ({B} x {T} x {num_processes} + 1)")
        self.files, self.shard_tokens = list(tokens), list(tokens.values())
        # sampled order: the index of each shard's first sequence; the last entry is the corpus's sequence count
        self.first_sequence = np.cumsum([0] + [(n - 1) // T for n in self.shard_tokens])
        self.sequences, self.order_pass = int(self.first_sequence[-1]), None
        self.reset()

    def batches_per_pass(self):  # global batches before the loader wraps around
        if self.data_seed:
            return self.sequences // (self.B * self.world)
        return sum((n - 1) // self.chunk for n in self.shard_tokens)

    def reset(self):
        self.load_state_dict(dict(sequence=0, sequences=self.sequences) if self.data_seed else
                             dict(shard=0, position=0))

    def state_dict(self):
        if self.data_seed:  # the corpus's size too: other shards would be another order
            return dict(sequence=self.sequence, sequences=self.sequences)
        return dict(shard=self.current_shard, position=self.current_position)

    def load_state_dict(self, state):
        if self.data_seed:
            if state.get("sequences") != self.sequences:  # other shards, or an older loader: another order
                saved = state.get("sequences", "windows")
                raise ShardError(f"the training shards hold {self.sequences} sequences, not the {saved} of the saved "
                                 f"data order; resume with its shards and train_gpt2.py")
            self.sequence = state["sequence"]
            self.shards = [load_shard(path) for path in self.files]  # memory-mapped: read only where sampled
        else:
            self.current_shard, self.current_position = state["shard"], state["position"]
            self.tokens = load_shard(self.files[self.current_shard])

    def sampled_batch(self):
        first = self.sequence + self.rank * self.B
        self.sequence += self.B * self.world
        rows = []
        for g in range(first, first + self.B):
            if self.order_pass != g // self.sequences:  # a new pass, a new order: the seed and the pass seed it
                self.order_pass = g // self.sequences
                self.order = np.arange(self.sequences, dtype=np.uint32 if self.sequences < 2 ** 32 else np.int64)
                np.random.default_rng([self.data_seed, self.order_pass]).shuffle(self.order)
            s = int(self.order[g % self.sequences])
            shard = int(np.searchsorted(self.first_sequence, s, side="right")) - 1
            start = (s - int(self.first_sequence[shard])) * self.T
            rows.append(self.shards[shard][start:start + self.T + 1])
        return np.stack(rows)

    def next_batch(self):
        if self.data_seed:
            rows = self.sampled_batch()
            buf = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]).astype(np.int64))  # x, y contiguous
        else:
            start = self.current_position + self.rank * self.B * self.T
            buf = torch.from_numpy(self.tokens[start:start + self.B * self.T + 1].astype(np.int64))
            self.current_position += self.chunk
            if self.current_position + self.chunk + 1 > len(self.tokens):
                self.load_state_dict(dict(shard=(self.current_shard + 1) % len(self.files), position=0))
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        if self.data_seed:
            return buf[0], buf[1]
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

# -----------------------------------------------------------------------------
# Training: the schedule, the optimizers, the loss, one step, the validation and the loop

def get_lr(step, args):
    if step < args.warmup_iters:
        return (step + 1) / args.warmup_iters
    if step < args.num_iterations - args.warmdown_iters or not args.warmdown_iters:
        return 1.0
    return (args.num_iterations - step) / args.warmdown_iters

def make_optimizers(model, args, ns_dtype=torch.bfloat16, compile_ns=False):
    """Adam for the embedding and head, Muon for the blocks' matrices; "initial_lr" keeps each group's base lr."""
    adam = dict(betas=(0.9, 0.95), **(dict(fused=True) if model.lm_head.weight.is_cuda else {}))
    routers = [p for name, p in model.transformer.h.named_parameters() if ".router." in name]
    matrices = [p for name, p in model.transformer.h.named_parameters() if ".router." not in name]
    router_group = [dict(params=routers, lr=args.router_lr)] if routers and args.router_optimizer == "muon" else []
    optimizers = [torch.optim.Adam([model.transformer.wte.weight], lr=args.embed_lr, **adam),
                  torch.optim.Adam([model.lm_head.weight], lr=args.head_lr, **adam),
                  Muon([dict(params=matrices)] + router_group, args.muon_lr, args.muon_momentum, ns_dtype=ns_dtype,
                       compile=compile_ns)]
    if routers and args.router_optimizer == "adam":
        optimizers.append(torch.optim.Adam(routers, lr=args.router_lr, **adam))
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["initial_lr"] = group["lr"]
    return optimizers

def objective(loss, stats, balance_load, args):
    """The training loss: the cross-entropy plus the auxiliary losses of a router that gives probabilities."""
    if "prob" in stats and args.aux_loss_coef:
        loss = loss + args.aux_loss_coef * balance_loss(balance_load, stats["prob"])
    if "z" in stats and args.router_z_loss_coef:  # ST-MoE's z-loss, summed over layers
        loss = loss + args.router_z_loss_coef * stats["z"].sum()
    return loss

@dataclass
class TrainState:
    model: GPT  # the bare model (not compiled, not DDP-wrapped)
    optimizers: list
    train_loader: DistributedDataLoader
    clock: TrainClock

def train_step(wrapped_model, state, lr_mult, args, rt):
    """One optimizer step; returns this rank's mean train loss and the tokens it routed to each expert [L, E]."""
    wrapped_model.train()
    accumulation = args.batch_size // (args.device_batch_size * rt.world_size)
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
            if balance_load is not None:
                step_load += balance_load.detach()
                if args.balance_scope == "global":
                    # global-batch balance (Qiu et al. 2025): the load fractions of all ranks and of this step's
                    # micro-batches so far; exactly the global batch's when a step is one micro-batch per rank
                    global_step_load += rt.all_reduce_sum(balance_load.detach().clone())
                    balance_load = global_step_load
            (objective(loss, stats, balance_load, args) / accumulation).backward()
        train_loss += loss.detach()
    for opt in state.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        opt.step()
    state.model.zero_grad(set_to_none=True)
    if args.router_bias_rate and args.num_experts > 1:  # (a dense model ignores the router flags)
        # auxiliary-loss-free balancing (DeepSeek-V3), outside the compiled graph: one all-reduce of the step's
        # loads over ranks and micro-batches, so every rank moves its biases alike
        for block, load in zip(state.model.transformer.h, rt.all_reduce_sum(step_load.clone())):
            block.mlp.router.update_bias(load, args.router_bias_rate)
    return train_loss / accumulation, step_load

def evaluate(wrapped_model, val_loader, args, rt):
    """The validation loss, and the MoE's stats: load [L, E] summed, gate and entropy [L] averaged."""
    wrapped_model.eval()
    val_loader.reset()
    val_steps = args.val_tokens // val_loader.chunk if args.val_tokens else val_loader.batches_per_pass()
    val_loss, totals = torch.zeros((), device=rt.device), {}
    with torch.no_grad():
        for _ in range(val_steps):
            with rt.autocast():
                loss, stats = wrapped_model(*val_loader.next_batch())
            val_loss += loss
            for name in [n for n in ("entropy", "gate", "load") if n in stats]:  # one order on every rank
                totals[name] = totals.get(name, 0) + stats[name]
    count = val_steps * rt.world_size
    return rt.all_reduce_sum(val_loss).item() / count, {k: rt.all_reduce_sum(v) / (1 if k == "load" else count)
                                                         for k, v in totals.items()}

# The log's line formats are the speedrun's, so that tools reading its logs read ours (tools/compare.py accepts
# extra key:value fields at the end of a step line).
VAL_LINE = "step:{step}/{N} val_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms"
TRAIN_LINE = "step:{step}/{N} train_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms lr_mult:{lr:.4f}"

def main(argv=None):
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
    state, wrapped_model, val_loader, start_step = build_run(args, rt, log, checkpoint)
    clock, N, stop, exit_code = state.clock, args.num_iterations, None, 0
    last_checkpoint = checkpoint and checkpoint["path"]
    train_load = torch.zeros(args.n_layer, args.num_experts, device=rt.device)  # routed tokens since the last val
    with stop_signals() as received:
        try:
            for step in range(start_step, N + 1):
                last_step = step == N
                if step == start_step + 10:  # the clock leaves out a session's first 10 steps (compilation)
                    clock.start()
                # validate, off the clock (a stop goes straight to its checkpoint)
                if (last_step or args.val_loss_every > 0 and step % args.val_loss_every == 0) and not stop:
                    with clock.paused():
                        val_loss, val_stats = evaluate(wrapped_model, val_loader, args, rt)
                        log(VAL_LINE.format(step=step, N=N, loss=val_loss, ms=clock.ms, avg=clock.step_avg(clock.ms)))
                        log.metrics(dict(val_loss=val_loss), step)
                        if "load" in val_stats:
                            report_routers(step, train_load, val_stats, state.model, args, rt, log)
                            train_load.zero_()
                # checkpoint at the end, every --save_every steps and on a stop, never where the session began
                if stop or step > start_step and (last_step or args.save_every > 0 and step % args.save_every == 0):
                    with clock.paused():
                        last_checkpoint = write_checkpoint(state, step, log, args, rt)
                    if stop:
                        log(f"step:{step}/{N} stopped by {stop}: checkpoint {last_checkpoint}")
                        log(f"resume: rerun the same command with --resume {last_checkpoint}")
                        break
                if last_step:
                    break
                # train
                lr_mult = get_lr(step, args)
                train_loss, step_load = train_step(wrapped_model, state, lr_mult, args, rt)
                train_load += step_load
                clock.steps += clock.t0 is not None  # the steps on the clock
                # one small all-reduce a step: the train loss averaged over ranks, and a stop asked for on any rank
                stop_vote = torch.tensor(float(bool(received)), device=rt.device)
                train_loss, stop_votes = rt.all_reduce_sum(torch.stack([train_loss, stop_vote])).tolist()
                train_loss /= rt.world_size
                stop = (received or ["a signal on another rank"])[0] if stop_votes else None
                # log
                ms = clock.elapsed_ms()
                log(TRAIN_LINE.format(step=step + 1, N=N, loss=train_loss, ms=ms, avg=clock.step_avg(ms), lr=lr_mult))
                log.metrics(dict(train_loss=train_loss, lr_mult=lr_mult), step + 1)
                if not math.isfinite(train_loss):  # the same value on every rank, so every rank stops here
                    raise Diverged(f"step:{step + 1}/{N} stopped: the train loss is {train_loss} (not saved)")
        except Diverged as e:
            log(f"{e}; " + (f"resume with --resume {last_checkpoint} and lower learning rates" if last_checkpoint
                            else "no checkpoint was written; lower the learning rates and start again"))
            exit_code = 3
    if rt.cuda:
        log(f"peak memory consumption: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB")
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; gloo aborts if a peer leaves early
        dist.destroy_process_group()
    if log.wandb:
        log.wandb.finish()
    return exit_code

# -----------------------------------------------------------------------------
# Run control: checkpoints, signals, ranks and devices, the log, the router report. A tweak need not touch it.

def check_run(args):
    """Check the flags, the shards and the checkpoint to resume from (None: none; tensors only: no code runs)."""
    world_size, path = int(os.environ.get("WORLD_SIZE", 1)), args.resume
    check_args(args, world_size)
    B, T = args.device_batch_size, args.sequence_length
    train = DistributedDataLoader(args.input_bin, B, T, 0, world_size, data_seed=args.data_seed)  # ShardErrors
    DistributedDataLoader(args.input_val_bin, B, T, 0, world_size)
    if not path:
        return None
    if path == "latest":
        found = glob.glob(os.path.join(args.log_dir, "*", "state_step*.pt"))
        if not found:
            raise ConfigError(f"--resume latest: no state_step*.pt under {args.log_dir}/*/; give a path or --log_dir")
        path = max(found, key=os.path.getmtime)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {path}: no such file")
    try:  # torch.save writes a zip archive, whose directory is at its very end: a truncated file has none
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume {path}: truncated, or not a checkpoint ({type(e).__name__}: "
                          f"{(str(e) or '-').splitlines()[0][:100]}); pick an earlier one") from None
    missing = {"step", "args", "model", "optimizers", "train_loader"} - set(checkpoint)
    if missing:
        raise ConfigError(f"--resume {path}: not a checkpoint of this trainer (missing {sorted(missing)})")
    # a field the checkpoint lacks did not exist when it was written: the run used the field's default
    saved = {**dataclasses.asdict(Hyperparameters()), **checkpoint["args"]}
    differ = [f"{name} (checkpoint {saved[name]!r}, now {getattr(args, name)!r})"
              for name in FIXED_AT_RESUME if saved[name] != getattr(args, name)]
    if differ:
        raise ConfigError(f"--resume {path}: the model, its optimizers or the data order differ in "
                          + ", ".join(differ) + "; resume with the checkpoint's values")
    if checkpoint["step"] > args.num_iterations:
        raise ConfigError(f"--resume {path}: step {checkpoint['step']} is past --num_iterations {args.num_iterations}")
    try:  # the same data order over the same shards, or the resumed run would read other text
        train.load_state_dict(checkpoint["train_loader"])
    except ShardError as e:
        raise ConfigError(f"--resume {path}: {e}") from None
    return dict(checkpoint, path=path)

def save_checkpoint(contents, path, keep):
    """Write atomically (a crash never leaves a broken checkpoint), then keep the newest `keep` (0: all)."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(contents, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "state_step*.pt")))[:-keep] if keep else []:
        os.remove(old)

class Diverged(Exception):
    """A loss or a parameter is not finite; the message says where."""

def write_checkpoint(state, step, log, args, rt):
    """A collective (Muon's momenta are spread over ranks); rank 0 writes. Returns the path."""
    if not torch.stack([p.isfinite().all() for p in state.model.parameters()]).all().item():
        raise Diverged(f"step:{step}/{args.num_iterations} stopped: the parameters are not finite (not saved)")
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

class TrainClock:
    """Training time in ms, paused for validation and checkpoints; steps: the steps timed."""
    def __init__(self, ms=0.0, steps=0, sync=lambda: None):
        self.ms, self.steps, self.sync, self.t0 = ms, steps, sync, None

    def start(self):
        self.sync()
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        running = self.t0 is not None
        if running:
            self.sync()
            self.ms, self.t0 = self.elapsed_ms(), None
        yield
        if running:
            self.start()

    def elapsed_ms(self):
        return self.ms + (1000 * (time.perf_counter() - self.t0) if self.t0 is not None else 0.0)

    def step_avg(self, ms):
        return ms / self.steps if self.steps > 0 else float("nan")

@contextlib.contextmanager
def stop_signals():
    """SIGTERM or SIGINT asks for a checkpoint at the next step boundary; yields the signals received."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

@dataclass
class Runtime:
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

    def all_reduce_sum(self, t):
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

def setup_runtime(args):
    """NCCL on GPUs, gloo on CPU, one process without torchrun; the record's GPU settings; one seed for all ranks."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda, attention = torch.cuda.is_available(), "default"
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    compile_model = use_cuda if args.compile is None else args.compile
    if use_cuda:
        torch.cuda.set_device(device)
        # the record's attention, cuDNN alone (recent torch tries flash first); torch's order where it cannot run
        for backend in ("flash", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
        try:
            q = torch.randn(1, 1, 128, args.n_embd // args.n_head, device=device, dtype=torch.bfloat16)
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()  # an error surfaces here
            attention = "cudnn"
        except RuntimeError as e:
            for backend in ("flash", "mem_efficient", "math"):
                getattr(torch.backends.cuda, f"enable_{backend}_sdp")(True)
            attention = f"torch's default order: cuDNN attention failed here ({str(e).splitlines()[0][:120]})"
        if compile_model and "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING" not in os.environ:  # the variable wins
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True  # slower compiles, faster kernels
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if use_cuda else torch.float32
    rt = Runtime(rank, world_size, device, dtype, compile_model, attention)
    seed = args.seed if args.seed >= 0 else int.from_bytes(os.urandom(4), "little") >> 1
    rt.seed = int(rt.all_reduce_sum(torch.tensor([seed if rt.master else 0], device=device)).item())
    torch.manual_seed(rt.seed)
    return rt

def build_run(args, rt, log, checkpoint):
    B, T = args.device_batch_size, args.sequence_length
    train_loader = DistributedDataLoader(args.input_bin, B, T, rt.rank, rt.world_size, rt.device, args.data_seed)
    val_loader = DistributedDataLoader(args.input_val_bin, B, T, rt.rank, rt.world_size, rt.device)
    log(f"training data: {len(train_loader.files)} shards, {sum(train_loader.shard_tokens):,} tokens, order: "
        + (f"sampled (data_seed {args.data_seed})" if args.data_seed else "record")
        + f"; validation: {sum(val_loader.shard_tokens):,} tokens")
    steps_of_data = train_loader.batches_per_pass() // (args.batch_size // (B * rt.world_size))
    if steps_of_data < args.num_iterations:
        log(f"warning: the training shards hold {steps_of_data} steps, fewer than --num_iterations; the loader "
            + ("starts a new order" if args.data_seed else "wraps around") + " (download more shards to avoid it)")
    model = GPT(args).to(rt.device)
    optimizers = make_optimizers(model, args, rt.dtype, compile_ns=rt.compile_model)
    sync = torch.cuda.synchronize if rt.cuda else lambda: None
    state = TrainState(model, optimizers, train_loader, TrainClock(sync=sync))
    if checkpoint:  # the inverse of write_checkpoint
        state.clock.ms, state.clock.steps = checkpoint["train_time_ms"], checkpoint["timed_steps"]
        model.load_state_dict(checkpoint["model"])
        for opt, saved in zip(state.optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(saved)
        train_loader.load_state_dict(checkpoint["train_loader"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if rt.cuda and "cuda" in checkpoint["rng"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    # the model as the steps run it: compiled, and DDP-wrapped on several ranks (on one it would only split the graph)
    wrapped = torch.compile(model) if rt.compile_model else model
    wrapped = DDP(wrapped, device_ids=[rt.device.index] if rt.cuda else None) if rt.world_size > 1 else wrapped
    return state, wrapped, val_loader, checkpoint["step"] if checkpoint else 0

def cpu_model():
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine() or "unknown"

class RunLog:
    """logs/<run id>.txt, the record: this file's source, the machine, then the run (a resume appends)."""
    def __init__(self, args, rt, checkpoint=None):
        self.code = open(os.path.abspath(__file__)).read()
        self.run_id = checkpoint["run_id"] if checkpoint else str(uuid.uuid4())
        self.run_dir = os.path.join(args.log_dir, self.run_id)
        self.path = self.run_dir + ".txt"
        self.master, self.wandb = rt.master, None
        if self.master:
            os.makedirs(self.run_dir, exist_ok=True)
            if not os.path.exists(self.path):
                smi = subprocess.run("nvidia-smi", shell=True, capture_output=True, text=True).stdout or "none\n"
                fence = "=" * 100 + "\n"
                with open(self.path, "w") as f:
                    f.write(f"{fence}{self.code}{fence}Running pytorch {torch.version.__version__} compiled for CUDA "
                            f"{torch.version.cuda}\npython {platform.python_version()}, cpu: {cpu_model()}, "
                            f"{os.cpu_count()} cores\nnvidia-smi:\n{smi}\n{fence}")
            if args.wandb:
                import wandb
                self.wandb = wandb.init(project=args.wandb_project, name=self.run_id, resume="allow", config=vars(args))
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
            why = (f"torch {torch.__version__} has no grouped_mm (upgrade torch)" if grouped_mm is None else
                   "torch.compile traces grouped_mm in bf16 only (use --dtype bfloat16, or --no-compile)")
            self(f"warning: the MoE's slow path, every expert on every token ({args.num_experts}x the FLOPs): {why}")

    def __call__(self, line, console=True):
        if self.master:
            if console:
                print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def metrics(self, values, step):
        if self.wandb:
            self.wandb.log(values, step=step)

def report_routers(step, train_load, val_stats, model, args, rt, log):
    """A collective: a line per MoE layer (max_violation: the largest train load x E - 1), and a warning per layer
    whose experts fall below a quarter of a uniform val load. train_load: this rank's tokens since the last."""
    def value(v):
        return ",".join(f"{x:.4f}" for x in v.tolist()) if v.dim() else f"{v.item():.4g}"

    train_load = rt.all_reduce_sum(train_load.clone())
    train_frac, val_frac = (x / x.sum(dim=-1, keepdim=True).clamp_min(1) for x in (train_load, val_stats["load"]))
    E, prefix, floor = val_frac.size(1), f"step:{step}/{args.num_iterations}", 0.25 / val_frac.size(1)
    max_violation = torch.where(train_load.sum(-1) > 0, train_frac.max(-1).values * E - 1, float("nan"))
    fields_ = dict(train_load=train_frac, val_load=val_frac, max_violation=max_violation, gate_mean=val_stats["gate"],
                   **{k: val_stats[k] for k in ["entropy"] if k in val_stats})
    if args.router_bias_rate:
        fields_.update(bias=torch.stack([block.mlp.router.bias for block in model.transformer.h]))
    for layer in range(len(val_frac)):
        log(f"{prefix} router layer:{layer} " + " ".join(f"{k}:{value(v[layer])}" for k, v in fields_.items()),
            console=False)
    for layer in range(len(val_frac)):  # one line per layer, however many experts starve
        starved = (val_frac[layer] < floor).nonzero().flatten()
        if len(starved):
            log(f"{prefix} warning: layer {layer} experts {','.join(map(str, starved.tolist()))} val_load "
                f"{value(val_frac[layer, starved])} below a quarter of uniform ({floor:.4f})")


if __name__ == "__main__":
    exit_code = main()
    # skip the interpreter's teardown, where DDP's gloo thread aborts ~1 run in 20 (cf. pytorch/pytorch#179291)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(exit_code)
