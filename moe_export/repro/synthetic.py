"""The synthetic task of the paper's theory: data, a two-layer MoE, and its SGD training.

Data (paper Sec. 4, reconstructed in shared/paper-notes.md section 9): every token is an orthonormal
feature plus small noise. A sample of class y in {+1, -1} holds exactly ONE class-relevant token; for
each class there is a frequent feature (probability 1 - alpha) and an infrequent one (probability
alpha). All other tokens are drawn from class-independent irrelevant patterns.

Model: k experts, each a ReLU layer W1^(s) [m, d] with a FIXED output layer a^(s) (+-1/m), and a
router w_s [d]. Expert-choice routing (the theory's setting): expert s takes the top-l tokens of a
sample by <w_s, x_j> and weights them by a softmax over those l scores. Token-choice top-1 is the
robustness variant. Trained from a small router init with plain SGD on the hinge loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

# Feature rows of SyntheticTask.features: the four class-relevant ones first, then the irrelevant ones.
FREQ_POS, FREQ_NEG, RARE_POS, RARE_NEG = 0, 1, 2, 3
N_RELEVANT = 4


@dataclass
class SyntheticConfig:
    d: int = 64  # token dim
    n_tokens: int = 16  # tokens per sample
    n_irrelevant: int = 16  # class-independent patterns
    alpha: float = 0.1  # probability of the infrequent feature of a class
    noise: float = 0.1  # std of the Gaussian noise of a token (whole vector norm ~ noise)
    n_experts: int = 8  # k
    n_neurons: int = 16  # m
    top_l: int = 2  # tokens per expert (expert-choice)
    routing: str = "expert_choice"  # or "token_choice" (top-1)
    router_init_std: float = 1e-3  # small router init: the theory's premise
    # Per-entry std of W1; row norm ~ expert_init_std * sqrt(d). The sweep (experiments.BASE) uses 2-4:
    # the learned feature part of a row is then small next to its random part, so RTN error, which
    # scales with the whole row, is large relative to the signal and the bit width decides what survives.
    expert_init_std: float = 0.1
    lr: float = 0.1
    batch: int = 32
    steps: int = 600
    loss: str = "hinge"  # or "logistic" (never saturates: margins keep growing with feature frequency)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha={self.alpha}: the infrequent-feature probability must be in (0, 0.5)")
        if N_RELEVANT + self.n_irrelevant > self.d:
            raise ValueError(
                f"{N_RELEVANT} relevant + {self.n_irrelevant} irrelevant features do not fit orthonormally in d={self.d}; "
                "raise d or lower n_irrelevant"
            )
        if self.loss not in ("hinge", "logistic"):
            raise ValueError(f"loss={self.loss!r}: use 'hinge' or 'logistic'")
        if self.routing not in ("expert_choice", "token_choice"):
            raise ValueError(f"routing={self.routing!r}: use 'expert_choice' or 'token_choice'")
        if not 1 <= self.top_l <= self.n_tokens:
            raise ValueError(f"top_l={self.top_l} must be between 1 and n_tokens={self.n_tokens}")
        if self.n_neurons % 2:
            raise ValueError(f"n_neurons={self.n_neurons} must be even (half the output weights are +1/m, half -1/m)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    x: torch.Tensor  # [B, n, d]
    y: torch.Tensor  # [B] float in {+1, -1}
    rare: torch.Tensor  # [B] bool: the class token is the infrequent feature
    pos: torch.Tensor  # [B] position of the class token


class SyntheticTask:
    """Orthonormal features (rows of a random orthogonal matrix) and the sampler of the theory's data."""

    def __init__(self, cfg: SyntheticConfig, seed: int = 0):
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=g, dtype=torch.float64))
        # Dense directions (not basis vectors): a spike in one coordinate would make per-row RTN trivially exact.
        self.features = q.T[: N_RELEVANT + cfg.n_irrelevant].float().contiguous()  # [4 + K, d]

    def sample(self, batch: int, generator: torch.Generator, rare: bool | None = None) -> Batch:
        """``rare=None`` draws the infrequent feature with probability alpha; True/False forces it."""
        cfg, n = self.cfg, self.cfg.n_tokens
        y = torch.randint(0, 2, (batch,), generator=generator) * 2 - 1  # [B]
        if rare is None:
            is_rare = torch.rand(batch, generator=generator) < cfg.alpha
        else:
            is_rare = torch.full((batch,), bool(rare))
        feat = torch.where(y > 0, FREQ_POS, FREQ_NEG) + 2 * is_rare.long()  # [B] index into features
        idx = N_RELEVANT + torch.randint(0, cfg.n_irrelevant, (batch, n), generator=generator)  # [B, n]
        pos = torch.randint(0, n, (batch,), generator=generator)
        idx[torch.arange(batch), pos] = feat
        x = self.features[idx]  # [B, n, d]
        x = x + cfg.noise / cfg.d**0.5 * torch.randn(x.shape, generator=generator)
        return Batch(x, y.float(), is_rare, pos)


