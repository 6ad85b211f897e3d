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

    started = _serve(port, address)
    try:
        return fo.launch_app(dataset, spaces=spaces, port=port, address=address, auto=False)
    except BaseException:
        if started is not None:
            started.stop()
        raise


def _serve(port: int, address: str) -> Any:
    """Start the App's server before the session that uses it.

    FiftyOne's session starts its client (which pings the server) before it starts the
    server, so the first ping fails: it prints "Could not connect session, trying again in
    10 seconds" and stays disconnected that long (the panels it sends, such as the
    embeddings space, arrive late). FiftyOne keeps the servers it runs per port in
    ``fiftyone.core.session.session._server_services`` and adopts one found there (and
    stops it when its last session closes); so the server is started here and put there.

    Returns:
      The started server service, or ``None`` where one was already registered for the
      port or this FiftyOne keeps no such registry (then FiftyOne starts it, as before).
    """
    import fiftyone as fo
    import fiftyone.core.service as fos
    import fiftyone.core.session.session as fo_session

    services = getattr(fo_session, "_server_services", None)
    if not isinstance(services, dict) or port in services:
        return None
    service = fos.ServerService(port, address=address, do_not_track=fo.config.do_not_track)
    services[port] = service
    return service


def app_url(session: Any, dataset: fo.Dataset) -> str:
    """The URL of a dataset in a running App session."""
    return f"{session.url.rstrip('/')}/datasets/{dataset.name}"
