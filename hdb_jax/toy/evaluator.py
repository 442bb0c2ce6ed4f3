"""The paper's four metrics in the toy world, one API for the demo, the jobs and the notebook.

=====================  ==========================================  ============================
paper                  toy analogue                                scorer
=====================  ==========================================  ============================
face recognition       cosine of identity embeddings               :mod:`hdb_jax.toy.identity`
DINO / CLIP-I          per-attribute agreement with the reference  :mod:`hdb_jax.toy.attributes`
CLIP-T                 asked attributes detected in the sample     :mod:`hdb_jax.toy.attributes`
realism (FID-like)     k-NN precision / recall vs real renders;    attribute classifier's
                       fraction of non-face samples                features and face head
=====================  ==========================================  ============================

Every per-sample score is returned as an array, so callers arrange them as
``[identities, prompts, seeds]`` and report :func:`hdb_jax.eval.stats.bootstrap` intervals.
The real-model metrics (CLIP-I, CLIP-T, DINO on SD-scale images) are :mod:`hdb_jax.eval.real`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from hdb_jax.eval import prdc
from hdb_jax.toy import attributes as attributes_lib
from hdb_jax.toy import identity as identity_lib
from hdb_jax.toy import synthetic

_STYLE = re.compile(r"\b(photo|cartoon|sketch)\b")
_BACKGROUND = re.compile(r"\b(" + "|".join(synthetic.BACKGROUND_NAMES) + r") background\b")


def asked(prompt: str) -> dict[str, int]:
    """The attributes a toy prompt asks for, as ``{label: class}``.

    ``"a cartoon of a sks face wearing a hat on a red background"`` ->
    ``{"style": 1, "hat": 1, "background": <red>}``; a plain ``"a face"`` asks nothing.
    """
    out: dict[str, int] = {}
    text = prompt.lower()
    if m := _STYLE.search(text):
        out["style"] = synthetic.STYLES.index(m.group(1))
    if m := _BACKGROUND.search(text):
        out["background"] = synthetic.BACKGROUND_NAMES.index(m.group(1))
    if "wearing a hat" in text:
        out["hat"] = 1
    for word in ("glasses", "earrings"):
        if re.search(rf"\bwith\b[^,]*\b{word}\b", text):
            out[word] = 1
    return out


@dataclasses.dataclass(frozen=True)
class RealManifold:
    """Features ``[N, D]`` of real renders and each one's distance to its k-th nearest neighbour."""

    features: np.ndarray
    radii: np.ndarray
    k: int


