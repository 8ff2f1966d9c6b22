"""Attention visualisation: matplotlib plots and the self-contained HTML page."""