class TwoLayerMoE(nn.Module):
    """f(x) = sum_s sum_{j in J_s} G_j(s) * a_s . relu(W1^(s) x_j)."""

    def __init__(self, cfg: SyntheticConfig, generator: torch.Generator):
        super().__init__()
        k, m, d = cfg.n_experts, cfg.n_neurons, cfg.d
        self.cfg = cfg
        self.router = nn.Parameter(cfg.router_init_std * torch.randn(k, d, generator=generator))  # [k, d]
        self.w1 = nn.Parameter(cfg.expert_init_std * torch.randn(k, m, d, generator=generator))  # [k, m, d]
        sign = torch.cat([torch.ones(m // 2), -torch.ones(m // 2)])
        self.register_buffer("a", sign.expand(k, m) / m)  # [k, m], fixed: the theory trains W1 and the router only

    def expert_outputs(self, x: torch.Tensor, w1: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert on every token: [B, n, k]. ``w1`` overrides the weights (quantized copies)."""
        w1 = self.w1 if w1 is None else w1
        h = torch.relu(torch.einsum("bnd,kmd->bnkm", x, w1))  # [B, n, k, m]
        return torch.einsum("bnkm,km->bnk", h, self.a)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights G [B, n, k]; zero where a token is not routed to an expert."""
        logits = x @ self.router.T  # [B, n, k]
        if self.cfg.routing == "expert_choice":
            top, idx = logits.topk(self.cfg.top_l, dim=1)  # [B, l, k]: each expert picks its tokens
            return torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=1))
        probs = torch.softmax(logits, dim=-1)  # [B, n, k]: each token picks its expert
        top, idx = probs.max(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter(-1, idx, top)

    def forward(self, x: torch.Tensor, w1: torch.Tensor | None = None) -> torch.Tensor:
        return (self.gates(x) * self.expert_outputs(x, w1)).sum((1, 2))  # [B]

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert share of the prediction: [B, k]."""
        return (self.gates(x) * self.expert_outputs(x)).sum(1)


@dataclass
class TrainResult:
    model: TwoLayerMoE
    router_init: torch.Tensor  # [k, d]
    w1_init: torch.Tensor  # [k, m, d]
    losses: list[float]
    train_acc: float


def loss_fn(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return torch.clamp(1 - y * f, min=0).mean()
    return torch.nn.functional.softplus(-y * f).mean()


def train(task: SyntheticTask, cfg: SyntheticConfig | None = None) -> TrainResult:
    """Plain SGD from the config's seed; deterministic for a seed."""
    cfg = cfg or task.cfg
    g = torch.Generator().manual_seed(cfg.seed)
    model = TwoLayerMoE(cfg, g)
    router_init, w1_init = model.router.detach().clone(), model.w1.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(cfg.steps):
        b = task.sample(cfg.batch, g)
        loss = loss_fn(cfg.loss, model(b.x), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        b = task.sample(1024, g)
        train_acc = (torch.sign(model(b.x)) == b.y).float().mean().item()
    return TrainResult(model, router_init, w1_init, losses, train_acc)


# ---- what the theory talks about -------------------------------------------------------------


def router_norm_change(result: TrainResult) -> torch.Tensor:
    """Lambda_s = ||w_s^(T)|| - ||w_s^(0)||, signed (paper Sec. 3). [k]"""
    return result.model.router.detach().norm(dim=1) - result.router_init.norm(dim=1)


def learned_feature(result: TrainResult, task: SyntheticTask) -> torch.Tensor:
    """Index of the class-relevant feature each router moved towards most, or -1 when the router
    moved more towards an irrelevant pattern. [k]"""
    delta = result.model.router.detach() - result.router_init  # [k, d]
    align = delta @ task.features.T  # [k, 4 + K]
    best = align.argmax(dim=1)
    return torch.where(best < N_RELEVANT, best, torch.full_like(best, -1))


def maxvar(w1: torch.Tensor) -> torch.Tensor:
    """Max over neurons of the variance of the neuron's weights across the input dim. [k]"""
    return w1.detach().var(dim=-1).amax(dim=-1)


@torch.no_grad()
def accuracy(model: TwoLayerMoE, batch: Batch, w1: torch.Tensor | None = None) -> float:
    return (torch.sign(model(batch.x, w1)) == batch.y).float().mean().item()


@torch.no_grad()
def activation_frequency(model: TwoLayerMoE, batch: Batch) -> torch.Tensor:
    """Share of calibration samples on which an expert contributes the largest |output| (a PMQ-style
    calibration statistic; with expert-choice every expert takes l tokens of every sample, so plain
    routing counts are equal and carry no signal). [k]"""
    top = model.contributions(batch.x).abs().argmax(dim=1)  # [B]
    return torch.bincount(top, minlength=model.cfg.n_experts).float() / len(top)


def quantize_experts(w1: torch.Tensor, bits, group_size: int | None = None, table: dict | None = None) -> torch.Tensor:
    """Per-row asymmetric RTN of each expert's first layer at its own width; dequantized [k, m, d].
    A width of 16 or more keeps the expert in float. ``table`` (from ``quantize_table``) caches the
    dequantized experts so sweeps quantize each (expert, width) once."""
    table = table if table is not None else {}
    out = []
    for s, b in enumerate(int(b) for b in bits):
        if b >= 16:
            out.append(w1[s].detach())
            continue
        if b not in table:
            table[b] = _rtn_all(w1, b, group_size)
        out.append(table[b][s])
    return torch.stack(out)


def quantize_table(w1: torch.Tensor, widths=range(1, 9), group_size: int | None = None) -> dict:
    return {b: _rtn_all(w1, b, group_size) for b in widths}


def _rtn_all(w1: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    from moe_export.quant.rtn import RTNQuantizer

    rtn = RTNQuantizer()
    return torch.stack([rtn.quantize(w.detach(), bits, group_size, symmetric=False).dequantize() for w in w1])
