"""The demo: synthetic shapes with exact masks (``data``), the small models shipped with
salience (``zoo``, weights in ``_weights/``), their training recipe (``train``) and the Clever
Hans check (``clever_hans``). ``data`` and ``zoo`` import only the core, so that ``loading`` can
offer ``demo:NAME`` models; ``train`` and ``clever_hans`` sit at the top, beside the CLI."""
