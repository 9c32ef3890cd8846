"""Data sets made locally: the synthetic fill50k circles set."""
