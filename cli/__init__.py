"""Command-line front end of selfment-label (installed as ``selfment_label_cli``)."""
