"""Image embeddings from the run's own backbone features, given to FiftyOne Brain.

An image's embedding is the mean of its patch tokens (the run's backbone, at the run's
resolution, read from the run's feature cache ``RUN_DIR/features`` and computed there only for
the images it lacks, so ``train`` reuses them), L2-normalised. No second model is involved.
FiftyOne Brain gets them twice: ``compute_visualization`` (t-SNE from scikit-learn, a plain
PyPI wheel) for the App's Embeddings panel, where a cluster can be lassoed, and
``compute_similarity`` (scikit-learn backend, cosine), so the App sorts samples by similarity
to the selected ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import DEFAULT_PRECISION
from ..features.cache import CacheError, FeatureProgress
from ..features.presets import BackboneError
from ..head.checkpoint import HeadMismatch
from ..head.features import run_features
from ..runfolder.layout import FEATURES_DIR, RunFolder, read_run
from .db import ReviewError
from .fields import RUN_FIELD

if TYPE_CHECKING:
    import fiftyone as fo

    from ..features.backbone import Backbone

logger = logging.getLogger(__name__)

VISUALIZATION_KEY = "selfment_embeddings"
"""Brain key of the 2-D map shown in the Embeddings panel."""
SIMILARITY_KEY = "selfment_similarity"
"""Brain key of the similarity index (sort by similarity in the App)."""
EMBEDDINGS_WORKSPACE = "embeddings"
"""Saved workspace: the grid beside the Embeddings panel."""
VISUALIZATION_METHOD = "tsne"
MAX_PERPLEXITY = 30.0
PCA_DIMS = 50


@dataclass
class EmbeddingsSummary:
    """What ``compute_embeddings`` gave FiftyOne Brain.

    Arguments:
      samples: samples embedded.
      dim: embedding size (the backbone's feature dimension).
      visualization_key: brain key of the 2-D map.
      similarity_key: brain key of the similarity index.
      cache: the feature cache the tokens came from.
      left_out: file names with no features (the image could not be decoded).
    """

    samples: int
    dim: int
    visualization_key: str
    similarity_key: str
    cache: Path
    left_out: list[str]


def image_embeddings(
    source: RunFolder,
    file_names: list[str],
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    allow_download: bool = True,
    backbone: Backbone | None = None,
    progress: FeatureProgress | None = None,
) -> tuple[dict[str, np.ndarray], Path]:
    """The L2-normalised mean patch token of each image, from the run's feature cache.

    Arguments:
      source: the run folder.
      file_names: images wanted, relative to the run's input folder.
      weights: backbone weights file, when features must be computed (default: the run's).
      device: device of the backbone, when features must be computed.
      precision: backbone precision of the features (``auto``: from the hardware).
      allow_download: whether hub downloads are allowed.
      backbone: a ready backbone (tests); must match the run's.
      progress: called with ``(done, total)`` while features are gathered.

    Returns:
      File name -> ``[D]`` float32 embedding (undecodable images left out), and the cache.

    Raises:
      ReviewError: features are missing and the run's backbone cannot be built.
    """
    try:
        cache, entries = run_features(
            source,
            file_names,
            weights=weights,
            device=device,
            precision=precision,
            allow_download=allow_download,
            backbone=backbone,
            progress=progress,
        )
    except BackboneError as error:
        raise ReviewError(
            f"the feature cache {source.path / FEATURES_DIR} lacks some of the run's images "
            f"and the run's backbone cannot be loaded to compute them ({error})",
            remedy=error.remedy,
        ) from None
    except (CacheError, HeadMismatch) as error:
        raise ReviewError(f"cannot compute the image embeddings: {error}") from None
    embeddings = {}
    for name, entry in entries.items():
        cached = cache.load(entry, name)
        if cached is None:
            continue
        pooled = cached.tokens.reshape(-1, cached.tokens.shape[-1]).mean(0).numpy()
        embeddings[name] = (pooled / max(np.linalg.norm(pooled), 1e-12)).astype(np.float32)
    return embeddings, cache.root


def embeddings_space() -> fo.Space:
    """The App layout of ``EMBEDDINGS_WORKSPACE``: the grid, and the 2-D map beside it."""
    import fiftyone as fo

    samples = fo.Panel(type="Samples", pinned=True)
    # FiftyOne 1.22's Embeddings panel keeps the plot it opens in its local state, which a
    # workspace does not hold: the panel opens on its list of maps, one click from the plot.
    embeddings = fo.Panel(type="Embeddings")
    # a space with no active child shows none of its panels
    return fo.Space(
        children=[
            fo.Space(children=[samples], active_child=samples.component_id),
            fo.Space(children=[embeddings], active_child=embeddings.component_id),
        ],
        orientation="horizontal",
    )


def compute_embeddings(
    dataset: fo.Dataset,
    run_dir: str | Path,
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    allow_download: bool = True,
    backbone: Backbone | None = None,
    progress: FeatureProgress | None = None,
) -> EmbeddingsSummary:
    """Embed the run's samples and store the 2-D map and the similarity index on the dataset.

    Previous results under ``VISUALIZATION_KEY`` and ``SIMILARITY_KEY`` are replaced; the
    workspace ``EMBEDDINGS_WORKSPACE`` is saved.

    Arguments:
      dataset: the run's dataset (built by ``build_dataset``).
      run_dir: the run folder whose samples are embedded.
      weights, device, precision, allow_download, backbone, progress: as for ``image_embeddings``.

    Raises:
      ReviewError: fewer than two samples, or features cannot be had.
    """
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    source = read_run(Path(run_dir).resolve())
    view = dataset.match(F(RUN_FIELD) == str(source.path))
    ids, names = view.values("id"), view.values("file_name")
    found, cache = image_embeddings(
        source,
        names,
        weights=weights,
        device=device,
        precision=precision,
        allow_download=allow_download,
        backbone=backbone,
        progress=progress,
    )
    kept = [(sample_id, name) for sample_id, name in zip(ids, names, strict=True) if name in found]
    if len(kept) < 2:
        raise ReviewError(f"embeddings need at least 2 samples with features, found {len(kept)}")
    embedded = view.select([sample_id for sample_id, _ in kept], ordered=True)
    matrix = np.stack([found[name] for _, name in kept])
    for key in (VISUALIZATION_KEY, SIMILARITY_KEY):
        if dataset.has_brain_run(key):
            dataset.delete_brain_run(key)
    count = len(kept)
    fob.compute_visualization(
        embedded,
        embeddings=matrix,
        brain_key=VISUALIZATION_KEY,
        method=VISUALIZATION_METHOD,
        perplexity=min(MAX_PERPLEXITY, max(1.0, (count - 1) / 3)),
        pca_dims=PCA_DIMS if count > PCA_DIMS else None,
        seed=0,
        verbose=False,
        progress=False,
    )
    fob.compute_similarity(
        embedded,
        embeddings=matrix,
        backend="sklearn",
        metric="cosine",
        brain_key=SIMILARITY_KEY,
        progress=False,
    )
    dataset.save_workspace(
        EMBEDDINGS_WORKSPACE,
        embeddings_space(),
        description="the grid beside the image embeddings (lasso a cluster to select it)",
        overwrite=True,
    )
    left_out = sorted(set(names) - set(found))
    for name in left_out:
        logger.warning("%s left out of the embeddings: no features", name)
    logger.info("embedded %d samples (%d dims) from %s", count, matrix.shape[1], cache)
    return EmbeddingsSummary(
        count, int(matrix.shape[1]), VISUALIZATION_KEY, SIMILARITY_KEY, cache, left_out
    )
