"""The f-distill GMM step in PyTorch, side by side with the JAX step: steps/s and their ratio.

    pip install -e ".[bench]"   # torch; the CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu
    python benchmarks/torch_reference.py [--width 64] [--batch 256] [--seconds 5] [--rounds 3] [--check]

One step = one generator update of `ml_collections_configs/gmm_fdistill.py` (f-distill, arXiv
2502.15681, JS weighting) with its K = `distill.fake_updates_per_gen` critic updates (fake score
DSM + discriminator head on the fake score's features), exactly as `fdistill.objectives.distill`:
the same residual MLP (Fourier noise embedding, LayerNorm residual blocks, EDM preconditioning), the
same batch (K real batches of B points per step), the same analytic GMM teacher, the same ratio
normalisations, Adam with global-norm clipping per network. Each framework runs in its own process
(several models in one torch process measured 10-40x too slow here), rounds alternate JAX and
PyTorch (each worker times the best of three windows), and the script prints the median and best
steps/s of each and the ratio JAX / PyTorch. `--threads 1` pins both workers to one core and one
thread. PyTorch workers get OMP_WAIT_POLICY=PASSIVE unless it is set: with other jobs on the
machine, spinning OpenMP threads made 2-thread PyTorch 20-100x slower.

`--check` first verifies that the two steps compute the same update: it copies the JAX initial
parameters into the PyTorch modules, replays the JAX step's random draws, and compares the losses
and the updated parameters of one step (it needs both frameworks in one process; it times nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ----- the shared specification (built from the fdistill config; JAX side) ----------------------------


def fdistill_config(width: int, batch: int):
    from fdistill import configs

    c = configs.override(configs.load("gmm_fdistill"), configs.STUDENT_CONTINUOUS)  # as measured: no categories
    c.model.width, c.train.batch_size = width, batch
    return c


def spec_from_config(config) -> dict:
    """Every number the PyTorch step needs, taken from the objective built by fdistill."""
    from fdistill import objectives

    obj = objectives.build(config)
    dc, gmm = config.distill, obj.source.gmm
    if (dc.disc_on != "fake_score" or obj.div.name not in H_FUNCTIONS or dc.ratio_binning != "index"
            or dc.fake_loss != "edm" or obj.name != "distill"):
        raise SystemExit(f"torch_reference supports the one-step student, disc_on='fake_score', index ratio bins, "
                         f"the EDM fake loss and divergences {list(H_FUNCTIONS)}")
    if config.model.name != "mlp" or config.train.warmup_steps or config.train.weight_decay:
        raise SystemExit("torch_reference supports the MLP, no warm-up and no weight decay")
    return {
        "width": int(config.model.width), "depth": int(config.model.depth), "emb_dim": int(config.model.emb_dim),
        "dim": int(obj.source.shape[0]), "batch": int(config.train.batch_size), "K": obj.critic_updates,
        "sigma_data": float(obj.teacher.sigma_data), "grid": [float(s) for s in obj.levels.grid],
        "index_lo": obj.levels.lo, "index_hi": obj.levels.hi, "num_bins": int(dc.ratio_bins),
        "ratio_ema": float(dc.ratio_ema), "gen_sigma": float(dc.gen_sigma),
        "logit_clip": float(dc.logit_clip), "ratio_min": float(dc.ratio_min), "ratio_max": float(dc.ratio_max),
        "lambda_gan": float(dc.lambda_gan), "disc_loss_weight": float(dc.disc_loss_weight),
        "teacher_error_norm": bool(dc.teacher_error_norm), "divergence": obj.div.name,
        "disc_hidden": int(dc.disc_hidden), "disc_depth": int(dc.disc_depth),
        "lr": {k: float(opt.settings.learning_rate) for k, opt in obj.optimizers.items()},
        "grad_clip": float(config.train.grad_clip),
        "gmm": {"means": gmm.means.tolist(), "weights": gmm.weights.tolist(), "stds": gmm.stds.tolist()},
        "data_seed": int(config.data.seed),
    }


H_FUNCTIONS = {  # h(r) = f''(r) r^2 (fdistill.divergences), normalised by its batch mean anyway
    "rkl": lambda r: r * 0 + 1,
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
}


# ----- PyTorch ------------------------------------------------------------------------------------


def torch_modules(spec):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.norm = nn.LayerNorm(w, eps=1e-6)
            self.d0, self.d1, self.d2 = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)

        def forward(self, h, emb):
            y = self.d0(self.norm(h)) + self.d1(emb)
            return h + self.d2(nn.functional.silu(y))

    class MLPNet(nn.Module):
        """fdistill.models.mlp.MLPDenoiserNet."""

        def __init__(self, dim, width, depth, emb_dim):
            super().__init__()
            self.register_buffer("freqs", torch.randn(emb_dim // 2) * 16.0)  # a constant in JAX too
            self.emb = nn.Linear(emb_dim, width)
            self.inp = nn.Linear(dim, width)
            self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)
            self.out = nn.Linear(width, dim)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x, c_noise, features=False):
            ang = 2 * math.pi * c_noise[:, None] * self.freqs[None, :]
            emb = nn.functional.silu(self.emb(torch.cat([torch.cos(ang), torch.sin(ang)], -1)))
            h = self.inp(x)
            for block in self.blocks:
                h = block(h, emb)
            h = nn.functional.silu(self.norm(h))
            out = self.out(h)
            return (out, h) if features else out

    class Head(nn.Module):
        """fdistill.distillation.critics.DiscriminatorHead."""

        def __init__(self, width, hidden, depth):
            super().__init__()
            dims = [width] + [hidden] * depth
            self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
            self.last = nn.Linear(hidden, 1)

        def forward(self, h):
            for layer in self.layers:
                h = nn.functional.silu(layer(h))
            return self.last(h)[:, 0]

    net = lambda: MLPNet(spec["dim"], spec["width"], spec["depth"], spec["emb_dim"])
    return {"gen": net(), "fake": net(), "head": Head(spec["width"], spec["disc_hidden"], spec["disc_depth"])}


class TorchFDistill:
    """One f-distill generator update with K critic updates (see fdistill.objectives.distill)."""

    def __init__(self, spec, modules=None):
        import torch

        self.torch, self.spec = torch, spec
        self.m = modules or torch_modules(spec)
        self.grid = torch.tensor(spec["grid"], dtype=torch.float32)
        g = spec["gmm"]
        self.means, self.weights, self.stds = (torch.tensor(g[k], dtype=torch.float32)
                                               for k in ("means", "weights", "stds"))
        self.h = H_FUNCTIONS[spec["divergence"]]
        self.bins = torch.ones(max(spec["num_bins"], 1))
        lr = spec["lr"]
        # Adam as optax.adamw(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0) after global-norm clipping.
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.opt = {"gen": adam(self.m["gen"].parameters(), lr["gen"]),
                    "fake": adam(self.m["fake"].parameters(), lr["fake"]),
                    "disc": adam(self.m["head"].parameters(), lr["disc"])}

    # EDM preconditioning (arXiv 2206.00364, Table 1 / eq. 7) and the exact GMM denoiser.
    def denoise(self, net, x, sigma, features=False):
        sd = self.spec["sigma_data"]
        s2 = sigma**2 + sd**2
        c_skip, c_out, c_in = sd**2 / s2, sigma * sd / s2.sqrt(), 1 / s2.sqrt()
        out = net(c_in[:, None] * x, sigma.log() / 4, features=features)
        f, h = out if features else (out, None)
        d = c_skip[:, None] * x + c_out[:, None] * f
        return (d, h) if features else d

    def teacher(self, x, sigma):
        c = self.stds**2 + sigma[:, None] ** 2  # [B, K]
        sq = ((x[:, None, :] - self.means) ** 2).sum(-1)
        logc = self.weights.log() - 0.5 * sq / c - 0.5 * x.shape[-1] * (2 * math.pi * c).log()
        w = logc.softmax(-1)
        score = ((w / c)[..., None] * (self.means - x[:, None, :])).sum(1)
        return x + sigma[:, None] ** 2 * score

    def generate(self, z):
        s = self.spec["gen_sigma"]
        return self.denoise(self.m["gen"], s * z, self.torch.full(z.shape[:1], s))

    def logits(self, x_t, sigma, with_fake=False):
        d_fake, feats = self.denoise(self.m["fake"], x_t, sigma, features=True)
        return self.m["head"](feats), d_fake

    def _clip_step(self, name, params):
        if self.spec["grad_clip"]:
            self.torch.nn.utils.clip_grad_norm_(params, self.spec["grad_clip"])
        self.opt[name].step()

    def draws(self, b):
        """Fresh random draws for one step (the same distributions as the JAX step)."""
        torch, spec = self.torch, self.spec
        n, lo, hi, d = len(spec["grid"]), spec["index_lo"], spec["index_hi"], spec["dim"]
        critic = [{"z": torch.randn(b, d), "sf_idx": torch.randint(0, n, (b,)), "noise": torch.randn(b, d),
                   "if_idx": torch.randint(lo, hi + 1, (b,)), "ir_idx": torch.randint(lo, hi + 1, (b,)),
                   "eps_f": torch.randn(b, d), "eps_r": torch.randn(b, d)} for _ in range(spec["K"])]
        gen = {"z": torch.randn(b, d), "index": torch.randint(lo, hi + 1, (b,)), "eps": torch.randn(b, d)}
        return critic, gen

    def step(self, x_real, draws=None):
        """x_real: [B, K, dim] (the JAX batch layout). Returns a dict of float metrics."""
        torch, spec, m = self.torch, self.spec, self.m
        b = x_real.shape[0]
        critic_draws, gen_draws = draws if draws is not None else self.draws(b)
        sd = spec["sigma_data"]
        critic_params = list(m["fake"].parameters()) + list(m["head"].parameters())
        losses_fake, losses_disc = [], []
        for k in range(spec["K"]):
            dr = critic_draws[k]
            with torch.no_grad():
                x_fake = self.generate(dr["z"])
            sigma_f = self.grid[dr["sf_idx"]]
            d = self.denoise(m["fake"], x_fake + sigma_f[:, None] * dr["noise"], sigma_f)
            weight = (sigma_f**2 + sd**2) / (sigma_f * sd) ** 2  # EDM eq. 8
            l_fake = (weight * ((d - x_fake) ** 2).mean(1)).mean()
            s_f, s_r = self.grid[dr["if_idx"]], self.grid[dr["ir_idx"]]
            logit_f, _ = self.logits(x_fake + s_f[:, None] * dr["eps_f"], s_f)
            logit_r, _ = self.logits(x_real[:, k] + s_r[:, None] * dr["eps_r"], s_r)
            l_disc = torch.nn.functional.softplus(-logit_r).mean() + torch.nn.functional.softplus(logit_f).mean()
            loss = l_fake + spec["disc_loss_weight"] * l_disc
            for p in critic_params:
                p.grad = None
            loss.backward()
            self._clip_step("fake", m["fake"].parameters())
            self._clip_step("disc", m["head"].parameters())
            losses_fake.append(float(l_fake.detach()))
            losses_disc.append(float(l_disc.detach()))

        # Generator update.
        x = self.generate(gen_draws["z"])
        sigma = self.grid[gen_draws["index"]]
        x_t = x + sigma[:, None] * gen_draws["eps"]
        with torch.no_grad():
            d_real = self.teacher(x_t, sigma)
        logits, d_fake = self.logits(x_t, sigma, with_fake=True)
        with torch.no_grad():
            r = logits.clamp(-spec["logit_clip"], spec["logit_clip"]).exp().clamp(spec["ratio_min"], spec["ratio_max"])
            if spec["num_bins"] > 0:
                span = spec["index_hi"] - spec["index_lo"] + 1
                bin_idx = ((gen_draws["index"] - spec["index_lo"]) * spec["num_bins"] // span).clamp(max=spec["num_bins"] - 1)
                onehot = torch.nn.functional.one_hot(bin_idx, spec["num_bins"]).float()
                count = onehot.sum(0)
                mean = (onehot * r[:, None]).sum(0) / count.clamp(min=1.0)
                ema = spec["ratio_ema"]
                self.bins = torch.where(count > 0, ema * self.bins + (1 - ema) * mean, self.bins)
                r = r / (self.bins[bin_idx] + 1e-6)
            h = self.h(r)
            h = h / h.mean().clamp(min=1e-12)
            w = 1 / ((x - d_real).abs().mean(1) + 1e-6) if spec["teacher_error_norm"] else torch.ones(b)
            g = (d_fake - d_real) * (w * h)[:, None]
        l_dm = 0.5 * ((x - (x - g).detach()) ** 2).mean()
        l_gan = torch.nn.functional.softplus(-logits).mean()
        loss = l_dm + spec["lambda_gan"] * l_gan
        gen_params = list(m["gen"].parameters())
        grads = torch.autograd.grad(loss, gen_params)  # no gradients into the critic
        for p, gr in zip(gen_params, grads):
            p.grad = gr
        self._clip_step("gen", gen_params)
        return {"loss": float(loss.detach()), "loss_fake": sum(losses_fake) / len(losses_fake),
                "loss_disc": sum(losses_disc) / len(losses_disc)}


def num_parameters_torch(modules) -> int:
    return sum(p.numel() for m in modules.values() for p in list(m.parameters()) + list(m.buffers()))


def real_batch(spec, step: int = 0):
    """K real batches of B mixture samples, [B, K, dim] (NumPy, no JAX)."""
    import numpy as np

    g = spec["gmm"]
    means, weights, stds = (np.asarray(g[k], np.float64) for k in ("means", "weights", "stds"))
    rng = np.random.default_rng([spec["data_seed"], 1, step])
    n = spec["batch"] * spec["K"]
    idx = rng.choice(len(weights), size=n, p=weights / weights.sum())
    x = means[idx] + stds[idx, None] * rng.standard_normal((n, means.shape[1]))
    return x.reshape(spec["K"], spec["batch"], -1).transpose(1, 0, 2).astype(np.float32)


def torch_worker(spec, seconds: float, warmup: int = 3, threads: int = 0, compile: bool = False) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    modules = torch_modules(spec)
    if compile:  # torch.compile (inductor) of each network; the step's Python stays eager
        modules = {k: torch.compile(m) for k, m in modules.items()}
    model = TorchFDistill(spec, modules)
    x = torch.from_numpy(real_batch(spec))
    for _ in range(warmup):
        metrics = model.step(x)
    sys.path.insert(0, HERE)
    from timing import best_rate  # the same timing as the JAX worker (step_throughput.time_fn)

    rate = best_rate(lambda: model.step(x), seconds)  # float() of the losses syncs every step
    metrics = model.step(x)
    mode = ("torch.compile" if compile else "eager") + f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
    return {"framework": f"torch {torch.__version__} ({mode}, {torch.get_num_threads()} threads)",
            "steps_per_sec": rate, "num_params": num_parameters_torch(model.m), "loss": metrics["loss"]}


# ----- JAX ----------------------------------------------------------------------------------------


def jax_objective(spec):
    return fdistill_config(spec["width"], spec["batch"])


def jax_worker(spec, seconds: float, warmup: int = 3, threads: int = 0, compile: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    from fdistill import objectives

    obj = objectives.build(jax_objective(spec))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
    batch = jax.tree.map(jnp.asarray, obj.batch(0))
    step = jax.jit(obj.train_step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    sys.path.insert(0, HERE)
    import step_throughput  # the same timing: best of three windows, steps in flight as in training

    rate = step_throughput.time_fn(step, state, (frozen, batch), seconds, warmup=warmup)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    state, metrics = step(jax.tree.map(lambda a: jnp.array(a, copy=True), state), frozen, batch)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"framework": f"jax {jax.__version__} (jit{f', {threads} thread' if threads else ''})",
            "steps_per_sec": rate, "num_params": int(num_params),
            "loss": float(metrics["loss"])}


# ----- parity check: one step, same parameters, same draws ------------------------------------------


def load_flax_into_torch(params, modules):
    """Copies the JAX (Flax) parameters {'gen','fake','disc':{'head'}} into the torch modules."""
    import numpy as np
    import torch

    def lin(layer, p):
        layer.weight.data = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
        layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    def ln(layer, p):
        layer.weight.data = torch.from_numpy(np.asarray(p["scale"]).copy())
        layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    for name in ("gen", "fake"):
        p, m = params[name], modules[name]
        m.freqs.copy_(torch.from_numpy(np.asarray(p["FourierEmbedding_0"]["freqs"])))
        lin(m.emb, p["Dense_0"])
        lin(m.inp, p["Dense_1"])
        for i, block in enumerate(m.blocks):
            bp = p[f"ResidualBlock_{i}"]
            ln(block.norm, bp["LayerNorm_0"])
            lin(block.d0, bp["Dense_0"])
            lin(block.d1, bp["Dense_1"])
            lin(block.d2, bp["Dense_2"])
        ln(m.norm, p["LayerNorm_0"])
        lin(m.out, p["Dense_2"])
    head, hp = modules["head"], params["disc"]["head"]
    for i, layer in enumerate(head.layers):
        lin(layer, hp[f"Dense_{i}"])
    lin(head.last, hp[f"Dense_{len(head.layers)}"])


def jax_step_draws(obj, state, b: int):
    """The random draws `DistillObjective.train_step` makes from `state.rng` at `state.step`
    (replaying its key splits: `critic_update`, `OneStep.draws`, `LearnedCritic.loss`), as torch
    tensors in `TorchFDistill.step`'s layout."""
    import jax
    import numpy as np
    import torch

    t = lambda a: torch.from_numpy(np.asarray(a).copy())
    key = jax.random.fold_in(state.rng, state.step)
    k_critic, k_gen = jax.random.split(key)
    shape = (b,) + tuple(obj.source.shape)
    critic = []
    for k in jax.random.split(k_critic, obj.critic_updates):
        k_point, k_loss = jax.random.split(k)
        d = obj.student.draws(k_point, b)
        k_fake, k_ir, k_er = jax.random.split(k_loss, 3)
        k_sf, k_nf = jax.random.split(k_fake)
        critic.append({
            "z": t(d["z"]),
            "sf_idx": t(jax.random.randint(k_sf, (b,), 0, obj.levels.grid.shape[0])).long(),
            "noise": t(jax.random.normal(k_nf, shape)),
            "if_idx": t(d["index"]).long(), "ir_idx": t(obj.levels.draw_index(k_ir, b)).long(),
            "eps_f": t(d["eps"]), "eps_r": t(jax.random.normal(k_er, shape)),
        })
    d = obj.student.draws(k_gen, b)
    return critic, {"z": t(d["z"]), "index": t(d["index"]).long(), "eps": t(d["eps"])}


