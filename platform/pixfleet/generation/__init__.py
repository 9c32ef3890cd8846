"""Bulk generation on Ray Data: sources -> stages -> sink (see `plan` for the data flow)."""
