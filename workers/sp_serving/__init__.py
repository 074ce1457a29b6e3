"""Serving with sequence-parallel prefill: config, the SP model forward, and the ring member."""
