"""Offline tooling for expert-locality zones: calibration data in, zone table out.

The zone-table format (read/write/validate) and the signature pipeline live here and are
imported by the gateway, so that signatures are built by exactly one implementation.
"""
