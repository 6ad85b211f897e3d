"""Labelling on a Ray cluster (``run --ray``, ``apply --ray``): needs the ``ray`` extra."""
