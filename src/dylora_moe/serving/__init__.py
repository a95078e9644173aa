"""Serving: a sequence-routed checkpoint as a bundle for multi-LoRA engines (``bundle.py``, ``bundle_route.py``)."""
