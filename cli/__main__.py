"""``python -m selfment_label_cli``: the same as the ``selfment-label`` command."""

from .main import app

app(prog_name="selfment-label")
