"""Serving guide models over nnInteractive's open client/server protocol (``nnUNetv2_guide_server``)."""
