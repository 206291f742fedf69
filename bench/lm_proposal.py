"""Why precompute.lm.proposal_temperature < 1 is refused: importance weights and gradient variance of the sampled
codec's KD term as the proposal temperature tau changes.

One teacher position with V = 1000 Zipf-like logits (log-probability -1.1 log(rank) plus N(0, 0.3) noise, ranks
shuffled) and a student that does not match it yet (the teacher's logits plus N(0, 1) noise). The position is
encoded R times by the sampled codec itself (`stages.tasks.lm_codecs._encode_chunk`: n = 12 draws from
q ~ p^(1/tau) per encoding, each encoding an independent draw from one seeded generator), and the KD term of each
is `stages.losses.sampled_kl` (forward KL at T = 1). For each tau the table gives, over the R encodings:

- max p/q and its 99.9th percentile: the largest importance weight of a drawn id (p/q = exp(log p (1 - 1/tau) +
  log Z));
- bias: |mean gradient - exact gradient| / |exact gradient|, the exact one being that of the full KL(p || s)
  (s - p w.r.t. the student's logits): near 0 for every tau (the estimate is unbiased), up to sampling noise;
- variance: the mean squared distance of one encoding's gradient from the exact gradient, relative to tau = 1
  (the trace of the gradient's covariance), and its range over the seeds.

    python bench/lm_proposal.py            # R = 20,000 encodings per tau, seeds 0, 1, 2
    python bench/lm_proposal.py --quick    # R = 2,000, seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.losses import sampled_kl  # noqa: E402
from stages.tasks.lm_codecs import _encode_chunk  # noqa: E402

V, SAMPLES = 1000, 12
TAUS = (0.5, 0.7, 1.0, 2.0)


def _position(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Zipf-like teacher's logits [V] and a student's that differ from them, both seeded."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=gen).double() + 1
    teacher = -1.1 * rank.log() + 0.3 * torch.randn(V, generator=gen, dtype=torch.float64)
    student = teacher + torch.randn(V, generator=gen, dtype=torch.float64)
    return teacher.float(), student.float()


def measure(tau: float, repeats: int, seed: int) -> dict[str, float]:
    teacher, student = _position(seed)
    lm = SimpleNamespace(codec="sampled", temperature=1.0, samples=SAMPLES, proposal_temperature=tau)
    enc = _encode_chunk(teacher.expand(repeats, V).contiguous(), lm, torch.Generator().manual_seed(seed + 1))
    used = enc["sample_counts"] > 0
    log_p = enc["sample_logprobs"].float()
    log_w = log_p * (1 - 1 / tau) + enc["proposal_lognorm"].unsqueeze(-1)
    weights = log_w.exp()[used]
    logits = student.expand(repeats, V).clone().requires_grad_(True)
    sampled_kl(logits, enc["sample_ids"], enc["sample_counts"], enc["sample_logprobs"], enc["proposal_lognorm"],
               tau, samples=SAMPLES, temperature=1.0).sum().backward()
    grads = logits.grad.double()
    exact = (student.double().softmax(-1) - teacher.double().softmax(-1))
    return {"max_w": float(weights.max()), "p999_w": float(weights.double().quantile(0.999)),
            "bias": float((grads.mean(0) - exact).norm() / exact.norm()),
            "variance": float(((grads - exact) ** 2).sum(-1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="R = 2,000 encodings, one seed")
    args = ap.parse_args()
    repeats, seeds = (2000, (0,)) if args.quick else (20000, (0, 1, 2))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs = {tau: [measure(tau, repeats, s) for s in seeds] for tau in TAUS}
    base = [r["variance"] for r in runs[1.0]]
    print(f"V = {V}, n = {SAMPLES} draws, R = {repeats:,} encodings per tau, seeds {list(seeds)} "
          "(max p/q, p99.9 and bias: seed 0)")
    print("| tau | max p/q | p99.9 p/q | bias (rel.) | variance / tau=1 (seeds) |")
    print("|---|---|---|---|---|")
    for tau, rs in runs.items():
        ratios = [r["variance"] / b for r, b in zip(rs, base)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"
        print(f"| {tau:g} | {rs[0]['max_w']:.1f} | {rs[0]['p999_w']:.1f} | {rs[0]['bias']:.3f} | {spread} |")


if __name__ == "__main__":
    main()
