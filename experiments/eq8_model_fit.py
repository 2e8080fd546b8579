"""Eq. (8) trainable as written: what the marginal's weight in the learning loss does to the
model (Marino & Yue, 003_…; issue 19 point 2).

The loss is ``-(eq. 8) - (1 - w) log p(x, r | z_<t)`` (pplrl.elbo.POMDPELBO's
``marginal_weight`` w; the marginal is the upper estimate of pplrl.infogain, so the logged
eq. 8 is a bound). w = 1 is eq. 8 as written; w = 0 adds the evidence term (reward + the
sequential-VAE bound on log p(x, r)); w in between weighs the two; ``anneal`` raises w from 0 to 1 over the first half
of the updates (the paper's suggestion, Sec. 4). Fitted offline, with the same seed, on the
same random-walk data of ``--env``, then measured on held-out windows:

* ``log_lik``: E_q log p(x_t, r_t | z_t) per step (reconstruction);
* ``pred_upper`` / ``pred_lower``: log p(x_t, r_t | z_<t) per step, the one-step predictive
  density, sandwiched by the contrastive (upper) and prior-only (lower) estimates at K = 256;
* ``open_loop_mse``: squared error of x predicted ``--ahead`` steps open-loop (transition
  means under the executed actions) from the filtered state;
* ``eq8``: the logged eq. (8) per step (less reward and KL_a: info_gain - kl_z, <= 0), and
  ``info_gain``, ``kl_z``.

Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from guides.pomdp import FilteringGuide, pomdp_guide
from models.pomdp import POMDPModel, Window, pomdp_model
from pplrl.elbo import POMDPELBO
from pplrl.envs import make_continuous_env, pomdp_spec
from pplrl.envs.pomdp import split_view
from pplrl.infogain import contrastive_log_marginal, prior_log_marginal


def random_walk_windows(env_id: str, n: int, T: int, seed: int, hold: int = 2) -> Window:
    """``n`` windows of T steps from episodes of held uniform random actions."""
    env = make_continuous_env(env_id)
    rng = np.random.default_rng(seed)
    xs, rs, aps = [], [], []
    ep = 0
    while len(xs) < n:
        obs, _ = env.reset(seed=seed * 100_000 + ep)
        ep += 1
        x_ep, r_ep, ap_ep, a_prev, done, t = [], [], [], np.zeros(env.action_space.shape), False, 0
        while not done:
            x, r, _ = split_view(obs)
            x_ep.append(x), r_ep.append(r), ap_ep.append(a_prev)
            if t % hold == 0:
                a = rng.uniform(-1, 1, env.action_space.shape)
            obs, _, term, trunc, _ = env.step(a.astype(np.float32))
            a_prev, done, t = a, term or trunc, t + 1
        for s in range(0, len(x_ep) - T + 1, T):
            xs.append(x_ep[s:s + T]), rs.append(r_ep[s:s + T]), aps.append(ap_ep[s:s + T])
    env.close()
    x, r, ap = (torch.tensor(np.array(v[:n]), dtype=torch.float32) for v in (xs, rs, aps))
    zeros = torch.zeros_like(ap)
    return Window(x=x, r=r, a_prev=ap, qa_loc=zeros, qa_scale=zeros + 1.0, act=zeros, rew=torch.zeros_like(r),
                  done=torch.zeros_like(r))


def batch(w: Window, idx) -> Window:
    return Window(*(getattr(w, f)[idx] for f in ("x", "r", "a_prev", "qa_loc", "qa_scale", "act", "rew", "done")))


@torch.no_grad()
def measure(model, guide, w: Window, K: int, ahead: int) -> dict:
    B, T = w.shape
    elbo = POMDPELBO()
    elbo.loss(pomdp_model, pomdp_guide, model, guide, w, K=8)
    t = elbo.last_terms
    z = guide.filter(model, w, sample=False)
    upper, lower = [], []
    for s in range(1, T):
        pz = model.transition(z[:, s - 1], w.a_prev[:, s])
        post = guide.step(model, z[:, s - 1], w.a_prev[:, s], w.x[:, s], w.r[:, s]).sample()
        ll = lambda zk, s=s: model.emitter.log_prob(zk, w.x[:, s], w.r[:, s])  # noqa: E731
        upper.append(contrastive_log_marginal(pz, ll, ll(post), K).mean())
        lower.append(prior_log_marginal(pz, ll, K).mean())
    mse = []
    for s in range(T - ahead):
        zk = z[:, s]
        for k in range(1, ahead + 1):
            zk = model.transition(zk, w.a_prev[:, s + k]).mean
        mse.append(((model.emitter(zk)[0].mean - w.x[:, s + ahead]) ** 2).sum(-1).mean())
    return {"log_lik": t["log_lik"] / T, "pred_upper": float(torch.stack(upper).mean()),
            "pred_lower": float(torch.stack(lower).mean()), "open_loop_mse": float(torch.stack(mse).mean()),
            "eq8": (t["info_gain"] - t["kl_z"]) / T, "info_gain": t["info_gain"] / T, "kl_z": t["kl_z"] / T}


def fit(setting: str, data: Window, test: Window, args, x_dim: int, a_dim: int) -> dict:
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    model = POMDPModel(x_dim, a_dim, z_dim=8, hidden=64, h_dim=64, x_scale=args.x_scale or None)
    guide = FilteringGuide(x_dim, a_dim, z_dim=8, h_dim=64, hidden=64)
    w_final = 1.0 if setting == "anneal" else float(setting.split("=", 1)[1])
    elbo = POMDPELBO(marginal_weight=w_final, free_nats=args.free_nats)
    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=3e-3)
    rng = np.random.default_rng(args.seed)
    curve = []
    for i in range(args.updates):
        if setting == "anneal":
            elbo.marginal_weight = min(1.0, i / (args.updates / 2))
        idx = rng.integers(0, data.shape[0], args.batch)
        loss = elbo.differentiable_loss(pomdp_model, pomdp_guide, model, guide, batch(data, idx), K=args.K)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % max(1, args.updates // 4) == 0:
            curve.append({"update": i + 1, **measure(model, guide, test, 256, args.ahead)})
    return {"setting": setting, **curve[-1], "curve": curve}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="pplrl/LightDark-v0")
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--ahead", type=int, default=4)
    p.add_argument("--x-scale", type=float, default=0.0, help="0: learned, state-dependent")
    p.add_argument("--free-nats", type=float, default=0.0, help="PlaNet's free nats on KL_z in the loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+", default=["w=0", "w=1", "anneal"], help="w=<weight> or anneal")
    p.add_argument("--out", default="runs/eq8_model_fit.json")
    args = p.parse_args(argv)
    for setting in args.settings:
        if setting != "anneal" and not (setting.startswith("w=") and 0 <= float(setting[2:]) <= 1):
            p.error(f"a setting is w=<weight in [0, 1]> or anneal, got {setting!r}")
    torch.set_num_threads(1)
    env = make_continuous_env(args.env)
    x_dim, a_dim = pomdp_spec(env).x_dim, env.action_space.shape[0]
    env.close()
    data = random_walk_windows(args.env, 400, args.window, seed=args.seed)
    test = random_walk_windows(args.env, 128, args.window, seed=args.seed + 1000)
    rows, t0 = [], time.time()
    for setting in args.settings:
        rows.append(fit(setting, data, test, args, x_dim, a_dim))
    keys = ["log_lik", "pred_upper", "pred_lower", "open_loop_mse", "eq8", "info_gain", "kl_z"]
    lines = ["| loss | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {r['setting']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    print(f"{args.env}, {args.updates} updates, free nats {args.free_nats}, seed {args.seed}, held-out windows "
          f"({time.time() - t0:.0f} s)")
    print(table)
    out = {"args": vars(args), "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
