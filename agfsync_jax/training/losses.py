"""Training objectives on UNet predictions, as pure functions, and the registry the step uses.

Every loss takes predictions and regression targets stacked by *view*: a view is one
(image, prompt) combination the UNet is run on, with leading shape (V, B, C, H, W). The spec of
each loss (`LossSpec`) says which views it needs, whether it needs the frozen reference model,
and whether views share one noise draw. Noise, timesteps and the forward passes live in
`objective.objective`; this module only turns predictions into a scalar and metrics.
The cross-validation loss shares one noise draw and timestep across all four views of a record
(the paper leaves this open): the two triples then differ only in their text.

Diffusion-DPO (Wallace et al. 2023; docs/design.md section 8), per pair with shared noise and t:

    err(m, x)  = mean_{C,H,W} (m(x_t, t, c) - target)^2
    inside     = -beta/2 * ((err_theta(x_w) - err_theta(x_l)) - (err_ref(x_w) - err_ref(x_l)))
    loss       = mean(-log sigmoid(inside)),   implicit accuracy = mean(inside > 0)

`inside` is the implicit reward margin r(x_w) - r(x_l) with r(x) = -beta/2 (err_theta - err_ref).
At theta == ref it is 0, so the loss is log 2, while its gradient (through err_theta) is not 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from agfsync_jax import schemas

WINNER = "winner"
LOSER = "loser"

Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, "jax.Array | None", jax.Array, float], tuple[jax.Array, Metrics]]


def _at_least_f32(x: jax.Array) -> jax.Array:
    """bf16/f16 predictions are scored in float32; float64 (tests under x64) stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """(V, B, C, H, W) -> (V, B): squared error averaged over C, H, W, in float32 or wider."""
    diff = _at_least_f32(pred) - _at_least_f32(target)
    return jnp.mean(jnp.square(diff), axis=tuple(range(2, diff.ndim)))


def per_example_error_gap(policy_pred: jax.Array, ref_pred: jax.Array, target: jax.Array) -> jax.Array:
    """(V, B): per_example_mse(policy) - per_example_mse(ref), computed accurately.

    Written as mean((p - r)(p + r - 2t)) rather than as the difference of two means: the policy
    stays close to the reference, so the two means agree in most of their float32 digits and
    subtracting them would leave rounding noise that beta = 5000 amplifies into the loss. This
    form is exactly 0 when p == r and has the same gradient in p, 2(p - t).
    """
    p, r, t = _at_least_f32(policy_pred), _at_least_f32(ref_pred), _at_least_f32(target)
    return jnp.mean((p - r) * ((p - t) + (r - t)), axis=tuple(range(2, p.ndim)))


