"""How a personal model of the toy world is sampled and scored: one protocol for every job.

The main job (:mod:`hdb_jax.jobs.demo`) and the sweeps (:mod:`hdb_jax.jobs.sweep`) both turn a personal
model into per-sample scores the same way:

1. draw ``len(prompts) x seeds`` samples (prompt ``q`` with the subject token, sample seeds
   ``0..seeds-1``), then ``prior_seeds`` samples of the class prompt (seeds ``100..``): is the
   prior kept?
2. score each subject sample against the reference photo: identity (face-recognition analogue),
   subject fidelity and prompt fidelity; and the prior samples for realism against real renders.

Every score comes back as an array (``[prompts, seeds]``, or ``[prior_seeds]``) for
:func:`hdb_jax.eval.stats.bootstrap` over identities, prompts and seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hdb_jax.blocks import sample
from hdb_jax.toy import evaluator as toy


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The sampling side of an evaluation.

    Attributes:
      prompts: subject prompts; ``token`` is the placeholder word they use (``"a sks face"``).
      seeds: sample seeds per subject prompt.
      sample_steps, guidance_scale: the sampler's settings.
      prior_prompt, prior_seeds: the class prompt sampled to check the prior (0 seeds: none).
    """

    prompts: tuple[str, ...]
    seeds: int
    sample_steps: int
    guidance_scale: float
    token: str = "sks"
    prior_prompt: str = "a face"
    prior_seeds: int = 0

    @classmethod
    def from_config(cls, e) -> "Protocol":
        """From an ``eval`` config section (its optional fields fall back to the defaults above)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "prompts" else v) for k, v in e.items() if k in fields})

    @property
    def subject_prompts(self) -> list[str]:
        """One entry per subject sample, prompt-major (``[p0 s0, p0 s1, p1 s0, ...]``)."""
        return [q for q in self.prompts for _ in range(self.seeds)]

    def draw(self, sd, params, lag: Any = None) -> np.ndarray:
        """uint8 ``[prompts x seeds + prior_seeds, H, W, 3]``: the subject samples, then the prior's."""
        prompts = [q.replace("sks", self.token) for q in self.subject_prompts]
        prompts += [self.prior_prompt] * self.prior_seeds
        seeds = [k for _ in self.prompts for k in range(self.seeds)] + list(
            range(100, 100 + self.prior_seeds)
        )
        return sample.sample(
            sd,
            params,
            prompts,
            seeds,
            num_steps=self.sample_steps,
            guidance_scale=self.guidance_scale,
            batch_size=len(prompts),
            progress=False,
            lag=lag,
        )

    def score(
        self,
        evaluator: toy.ToyEvaluator,
        drawn: np.ndarray,
        reference: np.ndarray,
        real: toy.RealManifold | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-sample scores of :meth:`draw`'s output against the reference photo.

        Returns:
          ``identity``, ``subject_fidelity``, ``prompt_fidelity`` as ``[prompts, seeds]``; with
          prior samples and ``real``, also ``prior_realism`` (in the real manifold, 0/1) and
          ``face`` (taken for a face) as ``[prior_seeds]``.
        """
        shape, n = (len(self.prompts), self.seeds), len(self.prompts) * self.seeds
        if len(drawn) != n + self.prior_seeds:
            raise ValueError(f"drawn has {len(drawn)} samples; the protocol draws {n + self.prior_seeds}")
        main, prior = drawn[:n], drawn[n:]
        prompts = self.subject_prompts
        out = {
            "identity": evaluator.identity_scores(main, reference).reshape(shape),
            "subject_fidelity": evaluator.subject_fidelity(main, reference, prompts).reshape(shape),
            "prompt_fidelity": evaluator.prompt_fidelity(main, prompts).reshape(shape),
        }
        if self.prior_seeds and real is not None:
            realism = evaluator.realism(prior, real)
            out["prior_realism"] = realism["in_real_manifold"].astype(np.float64)
            out["face"] = evaluator.face(prior)
        return out
