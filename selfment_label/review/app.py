"""The FiftyOne App on a dataset, listening on this machine only by default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import APP_ADDRESS, APP_PORT

if TYPE_CHECKING:
    import fiftyone as fo


def launch_app(
    dataset: fo.Dataset,
    port: int = APP_PORT,
    address: str = APP_ADDRESS,
    spaces: fo.Space | None = None,
) -> Any:
    """Launch the FiftyOne App on a dataset (no browser is opened).

    Arguments:
      dataset: the dataset to show.
      port: the App's port.
      address: the address the App listens on (``127.0.0.1``: this machine only).
      spaces: the panels to open (default: the grid).

    Returns:
      The ``fo.Session``; call ``close()`` on it to stop the App and its server.
    """
    import fiftyone as fo

    return fo.launch_app(dataset, spaces=spaces, port=port, address=address, auto=False)


def app_url(session: Any, dataset: fo.Dataset) -> str:
    """The URL of a dataset in a running App session."""
    return f"{session.url.rstrip('/')}/datasets/{dataset.name}"