def parity_check(spec, steps: int = 3) -> None:
    """Same initial parameters and random draws: losses and parameters after `steps` steps agree."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from fdistill import objectives

    obj = objectives.build(jax_objective(spec))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    tm = TorchFDistill(spec)
    load_flax_into_torch(jax.tree.map(np.asarray, state.params), tm.m)
    step = jax.jit(obj.train_step)
    batch = obj.batch(0)
    print("parity check (JAX step vs PyTorch step, same parameters and draws):")
    for i in range(steps):
        draws = jax_step_draws(obj, state, spec["batch"])
        state, jm = step(state, frozen, jax.tree.map(jnp.asarray, batch))
        tmx = tm.step(torch.from_numpy(batch["x"]), draws)
        pairs = [(k, float(jm[k]), tmx[k]) for k in ("loss", "loss_fake", "loss_disc")]
        print(f"  step {i + 1}: " + ", ".join(f"{k} jax {a:.6g} torch {b:.6g}" for k, a, b in pairs))
        for k, a, b in pairs:
            if not math.isclose(a, b, rel_tol=2e-3, abs_tol=1e-5):
                raise SystemExit(f"parity check failed at step {i + 1}: {k} jax {a} vs torch {b}")
    ref = torch_modules(spec)
    load_flax_into_torch(jax.tree.map(np.asarray, state.params), ref)
    worst = 0.0
    for name in ("gen", "fake", "head"):
        for (pn, a), (_, b) in zip(ref[name].named_parameters(), tm.m[name].named_parameters()):
            err = float((a - b).abs().max() / (a.abs().max() + 1e-8))
            worst = max(worst, err)
            if err > 1e-3:
                raise SystemExit(f"parity check failed: {name}.{pn} differs by {err:.2e} (relative max)")
    print(f"  parameters after {steps} steps: max relative difference {worst:.1e} (OK)")


# ----- orchestration --------------------------------------------------------------------------------


def run_worker(framework: str, spec_path: str, seconds: float, threads: int = 0, compile: bool = False) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one device (simulated devices slow small models by 30-40%)
    # OpenMP threads that sleep instead of spinning when idle: with other jobs on the machine the
    # default (spinning) policy made 2-thread PyTorch 20-100x slower here (0.2-1 vs 20 steps/s).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads == 1:  # single-threaded XLA CPU runtime (read when JAX starts)
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--spec", spec_path,
           "--seconds", str(seconds), "--threads", str(threads)] + (["--torch_compile"] if compile else [])
    from timing import run_worker as run_json_worker

    return run_json_worker(cmd, env, f"{framework} worker")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="MLP width (gmm_fdistill default 64)")
    parser.add_argument("--batch", type=int, default=256, help="points per batch (gmm_fdistill default 256)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per worker")
    parser.add_argument("--rounds", type=int, default=3, help="alternating JAX / PyTorch rounds")
    parser.add_argument("--check", action="store_true", help="verify the two steps agree before timing")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin each worker to this many cores and threads (0: each framework's default)")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the PyTorch networks")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.threads:  # before either framework starts its thread pool
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))
        with open(args.spec) as f:
            spec = json.load(f)
        worker = jax_worker if args.worker == "jax" else torch_worker
        result = worker(spec, args.seconds, threads=args.threads, compile=args.torch_compile)
        print(json.dumps(result))
        return

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    spec = spec_from_config(fdistill_config(args.width, args.batch))
    if args.check:
        parity_check(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    results = {"jax": [], "torch": []}
    try:
        for r in range(args.rounds):
            for fw in ("jax", "torch"):
                res = run_worker(fw, spec_path, args.seconds, args.threads, args.torch_compile)
                results[fw].append(res)
                print(f"round {r + 1}: {res['framework']}: {res['steps_per_sec']:.2f} steps/s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        os.unlink(spec_path)
    if results["jax"][0]["num_params"] != results["torch"][0]["num_params"]:
        raise SystemExit(f"parameter counts differ: jax {results['jax'][0]['num_params']} "
                         f"vs torch {results['torch'][0]['num_params']}")
    med = {fw: statistics.median(r["steps_per_sec"] for r in results[fw]) for fw in results}
    best = {fw: max(r["steps_per_sec"] for r in results[fw]) for fw in results}
    print(f"\nf-distill GMM step: MLP {spec['depth']}x{spec['width']} ({results['jax'][0]['num_params']} parameters "
          f"in generator + fake score + head), batch {spec['batch']}, K={spec['K']} critic updates per generator update")
    print("| framework | steps/s (median of rounds) | steps/s (best round) | ms/step (best) |")
    print("|---|---|---|---|")
    for fw in ("jax", "torch"):
        print(f"| {results[fw][0]['framework']} | {med[fw]:.2f} | {best[fw]:.2f} | {1000 / best[fw]:.1f} |")
    print(f"ratio JAX / PyTorch steps/s: {med['jax'] / med['torch']:.2f} (medians), "
          f"{best['jax'] / best['torch']:.2f} (best rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": {k: v for k, v in spec.items() if k not in ("grid", "gmm")}, "results": results,
                       "median_steps_per_sec": med, "best_steps_per_sec": best,
                       "ratio_jax_over_torch": med["jax"] / med["torch"]}, f, indent=2)


if __name__ == "__main__":
    main()
