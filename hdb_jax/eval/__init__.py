"""Evaluation metrics: toy-world analogues and real-model (CLIP, DINO) metrics."""
