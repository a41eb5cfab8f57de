"""Pictures only: colormaps, heatmaps, overlays, figures (``viz``), line plots (``plots``) and
HTML report pages (``report``). Nothing here sees a model: it turns numbers into pixels."""
