"""FiftyOne's database: reach it, or say why not and what to do."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import SelfmentError

INSTALL_HINT = 'pip install -e ".[dev]" ./third_party/fiftyone-db-shim'


class ReviewError(SelfmentError, RuntimeError):
    """A run folder cannot be reviewed (missing files, unknown dataset...)."""


class DatabaseError(ReviewError):
    """FiftyOne's database cannot be reached or started."""


def connect() -> None:
    """Start (or reach) FiftyOne's database, turning its failures into a ``DatabaseError``.

    The embedded MongoDB is used unless ``FIFTYONE_DATABASE_URI`` names a server. FiftyOne
    attaches to an embedded database service already running on the machine whatever
    ``FIFTYONE_DATABASE_DIR`` says; a service of another folder is refused
    (``check_database_dir``), so reviews are never written to one database and read from another.

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
    if not uri:
        check_database_dir()


def check_database_dir() -> None:
    """Refuse an embedded database that serves another folder than the configured one.

    The folder is asked of the server itself (``getCmdLineOpts``), so a service found by
    FiftyOne's process search and a port inherited from a parent process are both checked.

    Raises:
      DatabaseError: the database FiftyOne connected to runs on another ``dbPath``.
    """
    import fiftyone as fo
    from fiftyone.core.odm.database import get_db_client
    from pymongo.errors import PyMongoError

    try:
        options = get_db_client().admin.command("getCmdLineOpts")
        serving = Path(options["parsed"]["storage"]["dbPath"])
    except (PyMongoError, KeyError, TypeError):
        return
    configured = Path(fo.config.database_dir)
    if serving.resolve() != configured.resolve():
        raise DatabaseError(
            f"FiftyOne connected to the database of {serving}, already running on this "
            f"machine, not to FIFTYONE_DATABASE_DIR={configured}: stop the FiftyOne process "
            f"that holds it or set FIFTYONE_DATABASE_DIR={serving}, then run again"
        )
