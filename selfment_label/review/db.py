"""FiftyOne's database: reach it, or say why not and what to do."""

from __future__ import annotations

import logging
from pathlib import Path

INSTALL_HINT = 'pip install -e ".[dev]" ./third_party/fiftyone-db-shim'


class ReviewError(RuntimeError):
    """A run folder cannot be reviewed (missing files, unknown dataset...)."""


class DatabaseError(ReviewError):
    """FiftyOne's database cannot be reached or started."""


def connect() -> None:
    """Start (or reach) FiftyOne's database, turning its failures into a ``DatabaseError``.

    The embedded MongoDB is used unless ``FIFTYONE_DATABASE_URI`` names a server.

    Raises:
      DatabaseError: with the reason and what to do.
    """
    import fiftyone as fo
    from fiftyone.core.config import FiftyOneConfigError
    from fiftyone.core.service import ServiceException

    # mongod 6.0 (the embedded one) is supported but FiftyOne warns about it at each connection.
    logging.getLogger("fiftyone.core.odm.database").setLevel(logging.ERROR)
    uri = fo.config.database_uri
    fix = (
        f"check that the server at FIFTYONE_DATABASE_URI={uri} is up and reachable"
        if uri
        else f"install the embedded database with `{INSTALL_HINT}`, or set "
        "FIFTYONE_DATABASE_URI to a MongoDB server of your own"
    )
    try:
        fo.list_datasets()
    except FiftyOneConfigError as error:
        raise DatabaseError(f"FiftyOne's database is not installed ({error}); {fix}") from None
    except PermissionError as error:
        raise DatabaseError(
            f"{error}; set FIFTYONE_DATABASE_DIR to a writable folder, or {fix}"
        ) from None
    except ServiceException as error:
        log = Path(fo.config.database_dir) / "log" / "mongo.log"
        raise DatabaseError(
            f"FiftyOne's embedded MongoDB did not start ({type(error).__name__}); "
            f"its log is {log}; {fix}"
        ) from None
    except (ConnectionError, RuntimeError) as error:
        raise DatabaseError(f"cannot connect to FiftyOne's database ({error}); {fix}") from None