def _preference_terms(inside: jax.Array, policy_w: jax.Array, policy_l: jax.Array,
                      ref_w: jax.Array, ref_l: jax.Array) -> tuple[jax.Array, Metrics]:
    loss = jnp.mean(-jax.nn.log_sigmoid(inside))
    metrics = {
        "loss": loss,
        "implicit_acc": jnp.mean((inside > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(inside),
        "policy_err_w": jnp.mean(policy_w),
        "policy_err_l": jnp.mean(policy_l),
        "ref_err_w": jnp.mean(ref_w),
        "ref_err_l": jnp.mean(ref_l),
    }
    return loss, metrics


def _require_reference(ref_pred: jax.Array | None, name: str) -> jax.Array:
    if ref_pred is None:
        raise ValueError(f"loss {name!r} needs reference-model predictions")
    return ref_pred


def dpo_loss(policy_pred: jax.Array, ref_pred: jax.Array | None, target: jax.Array,
             beta: float) -> tuple[jax.Array, Metrics]:
    """Diffusion-DPO. Views: [winner | prompt, loser | prompt]."""
    ref_pred = _require_reference(ref_pred, "dpo")
    gap_w, gap_l = per_example_error_gap(policy_pred, ref_pred, target)
    inside = -0.5 * beta * (gap_w - gap_l)  # == ((pw - pl) - (rw - rl)), see error_gap
    pw, pl = per_example_mse(policy_pred, target)
    rw, rl = per_example_mse(ref_pred, target)
    return _preference_terms(inside, pw, pl, rw, rl)


def cross_dpo_loss(policy_pred: jax.Array, ref_pred: jax.Array | None, target: jax.Array,
                   beta: float) -> tuple[jax.Array, Metrics]:
    """InstructEngine's cross-validation DPO (InstructEngine Eq. 8).

    A record holds instructions x1, x2 and images y1 (matches x1), y2 (matches x2). Views:
    [y1 | x1, y2 | x1, y2 | x2, y1 | x2], i.e. the triples (x1, y1 > y2) and (x2, y2 > y1). Both
    triples' DPO margins are summed inside one log-sigmoid, as in the paper. (Eq. 8 as printed
    repeats Delta_{x1^l} in the second difference; by the definitions above it, Eq. 7, the
    second triple's own loser term is meant, which is what we use.)
    """
    ref_pred = _require_reference(ref_pred, "cross_dpo")
    g1w, g1l, g2w, g2l = per_example_error_gap(policy_pred, ref_pred, target)
    inside_1 = -0.5 * beta * (g1w - g1l)
    inside_2 = -0.5 * beta * (g2w - g2l)
    p1w, p1l, p2w, p2l = per_example_mse(policy_pred, target)
    r1w, r1l, r2w, r2l = per_example_mse(ref_pred, target)
    loss, metrics = _preference_terms(inside_1 + inside_2, (p1w + p2w) / 2, (p1l + p2l) / 2,
                                      (r1w + r2w) / 2, (r1l + r2l) / 2)
    # How often each triple alone already ranks its two images the right way.
    metrics["implicit_acc_x1"] = jnp.mean((inside_1 > 0).astype(jnp.float32))
    metrics["implicit_acc_x2"] = jnp.mean((inside_2 > 0).astype(jnp.float32))
    return loss, metrics


def released_code_dpo_loss(policy_pred: jax.Array, ref_pred: jax.Array | None, target: jax.Array,
                           beta: float) -> tuple[jax.Array, Metrics]:
    """The AGFSync authors' released-code variant (docs/design.md section 10), for comparisons.

    The error of a model on winners (losers) is the L2 norm of the whole batch's residual, not
    squared and not per example, so the batch yields one margin; winners and losers get
    independent noise (see `LossSpec.independent_noise`). The authors use beta = 1. Views:
    [winner | prompt, loser | prompt]. With gradient accumulation the "batch" is a microbatch.
    """
    ref_pred = _require_reference(ref_pred, "released_code_dpo")

    def batch_norm(pred: jax.Array) -> jax.Array:
        diff = _at_least_f32(pred) - _at_least_f32(target)
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=tuple(range(1, diff.ndim))))

    pw, pl = batch_norm(policy_pred)
    rw, rl = batch_norm(ref_pred)
    # |a| - |b| = (|a|^2 - |b|^2) / (|a| + |b|), with the numerator from the accurate gap.
    num_elements = policy_pred[0].size
    gap_w, gap_l = num_elements * jnp.mean(per_example_error_gap(policy_pred, ref_pred, target), axis=1)
    inside = -0.5 * beta * (gap_w / (pw + rw) - gap_l / (pl + rl))
    return _preference_terms(inside, pw, pl, rw, rl)


def sft_loss(policy_pred: jax.Array, ref_pred: jax.Array | None, target: jax.Array,
             beta: float) -> tuple[jax.Array, Metrics]:
    """Plain denoising loss on the winners only (the SFT baseline). Views: [winner | prompt]."""
    del ref_pred, beta
    err = per_example_mse(policy_pred, target)
    loss = jnp.mean(err)
    return loss, {"loss": loss, "policy_err_w": loss}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the train step feeds a loss.

    views: (image, prompt slot) per forward view; slot 0 is `prompt`, slot 1 is `prompt_2`.
    """

    name: str
    fn: LossFn
    views: tuple[tuple[str, int], ...]
    uses_reference: bool
    independent_noise: bool = False
    # Pair kinds the loss can train on; None: any.
    requires_pair_kind: str | None = None

    @property
    def reads_losers(self) -> bool:
        """Whether the loss looks at `loser`: SFT records (one image, kind PAIR_SFT) have none."""
        return any(image == LOSER for image, _ in self.views)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_prompts(self) -> int:
        return 1 + max(slot for _, slot in self.views)

    @property
    def num_noise(self) -> int:
        """Noise draws per pair: one shared by all views, or one per view."""
        return self.num_views if self.independent_noise else 1


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec("dpo", dpo_loss, ((WINNER, 0), (LOSER, 0)), uses_reference=True),
    # In a cross pair `winner` (y1) wins under `prompt` (x1) and `loser` (y2) under `prompt_2`.
    "cross_dpo": LossSpec("cross_dpo", cross_dpo_loss,
                          ((WINNER, 0), (LOSER, 0), (LOSER, 1), (WINNER, 1)),
                          uses_reference=True, requires_pair_kind=schemas.PAIR_CROSS),
    "released_code_dpo": LossSpec("released_code_dpo", released_code_dpo_loss,
                                  ((WINNER, 0), (LOSER, 0)), uses_reference=True,
                                  independent_noise=True),
    "sft": LossSpec("sft", sft_loss, ((WINNER, 0),), uses_reference=False),
}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"train.loss={name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]
