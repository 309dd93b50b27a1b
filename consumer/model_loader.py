"""Load a reranking model (local folder or hub id) and pick its encoder and scorer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from consumer.model_options import ModelOptions
from consumer.prompt import PromptEncoder
from consumer.scorer import Scorer

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says why in one line."""


@dataclass
class LoadedModel:
    """A ready model: its prompt encoder and its scorer."""

    name: str
    kind: str
    encoder: PromptEncoder
    scorer: Scorer
    device: str
    dtype: str


def load_model(options: ModelOptions) -> LoadedModel:
    """Load ``options.model``; raises :class:`ModelLoadError` with one clear line."""
    raise NotImplementedError("being written")
