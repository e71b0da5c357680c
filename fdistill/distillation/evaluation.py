"""Evaluation of a distilled student: its samples, its teacher's, and the quality of its critic.

`Evaluator.evaluate` gives the student sampler's metrics on the data source (`nfe` = the student's
steps, `samples_per_sec`), the teacher's deterministic ODE sampler's (`teacher/...`, computed once
per run and kept in the workdir's `cache/`, `fdistill.evaluation.cache`: the teacher is frozen),
the `speedup`, and on the mixture `ratio_spearman`: the Spearman correlation between the
discriminator's logit and the exact log p_sigma / q_sigma on held-out noised points (half data,
half fresh student samples), q_sigma being the noised mixture of a batch of student samples
(`fdistill.evaluation.ratio`), sigma log-uniform in [distill.ratio_eval_sigma_min,
distill.ratio_eval_sigma_max].
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import diffusion
from fdistill import workdir as workdir_lib
from fdistill.denoiser import sample_in_chunks
from fdistill.distillation import teachers
from fdistill.evaluation import cache as eval_cache
from fdistill.evaluation import ratio as ratio_lib
from fdistill.evaluation.timing import timed_sampling

TEACHER_METRICS = "teacher_metrics"  # the cache's name for them
# The config sections that define the teacher's samples and their metrics (besides train.compute_dtype).
TEACHER_SAMPLING_SECTIONS = ("data", "eval", "diffusion", "model")


class Evaluator:
    """Scores a student sampler against its teacher (and its critic's ratio, when it has a
    discriminator; `critic=None` for objectives without one)."""

    def __init__(self, config, source, teacher, student, critic, label: str):
        self.config, self.source, self.teacher, self.student, self.critic = config, source, teacher, student, critic
        self.label = label  # e.g. "1-step distill (js)"
        self._jitted = {}
        self._teacher_fp = None  # (the frozen teacher it was computed from, its fingerprint)
        self.last_samples = None

    def _jit(self, name, fn):
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def samples(self, gen_params, key, n: int, labels=None, step: int | None = None):
        """(n samples of the student's sampler, their labels or None), in jitted chunks of
        `config.eval.chunk`. `step` = k returns the output of step k of a K-step sampler's rollout
        instead (for the per-step diagnostic)."""
        chunk = int(self.config.eval.chunk)
        s = self.student
        if step is None:
            fn = self._jit("sample", s.sample)
        else:
            fn = self._jit(f"step{step}", lambda p, z, lab: s.train_point(
                p, {**s.draws(jax.random.PRNGKey(0), z.shape[0]), "z": z, "labels": lab,
                    "k": jnp.full(z.shape[:1], step, jnp.int32)})["x"])
        x, labs = sample_in_chunks(fn, gen_params, key, n, chunk, s.latent_shape, s.num_classes, labels)
        return x, (labs if s.conditional else None)

    def _teacher_fingerprint(self, teacher_params) -> str:
        """`tree_fingerprint` of the frozen teacher, computed once per teacher object."""
        if self._teacher_fp is None or self._teacher_fp[0] is not teacher_params:
            self._teacher_fp = (teacher_params, eval_cache.tree_fingerprint(teacher_params))
        return self._teacher_fp[1]

    def teacher_metrics(self, frozen, key, labels, cache: eval_cache.ResultCache | None = None
                        ) -> dict[str, float]:
        """The teacher sampler's metrics (`teacher/...`), taken from `cache` when it has them: the
        samples depend only on the frozen teacher, the evaluation key and labels, the settings and
        the code, so every evaluation of a run draws the same ones (`teacher/samples_per_sec` is the
        throughput of the first evaluation on these devices, `fdistill.evaluation.cache`)."""
        e, c = self.config.eval, self.config
        cache = eval_cache.ResultCache() if cache is None else cache
        num_classes = self.student.num_classes if self.student.conditional else 0
        fields = {k: v for k, v in workdir_lib.flatten(c).items()
                  if (k.split(".")[0] in TEACHER_SAMPLING_SECTIONS or k == "train.compute_dtype")
                  and workdir_lib.kind_of(k) != "may_change"}  # not where the data are found
        settings = {"teacher": str(self.teacher.name), "teacher_params": self._teacher_fingerprint(frozen["teacher"]),
                    "config": fields, "shape": list(self.student.shape), "num_classes": num_classes,
                    "code": eval_cache.code_fingerprint(), "devices": eval_cache.device_signature()}
        fp = eval_cache.inputs_fingerprint(settings, {"key": key, "labels": labels})
        found = cache.get(TEACHER_METRICS, fp, required=("teacher/nfe", "teacher/samples_per_sec"))
        if found is not None:
            return found

        def run(n):
            return teachers.sample(self.teacher, frozen["teacher"], self.student.shape, key, n, e,
                                   c.diffusion, num_classes, labels)

        x, per_sec = timed_sampling(run, e.num_samples)
        m = {f"teacher/{k}": float(v) for k, v in self.source.evaluate_samples(x, labels).items()}
        m["teacher/nfe"] = float(diffusion.nfe(e.num_steps, e.sampler))
        m["teacher/samples_per_sec"] = per_sec
        cache.put(TEACHER_METRICS, fp, m, settings)
        return m

    def ratio_spearman(self, params, frozen, key, n_batch: int = 4096, n_points: int = 4096) -> float:
        """See the module docstring."""
        dc = self.config.distill
        k_b, k_q, k_s, k_e = jax.random.split(key, 4)
        gen = params["gen"]
        batch, _ = self.samples(gen, k_b, n_batch)
        fake, _ = self.samples(gen, k_q, n_points // 2)
        real = self.source.reference(n_points - n_points // 2, seed=4242)
        pts = jnp.asarray(np.concatenate([real, fake]), jnp.float32)
        lo, hi = float(dc.ratio_eval_sigma_min), float(dc.ratio_eval_sigma_max)
        sigma = jnp.exp(jax.random.uniform(k_s, (n_points,), minval=np.log(lo), maxval=np.log(hi)))
        y = pts + sigma[:, None] * jax.random.normal(k_e, pts.shape)
        logits = self._jit("logits", lambda p, f, y, s: self.critic.logits(p, f, y, s)[0])(params, frozen["teacher"],
                                                                                            y, sigma)
        exact = ratio_lib.exact_log_ratio(self.source.gmm, batch, y, sigma)
        return ratio_lib.spearman(np.asarray(logits), np.asarray(exact))

    def evaluate(self, params, gen_params, frozen, key, cache: eval_cache.ResultCache | None = None
                 ) -> dict[str, float]:
        """Student, teacher and critic metrics (module docstring); `gen_params` is what samples (the
        generator's EMA when it keeps one); `cache` keeps the teacher's metrics (`teacher_metrics`)."""
        e = self.config.eval
        k_s, k_t, k_r = jax.random.split(key, 3)
        (x, labels), per_sec = timed_sampling(lambda n: self.samples(gen_params, k_s, n), e.num_samples)
        metrics = dict(self.source.evaluate_samples(x, labels))
        metrics["nfe"] = float(self.student.num_steps)
        metrics["samples_per_sec"] = per_sec
        metrics.update(self.teacher_metrics(frozen, k_t, labels, cache))
        metrics["speedup"] = metrics["samples_per_sec"] / metrics["teacher/samples_per_sec"]
        if hasattr(self.source, "gmm") and getattr(self.critic, "learned", False) and self.critic.use_disc:
            metrics["ratio_spearman"] = self.ratio_spearman(params, frozen, k_r)
        self.last_samples = x
        return metrics

    def plot(self, gen_params, plot_dir: str, step: int) -> list[str]:
        x = self.last_samples
        if x is None:
            x, _ = self.samples(gen_params, jax.random.key(0), self.config.eval.num_samples)
        path = os.path.join(plot_dir, f"samples_{step:07d}.png")
        return [self.source.plot_samples(x, path, f"{self.label}, step {step}")]
