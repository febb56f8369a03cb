"""Zero- and few-shot task evaluation (docs/evaluation.md): multiple choice and cloze tasks
scored by log-likelihood, during training and through lm-evaluation-harness."""