@dataclasses.dataclass
class ToyEvaluator:
    """The toy world's scorers, loaded once.

    Attributes:
      identity: the identity encoder (face-recognition analogue).
      attributes: the attribute classifier.
      subject_labels: the identity attributes subject fidelity compares.
    """

    identity: identity_lib.IdentityScorer
    attributes: attributes_lib.AttributeScorer
    # Identity attributes the classifier reads well (held-out accuracy in its model card); eye colour and
    # earrings are a few pixels at 32 px and near chance, so they are left out.
    subject_labels: tuple[str, ...] = ("hat", "glasses", "hair_color", "hair_style", "skin", "shirt")

    @classmethod
    def load(cls, identity_dir=None, attributes_dir=None) -> "ToyEvaluator":
        """The shipped scorers (or those in the given folders)."""
        return cls(identity_lib.load(identity_dir), attributes_lib.load(attributes_dir))

    # ---------------------------------------------------------------- per-sample scores
    def identity_scores(self, samples: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Cosine ``[N]`` of each sample's identity embedding to its reference's (one, or one per sample)."""
        return np.asarray(self.identity.similarity(samples, references), np.float64)

    def subject_fidelity(
        self, samples: np.ndarray, references: np.ndarray, prompts: Sequence[str] | None = None
    ) -> np.ndarray:
        """Fraction ``[N]`` of :attr:`subject_labels` the classifier reads the same on sample and reference.

        With ``prompts``, an attribute a sample's prompt asks to change ("wearing a hat") is not
        held against it: only the others count for that sample.
        """
        got = self.attributes.predict(samples)
        ref = self.attributes.predict(references if references.ndim == 4 else references[None])
        agree = np.stack(
            [got[k] == np.broadcast_to(ref[k], got[k].shape) for k in self.subject_labels], axis=1
        )  # [N, L]
        counted = np.ones_like(agree, bool)
        for i, prompt in enumerate(prompts or ()):
            changed = set(asked(prompt))
            counted[i] = [k not in changed for k in self.subject_labels]
        return (np.sum(agree & counted, axis=1) / np.sum(counted, axis=1)).astype(np.float64)

    def prompt_fidelity(self, samples: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Fraction ``[N]`` of what each sample's prompt asked that the classifier detects (NaN: nothing asked)."""
        got = self.attributes.predict(samples)
        out = np.full(len(samples), np.nan)
        for i, prompt in enumerate(prompts):
            wanted = asked(prompt)
            if wanted:
                out[i] = np.mean([got[k][i] == v for k, v in wanted.items()])
        return out

    def detected(self, samples: np.ndarray, prompt: str) -> dict[str, np.ndarray]:
        """``{label: [N] bool}``: whether each attribute ``prompt`` asks for is seen in each sample."""
        got = self.attributes.predict(samples)
        return {k: got[k] == v for k, v in asked(prompt).items()}

    def face(self, samples: np.ndarray) -> np.ndarray:
        """``[N]`` bool: the classifier takes the sample for a face."""
        return self.attributes.predict(samples)["face"] > 0.5

    # ---------------------------------------------------------------- realism
    def real_manifold(self, real: np.ndarray, k: int = 3) -> "RealManifold":
        """The real renders' features and k-NN radii, computed once for many :meth:`realism` calls."""
        features = np.asarray(self.attributes.features(real), np.float64)
        return RealManifold(features, prdc.knn_radii(features, k), k)

    def realism(self, samples: np.ndarray, real: "np.ndarray | RealManifold", k: int = 3) -> dict:
        """k-NN precision / recall of samples against real renders, and the non-face fraction.

        Args:
          real: uint8 renders, or their :meth:`real_manifold` (then its ``k`` is used).

        Returns:
          ``{"precision", "recall", "non_face_fraction", "in_real_manifold": [N] bool, ...}``.
        """
        manifold = real if isinstance(real, RealManifold) else self.real_manifold(real, k)
        gen, ref = self.attributes.features(samples), manifold.features
        out = prdc.precision_recall(ref, gen, manifold.k, real_radii=manifold.radii)
        out["in_real_manifold"] = prdc.coverage_of(gen, ref, manifold.radii)
        out["non_face_fraction"] = float(1.0 - np.mean(self.face(samples)))
        return out


def real_renders(
    count: int,
    *,
    start: int = 6_000_000,
    resolution: int = 32,
    seed: int = 0,
    styles: Sequence[str] = ("photo", "cartoon", "sketch"),
    weights: Sequence[float] = (0.5, 0.25, 0.25),
) -> np.ndarray:
    """uint8 renders of ``count`` identities nobody trains on, in the base model's style mix."""
    rng = np.random.default_rng([seed, 31, start])
    p = np.asarray(weights, np.float64)
    chosen = [styles[k] for k in rng.choice(len(styles), count, p=p / p.sum())]
    return synthetic.render_batch(
        range(start, start + count), rng.integers(0, 2**30, count), chosen, seed, resolution
    )


def modifier_prompts() -> dict[str, str]:
    """One prompt per caption modifier of the toy world (the base model's training vocabulary)."""
    out = {f"style={s}": f"{'an' if s[0] in 'aeiou' else 'a'} {s} of a face" for s in synthetic.STYLES}
    out.update(
        {
            f"background={c}": f"a face on {'an' if c[0] in 'aeiou' else 'a'} {c} background"
            for c in synthetic.BACKGROUND_NAMES
        }
    )
    out.update(
        {"hat": "a face wearing a hat", "glasses": "a face with glasses", "earrings": "a face with earrings"}
    )
    return out


def render_rates(
    evaluator: ToyEvaluator, count: int = 64, *, start: int = 6_500_000, resolution: int = 32, seed: int = 0
) -> dict[str, float]:
    """How often the classifier sees each modifier on real renders that have it (the ceiling)."""
    rng = np.random.default_rng([seed, 32])
    rates = {}
    for key, prompt in modifier_prompts().items():
        want = asked(prompt)
        ids, index, styles, backgrounds = [], [], [], []
        candidate = start
        while len(ids) < count:
            ident = synthetic.identity(candidate, seed)
            candidate += 1
            if any(
                getattr(ident, k) != bool(v) for k, v in want.items() if k in ("hat", "glasses", "earrings")
            ):
                continue
            ids.append(candidate - 1)
            index.append(int(rng.integers(0, 2**30)))
            styles.append(synthetic.STYLES[want["style"]] if "style" in want else "photo")
            backgrounds.append(
                synthetic.BACKGROUND_NAMES[want["background"]] if "background" in want else None
            )
        pixels = np.stack(
            [
                synthetic.render_face(
                    synthetic.identity(i, seed), synthetic.variation(i, j, seed, s, b), resolution
                )
                for i, j, s, b in zip(ids, index, styles, backgrounds)
            ]
        )
        rates[key] = float(
            np.mean(np.all(np.stack(list(evaluator.detected(pixels, prompt).values())), axis=0))
        )
    return rates


def evaluate_base(
    evaluator: ToyEvaluator,
    sample_fn,
    *,
    face_seeds: int = 256,
    modifier_seeds: int = 32,
    real: np.ndarray | None = None,
) -> dict:
    """The base model's quality figures: realism of "a face", and each modifier's detection rate.

    Args:
      evaluator: the scorers.
      sample_fn: ``(prompts, seeds) -> uint8 images`` of the base model.
      face_seeds: "a face" samples for precision / recall / non-face fraction.
      modifier_seeds: samples per modifier prompt.
      real: real renders (default: :func:`real_renders` of as many as ``face_seeds``).

    Returns:
      ``{"precision", "recall", "non_face_fraction", "modifiers": {key: rate}, "render_rates":
      {key: rate}, "face_seeds", "modifier_seeds"}``.
    """
    real = real_renders(max(face_seeds, 64)) if real is None else real
    faces = sample_fn(["a face"] * face_seeds, list(range(face_seeds)))
    out = {k: v for k, v in evaluator.realism(faces, real).items() if k != "in_real_manifold"}
    out["modifiers"] = {}
    for key, prompt in modifier_prompts().items():
        drawn = sample_fn([prompt] * modifier_seeds, list(range(10_000, 10_000 + modifier_seeds)))
        out["modifiers"][key] = float(
            np.mean(np.all(np.stack(list(evaluator.detected(drawn, prompt).values())), axis=0))
        )
    out["render_rates"] = render_rates(evaluator)
    out.update(face_seeds=face_seeds, modifier_seeds=modifier_seeds)
    return out
